"""The CUDA path: a step replayed as a CUDA graph trains as the step launched kernel by kernel."""

import copy
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config

from deepres.checkpoint import load_checkpoint, load_tensors, read_config
from deepres.models import create_model
from deepres.report import moves, read_metrics
from deepres.train import load_config, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def weights(run) -> dict:
    return load_tensors(run / "model.safetensors")[0]


def momentum(run) -> list[torch.Tensor]:
    model = create_model("resnet20", num_classes=3, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_checkpoint(run, model, optimizer)
    return [s["momentum_buffer"] for s in optimizer.state.values()]


def replays(monkeypatch) -> list[int]:
    count = [0]
    replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        count[0] += 1
        return replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    return count


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_steps_train_as_eager_steps(tiny_folder, tmp_path, monkeypatch, precision):
    # 12 iterations: the lr falls at 6 and 9, so the step is captured three times.
    eager = tiny_config(
        tiny_folder, tmp_path / "eager", device="cuda", precision=precision, cuda_graph=False
    )
    graphed = replace(eager, out=str(tmp_path / "graphed"), cuda_graph=True)
    count = replays(monkeypatch)
    train(eager, progress=False)
    assert count[0] == 0
    train(graphed, progress=False)
    assert count[0] == 12
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "graphed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    for u, v in zip(momentum(tmp_path / "eager"), momentum(tmp_path / "graphed"), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5)
    errors = [[m["train_error"] for m in read_metrics(tmp_path / r)] for r in ("eager", "graphed")]
    assert errors[0] == errors[1]


def test_a_graphed_run_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    count = replays(monkeypatch)
    whole = tiny_config(tiny_folder, tmp_path / "whole", device="cuda")
    train(whole, progress=False)
    stopped = replace(whole, out=str(tmp_path / "stopped"))
    train(stopped, stop_at=5, progress=False)
    train(load_config(tmp_path / "stopped"), resume=True, progress=False)
    assert count[0] == 12 + 5 + 7
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    b = (tmp_path / "stopped" / "model.safetensors").read_bytes()
    assert a == b


def test_a_run_moves_from_the_cpu_to_the_gpu_and_back(tiny_folder, tmp_path):
    # As session 12's campaign runs did: a CPU checkpoint goes on on the GPU, and back.
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, device="cpu"), stop_at=4, progress=False)
    train(replace(load_config(run), device="cuda"), resume=True, stop_at=8, progress=False)
    summary = train(replace(load_config(run), device="cpu"), resume=True, progress=False)
    assert summary["finished"] and summary["iteration"] == 12
    assert [m["iteration"] for m in read_metrics(run)] == [2, 4, 6, 8, 10, 12]
    saved = read_config(run)
    assert moves(saved) == [
        {"iteration": 4, "device": torch.cuda.get_device_name()},
        {"iteration": 8, "device": saved["device"]},
    ]


def test_a_classifier_loaded_on_the_gpu_takes_a_batch_from_the_cpu(tiny_folder, tmp_path):
    import deepres

    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=2), progress=False)
    batch = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    on_gpu = deepres.load(run, device="cuda")
    assert next(on_gpu.model.parameters()).is_cuda
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32, as on the CPU
        probabilities = on_gpu(batch).cpu()
    torch.testing.assert_close(probabilities, deepres.load(run)(batch), atol=1e-5, rtol=1e-4)


def test_auto_precision_is_bf16_from_ampere_on_and_fp32_before(tiny_folder, tmp_path):
    major, _ = torch.cuda.get_device_capability()
    run = tmp_path / "run"
    train(replace(tiny_config(tiny_folder, run, iters=2), device="cuda"), progress=False)
    # Compute capability 8.0 (A100, RTX 30xx) and later have bf16 units; V100 and T4 do not.
    assert load_config(run).precision == ("bf16" if major >= 8 else "fp32")
    assert read_metrics(run)[0]["precision"] == load_config(run).precision


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_graphed_run_on_a_second_gpu_after_one_on_the_first_trains_there(tiny_folder, tmp_path):
    # torch.cuda.graph's default capture stream is made once, on the GPU current then: a later
    # run on cuda:1 would capture nothing there, and its replays would train nothing.
    first = tiny_config(tiny_folder, tmp_path / "gpu0", device="cuda:0", cuda_graph=True)
    train(first, progress=False)
    eager = replace(first, out=str(tmp_path / "eager1"), device="cuda:1", cuda_graph=False)
    graphed = replace(eager, out=str(tmp_path / "graphed1"), cuda_graph=True)
    train(eager, progress=False)
    train(graphed, progress=False)
    a, b = weights(tmp_path / "eager1"), weights(tmp_path / "graphed1")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_the_gpu_draws_the_cpus_batches():
    from deepres.data.loader import BatchStream, Preprocess

    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(300) % 10
    preprocess = Preprocess(torch.rand(1, 3, 32, 32), torch.ones(1, 1, 1))
    cpu = BatchStream(images, labels, preprocess, 128, seed=5)
    # A copy: Module.cuda() moves the module itself, the CPU stream's included.
    gpu = BatchStream(images.cuda(), labels.cuda(), copy.deepcopy(preprocess).cuda(), 128, seed=5)
    for iteration in (0, 3, 7):  # 7: the second epoch's shuffle
        (x, y), (x_gpu, y_gpu) = cpu.batch(iteration), gpu.batch(iteration)
        assert torch.equal(y, y_gpu.cpu())
        torch.testing.assert_close(x, x_gpu.cpu())
