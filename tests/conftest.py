import io
import os
import re
import signal
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepres.train import TrainConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_JPEGS = SHARED_DATA / "cifar10-jpeg-train.zip"

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def run_torchrun(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """A torchrun command line, its output captured; on timeout its whole process group is
    killed: workers stuck on each other would otherwise hold the pipes open for the hour
    their collectives wait."""
    child = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        pytest.fail(f"torchrun still running after {timeout} s:\n{err}")
    return subprocess.CompletedProcess(args, child.returncode, out, err)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Decoded data sets are cached per test session, never in the user's cache."""
    monkeypatch.setenv("DEEPRES_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _files(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    )


@pytest.fixture(autouse=True, scope="session")
def shipped_nets_untouched():
    """No test publishes into the package's own deepres/weights (one once did)."""
    from deepres.pretrained import SHIPPED

    before = _files(SHIPPED)
    yield
    assert _files(SHIPPED) == before, f"a test wrote into {SHIPPED}"


def tiny_config(data, out, **overrides) -> TrainConfig:
    """The tests' run: a width-4 ResNet-20, a dozen deterministic CPU iterations; any field
    can be overridden."""
    base = dict(
        model="resnet20",
        data=str(data),
        out=str(out),
        iters=12,
        batch_size=16,
        width=4,
        log_every=2,
        eval_every=4,
        checkpoint_every=4,
        deterministic=True,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


def write_folder(root: Path, per_class: int, size: int = 12, seed: int = 0) -> Path:
    """ROOT/<class>/*.png: noisy images whose colour tells the class."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A three-class image folder with train/ and test/ splits, 12x12 RGB."""
    root = tmp_path_factory.mktemp("tiny") / "colours"
    write_folder(root / "train", per_class=24, seed=0)
    write_folder(root / "test", per_class=6, seed=1)
    return root


def write_photos(root: Path, per_class: int, seed: int = 0) -> list[Path]:
    """ROOT/<ants|bees>/*.jpg: JPEG photos, 60x40 and 40x60, a colour ramp tinted by class."""
    rng = np.random.default_rng(seed)
    written = []
    for c, name in enumerate(("ants", "bees")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            width, height = (60, 40) if i % 2 else (40, 60)
            ramp = np.linspace(0, 120, width)[None, :, None] + np.zeros((height, 1, 3))
            tint = np.array([120, 60, 20]) if c == 0 else np.array([20, 60, 120])
            noise = rng.integers(0, 30, (height, width, 3))
            pixels = np.clip(ramp + tint + noise, 0, 255).astype(np.uint8)
            path = root / name / f"{i:03d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            written.append(path)
    return written


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """Photos in ROOT/train/<class>/ (12 per class) and ROOT/val/<class>/ (3 per class)."""
    root = tmp_path_factory.mktemp("photos") / "hymenoptera"
    write_photos(root / "train", per_class=12, seed=0)
    write_photos(root / "val", per_class=3, seed=1)
    return root


def cifar_jpeg_folder(root: Path, per_class: int, classes: tuple[str, ...] | None = None) -> Path:
    """ROOT/<class>/*.jpg: the first per_class real CIFAR-10 JPEGs of each class (or of
    `classes`) from ../shared/data; skips the test when the zip is absent."""
    if not CIFAR_JPEGS.is_file():
        pytest.skip(f"{CIFAR_JPEGS} is absent (real data lives in ../shared/data)")
    with zipfile.ZipFile(CIFAR_JPEGS) as archive:
        by_class: dict[str, list[str]] = {}
        for name in archive.namelist():
            if name.endswith(".jpg"):
                by_class.setdefault(Path(name).parent.name, []).append(name)
        for name in classes or sorted(by_class):
            (root / name).mkdir(parents=True)
            for jpeg in sorted(by_class[name])[:per_class]:
                (root / name / Path(jpeg).name).write_bytes(archive.read(jpeg))
    return root


def write_shard(path: Path, samples: list[tuple[str, bytes, bytes]]) -> Path:
    """A WebDataset shard: key.jpg and key.cls for each (key, jpeg bytes, cls bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, jpeg, cls in samples:
            for name, data in ((f"{key}.jpg", jpeg), (f"{key}.cls", cls)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def sharded(folder: Path, out: Path, per_shard: int = 10, split: str = "train") -> list[Path]:
    """The photo folder's SPLIT/ photos as WebDataset shards, class number in key.cls."""
    samples = [
        (f"{p.parent.name}_{p.stem}", p.read_bytes(), str(["ants", "bees"].index(p.parent.name)))
        for p in sorted((folder / split).rglob("*.jpg"))
    ]
    return [
        write_shard(out / f"{split}-{i:06d}.tar", [(k, j, c.encode()) for k, j, c in chunk])
        for i, chunk in enumerate(
            samples[start : start + per_shard] for start in range(0, len(samples), per_shard)
        )
    ]


def patch_zip_headers(path: Path, method: int | None = None, flags: int | None = None) -> Path:
    """Set every member's compression method or flag bits in a zip's local and central headers:
    a zip that zipfile lists but cannot read (method 9 is deflate64; flag bit 0, encrypted)."""
    data = bytearray(path.read_bytes())
    # The flag bits sit 6 bytes into a local header and 8 into a central one, the method next.
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        for found in re.finditer(signature, bytes(data)):
            start = found.start() + at
            if flags is not None:
                data[start : start + 2] = flags.to_bytes(2, "little")
            if method is not None:
                data[start + 2 : start + 4] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path
