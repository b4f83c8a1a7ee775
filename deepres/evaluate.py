"""Evaluation: top-1/top-5 error of a net, on one view per image (Sec. 4.2) or with the paper's
ImageNet testing (Sec. 3.4) on full-size images: a center crop, 10-crop (Table 3) and
fully-convolutional multi-scale (Table 4).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from deepres.checkpoint import read_config
from deepres.data import DataError, available_splits, open_dataset
from deepres.data.augment import resize_shorter
from deepres.data.loader import Preprocess, split_train_val
from deepres.data.readers import (
    NAMED_DATA,
    ImageFolderSplit,
    MixedSizes,
    TooLarge,
    absolute_data,
    list_image_folder,
    locate_data,
    match_channels,
    read_full_size,
)
from deepres.data.stream import open_image_files, shard_files, stream_kind, stream_splits
from deepres.inference import eval_mode, load, no_tf32, parse_device
from deepres.models import model_family
from deepres.pretrained import resolve_run

# "single" is the one view of the in-memory data the net was trained on; the others read
# every image at full size from the data source.
PROTOCOLS = ("single", "center", "10crop", "multiscale")
# Table 4's shorter sides; the paper's crop is 224 after resizing the shorter side to 256.
PAPER_SCALES = (224, 256, 384, 480, 640)
# A typo such as 100000 would ask for tens of GB per image; the paper's largest side is 640.
MAX_SIDE = 4096


@dataclass(frozen=True)
class Protocol:
    """How the test views of an image are cut (center, 10crop, multiscale) and combined."""

    name: str
    resize: int = 256  # center, 10crop: the shorter side before cropping
    crop: int = 224  # center, 10crop: the side of the square views
    scales: tuple[int, ...] = PAPER_SCALES  # multiscale: the shorter sides
    flip: bool = True  # multiscale: each scale with its horizontal flip too

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS[1:]:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.name!r}")
        if not self.scales or min(self.resize, self.crop, *self.scales) < 1:
            raise ValueError(f"{self.name}: sizes must be positive numbers of pixels")
        if max(self.resize, self.crop, *self.scales) > MAX_SIDE:
            raise ValueError(f"{self.name}: sizes above {MAX_SIDE} pixels are refused")
        if self.name != "multiscale" and self.crop > self.resize:
            raise ValueError(f"{self.name}: crop {self.crop} is larger than resize {self.resize}")

    def settings(self) -> dict:
        """The sizes this protocol uses, for the record."""
        if self.name == "multiscale":
            return {"scales": list(self.scales), "flip": self.flip}
        return {"resize": self.resize, "crop": self.crop}


def default_protocol(name: str, family: str, input_size: int) -> Protocol:
    """The paper's sizes for an ImageNet net (in proportion to a crop other than 224); for a
    CIFAR-sized net, sizes of its input."""
    if family == "imagenet":
        # A net trained on smaller crops (--crop-size) is tested as it was trained: the same
        # crop, resized from the same 256/224 shorter side as its training's centre view.
        ratio = input_size / 224
        scales = tuple(round(side * ratio) for side in PAPER_SCALES)
        return Protocol(name, resize=round(256 * ratio), crop=input_size, scales=scales)
    # A CIFAR-sized net sees whole images of its input size: its center view is that image
    # (resize = crop, as the single view), and Table 4's sides keep their ratios to the crop.
    scales = tuple(round(side * input_size / 224) for side in PAPER_SCALES)
    return Protocol(name, resize=input_size, crop=input_size, scales=scales)


def channel_preprocess(preprocess: Preprocess) -> Preprocess:
    """The run's normalisation for views of any size: a per-channel mean and std [C, 1, 1]."""
    # A per-pixel mean image (the paper's, Sec. 3.4) has the training size, which full-size
    # views do not: its average over the pixels is the mean colour it subtracts on average.
    return Preprocess(
        preprocess.mean.mean((1, 2), keepdim=True), preprocess.std.mean((1, 2), keepdim=True)
    )


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of [..., H, W], offsets rounded down (as --image-size)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The 4 corner and the central size x size windows of [C, H, W], then their h-flips."""
    h, w = x.shape[-2:]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    crops = [x[:, top : top + size, left : left + size] for top, left in corners]
    crops = torch.stack([*crops, center_crop(x, size)])
    return torch.cat([crops, crops.flip(-1)])


def dense_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class scores [N, K, h, w] at every position of the last map: the fc as a 1x1 conv."""
    features = model.forward_features(x)[model.stage_names[-1]]
    return F.conv2d(features, model.fc.weight[:, :, None, None], model.fc.bias)


def _as_input(image: Image.Image, preprocess: Preprocess, device: torch.device) -> torch.Tensor:
    array = np.asarray(image)
    x = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1)
    return preprocess(x.permute(2, 0, 1)[None].to(device))


@torch.no_grad()
def protocol_probabilities(
    model: nn.Module, image: Image.Image, preprocess: Preprocess, protocol: Protocol
) -> torch.Tensor:
    """Class probabilities [K] of one image: the softmax averaged over the protocol's views."""
    with eval_mode(model):
        return _protocol_probabilities(model, image, preprocess, protocol)


def _protocol_probabilities(
    model: nn.Module, image: Image.Image, preprocess: Preprocess, protocol: Protocol
) -> torch.Tensor:
    device = next(model.parameters()).device
    if protocol.name == "multiscale":
        probs = []
        for side in protocol.scales:
            x = _as_input(resize_shorter(image, side), preprocess, device)
            views = torch.cat([x, x.flip(-1)]) if protocol.flip else x
            # The score map is averaged over positions before the softmax, as VGG does (the
            # paper's [41]); then softmax scores are averaged over scales and flips. At the
            # training size this is exactly the net's ordinary forward.
            probs.append(dense_logits(model, views).mean((2, 3)).float().softmax(1))
        result = torch.cat(probs).mean(0)
    else:
        x = _as_input(resize_shorter(image, protocol.resize), preprocess, device)[0]
        crop = protocol.crop
        if protocol.name == "center":
            views = center_crop(x, crop)[None]
        else:
            # AlexNet's ten views (the paper's [21]): the corners and centre of the central
            # resize x resize square, as AlexNet's 256x256 images were; not of the whole photo.
            # Where the views are as large as that square (a CIFAR net's 32 crop of a photo
            # resized to 32 on its shorter side), a photo that is not square keeps the corners
            # of the whole resized photo, or all ten would be its centre.
            if protocol.resize > crop:
                x = center_crop(x, protocol.resize)
            views = ten_crop(x, crop)
        result = model(views).float().softmax(1).mean(0)
    return result


def predict_protocol(
    model: nn.Module,
    images: Iterable[tuple[np.ndarray, int]],
    preprocess: Preprocess,
    protocol: Protocol,
    total: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [N, K] and labels [N] of (uint8 HxW[xC] image, label) pairs, one at a time."""
    preprocess = channel_preprocess(preprocess).to(next(model.parameters()).device)
    mode = "L" if preprocess.mean.shape[0] == 1 else "RGB"
    probs, labels = [], []
    for array, label in tqdm(images, total=total, disable=None if progress else True):
        image = Image.fromarray(array).convert(mode)
        probs.append(protocol_probabilities(model, image, preprocess, protocol))
        labels.append(label)
    if not probs:
        raise ValueError("no images to evaluate")
    return torch.stack(probs), torch.tensor(labels)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int = 500,
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits of the single original view of each uint8 image, in eval mode, on the net's device."""
    device = next(model.parameters()).device
    preprocess = preprocess.to(device)
    out = []
    with eval_mode(model):
        for chunk in images.split(batch_size):
            x = preprocess(chunk.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float())
    return torch.cat(out) if out else torch.empty(0, 0)


def error_rates(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """top1_error and top5_error in %, n, and the top-1 error of each class in %."""
    labels = labels.to(logits.device)
    n, num_classes = logits.shape
    if n == 0:
        raise ValueError("no images to evaluate")
    top5 = logits.topk(min(5, num_classes), dim=1).indices
    wrong1 = top5[:, 0] != labels
    wrong5 = ~(top5 == labels[:, None]).any(1)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        count = int(mask.sum())
        per_class.append(100.0 * int(wrong1[mask].sum()) / count if count else None)
    return {
        "top1_error": 100.0 * int(wrong1.sum()) / n,
        "top5_error": 100.0 * int(wrong5.sum()) / n,
        "n": n,
        "per_class_error": per_class,
    }


def evaluate_run(
    run: str | Path,
    data: str | None = None,
    split: str = "test",
    device: str = "cpu",
    protocol: str = "single",
    resize: int | None = None,
    crop: int | None = None,
    scales: tuple[int, ...] | None = None,
    progress: bool = False,
) -> dict:
    """Top-1/top-5 error of a run on a test split or its held-out split, under a protocol.

    Data given that has one split only (a bare <class>/ image folder, as held-out test sets
    often come) is evaluated whole ("all"), its classes matched to the run's by name. resize,
    crop and scales replace the protocol's defaults (default_protocol).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if split not in ("test", "val"):
        raise ValueError(f"--split must be test or val, got {split!r}")
    run = resolve_run(run)
    classifier = load(run)
    saved = read_config(run)
    config = saved["config"]
    if protocol == "single" and saved.get("augment"):
        # A run trained on streamed photos has no one image size: its single view is the centre
        # view its training evaluated on (Sec. 3.4's 224 crop of the 256-side image).
        protocol = "center"
    # A size the protocol does not use would change nothing, silently: refused instead.
    unused = [
        flag
        for flag, value, used_by in (
            ("--resize", resize, ("center", "10crop")),
            ("--crop", crop, ("center", "10crop")),
            ("--scales", scales, ("multiscale",)),
        )
        if value is not None and protocol not in used_by
    ]
    if unused:
        raise ValueError(
            f"{', '.join(unused)}: not used by --protocol {protocol} (--resize and --crop size "
            "the center and 10crop views, --scales the multiscale one)"
        )
    given = data is not None
    data = data or locate_data(config["data"], saved.get("data_path"))
    if not given and data not in NAMED_DATA and not Path(data).expanduser().exists():
        raise FileNotFoundError(
            f"{run}: its training data {data} is not found from {Path.cwd()}; pass --data PATH"
        )
    if split == "val" and not config["val_split"]:
        raise ValueError(f"{run}: was trained without --val-split, so it has no val split")
    # Shards are read by the streaming path only: looked for where the run streamed its data or
    # data is given (a shipped photo net tested on shards of new photos).
    shards = (given or saved.get("augment") is not None) and stream_kind(data) == "tar shards"
    if split == "test":
        split = _test_split(run, saved, data, given, shards)
    read_split = "test" if split == "test" else "train"
    keep = _val_images(run, saved, data) if split == "val" else None
    model = classifier.model.to(parse_device(device))
    # The iteration the weights come from and the run's budget: a run still training is
    # evaluated at its latest checkpoint, and the result says so.
    record = {
        "run": str(run),
        "iteration": classifier.iteration,
        "iters": saved["recipe"].get("iters"),
        "data": data,
        "split": split,
        "protocol": protocol,
    }
    if protocol != "single":
        sizes = {"resize": resize, "crop": crop, "scales": tuple(scales) if scales else scales}
        family = model_family(saved["model"])
        views = replace(
            default_protocol(protocol, family, classifier.input_size[1]),
            **{name: value for name, value in sizes.items() if value is not None},
        )
        if protocol == "multiscale" and family == "cifar" and max(views.scales) > views.crop:
            warnings.warn(
                f"{run}: a CIFAR net trained on {views.crop}-pixel images only is tested here "
                f"up to {max(views.scales)} pixels, sizes it never saw (the paper tests many "
                "scales on its ImageNet nets, trained on sides of 256-480): expect an error "
                "far above the single view's",
                stacklevel=2,
            )
        classes, n, images = _full_size(data, read_split, keep, classifier.classes, shards)
        index = _class_index(classes, classifier.classes, data, run)
        with _as_trained(saved):
            probs, labels = predict_protocol(
                model, images, classifier.preprocess, views, total=n, progress=progress
            )
        result = error_rates(probs, index[labels])
        return {**record, **views.settings(), **result, "classes": classifier.classes}
    try:
        dataset = open_dataset(data, read_split, image_size=config["image_size"])
    except TooLarge as error:
        raise DataError(
            f"{error.sizes}, decoded whole, would not fit in memory; --protocol center or 10crop "
            "reads them one at a time"
        ) from None
    except MixedSizes as error:
        raise DataError(
            f"{error.sizes}: the single view needs images of the net's size; "
            "--protocol center or 10crop resizes and crops each one"
        ) from None
    images, labels = dataset.images, dataset.labels
    if keep is not None:
        index = keep(len(labels))
        images, labels = images[index], labels[index]
    if images.shape[1] in (1, 3) and images.shape[2:] == tuple(classifier.input_size[1:]):
        images = match_channels(images, classifier.input_size[0])
    if list(images.shape[1:]) != classifier.input_size:
        raise ValueError(
            f"{data}: images {list(images.shape[1:])} do not fit {run} ({classifier.input_size})"
        )
    labels = _class_index(dataset.classes, classifier.classes, data, run)[labels]
    with _as_trained(saved):
        logits = predict_logits(model, images, classifier.preprocess)
    result = error_rates(logits, labels)
    return {**record, **result, "classes": classifier.classes}


def _as_trained(saved: dict) -> AbstractContextManager:
    # An fp32 run trained, and scored its held-out images, with TF32 off: so is it evaluated.
    return no_tf32() if saved["config"].get("precision", "fp32") == "fp32" else nullcontext()


def _val_images(run: Path, saved: dict, data: str):
    """The run's held-out indices among n training images, once n is checked to be its own."""
    val_split = saved["config"]["val_split"]

    def keep(n: int) -> torch.Tensor:
        # Drawn from the count: with an image more or less, most of them were trained on.
        expected = saved.get("n_train", n - val_split) + val_split
        if n != expected:
            raise DataError(
                f"{data}: {n:,} training images, where {run} was split from {expected:,}; its "
                "val split would hold images it trained on"
            )
        return split_train_val(n, val_split)[1]

    return keep


def _full_size(data: str, split: str, keep, classes: list[str], shards: bool):
    """read_full_size, for WebDataset tar shards too (which only the streaming path reads)."""
    if not shards:
        return read_full_size(data, split, keep)
    # Shards carry class numbers: the run's classes name them, a split may lack some.
    files = open_image_files(data, split, classes)
    if keep is not None:
        files = files.subset(keep(len(files)))
    return files.classes, len(files), files.full_size()


def _test_split(run: str | Path, saved: dict, data: str, given: bool, shards: bool) -> str:
    """ "test", or "all" for data given with one split only."""
    if not given or (stream_splits(data) if shards else available_splits(data)) != ["train"]:
        return "test"
    # The run's own training images are no test set: for shards, any shard it trained on,
    # however the path is spelled (a shipped net no longer knows where its shards lay).
    if shards:
        trained_on = saved.get("data_path") or absolute_data(saved["config"]["data"])
        own = bool(shard_files(data) & shard_files(trained_on))
    else:
        own = _trained_on(data, saved)
    if own:
        raise ValueError(
            f"{data}: the data {run} was trained on, with no test split; give held-out "
            "images, or --split val for a run trained with --val-split"
        )
    return "all"


def _trained_on(data: str, saved: dict) -> bool:
    """Whether one-split data is the data a run trained on, decoding it only where that tells."""
    listing = list_image_folder(data, "train")
    if listing is not None and (
        listing.source == saved.get("data_source") or _same_files(listing, saved)
    ):
        return True
    fingerprint = saved.get("data_sha256")
    if listing is not None and not fingerprint:
        return False  # a streamed run: its photos are known by where they lay, not by pixels
    try:
        dataset = open_dataset(data, "train", image_size=saved["config"]["image_size"])
    except DataError:
        # The run's data decoded whole at this image size; data that does not is other data
        # (photos of many sizes, say), and the evaluation reads it its own way.
        return False
    return dataset.source == saved.get("data_source") or dataset.fingerprint() == fingerprint


def _same_files(listing: ImageFolderSplit, saved: dict) -> bool:
    """Whether an image folder lists the very files of the run's training split."""
    try:
        trained = list_image_folder(
            saved.get("data_path") or absolute_data(saved["config"]["data"]), "train"
        )
    except DataError:  # moved or gone (a shipped net's data)
        return False
    return trained is not None and _paths(trained) == _paths(listing)


def _paths(listing: ImageFolderSplit) -> set[Path]:
    return {listing.path / name for name in listing.names}


def _class_index(
    classes: list[str], run_classes: list[str], data: str, run: str | Path
) -> torch.Tensor:
    """For each of a data set's classes, the index of the run's class of that name."""
    if set(classes) != set(run_classes):
        missing = sorted(set(run_classes) - set(classes))
        extra = sorted(set(classes) - set(run_classes))
        raise ValueError(
            f"{data}: its classes differ from {run}'s: "
            f"not in the run: {', '.join(extra) or 'none'}; "
            f"not in the data: {', '.join(missing) or 'none'}"
        )
    return torch.tensor([run_classes.index(name) for name in classes])
