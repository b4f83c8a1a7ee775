import argparse
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image

import deepres
from deepres import report
from deepres import train as train_module
from deepres.checkpoint import CHECKPOINT, checkpoint_state, load_checkpoint, load_tensors
from deepres.cli import build_parser, main
from deepres.data import open_dataset
from deepres.data.loader import split_train_val
from deepres.evaluate import error_rates
from deepres.experiments.common import run_result
from deepres.inference import parse_device
from deepres.models import create_model
from deepres.provenance import git_commit, git_dirty, machine
from deepres.recipes import RECIPES, default_recipe, get_recipe
from deepres.report import find_runs, read_metrics, run_status
from deepres.train import Diverged, TrainConfig, load_config, resolve_precision, train


def comparable(metrics):
    return [{k: v for k, v in m.items() if k not in ("seconds", "images_per_sec")} for m in metrics]


def test_resumed_run_ends_with_exactly_the_same_weights(tiny_folder, tmp_path):
    whole = tiny_config(tiny_folder, tmp_path / "whole")
    train(whole, progress=False)
    stopped = replace(whole, out=str(tmp_path / "stopped"))
    first = train(stopped, stop_at=5, progress=False)  # between checkpoints and log windows
    assert not first["finished"]
    assert not (tmp_path / "stopped" / "summary.json").exists()
    train(load_config(tmp_path / "stopped"), resume=True, stop_at=9, progress=False)
    train(load_config(tmp_path / "stopped"), resume=True, progress=False)
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    b = (tmp_path / "stopped" / "model.safetensors").read_bytes()
    assert a == b
    assert comparable(read_metrics(tmp_path / "whole")) == comparable(
        read_metrics(tmp_path / "stopped")
    )
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["finished"]
    # config.json keeps where each resumed stretch trained; a run never resumed has no list.
    saved = json.loads((tmp_path / "stopped" / "config.json").read_text())
    assert [r["iteration"] for r in saved["resumed"]] == [5, 9]
    for r in saved["resumed"]:
        assert r["device"] == saved["device"] and r["torch"] == torch.__version__
        assert "git_commit" in r and "git_dirty" in r
    assert "resumed" not in json.loads((tmp_path / "whole" / "config.json").read_text())


def test_a_half_written_last_metrics_line_is_dropped_on_resume(tiny_folder, tmp_path):
    whole = tiny_config(tiny_folder, tmp_path / "whole", iters=8)
    train(whole, progress=False)
    killed = replace(whole, out=str(tmp_path / "killed"))
    train(killed, stop_at=6, progress=False)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    # A kill during the append of iteration 8's record: part of a line, no newline.
    metrics.write_text(metrics.read_text() + '{"iteration": 8, "train_lo')
    assert [m["iteration"] for m in read_metrics(tmp_path / "killed")] == [2, 4, 6]
    # A whole line that is not a record is damage, not a kill: named, never dropped quietly.
    text = metrics.read_text()
    for bad in ('{"iteration": 8}\n', '{"iteration": 8, "images": 0}\n', "garbage\n"):
        metrics.write_text(text.replace("\n", "\n" + bad, 1))
        with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not a training record"):
            read_metrics(tmp_path / "killed")
    metrics.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match="metrics.jsonl: not text"):
        read_metrics(tmp_path / "killed")
    metrics.write_text(text)
    train(load_config(tmp_path / "killed"), resume=True, progress=False)
    assert comparable(read_metrics(tmp_path / "whole")) == comparable(
        read_metrics(tmp_path / "killed")
    )


def test_a_different_seed_gives_different_weights(tiny_folder, tmp_path):
    train(tiny_config(tiny_folder, tmp_path / "a", iters=2), progress=False)
    train(tiny_config(tiny_folder, tmp_path / "b", iters=2, seed=1), progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_run_directory_contents_and_metrics(tiny_folder, tmp_path):
    summary = train(tiny_config(tiny_folder, tmp_path / "run", val_split=12), progress=False)
    run = tmp_path / "run"
    for name in [
        "config.json",
        "model.safetensors",
        "preprocess.safetensors",
        CHECKPOINT,
        "metrics.jsonl",
        "curves.png",
        "summary.json",
    ]:
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["blue", "green", "red"]
    assert config["input_size"] == [3, 12, 12]
    assert config["n_train"] == 60 and config["eval_split"] == "val"
    # (None in a copy of deepres without its .git, as git_commit() is there.)
    assert config["git_commit"] == git_commit() and config["git_dirty"] == git_dirty()
    assert git_commit() is None or len(git_commit()) == 40
    assert config["recipe"]["milestones"] == [6, 9]
    # The paper's per-pixel mean: the mean image of the training images alone, std one.
    tensors, _ = load_tensors(run / "preprocess.safetensors")
    dataset = open_dataset(str(tiny_folder))
    train_index, _ = split_train_val(len(dataset.labels), 12)
    expected = dataset.images[train_index].double().mean(0) / 255
    assert config["normalize"] == "pixel" and tensors["mean"].shape == (3, 12, 12)
    assert torch.allclose(tensors["mean"].double(), expected, atol=1e-6)
    assert torch.equal(tensors["std"], torch.ones(3, 1, 1))
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    assert [m["lr"] for m in metrics] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001, 0.001])
    # Evaluated every eval_every (4) iterations, and not in between.
    assert [m["iteration"] for m in metrics if "val_error" in m] == [4, 8, 12]
    assert summary["eval_split"] == "val" and summary["val_error"] == metrics[-1]["val_error"]
    assert all(0 <= m["train_error"] <= 100 for m in metrics)


def test_warmup_recipe_holds_lr_low_until_training_error_below_80(
    tiny_folder, tmp_path, monkeypatch
):
    # Three classes start near 67% error, so the warm-up ends after the first window...
    config = tiny_config(tiny_folder, tmp_path / "w", iters=16, recipe="cifar-warmup")
    train(config, stop_at=4, progress=False)
    # ...and a resumed run knows it ended: it does not warm up again (milestones at 8 and 12).
    # It goes on with the recipe its config.json recorded, whatever the code's is now.
    warm = RECIPES["cifar-warmup"]
    monkeypatch.setitem(RECIPES, "cifar-warmup", replace(warm, lr=0.5, milestones=(4, 6)))
    train(load_config(tmp_path / "w"), resume=True, progress=False)
    lrs = [m["lr"] for m in read_metrics(tmp_path / "w")]
    assert lrs[:4] == [0.01, 0.1, 0.1, 0.1] and lrs[4] == pytest.approx(0.01)
    # With an error threshold never reached, the run stays at the warm-up lr until the
    # schedule falls below it: the second milestone (12) still divides it by 10.
    monkeypatch.setitem(RECIPES, "cifar-warmup", replace(warm, warmup_until_error=0.0))
    train(replace(config, out=str(tmp_path / "never")), progress=False)
    lrs = [m["lr"] for m in read_metrics(tmp_path / "never")]
    assert lrs == pytest.approx([0.01] * 6 + [0.001] * 2)


def test_recipes_are_the_papers():
    cifar = get_recipe("cifar")
    assert (cifar.lr, cifar.momentum, cifar.weight_decay, cifar.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (cifar.iters, cifar.milestones) == (64_000, (32_000, 48_000))
    assert [cifar.lr_at(i, False) for i in (0, 31_999, 32_000, 48_000)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001]
    )
    assert cifar.scaled(6400).milestones == (3200, 4800)
    warm = RECIPES["cifar-warmup"]
    assert warm.lr_at(10, warming_up=True) == 0.01 and warm.lr_at(10, warming_up=False) == 0.1
    # The warm-up caps the schedule: milestones still divide a run that is warming up, and an
    # --lr below the warm-up's holds from the first iteration.
    assert [warm.lr_at(i, True) for i in (31_999, 32_000, 48_000)] == pytest.approx(
        [0.01, 0.01, 0.001]
    )
    assert replace(warm, lr=0.001).lr_at(0, warming_up=True) == pytest.approx(0.001)
    assert warm.warmed_up(0.79) and not warm.warmed_up(0.80)
    assert default_recipe("resnet110") == "cifar-warmup" and default_recipe("resnet56") == "cifar"
    # The warm-up is CIFAR's (Sec. 4.2): ImageNet's deep nets on the in-memory path start at 0.1.
    assert default_recipe("plain110") == "cifar-warmup" and default_recipe("resnet152") == "cifar"


def test_error_rates_hand_checked():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 0],  # label 0: right
            [0.0, 9, 8, 7, 6, 5, 4],  # label 2: top-1 wrong, in top-5
            [0.0, 1, 2, 3, 4, 5, 9],  # label 0: wrong, not in top-5
            [0.0, 1, 2, 3, 4, 9, 5],  # label 5: right
        ]
    )
    labels = torch.tensor([0, 2, 0, 5])
    result = error_rates(logits, labels)
    assert result["top1_error"] == 50.0
    assert result["top5_error"] == 25.0
    assert result["n"] == 4
    assert result["per_class_error"] == [50.0, None, 100.0, None, None, 0.0, None]


def test_cli_train_eval_predict_load(tiny_folder, tmp_path, capsys):
    run = tmp_path / "cli"
    args = [
        "train",
        "--model",
        "resnet20",
        "--data",
        str(tiny_folder),
        "--out",
        str(run),
        "--iters",
        "6",
        "--batch-size",
        "16",
        "--width",
        "4",
        "--quiet",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] and summary["iteration"] == 6

    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"top1_error", "top5_error", "n"}
    assert result["n"] == 18 and result["top5_error"] == 0.0  # 3 classes: always in the top 5
    # top-1 is the error of the net's own predictions on the test split.
    test = open_dataset(str(tiny_folder), "test")
    wrong = deepres.load(run)(test.images).argmax(1) != test.labels
    assert result["top1_error"] == pytest.approx(100 * wrong.float().mean().item())
    assert main(["eval", str(run)]) == 0
    table = capsys.readouterr().out
    assert "top-1 error" in table and "green" in table

    image = tiny_folder / "test" / "red" / "000.png"
    assert main(["predict", str(run), str(image)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(str(image)) and all(c in line for c in ("red", "green", "blue"))

    classifier = deepres.load(run)
    # The first class printed is the net's most likely one.
    likeliest = classifier.classes[classifier(classifier.to_tensor(Image.open(image))).argmax()]
    assert line.split(": ")[1].startswith(likeliest + " ")
    with Image.open(image) as im:
        top = classifier.topk(im, k=2)
    assert len(top) == 2 and sum(p for _, p in top) <= 1.0 + 1e-6
    batch = classifier.to_tensor(Image.open(image))
    assert batch.shape == (1, 3, 12, 12) and batch.dtype == torch.uint8
    assert torch.allclose(classifier(batch).sum(1), torch.ones(1))

    # The same out again must not overwrite the finished run.
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    # One that stopped before its first checkpoint (out of memory at the first step) has
    # nothing to resume, and the line says so rather than sending the user to --resume.
    (run / "summary.json").unlink()
    (run / "checkpoint.safetensors").unlink()
    assert main(args) == 2
    assert "stopped before its first checkpoint, so there is nothing to resume" in one_line(capsys)


def test_a_run_before_its_first_checkpoint_in_another_process_is_not_called_stopped(
    tiny_folder, tmp_path, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # written at the start, no checkpoint yet
    args = ["train", "--model", "resnet20", "--data", str(tiny_folder), "--out", str(run)]
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the training process holds it
        assert main([*args, "--quiet"]) == 2
        assert "another process is training this run" in one_line(capsys)
    finally:
        os.close(fd)
    assert main([*args, "--quiet"]) == 2
    assert "stopped before its first checkpoint" in one_line(capsys)


def test_resuming_a_run_that_is_not_there_says_so(tiny_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="run: no such run directory"):
        train(tiny_config(tiny_folder, tmp_path / "run"), resume=True, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_new_run_never_writes_into_a_folder_with_files(tiny_folder, tmp_path, capsys):
    args = ["train", "--model", "resnet20", "--width", "4", "--data", str(tiny_folder)]
    args += ["--iters", "2", "--batch-size", "8", "--device", "cpu", "--quiet", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"someone's weights")
    (mine / "metrics.jsonl").write_text("someone's notes\n")
    assert main([*args, str(mine)]) == 2
    assert "a folder with files in it, not a run" in one_line(capsys)
    assert (mine / "model.safetensors").read_bytes() == b"someone's weights"
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl", "model.safetensors"]
    # An empty folder is a fine place for a new run.
    (tmp_path / "empty").mkdir()
    assert main([*args, str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "summary.json").is_file()


def test_cli_train_passes_every_flag_to_the_run(monkeypatch, capsys):
    # Each flag at a value other than its default: one that stopped reaching TrainConfig would
    # leave the default behind.
    configs = []
    monkeypatch.setattr(
        "deepres.cli.train", lambda config, **_: configs.append(config) or {"finished": True}
    )
    flags = {
        "--model": "resnet32", "--data": "D", "--out": "O", "--recipe": "cifar-warmup",
        "--iters": "7", "--batch-size": "9", "--lr": "0.05", "--val-split": "11", "--seed": "5",
        "--eval-every": "3", "--checkpoint-every": "4", "--precision": "fp32", "--shortcut": "B",
        "--stride-in": "3x3", "--width": "8", "--normalize": "channel", "--image-size": "24",
        "--init": "resnet20-cifar10", "--augment": "rrc", "--crop-size": "112",
        "--scale": "128,160", "--lighting": "0", "--workers": "1", "--device": "cpu",
    }  # fmt: skip
    switches = ["--deterministic", "--compile", "--no-cuda-graph", "--freeze-backbone", "--quiet"]
    assert main(["train", *[x for kv in flags.items() for x in kv], *switches]) == 0
    expected = TrainConfig(
        model="resnet32", data="D", out="O", recipe="cifar-warmup", iters=7, batch_size=9,
        lr=0.05, val_split=11, seed=5, eval_every=3, checkpoint_every=4, precision="fp32",
        shortcut="B", stride_in="3x3", width=8, normalize="channel", image_size=24,
        init="resnet20-cifar10", augment="rrc", crop_size=112, scale=[128, 160], lighting=0.0,
        workers=1, device="cpu", deterministic=True, compile=True, cuda_graph=False,
        freeze_backbone=True,
    )  # fmt: skip
    assert configs == [expected]
    defaults = TrainConfig(model="resnet32", data="D", out="O")
    same = [k for k, v in asdict(expected).items() if v == getattr(defaults, k)]
    assert same == ["model", "data", "out", "epochs", "log_every", "channels_last"]
    assert main(["train", "--model", "resnet20", "--data", "D", "--out", "O", "--epochs", "3"]) == 0
    assert (configs[-1].epochs, configs[-1].iters) == (3, None)
    capsys.readouterr()


def test_cli_errors_are_one_line(tiny_folder, tmp_path, capsys):
    # argparse's own errors too: no usage banner before them.
    for argv in (["train", "--iters", "abc"], ["trian"], ["eval"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert one_line(capsys).endswith("--help)"), argv
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing" in err[0]
    assert (
        main(
            [
                "train",
                "--model",
                "resnet20",
                "--data",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "r"),
                "--iters",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
    run = tmp_path / "corrupt"
    train(tiny_config(tiny_folder, run, iters=2), progress=False)
    (run / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and CHECKPOINT in err[0]
    not_image = tmp_path / "x.jpg"
    not_image.write_text("hello")
    assert main(["predict", str(run), str(not_image)]) == 2
    assert "x.jpg" in capsys.readouterr().err
    # A config.json that is valid JSON of the wrong shape is named, by every command.
    config = run / "config.json"
    good = config.read_text()
    damaged = json.loads(good)
    damaged["config"]["iters"] = "lots"
    fewer = {**json.loads(good), "classes": ["blue", "green"]}
    bogus = json.loads(good)
    bogus["model_options"]["bogus"] = 1
    sizeless = json.loads(good)
    del sizeless["config"]["image_size"]
    for text, why in (
        ("{}", "'model' missing or damaged"),
        ("[]", "'model' missing"),
        (json.dumps(damaged), "its settings are damaged"),
        (json.dumps(fewer), "names 2 classes for a net of 3"),
        (json.dumps(bogus), "resnet20 takes no option 'bogus'"),
        (json.dumps({**json.loads(good), "model": "resnet7"}), "unknown model 'resnet7'"),
        (json.dumps(sizeless), "'image_size' missing or damaged"),
    ):
        config.write_text(text)
        for args in (
            ["train", "--resume", str(run)],
            ["predict", str(run), str(not_image)],
            ["eval", str(run)],
            ["export", str(run), "--onnx", str(tmp_path / "m.onnx")],
        ):
            if why.startswith("its") and args[0] != "train":
                continue  # the others do not read the training settings
            assert main(args) == 2, (text, args)
            line = one_line(capsys)
            assert f"{config}: " in line and why in line, (line, args)
    config.write_text(good)


def test_compiled_training_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    compiled = []
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or original(model))
    whole = tiny_config(tiny_folder, tmp_path / "whole", iters=4, compile=True)
    train(whole, progress=False)
    stopped = replace(whole, out=str(tmp_path / "stopped"))
    train(stopped, stop_at=3, progress=False)
    train(load_config(tmp_path / "stopped"), resume=True, progress=False)
    # Each session compiled its net, the resumed one too.
    assert len(compiled) == 3 and load_config(tmp_path / "stopped").compile
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "stopped" / "model.safetensors").read_bytes()


def test_bf16_autocast_trains_fp32_weights(tiny_folder, tmp_path):
    train(tiny_config(tiny_folder, tmp_path / "fp32", iters=4, precision="fp32"), progress=False)
    train(tiny_config(tiny_folder, tmp_path / "bf16", iters=4, precision="bf16"), progress=False)
    metrics = read_metrics(tmp_path / "bf16")
    assert all(m["train_loss"] == m["train_loss"] for m in metrics)  # no NaN
    # Autocast computes in bf16; the weights, their momentum and the saved files stay fp32.
    assert [m["precision"] for m in metrics] == ["bf16"] * len(metrics)
    saved, _ = load_tensors(tmp_path / "bf16" / "model.safetensors")
    state, _ = load_tensors(tmp_path / "bf16" / CHECKPOINT)
    floats = [t for t in [*saved.values(), *state.values()] if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    assert (tmp_path / "fp32" / "model.safetensors").read_bytes() != (
        tmp_path / "bf16" / "model.safetensors"
    ).read_bytes()
    with pytest.raises(ValueError, match="precision"):
        train(tiny_config(tiny_folder, tmp_path / "fp16", precision="fp16"), progress=False)


def files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory, hidden ones included, by name."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_run_another_process_trains_is_not_resumed_beside_it(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run), stop_at=4, progress=False)
    before = files(run)
    # Another training process holds the run directory (a flock, as a session takes it).
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--resume", str(run), "--quiet"]) == 2
        assert one_line(capsys).endswith(
            f"{run}: another process is training this run; stop "
            "it first (SIGTERM checkpoints it) or wait for it to finish"
        )
        assert files(run) == before
    finally:
        os.close(fd)
    # Let go, it resumes; and a finished session lets go of the run too.
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert checkpoint_state(run)["iteration"] == 12
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_copied_run_resumes_where_it_is_and_leaves_the_original(tiny_folder, tmp_path, capsys):
    original = tmp_path / "original"
    train(tiny_config(tiny_folder, original, iters=8), stop_at=4, progress=False)
    saved = json.loads((original / "config.json").read_text())
    assert "out" not in saved["config"]  # the directory is the run
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    # A config.json from before this change records out: the directory given still wins.
    saved["config"]["out"] = str(original)
    (copy / "config.json").write_text(json.dumps(saved))
    before = files(original)
    assert main(["train", "--resume", str(copy), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == str(copy)
    assert json.loads((copy / "config.json").read_text())["resumed"][-1]["compile"] is False
    assert json.loads((copy / "summary.json").read_text())["iteration"] == 8
    assert [m["iteration"] for m in read_metrics(copy)] == [2, 4, 6, 8]
    assert files(original) == before


def test_resume_refuses_flags_that_would_change_the_run(tiny_folder, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=8), stop_at=4, progress=False)
    before = files(run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--seed", "5", "--quiet"]) == 2
    assert one_line(capsys).endswith(
        f"{run}: --resume continues the run as it was configured; --epochs, --seed cannot"
        " change it (only --data where the data moved, --lr, --precision, --device,"
        " --workers, --checkpoint-every, --compile and --cuda-graph can)"
    )
    # Given at its default value, a flag is still given: refused, not silently ignored.
    assert main(["train", "--resume", str(run), "--seed=0", "--val-split", "0"]) == 2
    assert "; --val-split, --seed cannot change it" in one_line(capsys)
    assert files(run) == before
    saves = record_saves(monkeypatch)
    resume = ["train", "--resume", str(run), "--device", "cpu", "--checkpoint-every", "3"]
    assert main([*resume, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["iteration"] == 8
    assert saves == [6, 8]
    # A flag given with the value of its default still counts: 1000 is not the run's 4.
    train(tiny_config(tiny_folder, tmp_path / "again", iters=12), stop_at=4, progress=False)
    saves.clear()
    again = ["train", "--resume", str(tmp_path / "again"), "--checkpoint-every", "1000"]
    assert main([*again, "--quiet"]) == 0
    assert saves == [12]


def test_a_run_resumes_with_data_where_its_data_moved(tiny_folder, tmp_path, capsys):
    data = tmp_path / "colours"
    shutil.copytree(tiny_folder, data)
    run = tmp_path / "run"
    train(tiny_config(data, run, iters=8), stop_at=4, progress=False)
    moved = tmp_path / "moved"
    data.rename(moved)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert one_line(capsys).endswith(
        f"{data}: no such file or directory, where {run} trained on it; --resume RUN --data PATH"
        " goes on where it moved"
    )
    assert main(["train", "--resume", str(run), "--data", str(moved), "--quiet"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["data_path"] == saved["config"]["data"] == saved["resumed"][-1]["data"]
    assert saved["data_path"] == str(moved) and saved["data_source"].startswith(str(moved))
    whole = tmp_path / "whole"
    train(tiny_config(moved, whole, iters=8), progress=False)
    assert (run / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(run), "--data", str(tmp_path / "typo"), "--quiet"]) == 2
    assert one_line(capsys).endswith(f"{tmp_path / 'typo'}: no such file or directory")
    # A caller that gives the data on each resume (reproduce, a GPU machine's copy) leaves the
    # run's own place as it was.
    elsewhere = tmp_path / "copy"
    shutil.copytree(moved, elsewhere)
    run3 = tmp_path / "run3"
    train(tiny_config(moved, run3, iters=8), stop_at=4, progress=False)
    train(replace(load_config(run3), data=str(elsewhere)), resume=True, progress=False)
    saved = json.loads((run3 / "config.json").read_text())
    assert saved["data_path"] == saved["config"]["data"] == str(moved)
    assert "data" not in saved["resumed"][-1]
    # Other data is refused as ever.
    run2 = tmp_path / "run2"
    train(tiny_config(moved, run2, iters=8), stop_at=4, progress=False)
    shutil.rmtree(moved / "test")
    assert main(["train", "--resume", str(run2), "--data", str(moved), "--quiet"]) == 2
    assert "not the data" in one_line(capsys)


def test_resume_refuses_data_other_than_the_run_started_on(tiny_folder, tmp_path):
    data = tmp_path / "colours"
    shutil.copytree(tiny_folder, data)
    run = tmp_path / "run"
    train(tiny_config(data, run, iters=8), stop_at=4, progress=False)
    before = files(run)

    def refused(why: str) -> None:
        with pytest.raises(ValueError, match=f"^{data}: not the data {run} started on \\({why}\\)"):
            train(load_config(run), resume=True, progress=False)
        assert files(run) == before

    # One image fewer would move the held-out split; a renamed class would swap labels.
    gone = data / "train" / "red" / "000.png"
    kept = gone.read_bytes()
    gone.unlink()
    refused("72 training images then, 71 now")
    gone.write_bytes(kept)
    (data / "test" / "blue" / "000.png").unlink()
    refused("18 held-out images then, 17 now")
    shutil.rmtree(data / "test")
    shutil.copytree(tiny_folder / "test", data / "test")
    for split in ("train", "test"):
        (data / split / "red").rename(data / split / "crimson")
    refused("other classes: no red; new crimson")
    for split in ("train", "test"):
        (data / split / "crimson").rename(data / split / "red")
    (data / "test").rename(tmp_path / "elsewhere")
    refused("18 held-out images then, none now")
    (tmp_path / "elsewhere").rename(data / "test")
    # As many images in the same classes but other pixels: said, and resumed.
    Image.new("RGB", (12, 12), (1, 2, 3)).save(gone)
    with pytest.warns(UserWarning, match="differ in content from those"):
        summary = train(load_config(run), resume=True, progress=False)
    assert summary["iteration"] == 8


def test_an_out_inside_the_training_data_is_refused(tiny_folder, tmp_path):
    data = tmp_path / "colours"
    shutil.copytree(tiny_folder, data)
    with pytest.raises(ValueError, match=f"--out {data / 'train' / 'run'}: inside the training"):
        train(tiny_config(data, data / "train" / "run"), progress=False)
    assert not (data / "train" / "run").exists()
    # A run that got there before is not stranded: it resumes (its data check is the guard).
    run = tmp_path / "run"
    train(tiny_config(data, run, iters=8), stop_at=4, progress=False)
    shutil.move(run, data / "run")
    config = replace(load_config(data / "run"), data=str(data))
    assert train(config, resume=True, progress=False)["iteration"] == 8


def test_a_gray_run_sees_a_colour_test_image_in_gray_and_refuses_other_sizes(tmp_path):
    for split, n in (("train", 8), ("test", 2)):
        for name, level in (("dark", 40), ("light", 200)):
            for i in range(n):
                (tmp_path / "d" / split / name).mkdir(parents=True, exist_ok=True)
                Image.new("L", (12, 12), level + i).save(tmp_path / "d" / split / name / f"{i}.png")
    # One colour photo among the gray test images made that split RGB: a net of one channel
    # failed on it with a traceback at its first evaluation.
    Image.new("RGB", (12, 12), (250, 10, 10)).save(tmp_path / "d" / "test" / "dark" / "0.png")
    summary = train(tiny_config(tmp_path / "d", tmp_path / "run", iters=4), progress=False)
    assert summary["eval_split"] == "test" and 0 <= summary["test_error"] <= 100
    _, _, (_, images, _) = train_module._open_data(tiny_config(tmp_path / "d", tmp_path / "x"))
    gray = Image.new("RGB", (1, 1), (250, 10, 10)).convert("L").getpixel((0, 0))
    assert images.shape == (4, 1, 12, 12) and images[0].unique().tolist() == [gray]
    for path in (tmp_path / "d" / "test").rglob("*.png"):
        Image.new("L", (10, 10), 3).save(path)
    with pytest.raises(ValueError, match="test images are 10x10, its training images 12x12"):
        train_module._open_data(tiny_config(tmp_path / "d", tmp_path / "y"))


def test_train_puts_global_torch_state_back_as_it_found_it(tiny_folder, tmp_path):
    # Set to what a deterministic fp32 run changes, so that each must come back.
    torch.use_deterministic_algorithms(False, warn_only=True)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    seen = {}

    def spy(*args, **kwargs):
        seen["tf32"] = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        return step(*args, **kwargs)

    step = train_module._step
    config = tiny_config(tiny_folder, tmp_path / "run", iters=2, deterministic=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module, "_step", spy)
            train(replace(config, precision="fp32"), progress=False)
        # fp32 is fp32 while it trains, not cuDNN's TF32 on the GPUs that have it...
        assert seen["tf32"] == (False, False)
        # ...and a program that called train() goes on as it was: no deterministic-only
        # errors, the autotuner it asked for, its random numbers where it left them.
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False


def test_the_summary_gives_the_training_error_as_the_reports_do(tiny_folder, tmp_path):
    run = tmp_path / "run"
    # A rate this low keeps the net near chance, so its last records' errors differ.
    config = tiny_config(
        tiny_folder, run, iters=256, log_every=1, lr=1e-4, eval_every=256, checkpoint_every=256
    )
    summary = train(config, progress=False)
    metrics = read_metrics(run)
    # The mean over the last 1/128 (here the last two records), not the last record alone:
    # told apart by the loss, which unlike an error over 16 images does not tie.
    tail = metrics[-2:]
    assert tail[0]["train_loss"] != tail[1]["train_loss"]
    error = sum(m["train_error"] for m in tail) / 2
    assert summary["train_error"] == pytest.approx(error)
    assert summary["train_loss"] == pytest.approx(sum(m["train_loss"] for m in tail) / 2)
    assert json.loads((run / "summary.json").read_text())["train_error"] == pytest.approx(error)


def test_resume_may_switch_compile_and_cuda_graphs_on_or_off(tiny_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=8, compile=True), stop_at=2, progress=False)
    configs = []
    monkeypatch.setattr(
        "deepres.cli.train", lambda config, **_: configs.append(config) or {"finished": True}
    )
    for flags in ([], ["--no-compile"], ["--compile"], ["--no-cuda-graph"]):
        assert main(["train", "--resume", str(run), *flags, "--quiet"]) == 0
    assert [c.compile for c in configs] == [True, False, True, True]
    assert [c.cuda_graph for c in configs] == [True, True, True, False]
    # What a new run gets without the flags.
    assert main(["train", "--model", "resnet20", "--data", "D", "--out", "O"]) == 0
    assert configs[-1].compile is False
    assert configs[-1].cuda_graph is True


def record_saves(monkeypatch) -> list[int]:
    """The iterations at which training saves a checkpoint from now on."""
    saves, save = [], train_module._save
    monkeypatch.setattr(train_module, "_save", lambda s, i, w: (saves.append(i), save(s, i, w)))
    return saves


def test_divergence_stops_keeps_the_finite_checkpoint_and_resumes_with_a_new_lr(
    tiny_folder, tmp_path, capsys
):
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run), stop_at=4, progress=False)
    before = files(run)
    assert main(["train", "--resume", str(run), "--lr", "1e9", "--quiet"]) == 2
    line = one_line(capsys)
    assert f"{run}: training diverged at iteration" in line
    assert "train loss nan" in line or "train loss inf" in line
    assert "keeps iteration 4" in line
    assert line.endswith("--lr LOWER (it was 1e+09, 1e+08 in its last steps)")
    # The checkpoint and weights of iteration 4 are kept as they were, and finite.
    assert files(run)[CHECKPOINT] == before[CHECKPOINT]
    assert files(run)["model.safetensors"] == before["model.safetensors"]
    weights, _ = load_tensors(run / "model.safetensors")
    assert all(w.isfinite().all() for w in weights.values())
    assert "summary.json" not in files(run)

    assert main(["train", "--resume", str(run), "--lr", "0.05", "--quiet"]) == 0
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    # lr 0.1 up to the checkpoint, the new lr after it, with the milestones (6, 9) as before.
    assert [m["lr"] for m in metrics] == pytest.approx([0.1, 0.1, 0.05, 0.005, 0.0005, 0.0005])
    assert all(math.isfinite(m["train_loss"]) for m in metrics)
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["lr"] == saved["recipe"]["lr"] == 0.05
    assert saved["lr_changes"][-1] == {"iteration": 4, "lr": 0.05}
    assert load_config(run).lr == 0.05


def test_the_divergence_line_gives_the_rate_its_last_steps_ran_at():
    # --lr sets the base rate; past a milestone, or warming up, the steps ran at less.
    recipe = replace(get_recipe("cifar").scaled(12), lr=1.0)  # milestones at 6 and 9
    s = argparse.Namespace(
        run=Path("r"), saved_at=4, recipe=recipe, state={"warming_up": False}, last_loss=math.nan
    )
    assert str(train_module._diverged(s, 6, "x")).endswith("(it was 1)")  # steps 4, 5
    assert str(train_module._diverged(s, 8, "x")).endswith("(it was 1, 0.1 in its last steps)")


def test_a_run_that_diverges_before_its_first_checkpoint_saves_nothing(tiny_folder, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Diverged, match=r"diverged at iteration \d+.*no checkpoint was saved"):
        train(tiny_config(tiny_folder, run, lr=1e9, checkpoint_every=100), progress=False)
    assert not (run / CHECKPOINT).exists() and not (run / "model.safetensors").exists()


def test_a_failing_writer_ends_in_one_line_and_keeps_the_checkpoint(
    tiny_folder, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=8), stop_at=4, progress=False)
    before = files(run)
    write_bytes = Path.write_bytes

    def disk_fills(self, data):
        write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", disk_fills)
        assert main(["train", "--resume", str(run), "--quiet"]) == 2
    line = one_line(capsys)
    assert line.startswith("deepres train: error: ")
    assert f"{run / CHECKPOINT}: cannot write (No space left on device)" in line
    after = files(run)
    assert after[CHECKPOINT] == before[CHECKPOINT]
    assert set(after) == set(before)  # no temp file left behind
    model = create_model("resnet20", num_classes=3, width=4)
    state = load_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert state["iteration"] == 4
    # With room again, the run resumes from that checkpoint and ends.
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [m["iteration"] for m in read_metrics(run)] == [2, 4, 6, 8]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, where the machine lets this process mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command on this machine")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_ends_in_one_line_and_keeps_the_checkpoint(tiny_folder, small_disk, capsys):
    run = small_disk / "run"
    train(tiny_config(tiny_folder, run, iters=8), stop_at=4, progress=False)
    before = files(run)
    stat = os.statvfs(small_disk)
    # Room for a few metrics lines, not for another checkpoint.
    (small_disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 8192))
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"deepres train: error: {run}/") and line.endswith(
        ": cannot write (No space left on device)"
    )
    after = files(run)
    assert after[CHECKPOINT] == before[CHECKPOINT]
    assert set(after) == set(before)  # no temp file left behind
    assert all(m["iteration"] <= 8 for m in read_metrics(run))  # whole lines only
    (small_disk / "filler").unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [m["iteration"] for m in read_metrics(run)] == [2, 4, 6, 8]


def fake_cpu(tmp_path: Path, monkeypatch, flags: str) -> None:
    cpuinfo = tmp_path / f"cpuinfo-{len(flags)}"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    monkeypatch.setattr(train_module, "_CPUINFO", cpuinfo)


def test_precision_auto_is_bf16_only_on_cpus_with_bf16_units(tmp_path, monkeypatch, recwarn):
    cpu = torch.device("cpu")
    for flags in ("avx512f avx512_bf16", "amx_tile amx_bf16"):
        fake_cpu(tmp_path, monkeypatch, flags)
        assert resolve_precision("auto", cpu) == "bf16"
        assert resolve_precision("bf16", cpu) == "bf16"
    assert not recwarn.list  # native bf16: no warning
    fake_cpu(tmp_path, monkeypatch, "avx512f")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp32", cpu) == "fp32"
    assert not recwarn.list
    with pytest.warns(UserWarning, match="emulated.*far slower") as caught:
        assert resolve_precision("bf16", cpu) == "bf16"
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert build_parser().parse_args(["train"]).precision == "auto"
    assert TrainConfig(model="m", data="d", out="o").precision == "auto"


def test_auto_precision_is_saved_resolved_and_kept_on_resume(tiny_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fake_cpu(tmp_path, monkeypatch, "avx512_bf16")
    train(tiny_config(tiny_folder, run, iters=4), stop_at=2, progress=False)
    assert load_config(run).precision == "bf16"
    # Resumed on a machine without bf16 units, the run keeps its precision, and says so.
    fake_cpu(tmp_path, monkeypatch, "avx2")
    with pytest.warns(UserWarning, match="emulated"):
        train(load_config(run), resume=True, progress=False, stop_at=3)
    assert [m["precision"] for m in read_metrics(run)] == ["bf16"]
    assert load_config(run).precision == "bf16"
    # Or goes on in fp32 where it is asked to, and config.json keeps it and says from when.
    assert main(["train", "--resume", str(run), "--precision", "fp32", "--quiet"]) == 0
    assert [m["precision"] for m in read_metrics(run)] == ["bf16", "fp32"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["precision_changes"] == [{"iteration": 3, "precision": "fp32"}]
    assert load_config(run).precision == "fp32"
    assert run_result(run)["precision"] == "bf16; fp32 from 3"  # what the reports print
    train(tiny_config(tiny_folder, tmp_path / "here", iters=2), progress=False)
    assert load_config(tmp_path / "here").precision == "fp32"
    assert read_metrics(tmp_path / "here")[0]["precision"] == "fp32"
    # A config.json from before --precision existed: that run trained in fp32, and goes on so
    # on a machine where auto would pick bf16, with no change recorded.
    fake_cpu(tmp_path, monkeypatch, "avx512_bf16")
    old = tmp_path / "old"
    train(tiny_config(tiny_folder, old, iters=4, precision="fp32"), stop_at=2, progress=False)
    saved = json.loads((old / "config.json").read_text())
    del saved["config"]["precision"]
    (old / "config.json").write_text(json.dumps(saved))
    assert load_config(old).precision == "fp32"
    train(load_config(old), resume=True, progress=False)
    assert "precision_changes" not in json.loads((old / "config.json").read_text())
    assert [m["precision"] for m in read_metrics(old)] == ["fp32", "fp32"]


def test_emulated_bf16_is_one_warning_line(tiny_folder, tmp_path, monkeypatch, capsys):
    fake_cpu(tmp_path, monkeypatch, "avx2")
    flags = ["--model", "resnet20", "--width", "4", "--iters", "2", "--batch-size", "16"]
    out = str(tmp_path / "run")
    args = ["train", *flags, "--data", str(tiny_folder), "--out", out, "--device", "cpu"]
    assert main([*args, "--precision", "bf16", "--quiet"]) == 0
    line = one_line(capsys)
    assert line.startswith("deepres train: warning: --precision bf16: ")
    assert "emulated" in line and "far slower" in line


def test_status_says_where_each_run_stands(tiny_folder, tmp_path, capsys, monkeypatch):
    stopped, done = tmp_path / "a" / "stopped", tmp_path / "b" / "done"
    train(tiny_config(tiny_folder, stopped, iters=8), stop_at=3, progress=False)
    train(tiny_config(tiny_folder, done, iters=4), progress=False)
    assert find_runs([tmp_path]) == [stopped, done]
    now = run_status(stopped)
    last = read_metrics(stopped)[-1]
    # The checkpoint's iteration (3), not the last log record's (2): where a resume starts.
    assert (now["iteration"], now["iters"], now["finished"]) == (3, 8, False)
    assert now["train_error"] == last["train_error"] and now["hours"] > 0
    assert now["train_loss"] == pytest.approx(last["train_loss"])
    assert now["lr"] == last["lr"] == 0.1
    # Where it started, as config.json names it: this CPU.
    assert now["device"] == json.loads((stopped / "config.json").read_text())["device"]
    assert now["device"].startswith(machine()["cpu"])
    assert now["moved"] == []
    resumed = json.loads((stopped / "config.json").read_text())
    resumed["resumed"] = [{"iteration": 3, "device": "NVIDIA H200"}]
    (stopped / "config.json").write_text(json.dumps(resumed))
    assert run_status(stopped)["moved"] == [{"iteration": 3, "device": "NVIDIA H200"}]
    assert now["hours_left"] == pytest.approx(5 * 16 / last["images_per_sec"] / 3600)
    # Over several windows the speed is time-weighted: windows of 100 and 300 images/s, 150.
    windows = [{**last, "images_per_sec": speed} for speed in (100.0, 300.0)]
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in windows))
    assert run_status(stopped)["hours_left"] == pytest.approx(5 * 16 / 150 / 3600)
    # The training error is the reports' (final_training): over the last 1/128 of the run.
    windows = [
        {**last, "iteration": i, "train_error": e, "train_loss": e / 10, "images": n}
        for i, e, n in ((200, 50.0, 100), (255, 10.0, 100), (256, 20.0, 300))
    ]
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in windows))
    assert run_status(stopped)["train_error"] == pytest.approx(17.5)
    assert run_status(stopped)["train_loss"] == pytest.approx(1.75)
    finished = run_status(done)
    assert (finished["iteration"], finished["finished"], finished["hours_left"]) == (4, True, None)
    assert main(["status", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == [str(stopped), "3/8"]
    # The precision the run trains in: auto became fp32 or bf16, by the CPU.
    assert now["precision"] == last["precision"] in ("fp32", "bf16")
    assert lines[0].split()[6] == "prec" and lines[1].split()[4] == now["precision"]
    assert lines[2].split()[1] == "4/4" and lines[2].endswith("done")
    # --plot: every run's curve in one figure, each labelled with where it stands.
    labels = []
    monkeypatch.setattr(report, "plot_curves", lambda ax, c, label: labels.append(label))
    figure = tmp_path / "progress.png"
    assert main(["status", str(tmp_path), "--plot", str(figure)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"figure: {figure}"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels == ["stopped (at 3 of 8)", "done (done)"]
    # --json: the same rows as run_status, stdout JSON alone (the figure's line on stderr).
    assert main(["status", str(tmp_path), "--json", "--plot", str(figure)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == [run_status(stopped), run_status(done)]
    assert err.strip() == f"figure: {figure}"
    # Another tool's config.json is no run; one beside a metrics.jsonl is named as not ours.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["Bert"]}')
    assert find_runs([tmp_path]) == [stopped, done]
    (tmp_path / "hf" / "metrics.jsonl").write_text("")
    assert main(["status", str(tmp_path / "hf")]) == 2
    assert one_line(capsys).endswith(
        "hf/config.json: not the config of a deepres run ('model' missing or damaged)"
    )
    (stopped / "checkpoint.safetensors").write_bytes(b"not safetensors")
    assert main(["status", str(stopped)]) == 2
    assert "checkpoint.safetensors: not a readable safetensors file" in one_line(capsys)
    # One damaged run among others: it is named, the others are still listed, and exit 2.
    assert main(["status", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split()[:2] == [str(done), "4/4"]
    assert len(err.strip().splitlines()) == 1 and "stopped/checkpoint.safetensors" in err
    (done / "summary.json").write_text("[]")  # valid JSON, the wrong shape
    assert main(["status", str(done)]) == 2
    assert one_line(capsys).endswith("done/summary.json: not a run summary")


def test_status_gives_training_error_at_matched_iterations(tiny_folder, tmp_path, capsys):
    # Image-weighted over each whole block: runs at different stages compare block by block.
    windows = [
        {"iteration": i, "train_error": e, "images": n}
        for i, e, n in ((50, 10.0, 100), (100, 20.0, 300), (150, 30.0, 100), (200, 40.0, 100))
    ]
    assert report.block_errors(windows, 100) == [
        {"iterations": [1, 100], "train_error": 17.5},
        {"iterations": [101, 200], "train_error": 35.0},
    ]
    # A block the run has not passed yet is left out.
    assert report.block_errors(windows[:3], 100) == [{"iterations": [1, 100], "train_error": 17.5}]
    # The block is 1/64 of the budget in whole log windows: 1,000 iterations at the full 64k.
    assert report._block(64000, {"config": {"log_every": 50}}) == 1000
    assert report._block(2000, {"config": {"log_every": 50}}) == 50
    # A run shorter than its log_every logs once, at its end: one block of the whole run.
    assert report._block(8, {"config": {"log_every": 50}}) == 8
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=8), progress=False)
    status = run_status(run)
    metrics = read_metrics(run)
    block = report._block(8, json.loads((run / "config.json").read_text()))
    assert status["train_error_by_block"] == report.block_errors(metrics, block)
    assert status["train_error_by_block"][-1]["iterations"][1] == metrics[-1]["iteration"]
    # --blocks: the same numbers, block by block, one column a run ("-" where a run has not
    # passed the block yet).
    train(tiny_config(tiny_folder, tmp_path / "short", iters=4), progress=False)
    assert main(["status", str(tmp_path), "--blocks"]) == 0
    table = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert table[0].split() == ["iterations", "run", "short"]
    expected = {
        name: {b["iterations"][1]: b["train_error"] for b in run_status(r)["train_error_by_block"]}
        for name, r in (("run", run), ("short", tmp_path / "short"))
    }
    assert len(table) == 1 + len(expected["run"]) and len(expected["short"]) == 2
    for line in table[1:]:
        span, *cells = line.split()
        last = int(span.split("-")[1].replace(",", ""))
        for name, cell in zip(("run", "short"), cells, strict=True):
            assert cell == ("-" if last not in expected[name] else f"{expected[name][last]:.2f}")
    # Runs of one name in different folders are told apart by their paths.
    twins = [{"run": f"{d}/resnet56", "train_error_by_block": []} for d in ("a", "b")]
    assert report.block_table(twins) == (["a/resnet56", "b/resnet56"], [])


def test_images_per_sec_after_a_resume_counts_only_this_sessions_steps(
    tiny_folder, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    config = tiny_config(tiny_folder, run, iters=8, log_every=4, eval_every=8)
    train(config, stop_at=3, progress=False)  # the window of iteration 4 holds 3 steps already
    # A clock that moves one second per training step: every window runs at one batch a second.
    clock, step = [0.0], train_module._step

    def timed_step(*args):
        step(*args)
        clock[0] += 1.0

    monkeypatch.setattr(train_module, "_step", timed_step)
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    train(load_config(run), resume=True, progress=False)
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == [4, 8]
    assert [r["images_per_sec"] for r in records] == [16.0, 16.0]


def test_sigterm_checkpoints_at_once_and_the_run_resumes_from_there(tiny_folder, tmp_path):
    # What a campaign's pause does: a real SIGTERM to a training process.
    run = tmp_path / "run"
    command = [sys.executable, "-m", "deepres.cli", "train", "--model", "resnet20", "--width", "4"]
    command += ["--data", str(tiny_folder), "--iters", "100000", "--batch-size", "16"]
    command += ["--checkpoint-every", "100000", "--device", "cpu", "--out", str(run), "--quiet"]
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not read_metrics(run) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert read_metrics(run), "no log record within 120 s"
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130
    summary = json.loads(out)
    stopped_at = summary["iteration"]
    assert not summary["finished"] and 50 <= stopped_at < 100_000
    assert err.strip().endswith(
        f"stopped at iteration {stopped_at}; deepres train --resume {run} continues it"
    )
    # The checkpoint was written at the stop, not at --checkpoint-every, and resumes from there.
    assert checkpoint_state(run)["iteration"] == stopped_at
    resumed = train(load_config(run), resume=True, stop_at=stopped_at + 2, progress=False)
    assert resumed["iteration"] == stopped_at + 2


def test_streaming_settings_on_an_in_memory_run_are_named_as_unused(tiny_folder, tmp_path, capsys):
    base = ["train", "--model", "resnet20", "--width", "4", "--data", str(tiny_folder)]
    base += ["--iters", "2", "--batch-size", "16", "--quiet", "--device", "cpu"]
    assert main([*base, "--lighting", "0.2", "--workers", "3", "--out", str(tmp_path / "a")]) == 0
    line = one_line(capsys)
    assert "--lighting, --workers: settings of the streaming path" in line and "not used" in line
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err.strip() == ""


def test_train_options_become_the_recipe_and_bad_ones_are_one_line(tiny_folder, tmp_path, capsys):
    base = ["train", "--model", "resnet20", "--width", "4", "--data", str(tiny_folder)]
    base += ["--batch-size", "16", "--quiet"]
    # --epochs: 72 training images in batches of 16 are 4 full steps an epoch; 1.5 epochs, 6.
    run = tmp_path / "epochs"
    assert main([*base, "--epochs", "1.5", "--device", "cpu", "--out", str(run)]) == 0
    recipe = json.loads((run / "config.json").read_text())["recipe"]
    assert recipe["iters"] == 6 and recipe["milestones"] == [3, 4]
    assert json.loads(capsys.readouterr().out)["iteration"] == 6
    bad = [
        (["--lr", "0"], "--lr 0.0: must be a positive number"),
        (["--lr", "-0.1"], "--lr -0.1: must be a positive number"),
        (["--lr", "inf"], "--lr inf: must be a positive number"),
        (["--epochs", "0"], "--epochs 0.0: must be a positive number"),
        (["--epochs", "nan"], "--epochs nan: must be a positive number"),
        (["--epochs", "inf"], "--epochs inf: must be a positive number"),
        (["--iters", "0"], "--iters 0: must be at least 1"),
        (["--width", "0"], "--width 0: must be at least 1"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--batch-size", "-1"], "--batch-size -1: must be at least 1"),
        (["--checkpoint-every", "0"], "--checkpoint-every 0: must be at least 1"),
        (["--eval-every", "-5"], "--eval-every -5: must be at least 1"),
        (["--seed", str(2**70)], f"--seed {2**70}: must be below 2**63"),
        (["--lighting", "nan"], "--lighting nan: must be a number >= 0"),
        (["--scale", "480,256"], "--scale 480,256: must be 0 < LOW <= HIGH"),
        (["--device", "banana"], "--device banana: not a device"),
        (["--crop-size", "100000"], "--crop-size 100000: sizes above 4096 pixels are refused"),
        (["--model", "plain20", "--shortcut", "B"], "--shortcut: plain20 is a plain net"),
    ]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "--device cuda: no CUDA device is available"))
    one = tmp_path / "one-class"
    shutil.copytree(tiny_folder / "train" / "red", one / "red")
    bad.append((["--data", str(one)], "one class (red) only; a classifier needs two or more"))
    for flags, message in bad:
        out = tmp_path / "bad"
        budget = [] if {"--iters", "--epochs"} & set(flags) else ["--iters", "2"]
        device = [] if "--device" in flags else ["--device", "cpu"]
        assert main([*base, *flags, *budget, *device, "--out", str(out)]) == 2, flags
        assert message in one_line(capsys)
        assert not out.exists()


def test_every_argument_of_every_command_says_what_it_is_for(capsys):
    def undocumented(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield from undocumented(subparser, f"{name} {sub}")
            elif not action.help:
                yield f"{name} {'/'.join(action.option_strings) or action.dest}"

    assert list(undocumented(build_parser(), "deepres")) == []
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "responses: std of layer responses (Fig. 7)" in " ".join(capsys.readouterr().out.split())


def test_records_mark_code_that_differs_from_its_commit(tiny_folder, tmp_path, monkeypatch):
    from deepres import provenance
    from deepres.bench import environment
    from deepres.experiments.common import run_result

    # Each record takes the mark from git at the time: the run's config, the reports built on
    # the run, and every benchmark's environment.
    monkeypatch.setattr(train_module, "git_dirty", lambda: True)
    run = tmp_path / "dirty"
    train(tiny_config(tiny_folder, run, iters=2), progress=False)
    assert json.loads((run / "config.json").read_text())["git_dirty"] is True
    assert run_result(run)["git_dirty"] is True
    monkeypatch.setattr(provenance, "git_dirty", lambda: True)
    assert environment("cpu", "bench")["git_dirty"] is True
    monkeypatch.setattr(provenance, "git_dirty", lambda: False)
    assert environment("cpu", "bench")["git_dirty"] is False
    # status names the precision the run was configured with (a bf16 run is not an fp32 one).
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["precision"] = "bf16"
    (run / "config.json").write_text(json.dumps(saved))
    assert run_status(run)["precision"] == "bf16"


def test_a_cuda_device_beyond_the_machine_s_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--device cuda:3: this machine has 1 CUDA device"):
        parse_device("cuda:3")
    assert parse_device("cuda:0") == torch.device("cuda", 0)


def test_damaged_run_files_are_one_line_errors_naming_the_run(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=4), stop_at=2, progress=False)
    config, metrics = run / "config.json", run / "metrics.jsonl"
    saved, records = json.loads(config.read_text()), metrics.read_text()

    def damaged(config_change=None, record_change=None):
        changed = json.loads(json.dumps(saved))
        (config_change or (lambda c: None))(changed)
        config.write_text(json.dumps(changed))
        record = {**json.loads(records.splitlines()[-1]), **(record_change or {})}
        metrics.write_text(json.dumps(record) + "\n")

    # status: an iteration of 10**12 is one block of the table (once a loop of 10**9 blocks)...
    damaged(None, {"iteration": 10**12})
    assert main(["status", str(run), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["train_error_by_block"]) == 1
    # ...and NaN or infinite budgets, an lr that is no number: one line naming the run, and no
    # half-printed table.
    for config_change, record_change in (
        (lambda c: c["recipe"].update(iters=float("nan")), None),
        (lambda c: c["recipe"].update(iters=float("inf")), None),
        (None, {"lr": "x"}),
    ):
        damaged(config_change, record_change)
        assert main(["status", str(run)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1
        assert err.startswith(f"deepres status: error: {run}")
    # resume and eval: damaged settings, class names that are not names.
    damaged(lambda c: c["config"].update(scale=[]))
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert one_line(capsys).startswith(f"deepres train: error: {config}: ")
    damaged(lambda c: c.update(classes=[1, 2, 3]))
    assert main(["eval", str(run), "--data", str(tiny_folder)]) == 2
    assert one_line(capsys).endswith(f"{config}: its class names are not all strings")
    # A streamed run's views without their crop; a record without its training error.
    damaged(lambda c: c.update(augment={"kind": "scale"}))
    assert main(["eval", str(run), "--data", str(tiny_folder)]) == 2
    assert one_line(capsys).endswith(
        f"{config}: not the config of a deepres run ('augment' damaged)"
    )
    damaged(None, {"train_error": None})
    assert main(["status", str(run)]) == 2
    assert one_line(capsys).endswith(f"{metrics}: line 1 is not a training record")


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail]\nDefaultCPUAllocator: not enough memory: you tried X")

    monkeypatch.setattr("deepres.cli.create_model", too_big)
    assert main(["models", "resnet20"]) == 2
    assert one_line(capsys).endswith(
        "out of memory (DefaultCPUAllocator: not enough memory: you tried X)"
    )

    # Other errors of torch are bugs, and keep their traceback.
    def broken(*args, **kwargs):
        raise RuntimeError("some kernel failed")

    monkeypatch.setattr("deepres.cli.create_model", broken)
    with pytest.raises(RuntimeError, match="some kernel failed"):
        main(["models", "resnet20"])

    # A DataLoader worker the OOM killer took, reported mid-step or under torchrun: one line.
    def worker_gone(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid(s) 7) exited unexpectedly\nmore lines")

    monkeypatch.setattr("deepres.cli.create_model", worker_gone)
    assert main(["models", "resnet20"]) == 2
    assert one_line(capsys).endswith(
        "DataLoader worker (pid(s) 7) exited unexpectedly (out of memory? fewer --workers use "
        "less; --resume from the last checkpoint)"
    )


def test_paths_of_the_wrong_kind_are_one_line_errors_that_say_so(tiny_folder, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    args = ["train", "--model", "resnet20", "--data", str(tiny_folder), "--quiet"]
    assert main([*args, "--out", str(a_file)]) == 2
    assert one_line(capsys).endswith(f"{a_file}: a file, not a folder; choose another --out")
    assert a_file.read_text() == "mine"
    # A file given as a run: no config.json in it, said as much (not "[Errno 20] ...").
    assert main(["eval", str(a_file)]) == 2
    assert one_line(capsys).endswith(
        f"{a_file / 'config.json'}: no such file (is this a deepres run directory?)"
    )
    (tmp_path / "odd" / "config.json").mkdir(parents=True)
    assert main(["eval", str(tmp_path / "odd")]) == 2
    assert one_line(capsys).endswith("config.json: a folder, where a JSON file belongs")
    assert main(["status", str(tmp_path / "absent")]) == 2
    assert one_line(capsys).endswith(f"{tmp_path / 'absent'}: no such file or directory")
    for args in (["status", str(tmp_path), "--plot", ""], ["export", "x", "--onnx", ""]):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and "give the path of the file to write" in one_line(capsys)


def test_under_torchrun_only_rank_0_asks_for_a_stopped_runs_lock(tmp_path):
    # A folder whose run stopped before its first checkpoint: rank 0 asks for its lock (held:
    # the run is live elsewhere). The other ranks must not: they would take it from each other
    # and say that another process is training the run.
    from deepres.train import RunInUse, _check_run_dir

    run = tmp_path / "stopped"
    run.mkdir()
    (run / "config.json").write_text("{}")
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunInUse):
            _check_run_dir(run, resume=False)
        # Nor tell a rank to remove a run that may be live: rank 0's error says which it is.
        with pytest.raises(FileExistsError, match="not yet checkpointed \\(rank 0 says more\\)"):
            _check_run_dir(run, resume=False, probe=False)
    finally:
        os.close(fd)
