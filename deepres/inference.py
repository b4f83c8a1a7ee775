"""A trained run as a ready classifier: deepres.load(RUN)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deepres.checkpoint import (
    CONFIG,
    PREPROCESS,
    WEIGHTS,
    load_preprocess,
    load_tensors,
    read_config,
    trained_iteration,
)
from deepres.data.augment import CENTER_RESIZE, eight_bit
from deepres.data.loader import Preprocess
from deepres.models import create_model
from deepres.pretrained import resolve_run, shipped_iterations


class Classifier:
    """A net with its preprocessing and class names; call it on a uint8 [N, C, H, W] batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Preprocess,
        classes: list[str],
        input_size: list[int],
        resize: int | None = None,
        iteration: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.classes = classes
        self.input_size = input_size
        # A run trained on streamed photos sees its test photos as the centre crop of the photo
        # resized to this shorter side (Sec. 3.4: 256 for a 224 crop); None: fitted to the input.
        self.resize = resize
        # The training iteration the weights come from (None where no file says).
        self.iteration = iteration

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a uint8 image batch of the training size."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected a uint8 [N, C, H, W] batch, got {images.dtype} {list(images.shape)}"
            )
        if list(images.shape[1:]) != self.input_size:
            raise ValueError(
                f"expected images of size {self.input_size} (C, H, W), got {list(images.shape[1:])}"
            )
        device = next(self.model.parameters()).device
        # The model is the caller's too (fine-tuned, moved): eval mode and its device, each call.
        self.preprocess.to(device)
        with eval_mode(self.model):
            return self.model(self.preprocess(images.to(device))).softmax(1)

    def to(self, device: str | torch.device) -> Classifier:
        """The classifier with its net and preprocessing moved to device (cpu, cuda, cuda:N)."""
        self.model.to(device)
        self.preprocess.to(device)
        return self

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """A PIL image as a uint8 [1, C, H, W] batch in the run's channels and size."""
        c, h, w = self.input_size
        image = eight_bit(image).convert("L" if c == 1 else "RGB")
        # A photo net's view is the centre crop of the photo resized to self.resize, even for a
        # photo that has the crop's size already (eval --protocol center takes it so too).
        if image.size != (w, h) or self.resize:
            if self.resize:
                low_w = low_h = self.resize
                scale = self.resize / min(image.size)
            else:
                low_w, low_h = w, h
                scale = max(w / image.width, h / image.height)
            size = (max(low_w, round(image.width * scale)), max(low_h, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
            left, top = (image.width - w) // 2, (image.height - h) // 2
            image = image.crop((left, top, left + w, top + h))
        array = np.asarray(image, dtype=np.uint8).reshape(h, w, c)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]

    def topk(self, image: Image.Image, k: int = 5) -> list[tuple[str, float]]:
        """The k most likely classes of one PIL image, with their probabilities."""
        return self.topk_batch(self.to_tensor(image), k)[0]

    def topk_batch(self, images: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k most likely classes of each image of a uint8 batch (see to_tensor)."""
        values, indices = self(images).topk(min(k, len(self.classes)), dim=1)
        return [
            [(self.classes[i], p) for p, i in zip(v.tolist(), i.tolist(), strict=True)]
            for v, i in zip(values, indices, strict=True)
        ]


def parse_device(name: str) -> torch.device:
    """The device a --device flag names: auto (CUDA if there is one, else cpu), cpu, cuda[:N]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: deepres runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            "cuda:0 and up"
        )
    return device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside, back in the mode it was in after, however it ends."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 convolutions and matmuls computed in fp32 inside, not in cuDNN's default TF32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def load(run: str | Path, fold_bn: bool = False, device: str = "cpu") -> Classifier:
    """The trained net of a run directory or shipped net, with its preprocessing, to classify.

    device: where the net runs (auto, cpu, cuda, cuda:N); images are moved there.

    fold_bn: each BN folded into the conv before it, and channels_last, for faster inference
    (what `deepres bench infer` times); its probabilities differ from the net's in the last
    bits, so eval and predict, whose numbers must match training's evaluation, keep BN.
    """
    run = resolve_run(run)
    saved = read_config(run)
    try:
        model = create_model(saved["model"], **saved["model_options"])
    except (TypeError, ValueError) as err:  # a width saved as "16", say
        raise ValueError(f"{run / CONFIG}: its net's settings are damaged ({err})") from None
    weights, meta = load_tensors(run / WEIGHTS)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        # torch's first line only says "Error(s) in loading state_dict for ResNet:".
        lines = [line.strip() for line in str(err).strip().splitlines()]
        first = (lines[1] if len(lines) > 1 else lines[0])[:200]
        raise ValueError(f"{run / WEIGHTS}: does not match {run / CONFIG} ({first})") from None
    augment = saved.get("augment")
    resize = round(augment["crop"] * CENTER_RESIZE) if augment else None
    preprocess = Preprocess(*load_preprocess(run))
    try:
        shape = torch.broadcast_shapes(
            preprocess.mean.shape, preprocess.std.shape, saved["input_size"]
        )
        if shape != torch.Size(saved["input_size"]):
            raise RuntimeError(shape)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{run / PREPROCESS}: its mean and std do not fit the input {saved['input_size']}"
            f" of {run / CONFIG}"
        ) from None
    iteration = trained_iteration(run, meta)
    if iteration is None:  # a net shipped before its weights carried the iteration
        iteration = shipped_iterations(run)
    if fold_bn:
        model = fold_batchnorm(model).to(memory_format=torch.channels_last)
    classifier = Classifier(
        model, preprocess, saved["classes"], saved["input_size"], resize, iteration
    )
    return classifier.to(parse_device(device))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of a deepres net with each BN folded into the conv before it."""
    # At inference BN is a fixed per-channel affine map: folded into the conv's weights and
    # bias it costs nothing, where eager mode would spend a pass over every feature map on it.
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("0", "1")):
            c, b = getattr(module, conv, None), getattr(module, bn, None)
            if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                setattr(module, conv, fuse_conv_bn_eval(c, b))
                setattr(module, bn, nn.Identity())
    return model
