import io
import json
import math
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from torch import nn

import deepres
from deepres import evaluate
from deepres.cli import main
from deepres.data import open_dataset
from deepres.data.loader import Preprocess
from deepres.data.readers import read_full_size
from deepres.evaluate import (
    Protocol,
    center_crop,
    channel_preprocess,
    default_protocol,
    dense_logits,
    error_rates,
    evaluate_run,
    predict_protocol,
    protocol_probabilities,
    resize_shorter,
)
from deepres.models import create_model
from deepres.train import train

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera.zip"
# Images of mixed sizes and aspects, as photos come: (width, height).
SIZES = [(20, 14), (14, 22), (17, 17), (30, 16)]


def identity_preprocess(channels: int = 3, scale: float = 1.0) -> Preprocess:
    """x = uint8 value * 255 / (255 * scale): no mean, so hand-computed inputs stay readable."""
    return Preprocess(torch.zeros(channels, 1, 1), torch.full((channels, 1, 1), scale / 255))


class ChannelProbe(nn.Module):
    """Logits [mean of channel 0, its top-left pixel, 0]: a known function of each view."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros(len(x))
        return torch.stack([x[:, 0].mean((1, 2)), x[:, 0, 0, 0], zeros], 1)


class Recorder(nn.Module):
    """Remembers the batch it was given; two constant logits."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.zeros(len(x), 2)


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_ten_crop_cuts_its_corners_from_the_central_square_as_alexnet_did():
    # 4 rows, 8 columns; channel 0 holds the column. AlexNet's views come from the central 4x4
    # square (columns 2-5): its corners start at columns 2 and 4, not at 0 and 6.
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[:, :, 0] = np.arange(8)
    probe = Recorder()
    protocol_probabilities(
        probe, Image.fromarray(pixels), identity_preprocess(), Protocol("10crop", 4, 2)
    )
    (views,) = probe.seen
    assert views[:5, 0, 0, 0].tolist() == [2, 4, 2, 4, 3]  # the corners, then the centre
    assert views[5:, 0, 0, 0].tolist() == [3, 5, 3, 5, 4]  # their flips start one column on
    # Views as large as the square (a CIFAR net's): the whole photo's corners, not ten centres.
    probe = Recorder()
    protocol_probabilities(
        probe, Image.fromarray(pixels), identity_preprocess(), Protocol("10crop", 4, 4)
    )
    assert probe.seen[0][:5, 0, 0, 0].tolist() == [0, 4, 0, 4, 2]


def test_ten_crop_averages_the_softmax_of_corners_centre_and_flips_by_hand():
    # Channel 0 holds 4i + j at row i, column j; scaled by 1/4 it reads i + j/4.
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[:, :, 0] = np.arange(16).reshape(4, 4)
    image = Image.fromarray(pixels)
    # Each 2x2 crop as (mean, top-left, top-right) of i + j/4; a flipped crop's top-left is the
    # crop's top-right. The centre crop is rows 1-2, columns 1-2.
    crops = [
        (0.625, 0.0, 0.25),  # top-left: 0, .25, 1, 1.25
        (1.125, 0.5, 0.75),  # top-right: .5, .75, 1.5, 1.75
        (2.625, 2.0, 2.25),  # bottom-left: 2, 2.25, 3, 3.25
        (3.125, 2.5, 2.75),  # bottom-right: 2.5, 2.75, 3.5, 3.75
        (1.875, 1.25, 1.5),  # centre: 1.25, 1.5, 2.25, 2.5
    ]
    views = [softmax([m, tl, 0]) for m, tl, _ in crops] + [
        softmax([m, tr, 0]) for m, _, tr in crops
    ]
    expected = torch.tensor([sum(v[k] for v in views) / 10 for k in range(3)])
    probs = protocol_probabilities(
        ChannelProbe(), image, identity_preprocess(scale=4.0), Protocol("10crop", 4, 2)
    )
    assert torch.allclose(probs, expected, atol=1e-6)
    # The centre crop alone is the centre view.
    centre = protocol_probabilities(
        ChannelProbe(), image, identity_preprocess(scale=4.0), Protocol("center", 4, 2)
    )
    assert torch.allclose(centre, torch.tensor(softmax([1.875, 1.25, 0])), atol=1e-6)


def test_center_crop_geometry():
    assert resize_shorter(Image.new("RGB", (500, 375)), 256).size == (341, 256)
    assert resize_shorter(Image.new("RGB", (375, 500)), 256).size == (256, 341)
    same = Image.new("RGB", (300, 256))
    assert resize_shorter(same, 256) is same
    x = torch.arange(5 * 7).view(1, 5, 7)
    assert center_crop(x, 3).tolist() == [[[9, 10, 11], [16, 17, 18], [23, 24, 25]]]
    # Shorter side 8 already: the 4x4 view is rows 2-5, columns 4-7 of the normalised image.
    pixels = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    model = Recorder()
    protocol_probabilities(
        model, Image.fromarray(pixels), identity_preprocess(), Protocol("center", 8, 4)
    )
    (seen,) = model.seen
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float()[:, 2:6, 4:8]
    assert seen.shape == (1, 3, 4, 4) and torch.allclose(seen[0], expected, atol=1e-4)
    # A 16x24 image is first resized to a shorter side of 8 (8x12), then cropped.
    model = Recorder()
    protocol_probabilities(
        model, Image.new("RGB", (24, 16)), identity_preprocess(), Protocol("center", 8, 4)
    )
    assert model.seen[0].shape == (1, 3, 4, 4)


def test_fully_convolutional_at_one_scale_equals_the_ordinary_forward():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    preprocess = Preprocess(torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25))
    x = preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    with torch.no_grad():
        logits = model(x)
        scores = dense_logits(model, x)
    assert scores.shape == (1, 10, 7, 7)
    assert torch.allclose(scores.mean((2, 3)), logits, atol=1e-5)
    probs = protocol_probabilities(
        model,
        Image.fromarray(pixels),
        preprocess,
        Protocol("multiscale", scales=(224,), flip=False),
    )
    assert torch.allclose(probs, logits.softmax(1)[0], atol=1e-6)


def test_multiscale_on_non_square_images_gives_probabilities_over_scales_and_flips():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3, width=4).eval()
    shapes = []
    model.conv1.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    preprocess = identity_preprocess()
    rng = np.random.default_rng(0)
    for height, width in [(40, 56), (56, 40)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        shapes.clear()
        probs = protocol_probabilities(
            model, image, preprocess, Protocol("multiscale", scales=(16, 24))
        )
        assert probs.shape == (3,) and (probs >= 0).all()
        assert abs(float(probs.sum()) - 1) < 1e-5
        long = [round(s * max(height, width) / min(height, width)) for s in (16, 24)]
        sides = [(16, long[0]), (24, long[1])] if height < width else [(long[0], 16), (long[1], 24)]
        assert shapes == [(2, 3, h, w) for h, w in sides]  # each scale with its flip, no crop
        # The average over flips is the average of the image's and its mirror image's.
        one_way = Protocol("multiscale", scales=(16, 24), flip=False)
        plain = protocol_probabilities(model, image, preprocess, one_way)
        mirrored = protocol_probabilities(
            model, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), preprocess, one_way
        )
        assert torch.allclose(probs, (plain + mirrored) / 2, atol=1e-6)
        assert not torch.allclose(plain, mirrored, atol=1e-6)


def test_protocol_sizes_default_to_the_paper_or_the_net_input():
    assert default_protocol("10crop", "imagenet", 224) == Protocol("10crop", 256, 224)
    # An ImageNet net trained on 112 crops is tested in the same proportions.
    small = default_protocol("multiscale", "imagenet", 112)
    assert (small.resize, small.crop, small.scales) == (128, 112, (112, 128, 192, 240, 320))
    cifar = default_protocol("multiscale", "cifar", 32)
    assert (cifar.resize, cifar.crop, cifar.scales) == (32, 32, (32, 37, 55, 69, 91))
    with pytest.raises(ValueError, match="larger than resize"):
        Protocol("center", resize=30, crop=32)
    with pytest.raises(ValueError, match="protocol must be"):
        Protocol("5crop")
    with pytest.raises(ValueError, match="sizes above 4096 pixels are refused"):
        Protocol("center", resize=100000, crop=224)
    with pytest.raises(ValueError, match="sizes above 4096 pixels are refused"):
        Protocol("multiscale", scales=(224, 100000))


def write_mixed_folder(root: Path) -> Path:
    """ROOT/{train,test}/<class>/*.png of mixed sizes, with a gray image among the colour ones."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("test", 3)):
        for label, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                width, height = SIZES[(i + label) % len(SIZES)]
                noise = rng.integers(-40, 40, (height, width, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                (image.convert("L") if (split, label, i) == ("test", 0, 1) else image).save(
                    folder / f"{i:02d}.png"
                )
    return root


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    return write_mixed_folder(tmp_path_factory.mktemp("mixed") / "photos")


def test_read_full_size_keeps_sizes_and_open_datasets_order(mixed_folder, tmp_path):
    dataset = open_dataset(str(mixed_folder), "test", image_size=8)
    classes, n, pairs = read_full_size(str(mixed_folder), "test")
    images, labels = zip(*pairs, strict=True)
    assert classes == dataset.classes and n == len(images) == 6
    assert list(labels) == dataset.labels.tolist()
    assert {image.shape[:2] for image in images} == {(h, w) for w, h in SIZES}
    assert sum(image.ndim == 2 for image in images) == 1  # the gray one stays gray
    # A tar yields members in archive order: written backwards, labels must still follow names.
    archive = tmp_path / "photos.tar"
    files = sorted(p for p in mixed_folder.rglob("*.png"))
    with tarfile.open(archive, "w") as tar:
        for path in reversed(files):
            tar.add(path, arcname=str(path.relative_to(mixed_folder)))
    _, _, tar_pairs = read_full_size(str(archive), "test")
    by_shape = sorted((a.shape, int(a.sum()), label) for a, label in tar_pairs)
    assert by_shape == sorted(
        (a.shape, int(a.sum()), label) for a, label in zip(images, labels, strict=True)
    )
    # keep picks by position in open_dataset's order.
    _, n_kept, kept = read_full_size(str(mixed_folder), "test", lambda n: torch.tensor([4, 0]))
    kept = list(kept)
    assert n_kept == 2 and [label for _, label in kept] == [labels[4], labels[0]]
    assert np.array_equal(kept[0][0], images[4]) and np.array_equal(kept[1][0], images[0])


def test_read_full_size_of_a_fixed_size_format(tmp_path):
    root = tmp_path / "zipped.zip"
    with zipfile.ZipFile(root, "w") as z:
        for i in range(3):
            buffer = io.BytesIO()
            Image.new("L", (9, 7), 40 * i).save(buffer, "PNG")
            z.writestr(f"train/c{i % 2}/{i}.png", buffer.getvalue())
    classes, n, pairs = read_full_size(str(root), "train")
    arrays = [a for a, _ in pairs]
    assert classes == ["c0", "c1"] and n == 3 and all(a.shape == (7, 9) for a in arrays)
    with pytest.raises(ValueError, match="no test split"):
        read_full_size(str(root), "test")


@pytest.fixture(scope="module")
def mixed_run(mixed_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mixed"
    config = tiny_config(
        mixed_folder, out, iters=2, batch_size=4, image_size=8, normalize="channel", val_split=4
    )
    train(config, progress=False)
    return out


def test_center_view_of_a_cifar_sized_run_is_its_single_view(mixed_run, mixed_folder):
    classifier = deepres.load(mixed_run)
    _, _, pairs = read_full_size(str(mixed_folder), "test")
    probs, labels = predict_protocol(
        classifier.model, pairs, classifier.preprocess, default_protocol("center", "cifar", 8)
    )
    dataset = open_dataset(str(mixed_folder), "test", image_size=8)
    assert torch.equal(labels, dataset.labels)
    assert torch.allclose(probs, classifier(dataset.images), atol=1e-5)


def test_cli_eval_protocols_json(mixed_run, capsys):
    errs = {}
    for protocol in ("center", "10crop", "multiscale"):
        assert main(["eval", str(mixed_run), "--protocol", protocol, "--json"]) == 0
        captured = capsys.readouterr()
        result, errs[protocol] = json.loads(captured.out), captured.err.strip().splitlines()
        assert result["protocol"] == protocol and result["n"] == 6
        assert 0 <= result["top1_error"] <= 100 and result["top5_error"] == 0.0
    assert result["scales"] == [8, 9, 14, 17, 23]
    # Only the multi-scale view takes a CIFAR-sized net to sizes it never trained on: one line.
    assert errs["center"] == errs["10crop"] == [] and len(errs["multiscale"]) == 1
    assert "trained on 8-pixel images only is tested here up to 23 pixels" in errs["multiscale"][0]
    assert (
        main(["eval", str(mixed_run), "--protocol", "multiscale", "--scales", "8", "--json"]) == 0
    )
    assert capsys.readouterr().err == ""
    args = ["eval", str(mixed_run), "--protocol", "10crop", "--crop", "6", "--split", "val"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and (result["resize"], result["crop"]) == (8, 6)
    assert main(args) == 0
    assert "10crop" in capsys.readouterr().out
    assert main(["eval", str(mixed_run), "--protocol", "multiscale", "--scales", "8,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scales" in err[0]
    assert main(["eval", str(mixed_run), "--protocol", "center", "--crop", "12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "larger than resize" in err[0]
    assert main(["eval", str(mixed_run), "--protocol", "center", "--resize", "0"]) == 2
    assert "positive" in capsys.readouterr().err
    # A size the protocol does not use is refused, not silently dropped.
    for protocol, flags, unused in (
        ("single", ["--resize", "12"], "--resize"),
        ("multiscale", ["--crop", "6", "--resize", "9"], "--resize, --crop"),
        ("10crop", ["--scales", "8,9"], "--scales"),
    ):
        assert main(["eval", str(mixed_run), "--protocol", protocol, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{unused}: not used by --protocol {protocol}" in err[0]


def test_channel_preprocess_averages_a_pixel_mean_over_the_pixels():
    # Views of other sizes than the training images' subtract the per-pixel mean's average.
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    pixel = Preprocess.fit(images, "pixel")
    channel = channel_preprocess(pixel)
    assert channel.mean.shape == channel.std.shape == (3, 1, 1)
    assert torch.allclose(channel.mean[:, 0, 0], pixel.mean.mean((1, 2)))
    # At the training size, the two agree over the pixels on average.
    assert torch.allclose(channel(images).mean((0, 2, 3)), pixel(images).mean((0, 2, 3)), atol=1e-5)
    # A per-channel normalisation is its own average.
    fitted = Preprocess.fit(images, "channel")
    assert torch.equal(channel_preprocess(fitted).mean, fitted.mean)


def test_protocols_agree_with_a_library_call(mixed_run, mixed_folder, capsys):
    result = evaluate_run(mixed_run, protocol="10crop")
    single = evaluate_run(mixed_run)
    assert result["protocol"] == "10crop" and single["protocol"] == "single"
    assert result["n"] == single["n"] == 6
    # The errors are those of the protocol's own probabilities, and of the net's single view.
    classifier = deepres.load(mixed_run)
    _, _, pairs = read_full_size(str(mixed_folder), "test")
    protocol = default_protocol("10crop", "cifar", 8)
    probs, labels = predict_protocol(classifier.model, pairs, classifier.preprocess, protocol)
    for key in ("top1_error", "per_class_error"):
        assert result[key] == error_rates(probs, labels)[key]
    dataset = open_dataset(str(mixed_folder), "test", image_size=8)
    assert (
        single["top1_error"]
        == error_rates(classifier(dataset.images), dataset.labels)["top1_error"]
    )
    # --resize, --crop and --scales replace the protocol's own sizes.
    seen, real = [], evaluate.predict_protocol

    def spy(model, images, preprocess, protocol, **kwargs):
        seen.append(protocol)
        return real(model, images, preprocess, protocol, **kwargs)

    for name, sizes, flags in (
        ("center", {"resize": 12, "crop": 10}, ["--resize", "12", "--crop", "10"]),
        ("multiscale", {"scales": (9, 14)}, ["--scales", "9,14"]),
    ):
        views = replace(default_protocol(name, "cifar", 8), **sizes)
        _, _, pairs = read_full_size(str(mixed_folder), "test")
        probs, labels = predict_protocol(classifier.model, pairs, classifier.preprocess, views)
        expected = error_rates(probs, labels)["per_class_error"]
        # The views the command line asked for reach the evaluation, and only those.
        seen.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(evaluate, "predict_protocol", spy)
            assert main(["eval", str(mixed_run), "--protocol", name, *flags, "--json"]) == 0
        assert seen == [views]
        assert json.loads(capsys.readouterr().out)["per_class_error"] == expected


@pytest.mark.skipif(not HYMENOPTERA.is_file(), reason=f"{HYMENOPTERA} is absent")
def test_hymenoptera_photos_read_at_full_size():
    classes, n, pairs = read_full_size(str(HYMENOPTERA), "test", lambda n: torch.arange(0, n, 40))
    sizes = [image.shape for image, _ in pairs]
    assert classes == ["ants", "bees"] and n == len(sizes) == 4
    assert len(set(sizes)) > 1 and all(len(s) == 3 and s[2] == 3 for s in sizes)


def test_a_net_evaluated_goes_back_to_its_mode_even_when_the_forward_fails():
    model = create_model("resnet20", num_classes=3, width=4).train()
    gray = Preprocess(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    with pytest.raises(RuntimeError, match="channels"):  # the net's first conv takes 3
        evaluate.predict_logits(model, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), gray)
    assert model.training
    colour = Preprocess(torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
    logits = evaluate.predict_logits(model, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), colour)
    assert logits.shape == (2, 3) and model.training


def test_eval_of_images_too_large_to_decode_whole_says_how(tiny_folder, tmp_path, monkeypatch):
    from deepres.data import DataError, readers

    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=1), progress=False)
    fresh = tmp_path / "fresh"  # not in the decode cache: decoded here
    for c, name in enumerate(("blue", "green", "red")):
        (fresh / name).mkdir(parents=True)
        Image.new("RGB", (12, 12), (40 * c, 0, 0)).save(fresh / name / "0.png")
    monkeypatch.setattr(readers, "available_memory", lambda: 1000)
    with pytest.raises(DataError, match="would not fit in memory; --protocol center or 10crop"):
        evaluate_run(run, str(fresh))
