import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from conftest import run_torchrun, tiny_config
from safetensors.torch import load_file

import deepres
from deepres import distributed
from deepres import train as train_module
from deepres.checkpoint import checkpoint_state
from deepres.cli import main
from deepres.models import create_model
from deepres.report import read_metrics
from deepres.train import train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed with the gloo backend",
)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`deepres` under torchrun with two CPU processes, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    return run_torchrun(
        [*command, "2", "-m", "deepres.cli", *args], {**os.environ, "OMP_NUM_THREADS": "1"}
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


RANK_WEIGHTS_SCRIPT = """
import sys
from safetensors.torch import save_file
from deepres import distributed, train
from deepres.train import TrainConfig

data, out, averaged = sys.argv[1], sys.argv[2], sys.argv[3] == "ddp"
if not averaged:  # the contrast: each rank trains alone on its own shard
    train.distributed.wrap = lambda model, device: model
finish = train._finish

def keep_weights(s, iteration, start_iter):
    rank = distributed.world()[0]
    weights = {k: v.contiguous() for k, v in s.model.state_dict().items()}
    save_file(weights, f"{out}/rank{rank}.safetensors")
    return finish(s, iteration, start_iter)

train._finish = keep_weights
config = TrainConfig(model="resnet20", data=data, out=f"{out}/run", iters=4, batch_size=16,
                     width=4, log_every=2, eval_every=4, checkpoint_every=4,
                     deterministic=True, device="cpu")
train.train(config, progress=False)
"""


def ranks_weights(tiny_folder, out, mode: str) -> list[dict]:
    """Each rank's weights after a 4-iteration run of two processes under torchrun."""
    out.mkdir()
    script = out / "ranks.py"
    script.write_text(RANK_WEIGHTS_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    done = run_torchrun(
        [*command, "2", str(script), str(tiny_folder), str(out), mode],
        {**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    return [load_file(out / f"rank{r}.safetensors") for r in range(2)]


def test_ddp_averages_the_ranks_gradients_so_their_weights_stay_equal(tiny_folder, tmp_path):
    ddp = ranks_weights(tiny_folder, tmp_path / "ddp", "ddp")
    alone = ranks_weights(tiny_folder, tmp_path / "alone", "alone")
    start = create_model("resnet20", width=4, num_classes=3).state_dict()
    params = [k for k in ddp[0] if "weight" in k or "bias" in k]
    # Each rank saw only its half of every batch; with the gradients averaged, both took the
    # same steps, and the weights still agree bit for bit. (BN's running statistics do not:
    # each rank's last forward updated them from its own half, and rank 0's are the run's.)
    assert all(torch.equal(ddp[0][k], ddp[1][k]) for k in params)
    assert any(not torch.equal(ddp[0][k], start[k]) for k in params)
    # Without DDP the two halves pull apart: so equality above is the averaging's doing.
    assert any(not torch.equal(alone[0][k], alone[1][k]) for k in params)


@pytest.mark.parametrize(
    ("environ", "why"),
    [
        ({"WORLD_SIZE": "2"}, "RANK=None"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 in the environment: not one of WORLD_SIZE=2's"),
    ],
)
def test_a_torchrun_environment_that_is_half_there_is_a_one_line_error(
    tiny_folder, tmp_path, monkeypatch, capsys, environ, why
):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = ["train", "--model", "resnet20", "--data", str(tiny_folder), "--iters", "1"]
    args += ["--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0]
    assert not (tmp_path / "r").exists()


def test_a_numbered_gpu_is_made_current_outside_torchrun(monkeypatch):
    # CUDA graphs capture on the current device's streams: cuda:1 must be current to train.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert distributed.setup(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert current == [torch.device("cuda", 1)]


def test_a_sigterm_stops_the_ranks_together_between_log_steps(tiny_folder, tmp_path):
    # torchrun passes a SIGTERM on to its workers and kills them 30 s later: the ranks must
    # agree on the stop and checkpoint well before their next log step (here never).
    run, script = tmp_path / "run", tmp_path / "train_forever.py"
    script.write_text(
        "import sys\n"
        "from deepres.train import TrainConfig, train\n"
        "train(TrainConfig(model='resnet20', width=4, batch_size=16, data=sys.argv[1],\n"
        "    out=sys.argv[2], iters=10**7, log_every=10**7, checkpoint_every=10**7,\n"
        "    device='cpu'), progress=False)\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    child = subprocess.Popen(
        [*command, "2", str(script), str(tiny_folder), str(run)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # torchrun and its workers: one group, killed whole if need be
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3)  # into the loop (its stop handler set), past both ranks' set-up
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=25)  # before torchrun's own SIGKILL at 30 s
    finally:
        # A failure must not leave the workers training on (for 10**7 iterations).
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state = checkpoint_state(run)
    assert state is not None, err
    assert state["iteration"] > 0 and state["iteration"] % train_module.STOP_CHECK_EVERY == 0


def test_more_processes_than_gpus_is_one_line_not_an_invalid_ordinal(monkeypatch):
    # torchrun --nproc_per_node 2 on a node with one GPU: process 1 has none of its own.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="process 1 of this node has no GPU of its own"):
        distributed.setup(torch.device("cuda"))
    assert not dist.is_initialized()
