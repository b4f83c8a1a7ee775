"""Evaluation: top-1/top-5 error of a net on uint8 images, single view (Sec. 4.2)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepres.checkpoint import CONFIG, read_json
from deepres.data import open_dataset
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
    """Top-1/top-5 error of a trained run on a data set's test split or the run's held-out split."""
    run = resolve_run(run)
    classifier = load(run)
    saved = read_json(run / CONFIG)
    config = saved["config"]
    data = data or config["data"]
    if split == "val":
        if not config["val_split"]:
            raise ValueError(f"{run}: was trained without --val-split, so it has no val split")
        dataset = open_dataset(data, "train", image_size=config["image_size"])
        _, index = split_train_val(len(dataset.labels), config["val_split"])
        images, labels = dataset.images[index], dataset.labels[index]
    elif split == "test":
        dataset = open_dataset(data, "test", image_size=config["image_size"])
        images, labels = dataset.images, dataset.labels
    else:
        raise ValueError(f"--split must be test or val, got {split!r}")
    if list(images.shape[1:]) != classifier.input_size or len(dataset.classes) != len(
        classifier.classes
    ):
        raise ValueError(
            f"{data}: images {list(images.shape[1:])} in {len(dataset.classes)} "
            f"classes do not fit {run} ({classifier.input_size}, "
            f"{len(classifier.classes)} classes)"
        )
    model = classifier.model.to(device)
    logits = predict_logits(model, images, classifier.preprocess)
    result = error_rates(logits, labels)
    return {"run": str(run), "data": data, "split": split, **result, "classes": classifier.classes}
