"""The reference: ResNet training and inference as a user writes them without deepres.

Plain eager PyTorch, the way the tutorials teach it: an ImageFolder-style Dataset that opens and
decodes one image file per sample with PIL, then pads, crops, flips and normalises it in the
DataLoader workers; NCHW fp32 nets; SGD. It imports nothing from deepres, so that `deepres bench`
measures deepres against code that owes it nothing. The nets are written out again here, with
the same layers and parameter counts as deepres's (option A shortcuts on CIFAR, Sec. 4.2;
projection shortcuts and the stride on the first 1x1 for ResNet-50, Table 1).

    python benchmarks/reference.py train --data PATH --iters N --json
    python benchmarks/reference.py infer --model resnet50 --batch-sizes 32,1 --json
    python benchmarks/reference.py data --data PATH --batches N --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
# Per-channel statistics of the CIFAR-10 training set, hard-coded as tutorials do.
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
# And ImageNet's, for photos.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ---- the nets


class BasicBlock(nn.Module):
    """Two 3x3 convs; the shortcut subsamples and zero-pads the new channels (option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = F.pad(
            x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra_channels)
        )
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """A 3x3 conv, three stages of 6n+2 layers in all at 32/16/8 maps, average pool, fc."""

    def __init__(self, depth: int, num_classes: int, width: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if stage and not i else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 (x4 channels); a 1x1 projection shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    """7x7 conv and max pool, then 3, 4, 6 and 3 bottleneck blocks, average pool, fc."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, in_planes = [], width
        for stage, count in enumerate((3, 4, 6, 3)):
            planes = width * 2**stage
            for i in range(count):
                blocks.append(Bottleneck(in_planes, planes, 2 if stage and not i else 1))
                in_planes = 4 * planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(self.blocks(x).mean((2, 3)))


def build_model(name: str, num_classes: int | None = None, width: int | None = None) -> nn.Module:
    """resnet50, or a CIFAR ResNet by name (resnet20 ... resnet1202), He-initialised."""
    depth = int(name.removeprefix("resnet")) if name.removeprefix("resnet").isdigit() else 0
    if name == "resnet50":
        model: nn.Module = ResNet50(num_classes or 1000, width or 64)
    elif depth in CIFAR_DEPTHS:
        model = CifarResNet(depth, num_classes or 10, width or 16)
    else:
        known = ", ".join(f"resnet{d}" for d in CIFAR_DEPTHS)
        raise ValueError(f"the reference has resnet50 and the CIFAR nets {known}; not {name!r}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


# ---- the data


def pad_crop_flip(image: Image.Image, pad: int = 4) -> Image.Image:
    """Zero-pad by `pad`, crop a random window of the original size, mirror it half the time."""
    width, height = image.size
    padded = ImageOps.expand(image, border=pad, fill=0)
    x, y = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    image = padded.crop((x, y, x + width, y + height))
    if torch.rand(()) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def unpacked_train_folder(data: str, tmp: str) -> Path:
    """The training class folders of data, a zip unpacked into tmp first, as a user would."""
    root = Path(data)
    if zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as archive:
            archive.extractall(tmp)
        root = Path(tmp)
    return find_train_folder(root)


def find_train_folder(root: Path) -> Path:
    """root/train, or <wrapper>/train, or root itself when it holds the class folders."""
    for candidate in [root / "train", *sorted(root.glob("*/train"))]:
        if candidate.is_dir():
            return candidate
    return root


def _visible(name: str) -> bool:
    # Hidden files and macOS's __MACOSX/._x.jpg resource forks carry image suffixes, no image.
    return not any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class ImageFolder(Dataset):
    """<class>/<image> files, classes and files in sorted order; one file decoded per sample."""

    def __init__(self, root: Path, augment: bool) -> None:
        self.augment = augment
        self.classes, self.samples = [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(
                p.relative_to(folder).as_posix()
                for p in folder.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p.relative_to(folder).as_posix())
            )
            if files and _visible(folder.name):
                self.samples += [(folder / f, len(self.classes)) for f in files]
                self.classes.append(folder.name)
        if not self.samples:
            raise ValueError(f"{root}: no <class>/<image> files")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as file:
            image = file.convert("RGB")
        if self.augment:
            image = pad_crop_flip(image)
        x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
        return (x - MEAN) / STD, label


def random_resized_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's RandomResizedCrop: 8-100% of the area, ratio 3/4-4/3, crop then resize."""
    width, height = image.size
    for _ in range(10):
        area = width * height * torch.empty(()).uniform_(0.08, 1.0).item()
        ratio = math.exp(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3)).item())
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = torch.randint(0, width - w + 1, ()).item()
            top = torch.randint(0, height - h + 1, ()).item()
            break
    else:
        # The central box at the nearest allowed ratio.
        w, h = width, height
        if width / height < 3 / 4:
            h = round(width / (3 / 4))
        elif width / height > 4 / 3:
            w = round(height * 4 / 3)
        left, top = (width - w) // 2, (height - h) // 2
    image = image.crop((left, top, left + w, top + h))
    return image.resize((size, size), Image.Resampling.BILINEAR)


def scale_crop(image: Image.Image, size: int, low: int, high: int) -> Image.Image:
    """Resize the shorter side to a random length in [low, high], then a random size x size crop."""
    side = torch.randint(low, high + 1, ()).item()
    width, height = image.size
    scale = side / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(resized, Image.Resampling.BILINEAR)
    left = torch.randint(0, resized[0] - size + 1, ()).item()
    top = torch.randint(0, resized[1] - size + 1, ()).item()
    return image.crop((left, top, left + size, top + size))


class PhotoFolder(ImageFolder):
    """Photos of any size: decoded whole, cropped and resized, mirrored, made a tensor."""

    def __init__(self, root: Path, augment: str, size: int, sizes: tuple[int, int]) -> None:
        super().__init__(root, augment=True)
        self.kind, self.size, self.sizes = augment, size, sizes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as file:
            image = file.convert("RGB")
        if self.kind == "rrc":
            image = random_resized_crop(image, self.size)
        else:
            image = scale_crop(image, self.size, *self.sizes)
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
        return (x - IMAGENET_MEAN) / IMAGENET_STD, label


def load_reference(
    data: str,
    batches: int = 16,
    windows: int = 4,
    batch_size: int = 32,
    workers: int = 2,
    augment: str = "scale",
    size: int = 224,
    sizes: tuple[int, int] = (256, 480),
) -> dict:
    """Training batches of photos the plain way, nothing else: images/s of each window."""
    if windows < 1 or batches < windows:
        raise ValueError(
            f"need at least one batch per window: batches {batches}, windows {windows}"
        )
    window = batches // windows
    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        start = time.perf_counter()
        root = unpacked_train_folder(data, tmp)
        setup_seconds = time.perf_counter() - start
        photos = PhotoFolder(root, augment, size, sizes)
        loader = DataLoader(
            photos,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
        )
        stream = (batch for _ in itertools.count() for batch in loader)
        rates = []
        t_window = time.perf_counter()
        for i, _ in zip(range(1, batches + 1), stream, strict=False):
            if i % window == 0:
                now = time.perf_counter()
                rates.append(window * batch_size / (now - t_window))
                t_window = now
        del stream, loader
    return {
        "images_per_sec": _steady(rates),
        "windows": rates,
        "n_images": len(photos),
        "setup_seconds": setup_seconds,
    }


# ---- training


def _steady(rates: list[float]) -> float:
    # The first window pays for worker start-up and kernel selection: it is warm-up.
    return statistics.median(rates[1:] or rates)


def train_reference(
    data: str,
    model_name: str = "resnet20",
    iters: int = 60,
    device: str = "cpu",
    windows: int = 6,
    batch_size: int = 128,
    workers: int = 2,
    width: int | None = None,
    held_out: list[int] | None = None,
    n_images: int | None = None,
    seed: int = 0,
) -> dict:
    """Train a CIFAR ResNet the plain way; images/s of each of `windows` windows, and more.

    held_out: indices (into the sorted training images) kept out of training and scored at the
    end, as given by the caller; `deepres bench` passes deepres's own 45k/5k split, so that
    both sides validate on the same images. n_images, when given, is checked against the
    number of training images found, so that those indices name the same files.
    """
    if windows < 1 or iters < windows:
        raise ValueError(
            f"need at least one iteration per window: iters {iters}, windows {windows}"
        )
    window = iters // windows
    device = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        start = time.perf_counter()
        root = unpacked_train_folder(data, tmp)
        setup_seconds = time.perf_counter() - start

        start = time.perf_counter()
        torch.manual_seed(seed)
        torch.backends.cudnn.benchmark = True
        train_set = ImageFolder(root, augment=True)
        if n_images is not None and len(train_set) != n_images:
            raise ValueError(f"{root}: {len(train_set)} training images, expected {n_images}")
        excluded = set(held_out or [])
        loader = DataLoader(
            Subset(train_set, [i for i in range(len(train_set)) if i not in excluded]),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )
        model = build_model(model_name, len(train_set.classes), width).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        # The paper's schedule: /10 at half and three quarters of the run (32k, 48k of 64k).
        milestones = [max(1, round(iters * 0.5)), max(1, round(iters * 0.75))]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)

        batches = (batch for _ in itertools.count() for batch in loader)
        rates = []
        model.train()
        t_window = time.perf_counter()
        # batches never ends: range decides when to stop.
        for iteration, (x, y) in zip(range(1, iters + 1), batches, strict=False):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if iteration % window == 0:
                train_loss = loss.item()  # waits for the device, as printing the loss does
                now = time.perf_counter()
                rates.append(window * batch_size / (now - t_window))
                t_window = now

        result = {
            "images_per_sec": _steady(rates),
            "windows": rates,
            "iters": iters,
            "n_images": len(train_set),
            "train_loss": train_loss,
            "setup_seconds": setup_seconds,
        }
        del batches, loader  # shuts its workers down, freeing their cores for evaluation
        if excluded:
            unaugmented = ImageFolder(root, augment=False)
            result["val_error"] = _top1_error(model, unaugmented, sorted(excluded), workers)
        result["seconds"] = time.perf_counter() - start
    return result


@torch.no_grad()
def _top1_error(model: nn.Module, dataset: Dataset, indices: list[int], workers: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    wrong = 0
    for x, y in DataLoader(Subset(dataset, indices), batch_size=500, num_workers=workers):
        wrong += int((model(x.to(device)).argmax(1).cpu() != y).sum())
    return 100.0 * wrong / len(indices)


# ---- inference


@torch.no_grad()
def infer_reference(
    model_name: str = "resnet50",
    batch_size: int = 32,
    iters: int = 10,
    device: str = "cpu",
    image_size: int = 224,
    warmup: int = 2,
) -> list[float]:
    """images/s of each timed forward pass: eval mode, eager, NCHW fp32, no_grad."""
    device = torch.device(device)
    model = build_model(model_name).to(device).eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    rates = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            rates.append(batch_size / (time.perf_counter() - start))
    return rates


# ---- command line


def main(argv: list[str] | None = None) -> int:
    """python benchmarks/reference.py train|infer|data ...: run the reference alone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--data", required=True, help="an image folder or .zip of train/<class>/*")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--width", type=int)
    p.add_argument(
        "--held-out", type=Path, metavar="FILE", help='JSON {"n_images": N, "indices": [...]}'
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("infer")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("data")
    p.add_argument("--data", required=True, help="an image folder or .zip of train/<class>/*")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--augment", choices=["scale", "rrc"], default="scale")
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--scale", default="256,480", metavar="LOW,HIGH")
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "train":
        split = json.loads(args.held_out.read_text()) if args.held_out else {}
        result = train_reference(
            args.data,
            args.model,
            args.iters,
            args.device,
            args.windows,
            args.batch_size,
            args.workers,
            args.width,
            split.get("indices"),
            split.get("n_images"),
        )
        summary = f"reference {args.model}: {result['images_per_sec']:.1f} images/s training"
    elif args.command == "data":
        low, high = (int(side) for side in args.scale.split(","))
        result = load_reference(
            args.data,
            args.batches,
            args.windows,
            args.batch_size,
            args.workers,
            args.augment,
            args.crop_size,
            (low, high),
        )
        summary = f"reference photo loading: {result['images_per_sec']:.1f} images/s"
    else:
        result = {}
        for size in (int(s) for s in args.batch_sizes.split(",")):
            rates = infer_reference(args.model, size, args.iters, args.device, args.image_size)
            result[str(size)] = {"images_per_sec": statistics.median(rates), "windows": rates}
        summary = ", ".join(
            f"batch {size}: {r['images_per_sec']:.1f} images/s" for size, r in result.items()
        )
    print(json.dumps(result) if args.json else summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
