import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from conftest import tiny_config

import deepres
from deepres.report import read_metrics
from deepres.train import train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed with the gloo backend",
)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`deepres` under torchrun with two CPU processes, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    return subprocess.run(
        [*command, "2", "-m", "deepres.cli", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_two_processes_train_one_run(tiny_folder, tmp_path):
    run = tmp_path / "ddp"
    # --device cpu: on a machine with one GPU, auto would send rank 1 to a cuda:1 it lacks.
    flags = ["--model", "resnet20", "--width", "4", "--iters", "6", "--batch-size", "16"]
    flags += ["--device", "cpu"]
    done = torchrun(
        "train", *flags, "--data", str(tiny_folder), "--out", str(run), "--quiet", "--deterministic"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # one copy, from rank 0
    assert summary["finished"] and summary["iteration"] == 6
    for name in ["config.json", "model.safetensors", "metrics.jsonl", "summary.json"]:
        assert (run / name).is_file(), name
    # Both ranks' halves counted: 6 iterations of the global batch of 16.
    assert [(m["iteration"], m["images"]) for m in read_metrics(run)] == [(6, 96)]
    # A strict load: DDP's "module." names in the saved weights would fail it.
    assert deepres.load(run).classes == ["blue", "green", "red"]


def test_a_single_process_run_resumes_under_torchrun(tiny_folder, tmp_path):
    run = tmp_path / "resumed"
    config = tiny_config(tiny_folder, run, iters=6, checkpoint_every=2)
    train(config, stop_at=3, progress=False)  # mid-window: iteration 3 is in the saved sums
    done = torchrun("train", "--resume", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["finished"]
    metrics = read_metrics(run)
    assert [(m["iteration"], m["images"]) for m in metrics] == [(2, 32), (4, 32), (6, 32)]
    assert all(0 <= m["train_error"] <= 100 for m in metrics)
    assert json.loads((run / "summary.json").read_text())["iteration"] == 6


def test_two_processes_stream_photos_into_one_run(photo_folder, tmp_path):
    run = tmp_path / "photos"
    # Width 8: see test_train_photos for what width 4 meets in torch's CPU convolutions.
    flags = ["--model", "resnet18", "--width", "8", "--crop-size", "32", "--iters", "4"]
    flags += [
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--quiet",
        "--deterministic",
        "--device",
        "cpu",
    ]
    done = torchrun("train", *flags, "--data", str(photo_folder), "--out", str(run))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["finished"] and summary["eval_split"] == "test"
    # Both ranks' halves of the global batch of 8 were counted, on the streaming path.
    assert [(m["iteration"], m["images"]) for m in read_metrics(run)] == [(4, 32)]
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["name"] == "imagenet" and config["augment"]["crop"] == 32
