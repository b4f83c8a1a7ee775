import json

import pytest
import torch
import torch.nn.functional as F

from deepres.cli import main
from deepres.models import (
    BasicBlock,
    Bottleneck,
    ZeroPadShortcut,
    count_depth,
    count_params,
    create_model,
    list_models,
    model_stats,
)

CIFAR_PARAMS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
}
IMAGENET_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
TABLE1_GMACS = {
    "resnet18": 1.8,
    "resnet34": 3.6,
    "resnet50": 3.8,
    "resnet101": 7.6,
    "resnet152": 11.3,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,params", CIFAR_PARAMS.items())
def test_cifar_params_match_paper(name, params):
    assert n_params(create_model(name)) == params


@pytest.mark.parametrize("name,params", IMAGENET_PARAMS.items())
def test_imagenet_params_match_paper(name, params):
    assert n_params(create_model(name)) == params


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_twin_has_same_params_as_option_a_resnet(depth):
    assert n_params(create_model(f"plain{depth}")) == CIFAR_PARAMS[f"resnet{depth}"]


def test_every_net_depth_equals_its_name():
    for name in list_models():
        digits = int("".join(c for c in name if c.isdigit()))
        # The weighted layers the paper counts, ResNet-1202's included (count_depth is what
        # model_stats reports, without its flop count, which is slow at 1202 layers).
        assert count_depth(create_model(name)) == digits, name
    assert model_stats("resnet56", create_model("resnet56"))["depth"] == 56
    assert len(list_models()) == 18


@pytest.mark.parametrize("name,gmacs", TABLE1_GMACS.items())
def test_imagenet_macs_match_table1(name, gmacs):
    stats = model_stats(name, create_model(name))
    assert abs(stats["macs"] / 1e9 - gmacs) < 0.1
    assert stats["input_size"] == [3, 224, 224]


def test_resnet50_v15_costs_4_1_gmacs():
    stats = model_stats("resnet50", create_model("resnet50", stride_in_1x1=False))
    assert abs(stats["macs"] / 1e9 - 4.1) < 0.05


def test_stride_placement_v1_and_v15():
    v1 = create_model("resnet50")
    v15 = create_model("resnet50", stride_in_1x1=False)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    x = torch.randn(1, 3, 64, 64)
    assert v1.eval()(x).shape == v15.eval()(x).shape == (1, 1000)


def test_shortcut_options_change_params_as_the_paper_says():
    a = n_params(create_model("resnet34", shortcut="A"))
    b = n_params(create_model("resnet34", shortcut="B"))
    c = n_params(create_model("resnet34", shortcut="C"))
    assert a < b < c
    assert n_params(create_model("plain34")) == a
    ra, rb, rc = (create_model("resnet20", shortcut=s) for s in "ABC")
    assert n_params(ra) == CIFAR_PARAMS["resnet20"] < n_params(rb) < n_params(rc)
    # Option C projects every shortcut, B only the two that change shape.
    assert sum(b.downsample is not None for b in rb.modules() if isinstance(b, BasicBlock)) == 2
    assert sum(b.downsample is not None for b in rc.modules() if isinstance(b, BasicBlock)) == 9
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", shortcut="D")


def test_option_a_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_resnet20_widens_its_stages_by_option_a():
    # With its residual branch zeroed, the first block of conv3_x passes on the shortcut alone:
    # every other pixel of the 16 input maps, then 16 maps of zeros, and no parameter.
    block = create_model("resnet20").layer2[0].eval()
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.zeros_(block.bn2.bias)
    x = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (1, 32, 16, 16)
    for channel, i, j in [(0, 0, 0), (5, 3, 7), (15, 15, 15), (9, 15, 0)]:
        assert out[0, channel, i, j] == max(float(x[0, channel, 2 * i, 2 * j]), 0.0)
    assert torch.count_nonzero(out[0, 16:]) == 0
    assert sum(p.numel() for p in block.downsample.parameters()) == 0


def test_plain_block_has_no_addition_and_residual_block_does():
    x = torch.rand(1, 16, 8, 8)
    for residual, expected in [(True, x), (False, torch.zeros_like(x))]:
        block = BasicBlock(16, 16, residual=residual).eval()
        torch.nn.init.zeros_(block.bn2.weight)
        torch.nn.init.zeros_(block.bn2.bias)
        assert torch.allclose(block(x), expected)


def test_zero_init_residual_zeroes_the_last_bn_of_each_block():
    model = create_model("resnet50", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.count_nonzero(b.bn2.weight) > 0 for b in blocks)
    default = create_model("resnet20")
    assert all(torch.count_nonzero(b.bn2.weight) > 0 for b in default.layer1)
    # Basic blocks too: their second BN. A plain net has no identity to start as, so none.
    basic = [m for m in create_model("resnet20", zero_init_residual=True).modules()]
    basic = [m for m in basic if isinstance(m, BasicBlock)]
    assert len(basic) == 9 and all(torch.count_nonzero(b.bn2.weight) == 0 for b in basic)
    assert all(torch.count_nonzero(b.bn1.weight) > 0 for b in basic)
    plain = create_model("plain20", zero_init_residual=True)
    assert all(
        torch.count_nonzero(m.weight) > 0 for m in plain.modules() if hasattr(m, "running_var")
    )


def test_he_initialisation_scale():
    torch.manual_seed(0)  # the margins are wide, but the draw should not depend on test order
    # fan_out, as the paper's [13] and torchvision: a 16->32 conv has std sqrt(2 / (32 * 9)),
    # where fan_in would give sqrt(2 / (16 * 9)).
    conv = create_model("resnet56").layer2[0].conv1
    assert (conv.in_channels, conv.out_channels) == (16, 32)
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.05 * (2 / fan_out) ** 0.5
    # Normal, not uniform: about 4.6% of a normal's draws lie beyond 2 std, none of a uniform's
    # (whose bound is sqrt(3) std).
    outside = (conv.weight.abs() > 2 * (2 / fan_out) ** 0.5).float().mean().item()
    assert 0.03 < outside < 0.065


def test_cifar_shapes_options_and_grayscale():
    model = create_model("resnet20", num_classes=7, in_channels=1, width=8).eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)
    assert model.conv1.weight.shape == (8, 1, 3, 3)
    assert model.fc.in_features == 32
    assert create_model("plain20").eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_backbone_feature_maps():
    model = create_model("resnet50").eval()
    feats = model.forward_features(torch.randn(1, 3, 224, 224))
    assert list(feats) == ["conv2_x", "conv3_x", "conv4_x", "conv5_x"]
    assert [f.shape[1] for f in feats.values()] == model.feature_channels == [256, 512, 1024, 2048]
    assert [f.shape[-1] for f in feats.values()] == [56, 28, 14, 7]
    assert torch.allclose(
        model.forward_head(feats["conv5_x"]), model.fc(feats["conv5_x"].mean((2, 3))), atol=1e-5
    )
    cifar = create_model("resnet20").eval()
    feats = cifar.forward_features(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats.values()] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def torchvision_keys(layers, bottleneck):
    keys = ["conv1.weight"]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys += [f"bn1.{k}" for k in bn]
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            for j in range(1, 4 if bottleneck else 3):
                keys += [f"{p}.conv{j}.weight"] + [f"{p}.bn{j}.{k}" for k in bn]
            if i == 0 and (stage > 1 or bottleneck):
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{k}" for k in bn]
    return sorted(keys + ["fc.weight", "fc.bias"])


@pytest.mark.parametrize(
    "name,layers,bottleneck,n_keys",
    [("resnet18", [2, 2, 2, 2], False, 122), ("resnet50", [3, 4, 6, 3], True, 320)],
)
def test_state_dict_keys_follow_torchvision(name, layers, bottleneck, n_keys):
    keys = sorted(create_model(name).state_dict())
    assert keys == torchvision_keys(layers, bottleneck)
    assert len(keys) == n_keys


def _bn(m: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _randomise_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data.normal_()
            m.running_var.data.uniform_(0.5, 2)


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_a_bottleneck_computes_the_papers_block(stride_in_1x1):
    # Written out from Fig. 5 (right) with option B's projection: a missing ReLU, a stride in
    # the wrong conv or a shortcut added after the last ReLU would each change the output.
    torch.manual_seed(0)
    block = create_model("resnet50", stride_in_1x1=stride_in_1x1).layer2[0]
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, 256, 16, 16)
    s1, s3 = (2, 1) if stride_in_1x1 else (1, 2)
    out = F.relu(_bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=s1)))
    out = F.relu(_bn(block.bn2, F.conv2d(out, block.conv2.weight, stride=s3, padding=1)))
    out = _bn(block.bn3, F.conv2d(out, block.conv3.weight))
    shortcut = _bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    with torch.no_grad():
        assert torch.allclose(block(x), F.relu(out + shortcut), atol=1e-5)


def test_a_basic_block_computes_the_papers_block():
    # Fig. 5 (left), with the projection that changes the shape (option B, ResNet-18's default).
    torch.manual_seed(0)
    block = create_model("resnet18").layer2[0]
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, 64, 16, 16)
    out = F.relu(_bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=2, padding=1)))
    out = _bn(block.bn2, F.conv2d(out, block.conv2.weight, padding=1))
    shortcut = _bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    with torch.no_grad():
        assert torch.allclose(block(x), F.relu(out + shortcut), atol=1e-5)


def test_torchvision_resnet50_weights_load_into_v15():
    torchvision = pytest.importorskip("torchvision", reason="torchvision not importable here")
    reference = torchvision.models.resnet50(weights=None).eval()
    ours = create_model("resnet50", stride_in_1x1=False).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5)


def test_cli_models_json(capsys):
    # --stride-in applies to the ImageNet nets of the whole table and passes the others over...
    assert main(["models", "--stride-in", "3x3", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["name"] in ("resnet20", "resnet50")]
    assert [r["name"] for r in rows] == ["resnet20", "resnet50"]
    assert rows[0] == {
        "name": "resnet20",
        "depth": 20,
        "params": 269_722,
        "macs": rows[0]["macs"],
        "input_size": [3, 32, 32],
    }
    assert abs(rows[0]["macs"] / 1e6 - 40.6) < 0.1
    assert abs(rows[1]["macs"] / 1e9 - 4.1) < 0.05
    # ...and is refused for a net named that cannot take it, as is a plain net's --shortcut.
    for argv, why in (
        (["resnet20", "--stride-in", "3x3"], "--stride-in: resnet20 is a CIFAR net"),
        (["plain20", "--shortcut", "B"], "--shortcut: plain20 is a plain net"),
    ):
        assert main(["models", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0]


def test_cli_models_table_and_shortcut(capsys):
    assert main(["models", "resnet20", "--shortcut", "B"]) == 0
    out = capsys.readouterr().out
    # Option B adds two 1x1 projections with BN where the width doubles, 16->32 and 32->64.
    with_b = count_params(create_model("resnet20", shortcut="B"))
    assert with_b == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert "resnet20" in out and f"{with_b:,}" in out


def test_cli_unknown_model_is_one_line_error(capsys):
    assert main(["models", "resnet21"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'resnet21'" in err[0]
