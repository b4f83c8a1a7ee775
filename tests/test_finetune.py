import hashlib
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from deepres.checkpoint import WEIGHTS, load_tensors, save_tensors
from deepres.cli import main
from deepres.data.loader import Preprocess
from deepres.evaluate import predict_logits
from deepres.finetune import freeze_backbone, load_backbone, read_weights
from deepres.models import create_model
from deepres.pretrained import resolve_run
from deepres.train import TrainConfig, build_model, load_config, train


def pretrained(seed: int = 1, **options) -> torch.nn.Module:
    """A resnet20 of 10 classes whose every tensor, BN statistics too, differs from a new one's."""
    torch.manual_seed(seed)
    model = create_model("resnet20", width=4, num_classes=10, **options)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                # Small: a net of all-larger weights overflows, and the loop stops diverged runs.
                tensor.add_(0.01 * torch.rand_like(tensor))
            else:
                tensor.add_(7)
    return model


def weights_files(tmp_path, model) -> dict[str, str]:
    run = tmp_path / "run"
    run.mkdir()
    save_tensors(run / WEIGHTS, model.state_dict())
    save_tensors(tmp_path / "weights.safetensors", model.state_dict())
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    return {
        "run": str(run),
        "safetensors": str(tmp_path / "weights.safetensors"),
        "pth": str(tmp_path / "weights.pth"),
    }


@pytest.mark.parametrize("kind", ["run", "safetensors", "pth"])
def test_init_loads_every_tensor_but_the_fc(tmp_path, kind):
    source = pretrained()
    path = weights_files(tmp_path, source)[kind]
    torch.manual_seed(0)
    model = create_model("resnet20", width=4, num_classes=3)
    fresh_fc = {k: v.clone() for k, v in model.fc.state_dict().items()}
    load_backbone(model, path)
    loaded, original = model.state_dict(), source.state_dict()
    for key, value in loaded.items():
        if key.startswith("fc."):
            assert torch.equal(value, fresh_fc[key[3:]])
        else:
            assert torch.equal(value, original[key]), key
    assert model.fc.weight.shape == (3, 16)
    assert sum(1 for k in loaded if k.endswith("num_batches_tracked")) > 0


def test_init_takes_a_file_from_before_bn_counted_its_updates(tmp_path):
    # Files saved before torch 0.4.1 (torchvision's first model zoo) have no num_batches_tracked.
    source = pretrained()
    legacy = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(legacy, tmp_path / "legacy.pth")
    model = create_model("resnet20", width=4, num_classes=3)
    load_backbone(model, tmp_path / "legacy.pth")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in legacy.items() if not k.startswith("fc."))
    assert all(loaded[k] == 0 for k in loaded if k.endswith("num_batches_tracked"))


def test_init_from_the_wrong_net_is_a_one_line_error(tmp_path):
    model = create_model("resnet20", width=4, num_classes=3)
    deeper = weights_files(tmp_path, create_model("resnet32", width=4))["pth"]
    with pytest.raises(ValueError) as err:
        load_backbone(model, deeper)
    message = str(err.value)
    assert "\n" not in message and deeper in message and "layer1.3.conv1.weight" in message
    wider = tmp_path / "wider.safetensors"
    save_tensors(wider, create_model("resnet20", width=8).state_dict())
    with pytest.raises(ValueError, match=r"wider.safetensors: .*conv1.weight is \[8, 3, 3, 3\]"):
        load_backbone(model, wider)
    shallower = tmp_path / "shallower.safetensors"
    save_tensors(shallower, {k: v for k, v in model.state_dict().items() if "layer3.2" not in k})
    with pytest.raises(ValueError, match="has no layer3.2.conv1.weight"):
        load_backbone(model, shallower)
    broken = model.state_dict()
    broken["layer2.0.bn1.running_var"][3] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_tensors(nan, broken)
    with pytest.raises(ValueError, match="nan.safetensors: layer2.0.bn1.running_var holds NaN"):
        load_backbone(model, nan)
    as_int = tmp_path / "int.safetensors"
    save_tensors(as_int, {k: v.long() for k, v in model.state_dict().items()})
    with pytest.raises(ValueError, match="int.safetensors: conv1.weight holds torch.int64"):
        load_backbone(model, as_int)


def test_a_pth_is_never_unpickled_beyond_tensors(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(ValueError) as err:
        read_weights(evil)
    assert "\n" not in str(err.value) and "evil.pth" in str(err.value)
    assert not marker.exists()
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {}}, wrapped)
    with pytest.raises(ValueError, match="wrapped.pt: not a state dict"):
        read_weights(wrapped)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        read_weights(garbage)
    with pytest.raises(ValueError, match="expected a deepres run directory"):
        read_weights(garbage.rename(tmp_path / "weights.bin"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_weights(tmp_path)


def test_freeze_backbone_leaves_every_other_parameter_and_bn_buffer_unchanged():
    torch.manual_seed(0)
    model = pretrained()
    freeze_backbone(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == [model.fc.weight, model.fc.bias]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=1e-4)
    preprocess = Preprocess(torch.full((3, 1, 1), 0.5), torch.ones(3, 1, 1))
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    model.train()
    for _ in range(3):
        x, y = preprocess(images), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # An evaluation switches the net to eval and back to train, as the loop's do.
        predict_logits(model, images, preprocess)
        assert model.training
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("fc."):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key


def finetune_config(folder, out, **kw) -> TrainConfig:
    return tiny_config(folder, out, **{"iters": 4, "checkpoint_every": 2, **kw})


def test_train_init_freeze_backbone_and_resume(tiny_folder, tmp_path):
    source = pretrained()
    pth = weights_files(tmp_path, source)["pth"]
    whole = finetune_config(tiny_folder, tmp_path / "whole", init=pth, freeze_backbone=True)
    train(whole, progress=False)
    weights = load_tensors(tmp_path / "whole" / WEIGHTS)[0]
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(weights[key], value), key
    assert weights["fc.weight"].shape == (3, 16)  # tiny_folder has 3 classes, the source 10
    recorded = json.loads((tmp_path / "whole" / "config.json").read_text())["init_source"]
    assert recorded == {"path": pth, "sha256": hashlib.sha256(open(pth, "rb").read()).hexdigest()}
    # Stopped and resumed with the weights file gone: the checkpoint holds all it needs.
    stopped = replace(whole, out=str(tmp_path / "stopped"))
    train(stopped, stop_at=2, progress=False)
    os.remove(pth)
    config = load_config(tmp_path / "stopped")
    assert config.init == pth and config.freeze_backbone
    train(config, resume=True, progress=False)
    assert (tmp_path / "whole" / WEIGHTS).read_bytes() == (
        tmp_path / "stopped" / WEIGHTS
    ).read_bytes()


def test_cli_train_init_from_a_run(tiny_folder, tmp_path, capsys):
    base = ["train", "--model", "resnet20", "--width", "4", "--data", str(tiny_folder)]
    base += ["--iters", "2", "--batch-size", "16", "--quiet", "--device", "cpu"]
    first, second = tmp_path / "first", tmp_path / "second"
    # Another seed for the first run: a second run that ignored --init would start elsewhere.
    assert main([*base, "--out", str(first), "--seed", "1"]) == 0
    assert main([*base, "--out", str(second), "--init", str(first)]) == 0
    capsys.readouterr()
    saved = json.loads((second / "config.json").read_text())
    assert saved["config"]["init"] == str(first)
    # Where the weights came from, so that a later change of that run does not hide it.
    assert saved["init_source"] == {
        "path": str((first / WEIGHTS).resolve()),
        "sha256": hashlib.sha256((first / WEIGHTS).read_bytes()).hexdigest(),
        "iteration": 2,
    }
    start = load_tensors(first / WEIGHTS)[0]
    end = load_tensors(second / WEIGHTS)[0]
    # Not frozen: the backbone trains on from the first run's weights.
    assert not torch.equal(start["conv1.weight"], end["conv1.weight"])
    assert torch.allclose(start["conv1.weight"], end["conv1.weight"], atol=0.1)


def test_cli_train_init_from_a_shipped_net_by_name(tiny_folder, tmp_path, capsys):
    out = tmp_path / "tuned"
    args = ["train", "--model", "resnet20", "--data", str(tiny_folder), "--iters", "2"]
    args += ["--batch-size", "16", "--quiet", "--out", str(out)]
    assert main([*args, "--init", "resnet20-cifar10", "--freeze-backbone"]) == 0
    # Its statistics are fitted on the new data, at the new size: said, as nothing else would.
    warned = capsys.readouterr().err
    assert "learned on 32x32 images with pixel normalisation; this run feeds 12x12" in warned
    shipped = load_tensors(resolve_run("resnet20-cifar10") / WEIGHTS)[0]
    tuned = load_tensors(out / WEIGHTS)[0]
    for key, value in shipped.items():
        if not key.startswith("fc."):
            assert torch.equal(tuned[key], value), key
    assert tuned["fc.weight"].shape == (3, 64)  # the shipped net has 10 classes
    # A name that is neither a path nor a shipped net: one line saying what --init takes.
    assert main([*args[:-1], str(tmp_path / "other"), "--init", "resnet21-cifar10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet21-cifar10" in err[0] and "shipped net" in err[0]


def test_cli_train_init_errors_are_one_line_and_write_nothing(tiny_folder, tmp_path, capsys):
    base = ["train", "--model", "resnet20", "--width", "4", "--data", str(tiny_folder)]
    base += ["--iters", "2", "--quiet", "--out", str(tmp_path / "out")]
    wrong = weights_files(tmp_path, create_model("resnet32", width=4))["safetensors"]
    assert main([*base, "--init", wrong]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and wrong in err[0] and "layer1.3" in err[0]
    assert main([*base, "--freeze-backbone"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init" in err[0]
    assert not (tmp_path / "out").exists()


def test_init_refuses_the_weights_of_another_net_with_the_same_tensors(tiny_folder, tmp_path):
    # A plain net and its option-A twin have the same tensors: only the run's config tells.
    plain = tmp_path / "plain"
    train(finetune_config(tiny_folder, plain, model="plain20", iters=2), progress=False)
    tuned = finetune_config(tiny_folder, tmp_path / "tuned", init=str(plain))
    with pytest.raises(ValueError, match="the weights of plain20, not of resnet20"):
        train(tuned, progress=False)
    # A typo is found before the data is read, let alone decoded.
    typo = replace(tuned, data=str(tmp_path / "not-here"), init=str(tmp_path / "plian"))
    with pytest.raises(FileNotFoundError, match="^--init .*plian: no such file, folder or shipped"):
        train(typo, progress=False)


@pytest.mark.parametrize("kind", ["pth", "safetensors"])  # torchvision's; timm's or the Hub's
def test_a_weights_file_into_an_imagenet_net_normalised_per_pixel_is_warned_about(tmp_path, kind):
    from deepres.train import _warn_init_input

    weights = weights_files(tmp_path, create_model("resnet18", width=4))[kind]
    config = TrainConfig(model="resnet18", data="d", out="o", init=weights)
    with pytest.warns(UserWarning, match="torchvision's and timm's weights learned on per-channel"):
        _warn_init_input(config, "pixel", [3, 32, 32])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_init_input(config, "channel", [3, 32, 32])


def test_a_runs_own_weights_file_is_taken_as_the_run(tmp_path):
    from deepres.finetune import init_source
    from deepres.pretrained import SHIPPED

    files = weights_files(tmp_path, create_model("resnet20", width=4))
    run = Path(files["run"])
    assert init_source(run / WEIGHTS) is None  # no config.json: a weights file like any other
    # A Hub or timm snapshot: model.safetensors beside a config.json that is not a run's.
    (run / "config.json").write_text('{"architecture": "resnet50", "num_classes": 1000}')
    assert init_source(run / WEIGHTS) is None
    assert init_source(files["safetensors"]) is None
    # A config.json that is no JSON at all: a damaged run, named, not weights from elsewhere.
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        init_source(run / WEIGHTS)
    shipped = SHIPPED / "resnet20-cifar10"
    assert init_source(shipped / WEIGHTS) == shipped == init_source(shipped)


def test_cli_train_stride_in_builds_v1_5_bottlenecks(tiny_folder, tmp_path, capsys):
    # torchvision's ResNet-50 weights are v1.5 (the stride in the 3x3): they fit a v1 net's
    # shapes too, so the layout must be asked for, and it is saved with the run.
    base = ["train", "--data", str(tiny_folder), "--image-size", "32", "--iters", "1"]
    base += ["--batch-size", "4", "--quiet"]
    out = tmp_path / "v15"
    assert (
        main(
            [*base, "--model", "resnet50", "--width", "4", "--stride-in", "3x3", "--out", str(out)]
        )
        == 0
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["stride_in"] == "3x3"
    model = build_model(saved)
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    capsys.readouterr()
    assert (
        main([*base, "--model", "resnet20", "--stride-in", "3x3", "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet20 is a CIFAR net" in err[0]
    assert not (tmp_path / "x").exists()
    # A .pth (torchvision's format) into a v1 bottleneck net: a warning, as nothing else tells.
    pth = weights_files(tmp_path, create_model("resnet50", width=4, stride_in_1x1=False))["pth"]
    v1 = [*base, "--model", "resnet50", "--width", "4", "--init", pth, "--normalize", "channel"]
    assert main([*v1, "--out", str(tmp_path / "v1")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --stride-in 3x3" in err[0] and pth in err[0]
    # The same tensors as the Hub ships them: model.safetensors beside a config.json of its own.
    snapshot = tmp_path / "hub" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_tensors(snapshot / WEIGHTS, create_model("resnet50", width=4).state_dict())
    (snapshot / "config.json").write_text('{"architecture": "resnet50", "num_classes": 1000}')
    hub = str(snapshot / WEIGHTS)
    assert main([*v1[:-4], "--init", hub, *v1[-2:], "--out", str(tmp_path / "h")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --stride-in 3x3" in err[0] and hub in err[0]
    assert main([*v1, "--stride-in", "3x3", "--out", str(tmp_path / "v15-init")]) == 0
    assert capsys.readouterr().err.strip() == ""


def test_an_init_run_with_damaged_weights_metadata_is_named(tmp_path):
    import shutil

    import safetensors.torch

    from deepres.finetune import read_init
    from deepres.pretrained import SHIPPED

    run = tmp_path / "net"
    shutil.copytree(SHIPPED / "resnet20-cifar10", run)
    tensors, _ = load_tensors(run / WEIGHTS)
    safetensors.torch.save_file(tensors, run / WEIGHTS, metadata={"json": "{not json"})
    with pytest.raises(ValueError, match=f"{run / WEIGHTS}: its metadata is damaged"):
        read_init(run)
    # Weights of another shape than config.json's net: the cause named, not torch's first line.
    import deepres

    safetensors.torch.save_file({**tensors, "fc.weight": torch.zeros(3, 64)}, run / WEIGHTS)
    with pytest.raises(ValueError, match=r"does not match .*config.json \(size mismatch for fc"):
        deepres.load(run)
