"""The ImageNet training views of Sec. 3.4, one photo at a time, and AlexNet's PCA lighting.

A training view is a box of the photo (drawn by scale augmentation or RandomResizedCrop)
resampled to crop x crop pixels, perhaps mirrored. Only the box is resampled (Pillow's resize
with `box=`), which gives the pixels of resizing the whole photo and then cropping at a
fraction of the cost, and JPEGs are first decoded at the smallest DCT scale (Pillow's draft
mode) that still gives the box at least crop pixels across.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from deepres.data.safe_pickle import DataError

# The test-time resize of Sec. 3.4 / Table 3: shorter side 256 for a 224 crop.
CENTER_RESIZE = 256 / 224
AUGMENTS = ("scale", "rrc")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Augment:
    """How training views are drawn: 'scale' (the paper's) or 'rrc' (RandomResizedCrop)."""

    kind: str = "scale"
    crop: int = 224
    # Sec. 3.4: the shorter side is resized to a random integer in [256, 480].
    sizes: tuple[int, int] = (256, 480)
    # RandomResizedCrop's defaults: 8% to 100% of the area, aspect ratio 3/4 to 4/3.
    area: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    draft: bool = True

    def __post_init__(self) -> None:
        if self.kind not in AUGMENTS:
            raise ValueError(f"--augment must be scale or rrc, got {self.kind!r}")
        if self.crop < 1:
            raise ValueError(f"--crop-size must be a positive number of pixels, got {self.crop}")
        low, high = self.sizes
        if not self.crop <= low <= high:
            raise ValueError(
                f"--scale {low},{high}: need {self.crop} (the crop size) <= LOW <= HIGH"
            )

    @classmethod
    def scaled(cls, kind: str = "scale", crop: int = 224, **options) -> Augment:
        """The paper's views for another crop size, the shorter-side range scaled with it."""
        sizes = tuple(round(side * crop / 224) for side in (256, 480))
        return cls(kind, crop, **{"sizes": sizes, **options})

    @property
    def center_resize(self) -> int:
        """The shorter side of the centre view that goes with this crop (256 for 224)."""
        return round(self.crop * CENTER_RESIZE)


def scale_box(width: int, height: int, rng: np.random.Generator, augment: Augment) -> Box:
    """Sec. 3.4: the source box of a crop x crop crop of the photo resized to a random side."""
    side = int(rng.integers(augment.sizes[0], augment.sizes[1] + 1))
    scale = side / min(width, height)
    # The resized photo is never narrower than the crop, even when rounding says 223.
    resized = (max(augment.crop, round(width * scale)), max(augment.crop, round(height * scale)))
    left = int(rng.integers(0, resized[0] - augment.crop + 1))
    top = int(rng.integers(0, resized[1] - augment.crop + 1))
    return _source_box((width, height), resized, left, top, augment.crop)


def rrc_box(width: int, height: int, rng: np.random.Generator, augment: Augment) -> Box:
    """RandomResizedCrop: a box of random area and aspect ratio, as torchvision draws it."""
    area = width * height
    log_ratio = (math.log(augment.ratio[0]), math.log(augment.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*augment.area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    # No draw fitted (a very long photo): the central box of the nearest allowed ratio.
    w, h = width, height
    if width / height < augment.ratio[0]:
        h = round(width / augment.ratio[0])
    elif width / height > augment.ratio[1]:
        w = round(height * augment.ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """The image scaled, aspect kept, to a shorter side of size (bilinear, as --image-size)."""
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image if resized == image.size else image.resize(resized, Image.Resampling.BILINEAR)


def center_view(image: Image.Image, resize: int, crop: int) -> Image.Image:
    """The central crop x crop, in RGB, of an image with its shorter side resized to resize."""
    # Decoded whole and resized whole, not drafted nor box-resampled as training views are:
    # the held-out views a run scores are then the ones eval --protocol center and predict see.
    image = resize_shorter(eight_bit(image).convert("RGB"), resize)
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


def _source_box(size: tuple[int, int], resized: tuple[int, int], left: int, top: int, crop: int):
    sx, sy = resized[0] / size[0], resized[1] / size[1]
    return (left / sx, top / sy, (left + crop) / sx, (top + crop) / sy)


def resized_crop(image: Image.Image, box: Box, crop: int, draft: bool = True) -> Image.Image:
    """The box of an opened photo resampled to an RGB crop x crop image (bilinear)."""
    width, height = image.size
    if draft and image.format in ("JPEG", "MPO"):
        # The DCT can scale by 1/2, 1/4 or 1/8 while decoding; ask for the smallest photo in
        # which the box still spans at least crop pixels each way.
        needed = (
            math.ceil(width * crop / (box[2] - box[0])),
            math.ceil(height * crop / (box[3] - box[1])),
        )
        image.draft("RGB", needed)
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    image = eight_bit(image).convert("RGB")
    return image.resize((crop, crop), Image.Resampling.BILINEAR, box=box)


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or float gray image as 8-bit gray, scaled; other images as they are."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    # Pillow's convert() clips these at 255: a 16-bit photo would come out nearly all white.
    pixels = np.asarray(image, dtype=np.float64)
    top = pixels.max(initial=0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and top > 255):
        pixels = pixels / 257  # 65535 -> 255 (mode I: a 16-bit PNG as older Pillows open it)
    elif image.mode == "F" and top <= 1:
        pixels = pixels * 255  # floats in [0, 1]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


@contextmanager
def decoding(where: str) -> Iterator[None]:
    """Pillow's errors while reading an image turned into a DataError naming it."""
    try:
        yield
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}: cannot decode image ({error})") from error


def open_image(data: bytes, where: str) -> Image.Image:
    """An encoded image opened (header read, pixels not yet decoded), or a DataError naming it."""
    with decoding(where):
        return Image.open(io.BytesIO(data))


def view(data: bytes, where: str, augment: Augment, rng: np.random.Generator | None) -> np.ndarray:
    """One photo as a uint8 [H, W, 3] view: a random training view, or with rng=None the centre."""
    image = open_image(data, where)
    if rng is None:
        # Pillow decodes lazily: a truncated or corrupt file fails here, not at open.
        with decoding(where):
            return np.asarray(center_view(image, augment.center_resize, augment.crop))
    width, height = image.size
    draw = scale_box if augment.kind == "scale" else rrc_box
    box = draw(width, height, rng, augment)
    flip = rng.random() < 0.5
    with decoding(where):
        out = resized_crop(image, box, augment.crop, augment.draft)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def colour_statistics(images: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [3] and covariance [3, 3] of the RGB values (scaled to [0, 1]) of uint8 images."""
    total = torch.zeros(3, dtype=torch.float64)
    products = torch.zeros(3, 3, dtype=torch.float64)
    n = 0
    # In chunks: a sample of 500 photos at 224 is 600 MB as float64 all at once.
    for part in images.split(chunk):
        x = part.double().div(255).transpose(0, 1).reshape(3, -1)
        total += x.sum(1)
        products += x @ x.T
        n += x.shape[1]
    if n < 2:
        raise ValueError("colour statistics need at least two pixels")
    mean = total / n
    return mean, (products - n * torch.outer(mean, mean)) / (n - 1)


class Lighting(nn.Module):
    """AlexNet's PCA colour augmentation (Krizhevsky et al. 2012, Sec. 4.1), as Sec. 3.4 uses it.

    Each image gets the RGB offset sum_i alpha_i * eigval_i * eigvec_i, alpha_i ~ N(0, std),
    where eigval_i, eigvec_i are the eigenvalues and eigenvectors of the 3x3 covariance of the
    training set's RGB values (on the [0, 1] scale the nets see).
    """

    def __init__(self, eigval: torch.Tensor, eigvec: torch.Tensor, std: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("eigval", eigval.float())
        self.register_buffer("eigvec", eigvec.float())
        self.std = std

    @classmethod
    def fit(cls, covariance: torch.Tensor, std: float = 0.1) -> Lighting:
        """The eigen-decomposition of an RGB covariance, largest eigenvalue first."""
        eigval, eigvec = torch.linalg.eigh(covariance.double())
        return cls(eigval.flip(0), eigvec.flip(1), std)

    def offsets(self, alpha: torch.Tensor) -> torch.Tensor:
        """RGB offsets [B, 3] for standard-normal draws alpha [B, 3] (scaled by std here)."""
        return (alpha.to(self.eigval) * self.std * self.eigval) @ self.eigvec.T
