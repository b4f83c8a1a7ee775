import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

import deepres
from deepres.checkpoint import CHECKPOINT
from deepres.cli import main
from deepres.evaluate import error_rates
from deepres.recipes import RECIPES, default_recipe, get_recipe
from deepres.report import read_metrics
from deepres.train import TrainConfig, load_config, train


def tiny_config(folder, out, **kw) -> TrainConfig:
    base = dict(
        model="resnet20",
        data=str(folder),
        out=str(out),
        iters=12,
        batch_size=16,
        width=4,
        log_every=2,
        eval_every=4,
        checkpoint_every=4,
        deterministic=True,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


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
    assert len(config["git_commit"]) == 40
    assert config["recipe"]["milestones"] == [6, 9]
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    assert [m["lr"] for m in metrics] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001, 0.001])
    assert all("val_error" in m for m in metrics if m["iteration"] % 4 == 0)
    assert summary["eval_split"] == "val" and summary["val_error"] == metrics[-1]["val_error"]
    assert all(0 <= m["train_error"] <= 100 for m in metrics)


def test_warmup_recipe_holds_lr_low_until_training_error_below_80(tiny_folder, tmp_path):
    # Three classes start near 67% error, so the warm-up ends after the first window.
    train(tiny_config(tiny_folder, tmp_path / "w", iters=8, recipe="cifar-warmup"), progress=False)
    lrs = [m["lr"] for m in read_metrics(tmp_path / "w")]
    assert lrs[0] == 0.01 and lrs[1] == 0.1


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
    assert default_recipe("resnet110") == "cifar-warmup" and default_recipe("resnet56") == "cifar"


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
    assert result["n"] == 18 and result["top5_error"] == 0.0
    assert main(["eval", str(run)]) == 0
    table = capsys.readouterr().out
    assert "top-1 error" in table and "green" in table

    image = tiny_folder / "test" / "red" / "000.png"
    assert main(["predict", str(run), str(image)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(str(image)) and all(c in line for c in ("red", "green", "blue"))

    classifier = deepres.load(run)
    with Image.open(image) as im:
        top = classifier.topk(im, k=2)
    assert len(top) == 2 and sum(p for _, p in top) <= 1.0 + 1e-6
    batch = classifier.to_tensor(Image.open(image))
    assert batch.shape == (1, 3, 12, 12) and batch.dtype == torch.uint8
    assert torch.allclose(classifier(batch).sum(1), torch.ones(1))

    # The same out again must not overwrite the finished run.
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_cli_errors_are_one_line(tiny_folder, tmp_path, capsys):
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


def test_compiled_training_resumes_exactly(tiny_folder, tmp_path):
    whole = tiny_config(tiny_folder, tmp_path / "whole", iters=4, compile=True)
    train(whole, progress=False)
    stopped = replace(whole, out=str(tmp_path / "stopped"))
    train(stopped, stop_at=3, progress=False)
    train(load_config(tmp_path / "stopped"), resume=True, progress=False)
    assert load_config(tmp_path / "stopped").compile
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "stopped" / "model.safetensors").read_bytes()


def test_bf16_autocast_trains_fp32_weights(tiny_folder, tmp_path):
    train(tiny_config(tiny_folder, tmp_path / "fp32", iters=4), progress=False)
    train(tiny_config(tiny_folder, tmp_path / "bf16", iters=4, precision="bf16"), progress=False)
    metrics = read_metrics(tmp_path / "bf16")
    assert all(m["train_loss"] == m["train_loss"] for m in metrics)  # no NaN
    weights = deepres.load(tmp_path / "bf16").model.state_dict()
    assert weights["conv1.weight"].dtype == torch.float32
    assert (tmp_path / "fp32" / "model.safetensors").read_bytes() != (
        tmp_path / "bf16" / "model.safetensors"
    ).read_bytes()
    with pytest.raises(ValueError, match="precision"):
        train(tiny_config(tiny_folder, tmp_path / "fp16", precision="fp16"), progress=False)
