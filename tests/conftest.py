from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Decoded data sets are cached per test session, never in the user's cache."""
    monkeypatch.setenv("DEEPRES_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


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
