"""Tests for deepres.data.readers and safe_pickle, on tiny fixtures in the official formats."""

import gzip
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import patch_zip_headers, tiny_config
from PIL import Image
from safetensors.torch import save_file

import deepres
from deepres.cli import main
from deepres.data import DataError, available_splits, open_dataset, readers
from deepres.data.augment import Augment, eight_bit, view
from deepres.data.readers import FASHION_MNIST_CLASSES
from deepres.data.safe_pickle import restricted_loads
from deepres.data.stream import stream_kind
from deepres.train import train

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer"] + [f"c{i}" for i in range(5, 10)]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> Path:
    """The default cache folder, private to the test and outside its data folder."""
    # No test may write to the user's ~/.cache.
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("DEEPRES_CACHE", str(folder))
    return folder


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


# ---- CIFAR, python format


def _write_cifar10_python(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [name.encode() for name in CIFAR10_NAMES]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    rows, labels = _rows(13, seed=0), np.arange(13) % 10
    for i, batch in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        part = slice(2 * i, 2 * i + 2) if batch != "test_batch" else slice(10, 13)
        content = {
            b"batch_label": batch.encode(),
            b"data": rows[part],
            b"labels": [int(label) for label in labels[part]],
        }
        (folder / batch).write_bytes(pickle.dumps(content, protocol=2))
    return rows, labels


def test_cifar10_python_pixel_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10_python(tmp_path)
    # One bright pixel: image 1 of batch 1, green plane, row 5, column 7.
    rows = np.zeros((2, 3072), np.uint8)
    rows[1, 1 * 1024 + 5 * 32 + 7] = 200
    (folder / "data_batch_1").write_bytes(
        pickle.dumps({b"data": rows, b"labels": [3, 4]}, protocol=2)
    )
    images = open_dataset(str(folder)).images
    assert images[1, 1, 5, 7] == 200
    assert images[:2].sum() == 200


def test_cifar10_python_dir_and_tarball(tmp_path):
    rows, labels = _write_cifar10_python(tmp_path / "dir")
    expected = torch.from_numpy(rows.reshape(-1, 3, 32, 32))
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tmp_path / "dir" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for spec in (tmp_path / "dir", tarball):
        train, test = open_dataset(str(spec)), open_dataset(str(spec), "test")
        assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
        assert torch.equal(train.images, expected[:10]) and torch.equal(test.images, expected[10:])
        assert train.labels.dtype == torch.int64
        assert train.labels.tolist() == labels[:10].tolist()
        assert test.labels.tolist() == labels[10:].tolist()
        assert train.classes == CIFAR10_NAMES
        assert available_splits(str(spec)) == ["train", "test"]


@pytest.mark.parametrize("labels", [[1, 2**70], [1.9, 9.99], [True, False], ["3", "4"]])
def test_cifar_labels_that_are_not_integers_are_refused_not_changed(tmp_path, labels):
    _write_cifar10_python(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _rows(2, seed=1), b"labels": labels}, protocol=2))
    with pytest.raises(DataError, match=f"^{re.escape(str(batch))}.*not a list of integers$"):
        open_dataset(str(tmp_path))


def test_cifar10_python_missing_batch(tmp_path):
    _write_cifar10_python(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4: missing"):
        open_dataset(str(tmp_path))


def test_cifar_batches_without_rows_are_no_images(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10_python(tmp_path)
    empty = pickle.dumps({"data": np.zeros((0, 3072), np.uint8), "labels": []})
    for batch in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / batch).write_bytes(empty)
    with pytest.raises(DataError, match=f"^{re.escape(str(folder))}: no images in the train split"):
        open_dataset(str(folder))


def test_cifar100_python(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"fine{i}".encode() for i in range(100)]
    meta = {b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    rows = _rows(5, seed=1)
    for split, part, fine in (("train", slice(0, 3), [99, 0, 42]), ("test", slice(3, 5), [7, 8])):
        batch = {b"data": rows[part], b"fine_labels": fine, b"coarse_labels": [19] * len(fine)}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    train, test = open_dataset(str(folder)), open_dataset(str(folder), "test")
    assert train.labels.tolist() == [99, 0, 42] and test.labels.tolist() == [7, 8]
    assert train.classes[99] == "fine99" and len(train.classes) == 100
    assert torch.equal(test.images, torch.from_numpy(rows[3:].reshape(-1, 3, 32, 32)))


# ---- CIFAR, binary format


def _write_cifar10_binary(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    rows, labels = _rows(13, seed=2), (np.arange(13) * 3) % 10
    records = np.concatenate([labels[:, None].astype(np.uint8), rows], axis=1)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(records[2 * i - 2 : 2 * i].tobytes())
    (folder / "test_batch.bin").write_bytes(records[10:].tobytes())
    return rows, labels


def test_cifar10_binary_dir_and_tarball(tmp_path):
    rows, labels = _write_cifar10_binary(tmp_path / "dir")
    tarball = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tmp_path / "dir" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    for spec in (tmp_path / "dir" / "cifar-10-batches-bin", tarball):
        train, test = open_dataset(str(spec)), open_dataset(str(spec), "test")
        assert torch.equal(train.images, torch.from_numpy(rows[:10].reshape(-1, 3, 32, 32)))
        assert train.labels.tolist() == labels[:10].tolist()
        assert test.labels.tolist() == labels[10:].tolist()
        assert train.classes == CIFAR10_NAMES


def test_cifar10_binary_bad_length(tmp_path):
    _write_cifar10_binary(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(DataError, match="data_batch_3.bin: 6145 bytes is not a whole number"):
        open_dataset(str(tmp_path))


def test_cifar100_binary_uses_fine_label(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    (folder / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
    rows = _rows(2, seed=3)
    coarse_fine = np.array([[1, 77], [19, 3]], np.uint8)
    (folder / "train.bin").write_bytes(np.concatenate([coarse_fine, rows], axis=1).tobytes())
    dataset = open_dataset(str(folder))
    assert dataset.labels.tolist() == [77, 3] and dataset.classes[77] == "f77"
    assert torch.equal(dataset.images, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))


# ---- restricted unpickler


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_loads_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(marker)}, protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os)\.system"):
        restricted_loads(payload, "evil")
    assert not marker.exists()


def test_open_dataset_refuses_code_in_cifar_batch(tmp_path):
    _write_cifar10_python(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="data_batch_2: refusing to unpickle"):
        open_dataset(str(tmp_path))
    assert not marker.exists()


def test_restricted_loads_reads_arrays_and_plain_data():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    loaded = restricted_loads(pickle.dumps({b"data": array, b"labels": [1, 2], "s": "x"}, 2))
    assert np.array_equal(loaded[b"data"], array) and loaded[b"data"].dtype == np.uint8
    assert type(loaded[b"data"]) is np.ndarray
    # Every kind of numeric array numpy pickles, in protocols 2 and 4.
    for numbers in (
        np.arange(3, dtype="<f4"),
        np.arange(3, dtype=">i8"),
        np.zeros((2, 3), dtype=np.int64, order="F"),
        np.array([], dtype=np.uint8),
    ):
        for protocol in (2, 4):
            again = restricted_loads(pickle.dumps([numbers], protocol))[0]
            # (numpy itself unpickles a big-endian array in native order)
            assert np.array_equal(again, numbers) and again.dtype.kind == numbers.dtype.kind
    # Records and strings are no dataset's numbers.
    for other in (np.zeros(2, dtype=[("a", "<u2")]), np.array([b"ab"])):
        with pytest.raises(DataError, match="r.pkl: not a readable pickle .* only numbers"):
            restricted_loads(pickle.dumps(other, 2), "r.pkl")
    assert loaded[b"labels"] == [1, 2] and loaded["s"] == "x"
    # Pickles written by numpy < 2 name numpy.core instead of numpy._core.
    old = pickle.dumps(array, 2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert np.array_equal(restricted_loads(old), array)
    # A Python 2 str (SHORT_BINSTRING) stays bytes, as the official CIFAR keys need.
    assert restricted_loads(b"\x80\x02}U\x04dataK\x01s.") == {b"data": 1}
    # An empty array's buffer is pickled as a call of bytes() with no arguments...
    empty = restricted_loads(pickle.dumps(np.zeros((0, 3072), np.uint8), 2))
    assert empty.shape == (0, 3072) and empty.dtype == np.uint8
    # ...but bytes(n), which allocates n bytes, is not taken from a file.
    sized = pickle.dumps(b"", 2).replace(b")R", b"J\x00\x00\x00\x40\x85R")
    with pytest.raises(DataError, match=r"s.pkl: not a readable pickle \(TypeError"):
        restricted_loads(sized, "s.pkl")


class _Unfilled:
    """Pickles as numpy.ndarray(shape, dtype): an array of any size, with no data in the file."""

    def __init__(self, shape: tuple, dtype: str) -> None:
        self.args = (shape, dtype)

    def __reduce__(self):
        return (np.ndarray, self.args)


class _Rebuilt(_Unfilled):
    def __reduce__(self):
        return (np.ndarray(0).__reduce__()[0], (np.ndarray, *self.args))


class _ForgedDtype:
    """Pickles as a dtype of numbers whose pickled flags make it an object dtype."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self):
        order = "|" if self.kind.startswith("V") else "<"
        return (np.dtype, (self.kind, False, True), (3, order, None, None, None, 8, 1, 0x3F))


class _ForgedObjects(_ForgedDtype):
    """An array of 100,000 of those objects, filled from a list of one."""

    def __reduce__(self):
        state = (1, (100_000,), _ForgedDtype(self.kind), False, [1])
        return (np.ndarray(0).__reduce__()[0], (np.ndarray, (0,), b"b"), state)


def test_restricted_loads_makes_no_array_larger_than_its_data():
    # A file of a hundred bytes asking for 6 GB of pixels, two ways; neither array is made.
    for kind in (_Unfilled, _Rebuilt):
        bomb = pickle.dumps({b"data": kind((2_000_000, 3072), "u1"), b"labels": []}, 2)
        assert len(bomb) < 200
        with pytest.raises(DataError, match="b.pkl: not a readable pickle"):
            restricted_loads(bomb, "b.pkl")
    # Nor an array of Python objects, which numpy makes at its declared shape before any data,
    # even where the dtype turns into an object dtype only through its own pickled state.
    objects = pickle.dumps({b"data": np.array([1, "x", None], dtype=object)}, 2)
    with pytest.raises(DataError, match="o.pkl: not a readable pickle .* only numbers"):
        restricted_loads(objects, "o.pkl")
    for kind in ("i8", "V8"):
        forged = pickle.dumps({b"data": _ForgedObjects(kind)}, 2)
        with pytest.raises(DataError, match="f.pkl: not a readable pickle .* only numbers"):
            restricted_loads(forged, "f.pkl")
    # An array whose data is shorter than its shape claims is refused by numpy itself.
    short = pickle.dumps(np.zeros(8, np.uint8), 2).replace(b"K\x08\x85", b"J\x00\x00\x00\x40\x85")
    with pytest.raises(DataError, match="s.pkl: not a readable pickle"):
        restricted_loads(short, "s.pkl")


def test_restricted_loads_malformed():
    with pytest.raises(DataError, match="x.pkl: not a readable pickle"):
        restricted_loads(b"\x80\x02}U\x04da", "x.pkl")


# ---- IDX


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(f">I{array.ndim}I", 0x800 | array.ndim, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, compress: bool, n_test_labels: int = 2) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(4).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte": _idx(images[:3]),
        "train-labels-idx1-ubyte": _idx(np.array([9, 0, 4])),
        "t10k-images-idx3-ubyte": _idx(images[3:]),
        "t10k-labels-idx1-ubyte": _idx(np.array([1, 2, 3][:n_test_labels])),
    }
    for name, data in files.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return images


@pytest.mark.parametrize("compress", [True, False])
def test_idx(tmp_path, compress):
    images = _write_idx(tmp_path / "digits", compress)
    train = open_dataset(str(tmp_path / "digits"))
    test = open_dataset(str(tmp_path / "digits"), "test")
    assert train.images.shape == (3, 1, 28, 28) and test.images.shape == (2, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(images[:3]))
    assert train.labels.tolist() == [9, 0, 4] and test.labels.tolist() == [1, 2]
    assert train.classes == [str(i) for i in range(10)]


def test_zalando_s_files_are_named_as_such_in_any_folder(tmp_path):
    # Fashion-MNIST's official first labels, in folders whose names (this test's too) say
    # nothing of it.
    folder = tmp_path / "fm"
    _write_idx(folder, compress=True)
    start = {"train": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9, 5, 5, 7, 9, 1, 0, 6, 4]}
    start["test"] = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5, 7, 3, 4, 1, 2, 4, 8, 0]
    images = np.zeros((20, 28, 28), np.uint8)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        labels = gzip.compress(_idx(np.array(start[split])))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(labels)
        assert open_dataset(str(folder), split).classes == FASHION_MNIST_CLASSES
    # Other labels: MNIST's digits.
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    labels = gzip.compress(_idx(np.array([5, 0, 4, *start["train"][3:]])))
    (other / "train-labels-idx1-ubyte.gz").write_bytes(labels)
    assert open_dataset(str(other)).classes == [str(i) for i in range(10)]


def test_a_one_channel_run_end_to_end(tmp_path, capsys):
    # make demo's path: IDX digits (one channel) trained, evaluated, then asked about colour
    # photos of another size, which are turned grey and fitted as the run was tested.
    rng = np.random.default_rng(0)
    folder = tmp_path / "digits"
    folder.mkdir()
    for prefix, n in (("train", 40), ("t10k", 10)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            _idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        )
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))
    run = tmp_path / "run"
    train(tiny_config(folder, run, iters=2, precision="fp32"), progress=False)
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10
    photo = tmp_path / "colour.png"
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(photo)
    classifier = deepres.load(run)
    view = classifier.to_tensor(Image.open(photo))
    assert view.shape == (1, 1, 28, 28) and view.dtype == torch.uint8
    grey = np.asarray(Image.open(photo).convert("L").resize((37, 28), Image.BILINEAR))
    assert torch.equal(view[0, 0], torch.from_numpy(grey[:, 4:32].copy()))  # centre 28 of 37
    assert main(["predict", str(run), str(photo), "--top", "1"]) == 0
    likeliest = classifier.classes[classifier(view).argmax()]
    assert capsys.readouterr().out.startswith(f"{photo}: {likeliest} ")


def test_idx_bad_magic(tmp_path):
    _write_idx(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x02" + path.read_bytes()[4:])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: IDX magic number is 0x00000802"):
        open_dataset(str(tmp_path))


def test_idx_count_and_size_mismatch(tmp_path):
    _write_idx(tmp_path, compress=True, n_test_labels=3)
    with pytest.raises(DataError, match="2 images but .*t10k-labels-idx1-ubyte.gz has 3 labels"):
        open_dataset(str(tmp_path), "test")
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    with pytest.raises(DataError, match="IDX header promises 3x28x28"):
        open_dataset(str(tmp_path))


def test_idx_without_images_is_no_images(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((0, 28, 28))))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(0)))
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: no images"):
        open_dataset(str(tmp_path))


def test_a_gzip_idx_is_decompressed_no_further_than_its_header_declares(tmp_path):
    _write_idx(tmp_path, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    # A bomb: 3x28x28 declared, 32 MB of zeros after it, in a gzip of some 30 KB.
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()) + bytes(32 << 20), 1))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="promises 3x28x28 .* but the file holds more"):
            open_dataset(str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    # A header that declares far more than there is: read as far as the data goes.
    path.write_bytes(gzip.compress(struct.pack(">4I", 0x803, 2**32 - 1, 2**32 - 1, 2**16 - 1)))
    with pytest.raises(DataError, match="but the file holds 16$"):
        open_dataset(str(tmp_path))


def test_image_size_applies_to_idx_and_cifar(tmp_path):
    images = _write_idx(tmp_path / "digits", compress=False)
    _write_cifar10_binary(tmp_path / "cifar")
    digits = open_dataset(str(tmp_path / "digits"), image_size=14)
    # The same rule as for image folders: Pillow's bilinear resize of the shorter side.
    expected = Image.fromarray(images[0]).resize((14, 14), Image.Resampling.BILINEAR)
    assert digits.images.shape == (3, 1, 14, 14)
    assert torch.equal(digits.images[0, 0], torch.from_numpy(np.array(expected)))
    assert open_dataset(str(tmp_path / "cifar"), image_size=16).images.shape == (10, 3, 16, 16)


def test_fashion_mnist_from_environment(tmp_path, monkeypatch):
    _write_idx(tmp_path / "fixture", compress=True)
    monkeypatch.setenv("DEEPRES_FASHION_MNIST_DIR", str(tmp_path / "fixture"))
    dataset = open_dataset("fashion-mnist")
    assert dataset.classes == FASHION_MNIST_CLASSES and dataset.classes[0] == "T-shirt/top"
    assert dataset.labels.tolist() == [9, 0, 4]
    monkeypatch.setenv("DEEPRES_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        open_dataset("fashion-mnist")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("DEEPRES_FASHION_MNIST_DIR", raising=False)
    train, test = open_dataset("fashion-mnist"), open_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.classes == FASHION_MNIST_CLASSES


# ---- image folders


def _image(path: Path, color, size=(8, 8), fmt="PNG", mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def _write_classes(root: Path) -> None:
    _image(root / "cats" / "a.png", (255, 0, 0))
    _image(root / "cats" / "b.png", (0, 255, 0))
    _image(root / "dogs" / "c.jpg", (128, 128, 128), fmt="JPEG")
    # A GIF under a .jpg name, as real folders have: decoded by content.
    _image(root / "dogs" / "d.jpg", (0, 0, 255), fmt="GIF")


def test_image_folder_by_class(tmp_path):
    _write_classes(tmp_path)
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    dataset = open_dataset(str(tmp_path))
    assert dataset.images.shape == (4, 3, 8, 8) and dataset.images.dtype == torch.uint8
    assert dataset.classes == ["cats", "dogs"] and dataset.labels.tolist() == [0, 0, 1, 1]
    assert dataset.images[0, :, 3, 3].tolist() == [255, 0, 0]
    assert dataset.images[3, :, 3, 3].tolist() == [0, 0, 255]
    assert available_splits(str(tmp_path)) == ["train"]
    with pytest.raises(DataError, match="no test split .*--val-split"):
        open_dataset(str(tmp_path), "test")


def test_image_folder_splits_wrapper_and_zip(tmp_path):
    root = tmp_path / "dir"
    _write_classes(root / "wrap" / "train")
    _image(root / "wrap" / "val" / "dogs" / "e.png", (9, 9, 9))
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(root.rglob("*")):
            zipped.write(path, path.relative_to(root).as_posix())
        # macOS resource forks carry image names but no image.
        zipped.writestr("__MACOSX/wrap/train/cats/._a.png", b"junk")
    for spec in (root, archive):
        assert available_splits(str(spec)) == ["train", "test"]
        train, test = open_dataset(str(spec)), open_dataset(str(spec), "test")
        assert train.labels.tolist() == [0, 0, 1, 1]
        # 'val' is the test split, labelled with the training classes.
        assert test.classes == ["cats", "dogs"] and test.labels.tolist() == [1]
        assert test.images[0, :, 0, 0].tolist() == [9, 9, 9]
    assert torch.equal(open_dataset(str(root)).images, open_dataset(str(archive)).images)


def test_split_folders_are_known_in_any_case_and_by_their_long_names(tmp_path):
    # Kaggle's layout: Training/ and Testing/, which were read as two classes named so.
    _write_classes(tmp_path / "mri" / "Training")
    _image(tmp_path / "mri" / "Testing" / "dogs" / "e.png", (9, 9, 9))
    _image(tmp_path / "mri" / "Validation" / "cats" / "f.png", (1, 1, 1))
    spec = str(tmp_path / "mri")
    assert available_splits(spec) == ["train", "test"]
    train, test = open_dataset(spec), open_dataset(spec, "test")
    assert train.classes == ["cats", "dogs"] and train.labels.tolist() == [0, 0, 1, 1]
    # A test split beside it wins over the validation one, as test/ over val/.
    assert test.labels.tolist() == [1] and test.images[0, :, 0, 0].tolist() == [9, 9, 9]
    shutil.rmtree(tmp_path / "mri" / "Testing")
    assert open_dataset(spec, "test").images[0, :, 0, 0].tolist() == [1, 1, 1]
    # Two folders of one split would be merged without a word: refused.
    _image(tmp_path / "mri" / "train" / "dogs" / "g.png", (2, 2, 2))
    with pytest.raises(DataError, match=r"mri/train: a second train split beside Training/"):
        open_dataset(spec)


def test_a_class_named_like_a_split_is_a_class(tmp_path):
    # Bus/, Car/, Train/ with their images in them: three classes, not a train split.
    for name, colour in (("Bus", 10), ("Car", 20), ("Train", 30), ("train", 40)):
        _image(tmp_path / "vehicles" / name / "a.png", (colour,) * 3)
    dataset = open_dataset(str(tmp_path / "vehicles"))
    assert dataset.classes == ["Bus", "Car", "Train", "train"]
    assert available_splits(str(tmp_path / "vehicles")) == ["train"]


def test_tiff_ppm_pgm_and_jfif_photos_are_read_as_torchvision_reads_them(tmp_path):
    # Left out without a word before: a class of TIFFs looked empty, mixed ones shrank.
    _image(tmp_path / "scans" / "a" / "x.tif", (10, 20, 30), fmt="TIFF")
    _image(tmp_path / "scans" / "a" / "y.tiff", (10, 20, 30), fmt="TIFF")
    _image(tmp_path / "scans" / "b" / "z.ppm", (40, 50, 60), fmt="PPM")
    _image(tmp_path / "scans" / "b" / "g.pgm", 70, fmt="PPM", mode="L")
    _image(tmp_path / "scans" / "b" / "w.jfif", (40, 50, 60), fmt="JPEG")
    dataset = open_dataset(str(tmp_path / "scans"))
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1]
    assert dataset.images[0, :, 0, 0].tolist() == [10, 20, 30]
    assert dataset.images[2, :, 0, 0].tolist() == [70, 70, 70]  # b/g.pgm, gray made RGB


def test_an_image_in_no_class_is_refused_not_left_out(tmp_path):
    # Bus/ and Car/ are classes, Train/ holds subfolders so it is the train split: Bus/ and
    # Car/ were left out without a word, the run trained on Train/'s years as its classes.
    for name in ("Bus/a.png", "Car/b.png", "Train/2023/c.png", "Train/2024/d.png"):
        _image(tmp_path / "mixed" / name, (9, 9, 9))
    with pytest.raises(
        DataError, match=r"mixed/Bus/a.png: in no split, .* split folders \(Train/\)"
    ):
        open_dataset(str(tmp_path / "mixed"))
    _image(tmp_path / "loose" / "train" / "cats" / "a.png", (9, 9, 9))
    _image(tmp_path / "loose" / "train" / "x.png", (9, 9, 9))
    with pytest.raises(DataError, match=r"loose/train/x.png: an image in a split folder but in no"):
        open_dataset(str(tmp_path / "loose"))
    _write_classes(tmp_path / "beside")
    _image(tmp_path / "beside" / "x.png", (9, 9, 9))
    with pytest.raises(DataError, match=r"beside/x.png: an image beside the class folders"):
        open_dataset(str(tmp_path / "beside"))
    # A deepres run saved inside the data is neither a class nor a stray image.
    _write_classes(tmp_path / "with-run")
    run = tmp_path / "with-run" / "run"
    _image(run / "curves.png", (9, 9, 9))
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert open_dataset(str(tmp_path / "with-run")).classes == ["cats", "dogs"]
    # Deeper, beside a wrapping folder (runs/r1/), as well: the wrapper is still descended.
    _write_classes(tmp_path / "wrapped" / "data" / "train")
    shutil.copytree(run, tmp_path / "wrapped" / "runs" / "r1")
    assert open_dataset(str(tmp_path / "wrapped")).classes == ["cats", "dogs"]
    # val/ beside test/: test/ is the held-out split, and val/ is named as not read.
    _write_classes(tmp_path / "three" / "train")
    _image(tmp_path / "three" / "val" / "cats" / "v.png", (1, 1, 1))
    _image(tmp_path / "three" / "test" / "cats" / "t.png", (2, 2, 2))
    with pytest.warns(UserWarning, match=r"three/val: not read, as the test split beside it"):
        assert open_dataset(str(tmp_path / "three"), "test").images[0, :, 0, 0].tolist() == [2] * 3
    # Kaggle's layout: a test/ of unlabelled images beside train/<class>/: named, not read.
    _write_classes(tmp_path / "kaggle" / "train")
    _image(tmp_path / "kaggle" / "test" / "1.png", (3, 3, 3))
    with pytest.warns(UserWarning, match=r"kaggle/test: not read: a split folder of images in no"):
        assert len(open_dataset(str(tmp_path / "kaggle")).labels) == 4
    assert available_splits(str(tmp_path / "kaggle")) == ["train"]


def test_deep_image_folders_are_read_and_deeper_ones_refused(tmp_path):
    # A phone's export: class/year/month/day/trip/image, below a split and a wrapper.
    deep = tmp_path / "wrap" / "train" / "cats" / "2024" / "07" / "15" / "trip"
    _image(deep / "a.png", (255, 0, 0))
    _image(tmp_path / "wrap" / "train" / "dogs" / "b.png", (0, 0, 255))
    assert open_dataset(str(tmp_path)).labels.tolist() == [0, 1]
    # One level more was left out without a word, and a class of such images only refused as
    # empty: the folder is named instead.
    (deep / "empty").mkdir()  # leaves no image out
    assert open_dataset(str(tmp_path)).labels.tolist() == [0, 1]
    _image(deep / "more" / "c.png", (0, 255, 0))
    with pytest.raises(DataError, match=f"^{deep / 'more'}: a folder 8 levels down, deeper"):
        open_dataset(str(tmp_path))


def test_match_channels_is_pillows_gray_and_repeats_gray():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    gray = readers.match_channels(images, 1)
    assert gray.shape == (1, 1, 5, 7)
    assert np.array_equal(gray[0, 0].numpy(), np.asarray(Image.fromarray(rgb).convert("L")))
    again = readers.match_channels(gray.expand(-1, 3, -1, -1), 1)
    assert torch.equal(again, gray) and readers.match_channels(images, 3) is images
    assert torch.equal(readers.match_channels(gray, 3), gray.expand(-1, 3, -1, -1))


def test_image_folder_grayscale_is_one_channel(tmp_path):
    _image(tmp_path / "a" / "x.png", 7, mode="L")
    _image(tmp_path / "b" / "y.png", 200, mode="L")
    dataset = open_dataset(str(tmp_path))
    assert dataset.images.shape == (2, 1, 8, 8) and dataset.images[1].unique().tolist() == [200]


def test_sixteen_bit_and_float_gray_images_are_scaled_not_clipped(tmp_path):
    # Pillow's convert() clips 16-bit values at 255: 200/255 of full scale would be white.
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((8, 8), 200 * 257, np.uint16)).save(tmp_path / "a" / "x.png")
    _image(tmp_path / "b" / "y.png", 7, mode="L")
    dataset = open_dataset(str(tmp_path))
    assert dataset.images.shape == (2, 1, 8, 8)
    assert [dataset.images[i].unique().tolist() for i in (0, 1)] == [[200], [7]]
    # The streamed photos' views and a net's own input go through the same scaling.
    data = (tmp_path / "a" / "x.png").read_bytes()
    assert np.unique(view(data, "x.png", Augment.scaled(crop=4), None)).tolist() == [200]
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    deep = Image.fromarray(np.full((4, 4), 100 * 257, np.int32), "I")
    assert [np.unique(np.asarray(eight_bit(i))).tolist() for i in (floats, deep)] == [[128], [100]]


def test_image_folder_sizes(tmp_path):
    _image(tmp_path / "a" / "square.png", (10, 20, 30))
    # 8 wide, 4 high: black, white, black in columns 0-1, 2-5, 6-7.
    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, 2:6] = 255
    (tmp_path / "b").mkdir()
    Image.fromarray(wide).save(tmp_path / "b" / "wide.png")
    with pytest.raises(
        DataError, match=r"b/wide.png is 8x4 but .*a/square.png is 8x8.*--image-size"
    ):
        open_dataset(str(tmp_path))
    dataset = open_dataset(str(tmp_path), image_size=4)
    assert dataset.images.shape == (2, 3, 4, 4)
    # Shorter side to 4 (a solid colour stays exact), then the centre 4x4: all white.
    assert dataset.images[0, :, 0, 0].tolist() == [10, 20, 30]
    assert dataset.images[1].unique().tolist() == [255]


def test_image_folder_corrupt_file(tmp_path):
    _write_classes(tmp_path)
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"dogs/broken.jpg: cannot decode image"):
        open_dataset(str(tmp_path))


def test_image_folder_refuses_a_broken_link(tmp_path):
    root = tmp_path / "set"
    _write_classes(root)
    counted = len(readers.image_files(root))
    (root / "dogs" / "gone.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    # A link to an image that exists counts as the image.
    Image.new("RGB", (8, 8)).save(tmp_path / "real.png")
    (root / "cats" / "linked.png").symlink_to(tmp_path / "real.png")
    broken = r"dogs/gone.jpg: broken symbolic link \(its target .*elsewhere.jpg does not exist or"
    with pytest.raises(DataError, match=broken):
        open_dataset(str(root))
    with pytest.raises(DataError, match=broken):
        readers.image_files(root)
    (root / "dogs" / "gone.jpg").unlink()
    (root / "dogs" / "loop.jpg").symlink_to("loop.jpg")  # a link to itself
    with pytest.raises(DataError, match=r"dogs/loop.jpg: broken symbolic link .* or is a loop"):
        open_dataset(str(root))
    with pytest.raises(DataError, match=r"dogs/loop.jpg: broken symbolic link .* or is a loop"):
        readers.image_files(root)
    (root / "dogs" / "loop.jpg").unlink()
    (root / "dogs" / "notes").symlink_to("notes")  # a loop, but no image: not data
    assert len(readers.image_files(root)) == counted + 1  # the link to real.png
    assert len(open_dataset(str(root)).labels) == counted + 1


def test_image_files_follow_linked_folders_as_training_does_and_never_loop(tmp_path):
    _write_classes(tmp_path / "elsewhere")
    root = tmp_path / "photos"
    root.mkdir()
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    trained = open_dataset(str(root / "linked")).labels
    (root / "linked" / "cats" / "up").symlink_to(root)  # a cycle back to the root
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "x.png")
    found = readers.image_files(root)
    assert len(found) == len(trained) > 0
    # Nor does the training reader count the linked folder's images again through the cycle.
    os.utime(tmp_path / "elsewhere")  # a new listing, not the cached decode
    assert torch.equal(open_dataset(str(root / "linked")).labels, trained)
    assert all(path.relative_to(root).parts[0] == "linked" for path in found)
    # A second link to the same folder is a second path to its images, as in training.
    (root / "again").symlink_to(tmp_path / "elsewhere")
    assert len(readers.image_files(root)) == 2 * len(trained)


@pytest.mark.parametrize(
    ("method", "flags", "cause"),
    [
        (9, None, r"compression method 9 \(deflate64\) is not supported; re-zip with deflate"),
        (99, None, r"compression method 99 \(AES\) is not supported"),
        (None, 0x1, "the member is encrypted"),
    ],
    ids=["deflate64", "AES", "encrypted"],
)
def test_a_zip_member_zipfile_cannot_read_is_named(tmp_path, method, flags, cause):
    _write_classes(tmp_path / "dir")
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((tmp_path / "dir").rglob("*.*")):
            zipped.write(path, path.relative_to(tmp_path / "dir").as_posix())
    patch_zip_headers(archive, method, flags)
    with pytest.raises(DataError, match=f"^{re.escape(str(archive))}:cats/a.png: {cause}"):
        open_dataset(str(archive))


def _tar(root: Path, archive: Path, gnu: bool) -> Path:
    if gnu:
        subprocess.run(["tar", "cf", str(archive), "-C", str(root), "."], check=True)
    else:
        with tarfile.open(archive, "w") as packed:
            packed.add(root, ".")
    return archive


@pytest.mark.parametrize("gnu", [False, True], ids=["tarfile", "GNU tar"])
def test_a_tar_cut_at_or_inside_a_header_is_truncated(tmp_path, gnu):
    if gnu and shutil.which("tar") is None:
        pytest.skip("no tar program")
    _write_classes(tmp_path / "dir")
    archive = _tar(tmp_path / "dir", tmp_path / "images.tar", gnu)
    assert open_dataset(str(archive)).labels.tolist() == [0, 0, 1, 1]
    with tarfile.open(archive) as packed:
        last = packed.getmembers()[-1].offset
    # tarfile reads a missing or cut header as the end: the archive would just be shorter.
    for cut in (last, last + 100):
        short = tmp_path / f"cut{cut}.tar"
        short.write_bytes(archive.read_bytes()[:cut])
        with pytest.raises(DataError, match=f"^{re.escape(str(short))}: truncated archive"):
            open_dataset(str(short))


def test_an_archive_member_larger_than_deepres_reads_is_named(tmp_path, monkeypatch):
    _write_classes(tmp_path / "dir")
    big = tmp_path / "dir" / "cats" / "a.png"
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted((tmp_path / "dir").rglob("*.*")):
            zipped.write(path, path.relative_to(tmp_path / "dir").as_posix())
    packed = _tar(tmp_path / "dir", tmp_path / "images.tar", gnu=False)
    monkeypatch.setattr(readers, "MAX_MEMBER_BYTES", big.stat().st_size - 1)
    for source, member in ((archive, "cats/a.png"), (packed, "cats/a.png")):
        with pytest.raises(
            DataError, match=f"{re.escape(str(source))}:{member}: .* bytes unpacked"
        ):
            open_dataset(str(source))


def test_an_image_linked_inside_a_tar_is_named_not_left_out(tmp_path):
    _write_classes(tmp_path / "dir")
    (tmp_path / "dir" / "dogs" / "e.jpg").symlink_to("c.jpg")
    packed = _tar(tmp_path / "dir", tmp_path / "images.tar", gnu=False)
    with pytest.raises(DataError, match=r"images.tar:dogs/e.jpg: a symbolic link inside the tar"):
        open_dataset(str(packed))
    # GNU tar stores a second name of one file as a hard link by itself.
    (tmp_path / "dir" / "dogs" / "e.jpg").unlink()
    os.link(tmp_path / "dir" / "dogs" / "c.jpg", tmp_path / "dir" / "dogs" / "e.jpg")
    packed = _tar(tmp_path / "dir", tmp_path / "hard.tar", gnu=False)
    with pytest.raises(DataError, match=r"hard.tar:dogs/.\.jpg: a hard link .*--hard-dereference"):
        open_dataset(str(packed))


def test_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for spec in (tmp_path / "notes.txt", tmp_path, tmp_path / "absent"):
        with pytest.raises(DataError, match="expected fashion-mnist"):
            open_dataset(str(spec))
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        open_dataset(str(tmp_path), "validation")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(b"\x1f\x8b\x08")  # the first bytes of a gzip stream, and no more
    with pytest.raises(DataError, match=f"^{re.escape(str(cut))}: corrupt archive"):
        open_dataset(str(cut))
    # Looked at first as a possible tar shard (eval --data, photo training): the same one line.
    with pytest.raises(DataError, match=f"^{re.escape(str(cut))}: corrupt archive"):
        stream_kind(str(cut))


# ---- cache


def _refuse_to_decode(*args):
    raise AssertionError("decoded again instead of reading the cache")


def test_cache_is_reused(tmp_path, monkeypatch):
    rows, _ = _write_cifar10_binary(tmp_path / "data")
    cache = tmp_path / "mycache"
    first = open_dataset(str(tmp_path / "data"), cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1
    monkeypatch.setattr(readers, "_read", _refuse_to_decode)
    second = open_dataset(str(tmp_path / "data"), cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert (second.classes, second.source) == (first.classes, first.source)


def test_cache_follows_the_source(tmp_path, cache):
    _write_cifar10_binary(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin"
    before = open_dataset(str(tmp_path)).images
    # Same size, new content and a newer mtime.
    batch.write_bytes(bytes(255 - b if i % 3073 else b for i, b in enumerate(batch.read_bytes())))
    stat = batch.stat()
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = open_dataset(str(tmp_path)).images
    assert torch.equal(after[:2], 255 - before[:2]) and torch.equal(after[2:], before[2:])
    # The entry for the old content was removed, not left to pile up.
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_cache_follows_a_move_between_classes(tmp_path):
    _write_classes(tmp_path / "data")
    assert open_dataset(str(tmp_path / "data")).labels.tolist() == [0, 0, 1, 1]
    os.replace(tmp_path / "data" / "cats" / "b.png", tmp_path / "data" / "dogs" / "b.png")
    assert open_dataset(str(tmp_path / "data")).labels.tolist() == [0, 1, 1, 1]


def test_corrupt_cache_is_rebuilt(tmp_path, cache, monkeypatch):
    _write_idx(tmp_path / "digits", compress=False)
    first = open_dataset(str(tmp_path / "digits"))
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignoring unreadable dataset cache"):
        rebuilt = open_dataset(str(tmp_path / "digits"))
    assert torch.equal(rebuilt.images, first.images)
    monkeypatch.setattr(readers, "_read", _refuse_to_decode)
    assert torch.equal(open_dataset(str(tmp_path / "digits")).labels, first.labels)


def test_inconsistent_cache_is_rebuilt(tmp_path, cache):
    _write_idx(tmp_path / "digits", compress=False)
    first = open_dataset(str(tmp_path / "digits"))
    (entry,) = cache.glob("*.safetensors")
    # A well-formed file whose labels point past the class list.
    info = json.dumps({"classes": ["only"], "source": first.source})
    tensors = {"images": first.images, "labels": first.labels}
    save_file(tensors, entry, metadata={"deepres": info})
    with pytest.warns(UserWarning, match="ignoring unreadable dataset cache"):
        assert open_dataset(str(tmp_path / "digits")).classes == first.classes


def test_an_empty_class_folder_is_refused(tmp_path):
    root = tmp_path / "dir"
    _write_classes(root)
    (root / "birds").mkdir()
    with pytest.raises(
        DataError, match=f"^{re.escape(str(root / 'birds'))}: class folder with no images"
    ):
        open_dataset(str(root))
    with pytest.raises(DataError, match="birds"):
        available_splits(str(root))
    (root / "birds" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="birds"):
        open_dataset(str(root))
    # In a split layout, and in a zip with the folder's own entry.
    split = tmp_path / "split"
    _write_classes(split / "train")
    _write_classes(split / "test")
    (split / "test" / "birds").mkdir()
    archive = tmp_path / "split.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(split.rglob("*")):
            zipped.write(path, path.relative_to(split).as_posix())
    with pytest.raises(
        DataError, match=f"^{re.escape(str(split / 'test' / 'birds'))}: class folder"
    ):
        open_dataset(str(split), "train")
    with pytest.raises(DataError, match=f"^{re.escape(str(archive))}:test/birds: class folder"):
        open_dataset(str(archive), "train")


def test_photos_too_large_to_decode_whole_are_refused_before_they_fill_memory(
    tmp_path, monkeypatch
):
    for name in ("a", "b"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 80, 0, 0)).save(tmp_path / "photos" / name / f"{i}.png")
    # Six 40x30 colour images held three times over: 64,800 bytes.
    monkeypatch.setattr(readers, "available_memory", lambda: 64_000)
    with pytest.raises(
        DataError, match=r"6 images of 40x30, decoded whole, need about .*--image-size S"
    ):
        open_dataset(str(tmp_path / "photos"))
    assert open_dataset(str(tmp_path / "photos"), image_size=16).images.shape == (6, 3, 16, 16)
    monkeypatch.setattr(readers, "available_memory", lambda: 64_800)
    assert open_dataset(str(tmp_path / "photos")).images.shape == (6, 3, 30, 40)
    # Gray images are counted in one channel: 21,600 bytes.
    for path in (tmp_path / "photos").rglob("*.png"):
        (tmp_path / "gray" / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").save(
            tmp_path / "gray" / path.relative_to(tmp_path / "photos")
        )
    monkeypatch.setattr(readers, "available_memory", lambda: 21_600)
    assert open_dataset(str(tmp_path / "gray")).images.shape == (6, 1, 30, 40)
    # A gray set with one colour image is colour: counted again when that image comes.
    Image.new("RGB", (40, 30), (0, 90, 0)).save(tmp_path / "gray" / "b" / "9.png")
    monkeypatch.setattr(readers, "available_memory", lambda: 30_000)
    with pytest.raises(DataError, match="7 images of 40x30"):
        open_dataset(str(tmp_path / "gray"))
