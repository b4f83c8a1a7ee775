"""Evaluation: top-1/top-5 error of a net on uint8 images, single view (Sec. 4.2)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepres.checkpoint import CONFIG, read_json
from deepres.data import ImageDataset, available_splits, open_dataset
from deepres.data.loader import Preprocess, split_train_val
from deepres.inference import load
from deepres.pretrained import resolve_run


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int = 500,
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits of the single original view of each uint8 image, in eval mode, on the net's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preprocess = preprocess.to(device)
    out = []
    for chunk in images.split(batch_size):
        x = preprocess(chunk.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float())
    model.train(was_training)
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
    run: str | Path, data: str | None = None, split: str = "test", device: str = "cpu"
) -> dict:
    """Top-1/top-5 error of a trained run on a data set's test split or the run's held-out split.

    Data given that has one split only (a bare <class>/ image folder, as held-out test sets
    often come) is evaluated whole, its classes matched to the run's by name.
    """
    run = resolve_run(run)
    classifier = load(run)
    saved = read_json(run / CONFIG)
    config = saved["config"]
    given, data = data is not None, data or config["data"]
    if split == "val":
        if not config["val_split"]:
            raise ValueError(f"{run}: was trained without --val-split, so it has no val split")
        dataset = open_dataset(data, "train", image_size=config["image_size"])
        _, index = split_train_val(len(dataset.labels), config["val_split"])
        images, labels = dataset.images[index], dataset.labels[index]
    elif split == "test":
        split, dataset = _test_set(run, saved, data, given)
        images, labels = dataset.images, dataset.labels
    else:
        raise ValueError(f"--split must be test or val, got {split!r}")
    if list(images.shape[1:]) != classifier.input_size:
        raise ValueError(
            f"{data}: images {list(images.shape[1:])} do not fit {run} ({classifier.input_size})"
        )
    labels = _to_run_classes(labels, dataset.classes, classifier.classes, data, run)
    model = classifier.model.to(device)
    logits = predict_logits(model, images, classifier.preprocess)
    result = error_rates(logits, labels)
    return {"run": str(run), "data": data, "split": split, **result, "classes": classifier.classes}


def _test_set(run: str | Path, saved: dict, data: str, given: bool) -> tuple[str, ImageDataset]:
    """The test split of data, or all of data given with one split only ("all")."""
    image_size = saved["config"]["image_size"]
    if not given or available_splits(data) != ["train"]:
        return "test", open_dataset(data, "test", image_size=image_size)
    dataset = open_dataset(data, "train", image_size=image_size)
    # The run's own training images are no test set.
    if dataset.source == saved.get("data_source"):
        raise ValueError(
            f"{data}: the data {run} was trained on, with no test split; give held-out "
            "images, or --split val for a run trained with --val-split"
        )
    return "all", dataset


def _to_run_classes(
    labels: torch.Tensor, classes: list[str], run_classes: list[str], data: str, run: str | Path
) -> torch.Tensor:
    """Labels of a data set's classes as indices of the run's classes, matched by name."""
    if set(classes) != set(run_classes):
        missing = sorted(set(run_classes) - set(classes))
        extra = sorted(set(classes) - set(run_classes))
        raise ValueError(
            f"{data}: its classes differ from {run}'s: "
            f"not in the run: {', '.join(extra) or 'none'}; "
            f"not in the data: {', '.join(missing) or 'none'}"
        )
    index = torch.tensor([run_classes.index(name) for name in classes])
    return index[labels]
