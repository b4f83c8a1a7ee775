import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from deepres.checkpoint import load_tensors, save_tensors
from deepres.cli import main
from deepres.evaluate import evaluate_run
from deepres.inference import load
from deepres.train import train


@pytest.fixture(scope="module")
def bare_run(tiny_folder, tmp_path_factory):
    """A run trained on a bare <class>/ folder: training images only, no test split."""
    run = tmp_path_factory.mktemp("bare") / "run"
    config = tiny_config(tiny_folder / "train", run, iters=6, precision="fp32")
    train(config, progress=False)
    return run


def test_a_bare_class_folder_is_evaluated_whole(bare_run, tiny_folder, capsys):
    held_out = tiny_folder / "test"  # blue/, green/, red/: one split
    result = evaluate_run(bare_run, str(held_out))
    assert result["split"] == "all" and result["n"] == 18
    assert len(result["per_class_error"]) == 3
    assert main(["eval", str(bare_run), "--data", str(held_out)]) == 0
    assert "(all, 18 images, single)" in capsys.readouterr().out
    # The run's own training images are refused as a test set, as before without --data.
    for args in (["--data", str(tiny_folder / "train")], []):
        assert main(["eval", str(bare_run), *args]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # So is a device that is not one.
    assert main(["eval", str(bare_run), "--data", str(held_out), "--device", "banana"]) == 2
    assert "--device banana: not a device" in capsys.readouterr().err


def test_classes_are_matched_by_name(bare_run, tiny_folder, tmp_path):
    # The same net with its classes in another order: fc's rows follow the names.
    permuted = tmp_path / "permuted"
    shutil.copytree(bare_run, permuted)
    saved = json.loads((permuted / "config.json").read_text())
    order = ["red", "blue", "green"]
    rows = [saved["classes"].index(name) for name in order]
    saved["classes"] = order
    (permuted / "config.json").write_text(json.dumps(saved))
    weights, _ = load_tensors(permuted / "model.safetensors")
    weights["fc.weight"], weights["fc.bias"] = weights["fc.weight"][rows], weights["fc.bias"][rows]
    save_tensors(permuted / "model.safetensors", weights)

    held_out = str(tiny_folder / "test")
    a, b = evaluate_run(bare_run, held_out), evaluate_run(permuted, held_out)
    assert a["top1_error"] == b["top1_error"] and a["top5_error"] == b["top5_error"]
    assert b["per_class_error"] == [a["per_class_error"][i] for i in rows]


def test_other_classes_are_refused_in_one_line_naming_them(bare_run, tiny_folder, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_folder / "test", other)
    (other / "red").rename(other / "purple")
    assert main(["eval", str(bare_run), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "not in the run: purple" in err[0] and "not in the data: red" in err[0]


def test_photos_of_many_sizes_are_tested_through_a_resizing_view(bare_run, tmp_path, capsys):
    photos = tmp_path / "photos"
    for name in ("blue", "green", "red"):
        (photos / name).mkdir(parents=True)
        for i, size in enumerate([(12, 12), (20, 15)]):
            pixels = [0, 0, 0]
            pixels[("red", "green", "blue").index(name)] = 200
            Image.new("RGB", size, tuple(pixels)).save(photos / name / f"{i}.png")
    # The single view takes images at the net's size only, and says which view resizes them.
    assert main(["eval", str(bare_run), "--data", str(photos)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is 20x15 but" in err[0]
    assert err[0].endswith("--protocol center or 10crop resizes and crops each one")
    # The centre view takes them as they are: a bare folder of photos is no longer decoded
    # whole (at one size) to learn whether it is the run's own training data.
    assert main(["eval", str(bare_run), "--data", str(photos), "--protocol", "center"]) == 0
    assert "(all, 6 images, center)" in capsys.readouterr().out


def test_predict_takes_folders(bare_run, tiny_folder, tmp_path, capsys):
    assert main(["predict", str(bare_run), str(tiny_folder / "test"), "--top", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 18  # every image, in the class folders below
    assert lines[0].startswith(str(tiny_folder / "test" / "blue" / "000.png") + ": ")
    assert all(len(line.split(": ")[1].split(", ")) == 1 for line in lines)  # --top 1
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main(["predict", str(bare_run), str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{empty}: no images" in err[0]


def test_predict_in_batches_answers_each_image_as_alone(bare_run, tiny_folder, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(tiny_folder / "test", folder)
    # 18 images in batches of 4: the last batch is short.
    assert main(["predict", str(bare_run), str(folder), "--batch-size", "4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 18 and lines[0]["image"] == str(folder / "blue" / "000.png")
    classifier = load(bare_run)
    for line in lines:
        with Image.open(line["image"]) as image:
            alone = classifier.topk(image, 5)
        assert [c["class"] for c in line["top"]] == [name for name, _ in alone]
        assert [c["probability"] for c in line["top"]] == pytest.approx(
            [p for _, p in alone], abs=1e-5
        )
    # A file that is no image, in the middle of a batch: the images before it are answered,
    # then one line names it.
    (folder / "green" / "002.png").write_text("not an image")
    assert main(["predict", str(bare_run), str(folder), "--batch-size", "4"]) == 2
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 8  # blue's 6, green's 000 and 001
    assert err.strip().count("\n") == 0 and "green/002.png" in err
    for flag in ("--top", "--batch-size"):
        assert main(["predict", str(bare_run), str(folder), flag, "0"]) == 2
        assert capsys.readouterr().err.strip().endswith(f"{flag} 0: must be at least 1")


def broken_pngs() -> dict[str, bytes]:
    """PNGs Pillow refuses in three ways: SyntaxError, ValueError and OSError."""
    out = io.BytesIO()
    Image.new("RGB", (12, 12), (0, 0, 255)).save(out, "PNG")
    png = out.getvalue()
    i = png.index(b"IDAT")
    n = int.from_bytes(png[i - 4 : i], "big")
    # The image data split over two IDAT chunks, the second's type garbled.
    first = (n // 2).to_bytes(4, "big") + b"IDAT" + png[i + 4 : i + 4 + n // 2] + bytes(4)
    second = (n - n // 2).to_bytes(4, "big") + b"\xeb8M(" + png[i + 4 + n // 2 : i + 4 + n]
    return {
        "garbled-chunk.png": png[: i - 4] + first + second + bytes(4) + png[i + 4 + n + 4 :],
        "short-ihdr.png": png[:8] + (5).to_bytes(4, "big") + png[12:],
        "cut.png": png[:20],
    }


def test_predict_names_any_broken_image_after_answering_the_ones_before(
    bare_run, tiny_folder, tmp_path, capsys
):
    good = next((tiny_folder / "test" / "red").iterdir())
    for name, data in broken_pngs().items():
        (tmp_path / name).write_bytes(data)
        assert main(["predict", str(bare_run), str(good), str(tmp_path / name)]) == 2, name
        out, err = capsys.readouterr()
        assert out.startswith(f"{good}: ") and len(out.strip().splitlines()) == 1
        assert err.strip().count("\n") == 0 and f"{tmp_path / name}: not an image" in err
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)  # opened, it would wait for a writer forever
    assert main(["predict", str(bare_run), str(pipe)]) == 2
    assert f"{pipe}: not an image deepres can read (not a regular file)" in capsys.readouterr().err
    for missing in (tmp_path / "absent.png", tmp_path / "dangling.png"):
        if missing.name.startswith("dangling"):
            missing.symlink_to(tmp_path / "nowhere.png")
        assert main(["predict", str(bare_run), str(missing)]) == 2
        assert f"{missing}: not an image deepres can read (no such file)" in capsys.readouterr().err


def test_a_warning_about_an_image_names_it(bare_run, tiny_folder, monkeypatch, capsys):
    image = next((tiny_folder / "test" / "red").iterdir())  # 12x12: 144 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a "decompression bomb" above 100
    assert main(["predict", str(bare_run), str(image)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{image}: Image size (144 pixels) exceeds limit" in err[0]


def test_a_closed_stdout_ends_the_command_quietly():
    # `deepres predict RUN DIR | head`: the reader leaves before the command has printed.
    # Buffered, as a pipe's stdout is unless PYTHONUNBUFFERED is set.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    child = subprocess.Popen(
        [sys.executable, "-m", "deepres.cli", "models", "resnet20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    child.stdout.close()
    _, err = child.communicate(timeout=120)
    assert (child.returncode, err.decode()) == (141, "")


def test_a_relative_data_path_missing_from_here_asks_for_data(bare_run, tiny_folder, tmp_path):
    # The run records its data as given: relative to where it was trained.
    moved = tmp_path / "moved"
    shutil.copytree(bare_run, moved)
    saved = json.loads((moved / "config.json").read_text())
    saved["config"]["data"] = "../somewhere/train"
    del saved["data_path"]  # as in runs trained before it was recorded
    (moved / "config.json").write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match=r"training data \.\./somewhere/train is not found"):
        evaluate_run(moved)
    assert evaluate_run(moved, str(tiny_folder / "test"))["n"] == 18


def test_a_run_given_a_relative_path_finds_its_data_from_another_folder(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data" / "colours"
    shutil.copytree(tiny_folder, data)
    monkeypatch.chdir(data.parent)
    run = tmp_path / "run"
    config = tiny_config("colours", run, iters=4, checkpoint_every=2, precision="fp32")
    train(config, stop_at=2, progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # Resumed and evaluated from a folder where "colours" means nothing.
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["n"] == 18
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["data"] == "colours" and saved["data_path"] == str(data)
    # With the data gone from both places, one line asks for --data; the run is untouched.
    shutil.rmtree(data)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "colours" in err and "--data" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_eval_of_the_val_split_refuses_data_that_changed_since_training(tiny_folder, tmp_path):
    data = tmp_path / "colours"
    shutil.copytree(tiny_folder / "train", data)
    run = tmp_path / "run"
    summary = train(tiny_config(data, run, iters=4, val_split=12), progress=False)
    assert evaluate_run(run, split="val")["top1_error"] == summary["val_error"]
    # One image fewer: the val split drawn from the count would be other images, most of them
    # trained on, and its error a training error.
    (data / "red" / "000.png").unlink()
    with pytest.raises(ValueError, match="71 training images, where .* was split from 72; its val"):
        evaluate_run(run, split="val")


def test_an_fp32_run_is_evaluated_without_tf32_as_it_trained(bare_run, tiny_folder, monkeypatch):
    from deepres import evaluate

    seen = []
    predict = evaluate.predict_logits

    def spy(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return predict(*args, **kwargs)

    monkeypatch.setattr(evaluate, "predict_logits", spy)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    evaluate_run(bare_run, str(tiny_folder / "test"))
    # cuDNN's TF32 (PyTorch's default on Ampere and later GPUs) off while it scores, as in
    # training's own evaluation, and back on after.
    assert seen == [(False, False)] and torch.backends.cudnn.allow_tf32
