"""Dataset readers: every on-disk format deepres accepts, decoded once to uint8 tensors.

open_dataset() looks at what is at a spec (a dataset name, a directory, a .zip or a tar
archive), finds the format from the file names inside (IDX, CIFAR python or binary, or an
image folder), decodes one split and caches the result as safetensors, so that later runs
read one file instead of decoding again.
"""

import gzip
import hashlib
import io
import json
import math
import os
import re
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from deepres.data.augment import eight_bit
from deepres.data.safe_pickle import DataError, restricted_loads

# The first 20 labels of Fashion-MNIST's official train and test files (MNIST's differ).
_FASHION_MNIST_START = {
    "train": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9, 5, 5, 7, 9, 1, 0, 6, 4),
    "test": (9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5, 7, 3, 4, 1, 2, 4, 8, 0),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(digit) for digit in range(10)]
SPLITS = ("train", "test")

# Named datasets: where Debian's dataset packages put them, the variable that moves them, and
# what to do when they are absent.
_NAMED = {
    "fashion-mnist": (
        "/usr/share/datasets/fashion-mnist",
        "DEEPRES_FASHION_MNIST_DIR",
        "install it with `apt-get install dataset-fashion-mnist`",
    ),
    "mnist": (
        "/usr/share/datasets/mnist",
        "DEEPRES_MNIST_DIR",
        "put the MNIST IDX files there or point DEEPRES_MNIST_DIR at them",
    ),
}
NAMED_DATA = frozenset(_NAMED)  # data given by name, not by path
# Data with no test split: where held-out images come from instead.
_NO_TEST_HINT = (
    "; a run that held out part of the training set (deepres train --val-split N) is tested "
    "on it with deepres eval --split val"
)


def absolute_data(data: str) -> str:
    """The data's absolute path (a named data set keeps its name), recorded beside the given."""
    return data if data in NAMED_DATA else str(Path(data).expanduser().resolve())


def locate_data(given: str, absolute: str | None) -> str:
    """A run's training data: the path as given where it is found from here, else the absolute
    path recorded at training where that is found, else as given (for the caller's error)."""
    if given in NAMED_DATA or Path(given).expanduser().exists():
        return given
    if absolute and Path(absolute).exists():
        return absolute
    return given


_EXPECTED = (
    "expected fashion-mnist, mnist, a folder of IDX files, CIFAR-10/100 in the python or"
    " binary format (folder or .tar.gz), or an image folder (folder or .zip) of"
    " <class>/<image> or train|test|val/<class>/<image>"
)
# torchvision's ImageFolder's, and .jfif (a JPEG under the name browsers save it with).
_IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
}
# Split folders of an image folder, by their names in lower case (Kaggle's sets often have
# Training/ and Testing/); a val folder serves as the test split when there is no test one.
_SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}
# Deep enough for wrapper/split/class/year/month/day/trip/image; a spec pointing at a large
# unrelated tree then costs a bounded walk before it is rejected. An image folder with folders
# below that is refused: their images would be left out without a word.
_MAX_DEPTH = 8
_IDX_NAME = re.compile(r"(train|t10k)-images[-.]idx3-ubyte(\.gz)?")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# Part of every cache key: raise it when decoding changes, so old entries are not reused
# (2: 16-bit and float gray images scaled to 8 bits, no longer clipped; 3: Fashion-MNIST's
# files named by their labels too; 4: split folders known in any case and by their long names,
# image folders read 8 levels deep; 5: .tif/.tiff/.ppm/.pgm/.jfif read, an image in no class
# refused; 6: unlabelled split folders and deepres runs inside the data not read).
_CACHE_FORMAT = 6
# Names of the zip compression methods Python's zipfile cannot decompress, by header number.
_ZIP_METHOD_NAMES = {9: "deflate64", 93: "zstandard", 95: "xz", 98: "ppmd", 99: "AES"}
# Bytes an IDX file is read in at once: gzip's read(n) allocates all n before it reads.
_GZIP_CHUNK = 1 << 24


class TooLarge(DataError):
    """Images that decoded whole would not fit in memory; sizes says how many of what size."""

    def __init__(self, sizes: str, detail: str):
        super().__init__(
            f"{sizes}, decoded whole, {detail}: --image-size S decodes them at SxS (32 for a "
            "CIFAR net), or an ImageNet net streams them from a folder, a .zip or tar shards"
        )
        self.sizes = sizes


class MixedSizes(DataError):
    """Images of more than one size where a split is decoded whole; sizes says which two."""

    def __init__(self, sizes: str):
        super().__init__(f"{sizes}; pass --image-size N to resize every image")
        self.sizes = sizes


@dataclass
class ImageDataset:
    """A whole split in memory: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def fingerprint(self) -> str:
        """A sha256 of the decoded images, labels and class names: the same data wherever it is."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for t in (self.images, self.labels):
            digest.update(t.contiguous().numpy())
        return digest.hexdigest()


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 images [N, C, H, W] in 1 or 3 channels: gray repeated, RGB as Pillow's gray (L)."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # Pillow's convert("L"), in its own fixed point: gray that was repeated comes back unchanged.
    r, g, b = images.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]


@dataclass(frozen=True)
class _CifarLayout:
    meta: str  # holds the class names
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_bytes: int = 0  # binary format: label bytes before each image's 3072 pixel bytes
    names_key: str = ""  # python format: the meta dict's class-name list
    labels_key: str = ""  # python format: the batch dict's label list


# Shared by the python and binary releases: five training batches and one test batch.
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR = {
    "CIFAR-10 python": _CifarLayout(
        "batches.meta",
        _CIFAR10_TRAIN,
        ("test_batch",),
        names_key="label_names",
        labels_key="labels",
    ),
    "CIFAR-100 python": _CifarLayout(
        "meta", ("train",), ("test",), names_key="fine_label_names", labels_key="fine_labels"
    ),
    "CIFAR-10 binary": _CifarLayout(
        "batches.meta.txt",
        tuple(f"{name}.bin" for name in _CIFAR10_TRAIN),
        ("test_batch.bin",),
        label_bytes=1,
    ),
    # Each record starts with the coarse label, then the fine one: the 100 classes are fine.
    "CIFAR-100 binary": _CifarLayout(
        "fine_label_names.txt", ("train.bin",), ("test.bin",), label_bytes=2
    ),
}


def open_dataset(
    spec: str,
    split: str = "train",
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> ImageDataset:
    """Read a dataset by name or path, detecting its format; split is 'train' or 'test'."""
    if split not in SPLITS:
        raise DataError(f"{spec}: split must be 'train' or 'test', not {split!r}")
    if image_size is not None and image_size < 1:
        raise DataError(f"{spec}: image size must be a positive number of pixels")
    source = _open_source(spec)
    cache_file = _cache_file(cache_dir, source, split, image_size)
    dataset = _load_cache(cache_file)
    if dataset is None:
        dataset = _read(source, split, image_size)
        _save_cache(cache_file, dataset)
    return dataset


@dataclass
class ImageFolderSplit:
    """One split of an image folder, listed but not decoded: where each file is, and its label."""

    path: Path  # the folder, or the .zip that holds it
    is_zip: bool
    names: list[str]  # relative to path
    labels: list[int]
    classes: list[str]
    source: str


def list_image_folder(spec: str, split: str = "train") -> ImageFolderSplit | None:
    """The files of a split of the image folder (folder or .zip) at spec; None if it is not one."""
    listings = list_image_folders(spec, [split])
    return None if listings is None else listings[split]


def list_image_folders(
    spec: str, splits: list[str] | None = None
) -> dict[str, ImageFolderSplit] | None:
    """Splits of the image folder at spec from one walk of it: those named, else all it has.

    None if spec is not an image folder. A folder of a million photos takes a while to walk,
    and a run wants its training and held-out splits both.
    """
    for split in splits or []:
        if split not in SPLITS:
            raise DataError(f"{spec}: split must be 'train' or 'test', not {split!r}")
    source = _open_source(spec)
    if isinstance(source, _Tar) or _detect(source)[0] != "image folder":
        return None
    there = _splits(source, "image folder", "")
    for split in splits or []:
        if split not in there:
            hint = _NO_TEST_HINT if split == "test" else ""
            found = ", ".join(there) or "none"
            raise DataError(
                f"{source.label}: image folder with no {split} split (found: {found}){hint}"
            )
    listings = {}
    for split in splits or there:
        names, labels, classes = _image_folder_split(source, split)
        listings[split] = ImageFolderSplit(
            source.path,
            isinstance(source, _Zip),
            names,
            labels,
            classes,
            f"{source.where('')} (image folder, {split} split)",
        )
    return listings


def available_splits(spec: str) -> list[str]:
    """Which of 'train'/'test' the source at spec has."""
    source = _open_source(spec)
    return _splits(source, *_detect(source))


def image_files(folder: str | Path) -> list[Path]:
    """The image files in a folder and its subfolders, sorted; hidden files left out."""
    folder = Path(folder)
    found = []
    for name, entry, _, is_file, _ in _walk(folder, depth=None):
        if _is_image(entry.name):
            if is_file:
                found.append(folder / name)
            elif _dangling(entry.path):
                _refuse_broken_link(Path(entry.path))
    found.sort()
    if not found:
        suffixes = " ".join(sorted(_IMAGE_SUFFIXES))
        raise DataError(f"{folder}: no images ({suffixes}) in this folder or below")
    return found


def read_full_size(
    spec: str, split: str = "train", keep: Callable[[int], torch.Tensor] | None = None
) -> tuple[list[str], int, Iterator[tuple[np.ndarray, int]]]:
    """Class names, count and (uint8 HxW[xC] image, label) pairs of a split at full size.

    keep(n) picks, from the split's n images in open_dataset's order, the positions to read
    (a held-out split). An image folder is decoded one image at a time as the pairs are drawn,
    never whole: full-size photos of mixed sizes fit no one tensor, and a large set no memory.
    Other formats hold images of one size, which open_dataset reads as they are.
    """
    if split not in SPLITS:
        raise DataError(f"{spec}: split must be 'train' or 'test', not {split!r}")
    source = _open_source(spec)
    kind, folder = _detect(source)
    if kind != "image folder":
        dataset = open_dataset(spec, split)
        images, labels = dataset.images, dataset.labels
        if keep is not None:
            index = keep(len(labels))
            images, labels = images[index], labels[index]
        pairs = (
            (image.permute(1, 2, 0).squeeze(2).numpy(), int(label))
            for image, label in zip(images, labels, strict=True)
        )
        return dataset.classes, len(labels), pairs
    _require_split(source, kind, folder, split)
    names, labels, classes = _image_folder_split(source, split)
    if keep is not None:
        index = keep(len(names)).tolist()
        names, labels = [names[i] for i in index], [labels[i] for i in index]
    label_of = dict(zip(names, labels, strict=True))
    # A tar yields its members in archive order, not in the order asked: labels go by name.
    pairs = (
        (decode_image(data, source.where(name), None), label_of[name])
        for name, data in source.read(names)
    )
    return classes, len(names), pairs


# ---- containers: a directory, a zip or a tar, seen as relative file names and their bytes


def _walk(root: Path, depth: int | None) -> Iterator[tuple[str, os.DirEntry, bool, bool, bool]]:
    """(name below root, entry, walked into, a file, a folder too deep to walk into) for each
    visible entry, depth levels deep.

    Symbolic links to folders are followed, but never one to a folder above it: its images
    would be listed again at every level.
    """
    pending = [(root, "", depth, {os.path.realpath(root)})]
    while pending:
        folder, prefix, left, above = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if not _visible(entry.name):
                    continue
                try:
                    is_folder, is_file = entry.is_dir(), entry.is_file()
                except OSError:  # a link in a loop: neither (a reader names an image's)
                    is_folder = is_file = False
                real = os.path.realpath(entry.path) if is_folder else None
                walkable = real is not None and real not in above
                entered = walkable and (left is None or left > 1)
                if entered:
                    below = None if left is None else left - 1
                    pending.append(
                        (Path(entry.path), f"{prefix}{entry.name}/", below, above | {real})
                    )
                yield prefix + entry.name, entry, entered, is_file, walkable and not entered


def _holds_anything(folder: str) -> bool:
    # An empty folder too deep to walk into leaves no image out.
    with os.scandir(folder) as entries:
        return any(_visible(entry.name) for entry in entries)


def _visible(name: str) -> bool:
    # Hidden files and macOS's __MACOSX/._x.jpg resource forks carry image suffixes but no image.
    return not any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _dangling(path: str | Path) -> bool:
    # A symbolic link whose target is missing or a loop: os.path.exists follows it, and fails.
    return os.path.islink(path) and not os.path.exists(path)


def _refuse_broken_link(path: Path) -> None:
    # Skipping it would train on fewer images than the folder shows, without a word.
    raise DataError(
        f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist or is a loop)"
    )


class _Directory:
    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label

    @cached_property
    def _listing(self) -> tuple[list[str], list[str], list[str]]:
        found: list[str] = []
        folders: list[str] = []
        cut: list[str] = []
        for name, entry, entered, is_file, too_deep in _walk(self.path, _MAX_DEPTH):
            if _is_image(entry.name) and _dangling(entry.path):
                _refuse_broken_link(Path(entry.path))
            if entered:
                folders.append(name)
            elif is_file:
                found.append(name)
            elif too_deep and _holds_anything(entry.path):
                cut.append(name)
        return sorted(found), sorted(folders), sorted(cut)

    @property
    def names(self) -> list[str]:
        return self._listing[0]

    @property
    def folders(self) -> list[str]:
        return self._listing[1]

    @property
    def cut(self) -> list[str]:
        """Folders too deep to be walked into (_MAX_DEPTH)."""
        return self._listing[2]

    def where(self, name: str) -> str:
        return str(self.path / name)

    def fingerprint(self) -> list:
        # Renaming a file between class folders changes neither sizes nor mtimes: the names
        # are part of the fingerprint too, and the folders, which an empty one may be.
        stats = [os.stat(self.path / name) for name in self.names]
        sizes = sum(stat.st_size for stat in stats)
        newest = max((stat.st_mtime_ns for stat in stats), default=0)
        return [self.names, self.folders, self.cut, sizes, newest]

    def read(self, names: list[str]) -> Iterator[tuple[str, bytes]]:
        for name in names:
            try:
                data = (self.path / name).read_bytes()
            except OSError as error:
                raise DataError(f"{self.where(name)}: cannot read ({error.strerror})") from error
            yield name, data


class _Archive:
    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if name else str(self.path)

    def fingerprint(self) -> list:
        stat = self.path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def _corrupt(self, error: Exception) -> DataError:
        return DataError(f"{self.path}: corrupt archive ({type(error).__name__}: {error})")

    # _listed: every visible entry of the archive, folders ending in "/".
    @cached_property
    def names(self) -> list[str]:
        return sorted(name for name in self._listed if not name.endswith("/"))

    @cached_property
    def folders(self) -> list[str]:
        # Folder entries are optional in zips and tars: the folders of their files count too.
        named = {name.rstrip("/") for name in self._listed if name.endswith("/")}
        return sorted(named | {parent for name in self.names for parent in _parents(name)})


# No member of an archive is read past this: a few kilobytes of deflate or gzip can declare and
# unpack to gigabytes. The largest files deepres reads are CIFAR's batches (31 MB) and photos.
MAX_MEMBER_BYTES = 1 << 30


def _check_member_size(size: int, where: str) -> None:
    if size > MAX_MEMBER_BYTES:
        raise DataError(
            f"{where}: {size:,} bytes unpacked, more than the {MAX_MEMBER_BYTES:,} deepres reads"
            " from one member of an archive"
        )


def read_zip_member(archive: zipfile.ZipFile, name: str, where: str) -> bytes:
    """The bytes of a zip member; a DataError naming it (as where) when they cannot be read."""
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise DataError(f"{where}: the member is encrypted; re-zip it without a password")
    # zipfile stops at the size the member declares, so the declared size bounds the memory.
    _check_member_size(info.file_size, where)
    try:
        return archive.read(info)
    except NotImplementedError as error:
        method = f"{info.compress_type} ({_ZIP_METHOD_NAMES.get(info.compress_type, 'unknown')})"
        raise DataError(
            f"{where}: compression method {method} is not supported; re-zip with deflate"
        ) from error
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise DataError(f"{where}: cannot read ({error})") from error


def refuse_link(member: tarfile.TarInfo, where: str) -> None:
    """A DataError for an image stored in a tar as a link, which a reader cannot follow."""
    # Left out, the data set would be smaller than the archive shows. GNU tar stores a file it
    # has already stored (a second name of one inode) as a hard link on its own.
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise DataError(
            f"{where}: a {kind} link inside the tar; deepres reads the files themselves"
            " (GNU tar stores them with --dereference --hard-dereference)"
        )


def tar_members(archive: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """The members of an open tar, then a DataError if it ends short of its end-of-archive block."""
    yield from archive
    # tarfile takes a header cut short, or missing, for the end of the archive; where it really
    # ends, it has read a whole block (the zero block that closes every tar) past the last member.
    if archive.fileobj.tell() - archive.offset < tarfile.BLOCKSIZE:
        raise DataError(f"{path}: truncated archive")


class _Zip(_Archive):
    _errors = (zipfile.BadZipFile, OSError, EOFError, zlib.error)

    @cached_property
    def _listed(self) -> list[str]:
        try:
            with zipfile.ZipFile(self.path) as archive:
                return [name for name in archive.namelist() if _visible(name)]
        except self._errors as error:
            raise self._corrupt(error) from error

    def read(self, names: list[str]) -> Iterator[tuple[str, bytes]]:
        with zipfile.ZipFile(self.path) as archive:
            for name in names:
                yield name, read_zip_member(archive, name, self.where(name))


class _Tar(_Archive):
    _errors = (tarfile.TarError, OSError, EOFError, zlib.error)

    def _stream(self, wanted: set[str] | None) -> Iterator[tuple[str, bytes]]:
        # Stream mode: a .tar.gz is decompressed once, front to back, never seeked in.
        try:
            with tarfile.open(self.path, "r|*") as archive:
                for member in tar_members(archive, self.path):
                    name = member.name.removeprefix("./").rstrip("/")
                    if not _visible(name):
                        continue
                    if member.isdir() and wanted is None:
                        yield name + "/", b""
                    if _is_image(name):
                        refuse_link(member, self.where(name))
                    if not member.isfile():
                        continue
                    if wanted is None:
                        yield name, b""
                    elif name in wanted:
                        _check_member_size(member.size, self.where(name))
                        yield name, archive.extractfile(member).read()
        except self._errors as error:
            raise self._corrupt(error) from error

    @cached_property
    def _listed(self) -> list[str]:
        return [name for name, _ in self._stream(None)]

    def read(self, names: list[str]) -> Iterator[tuple[str, bytes]]:
        return self._stream(set(names))


_Source = _Directory | _Zip | _Tar


def _parents(name: str) -> list[str]:
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _open_source(spec: str) -> _Source:
    if spec in _NAMED:
        default, variable, fix = _NAMED[spec]
        root = Path(os.environ.get(variable) or default)
        if not root.is_dir():
            raise DataError(f"{spec}: not found at {root}; {fix}")
        return _Directory(root.resolve(), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _Directory(path.resolve(), spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file or directory ({_EXPECTED})")
    if zipfile.is_zipfile(path):
        return _Zip(path.resolve(), spec)
    try:
        is_tar = tarfile.is_tarfile(path)
    except (EOFError, OSError, zlib.error) as error:  # a compressed file cut short, say
        raise DataError(f"{spec}: corrupt archive ({error or type(error).__name__})") from None
    if is_tar:
        return _Tar(path.resolve(), spec)
    raise DataError(f"{spec}: not a dataset deepres can read ({_EXPECTED})")


# ---- format detection


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _detect(source: _Source) -> tuple[str, str]:
    """The format of source and the folder inside it that holds the format's files."""
    files_by_folder: dict[str, set[str]] = defaultdict(set)
    for name in source.names:
        folder, _, file = name.rpartition("/")
        files_by_folder[folder].add(file)
    # Shallowest first, so a wrapping folder ("cifar-10-batches-py/") is found wherever it is.
    for folder in sorted(files_by_folder, key=lambda folder: (folder.count("/"), folder)):
        files = files_by_folder[folder]
        if any(_IDX_NAME.fullmatch(file) for file in files):
            return "IDX", folder
        for name, layout in _CIFAR.items():
            if layout.meta in files and files & {*layout.train, *layout.test}:
                return name, folder
    if any(_is_image(name) for name in source.names):
        return "image folder", ""
    raise DataError(f"{source.label}: not a dataset deepres can read ({_EXPECTED})")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _IMAGE_SUFFIXES


def _splits(source: _Source, kind: str, folder: str) -> list[str]:
    present = set(source.names)
    if kind == "IDX":
        have = {split for split in SPLITS if _idx_files(present, folder, split)}
    elif kind == "image folder":
        have = set(_image_folder(source))
    else:
        layout = _CIFAR[kind]
        files = {"train": layout.train, "test": layout.test}
        have = {split for split in SPLITS if any(_join(folder, f) in present for f in files[split])}
    return [split for split in SPLITS if split in have]


def _require_split(source: _Source, kind: str, folder: str, split: str) -> None:
    splits = _splits(source, kind, folder)
    if split not in splits:
        hint = _NO_TEST_HINT if split == "test" else ""
        found = ", ".join(splits) or "none"
        raise DataError(f"{source.label}: {kind} with no {split} split (found: {found}){hint}")


def _read(source: _Source, split: str, image_size: int | None) -> ImageDataset:
    kind, folder = _detect(source)
    _require_split(source, kind, folder, split)
    if kind == "IDX":
        images, labels, classes = _read_idx(source, folder, split)
    elif kind == "image folder":
        images, labels, classes = _read_image_folder(source, split, image_size)
    else:
        images, labels, classes = _read_cifar(source, folder, _CIFAR[kind], split)
    if image_size is not None and kind != "image folder":
        images = _resize_all(images, image_size)
    where = source.where(folder)
    if not len(labels):
        raise DataError(f"{where}: no images in the {split} split")
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if bad.size:
        raise DataError(f"{where}: label {bad[0]} is out of range for {len(classes)} classes")
    # A copy: frombuffer arrays are read-only, and torch wants memory it may write.
    return ImageDataset(
        images=torch.from_numpy(np.array(images, order="C")),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=classes,
        source=f"{where} ({kind}, {split} split)",
    )


# ---- IDX (MNIST, Fashion-MNIST)


def _idx_files(present: set[str], folder: str, split: str) -> tuple[str, str] | None:
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind, dims in (("images", 3), ("labels", 1)):
        # The official names, gzipped or not, and the dotted spelling of the original MNIST.
        candidates = [
            _join(folder, f"{prefix}-{kind}{dot}idx{dims}-ubyte{gz}")
            for dot in "-."
            for gz in (".gz", "")
        ]
        found.append(next((name for name in candidates if name in present), None))
    images, labels = found
    return (images, labels) if images and labels else None


def _parse_idx(data: bytes, where: str, ndim: int) -> np.ndarray:
    gzipped = data[:2] == b"\x1f\x8b"
    file = gzip.GzipFile(fileobj=io.BytesIO(data)) if gzipped else io.BytesIO(data)
    # 0x08 is the unsigned-byte type code; the low byte counts the big-endian int32 dims.
    magic = 0x800 | ndim
    header = 4 + 4 * ndim
    try:
        head = file.read(header)
        if len(head) < header:
            raise DataError(f"{where}: {len(head)} bytes is too short for an IDX header")
        (found,) = struct.unpack_from(">I", head)
        if found != magic:
            raise DataError(f"{where}: IDX magic number is 0x{found:08x}, expected 0x{magic:08x}")
        dims = struct.unpack_from(f">{ndim}I", head, 4)
        # No more than the header declares, and a byte to tell a longer file: a few megabytes
        # of gzip can expand to gigabytes.
        pixels = _read_at_most(file, math.prod(dims) + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{where}: corrupt gzip data ({error})") from error
    if len(pixels) != math.prod(dims):
        shape = "x".join(map(str, dims))
        holds = "more" if len(pixels) > math.prod(dims) else header + len(pixels)
        raise DataError(
            f"{where}: IDX header promises {shape} bytes of data"
            f" ({header + math.prod(dims)} bytes in all) but the file holds {holds}"
        )
    return np.frombuffer(pixels, np.uint8).reshape(dims)


def _read_at_most(file: io.BufferedIOBase, size: int) -> bytes:
    chunks: list[bytes] = []
    while size > 0 and (chunk := file.read(min(size, _GZIP_CHUNK))):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_idx(source: _Source, folder: str, split: str) -> tuple[np.ndarray, np.ndarray, list]:
    images_name, labels_name = _idx_files(set(source.names), folder, split)
    blobs = dict(source.read([images_name, labels_name]))
    images = _parse_idx(blobs[images_name], source.where(images_name), 3)
    labels = _parse_idx(blobs[labels_name], source.where(labels_name), 1)
    if len(images) != len(labels):
        raise DataError(
            f"{source.where(images_name)}: {len(images)} images but"
            f" {source.where(labels_name)} has {len(labels)} labels"
        )
    fashion = "fashion" in f"{source.label}/{source.where(folder)}".lower()
    # Fashion-MNIST's own files are known by their first labels wherever they lie.
    fashion = fashion or labels[: len(_FASHION_MNIST_START[split])].tolist() == list(
        _FASHION_MNIST_START[split]
    )
    classes = FASHION_MNIST_CLASSES if fashion else DIGIT_CLASSES
    return images[:, None], labels, list(classes)


# ---- CIFAR-10 / CIFAR-100, python (pickled) and binary releases


def _read_cifar(
    source: _Source, folder: str, layout: _CifarLayout, split: str
) -> tuple[np.ndarray, np.ndarray, list]:
    batches = layout.train if split == "train" else layout.test
    names = [_join(folder, name) for name in (layout.meta, *batches)]
    present = set(source.names)
    for name in names:
        if name not in present:
            raise DataError(f"{source.where(name)}: missing (needed for the {split} split)")
    blobs = dict(source.read(names))
    meta = source.where(names[0])
    if layout.label_bytes:
        classes = _text_lines(blobs[names[0]], meta)
        parts = [_binary_batch(blobs[n], source.where(n), layout.label_bytes) for n in names[1:]]
    else:
        classes = _pickled_names(blobs[names[0]], meta, layout.names_key)
        parts = [_pickled_batch(blobs[n], source.where(n), layout.labels_key) for n in names[1:]]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return images, labels, classes


def _unpickle_dict(data: bytes, where: str) -> dict[str, object]:
    loaded = restricted_loads(data, where)
    if not isinstance(loaded, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(loaded).__name__}")
    # Python 2 pickles come back with bytes keys.
    return {
        key.decode("latin-1") if isinstance(key, bytes) else str(key): value
        for key, value in loaded.items()
    }


def _pickled_names(data: bytes, where: str, key: str) -> list[str]:
    names = _unpickle_dict(data, where).get(key)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{where}: no list of class names under {key!r}")
    return [name.decode("utf-8", "replace") if isinstance(name, bytes) else name for name in names]


def _pickled_batch(data: bytes, where: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_dict(data, where)
    pixels = batch.get("data")
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2):
        raise DataError(f"{where}: 'data' is not a uint8 array of shape (N, 3072)")
    if pixels.shape[1] != 3072:
        raise DataError(f"{where}: 'data' rows hold {pixels.shape[1]} bytes, expected 3072")
    raw = batch.get(labels_key)
    try:
        labels = np.asarray(raw, dtype=np.int64)
        # A float or bool label would be truncated to some class without a word: refuse it.
        whole = labels.size == 0 or np.asarray(raw).dtype.kind in "iu"
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise DataError(f"{where}: {labels_key!r} is not a list of integers") from None
    if labels.shape != (len(pixels),):
        raise DataError(f"{where}: {labels_key!r} must hold {len(pixels)} labels, one per row")
    # Each row is the red plane, then green, then blue, each 32 rows of 32 pixels.
    return pixels.reshape(-1, 3, 32, 32), labels


def _binary_batch(data: bytes, where: str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    record = label_bytes + 3072
    if not data or len(data) % record:
        raise DataError(
            f"{where}: {len(data)} bytes is not a whole number of {record}-byte records"
        )
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _text_lines(data: bytes, where: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: class names are not UTF-8 text ({error})") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---- image folders


def _image_folder(source: _Source) -> dict[str, dict[str, list[str]]]:
    """Image names by split, then by class folder, for <class>/ and <split>/<class>/ layouts."""
    # Worked out once per opened source (its splits, then each split, ask for it), and its
    # warnings said once.
    layout = getattr(source, "_image_layout", None)
    if layout is None:
        # Plain dicts: a lookup of a split it lacks must not add one to the cached layout.
        found = _image_layout(source)
        layout = source._image_layout = {split: dict(classes) for split, classes in found.items()}
    return layout


def _run_folders(names: list[str]) -> set[str]:
    """The deepres run directories among a source's folders (config.json beside metrics.jsonl)."""
    holds: dict[str, set[str]] = defaultdict(set)
    for name in names:
        folder, _, file = name.rpartition("/")
        if file in ("config.json", "metrics.jsonl") and folder:
            holds[folder].add(file)
    return {folder for folder, files in holds.items() if len(files) == 2}


def _image_layout(source: _Source) -> dict[str, dict[str, list[str]]]:
    cut = getattr(source, "cut", [])
    if cut:
        raise DataError(
            f"{source.where(cut[0])}: a folder {_MAX_DEPTH} levels down, deeper than deepres "
            "reads an image folder; move the images in it up"
        )
    # A deepres run saved inside the data (its curves.png) holds no data, wherever it lies.
    runs = _run_folders(source.names)

    def in_run(name: str) -> bool:
        return name in runs or any(parent in runs for parent in _parents(name))

    run_parents = {parent for run in runs for parent in _parents(run + "/")}
    images = [
        (name, name.split("/")) for name in source.names if _is_image(name) and not in_run(name)
    ]
    # Descend through single wrapping folders ("hymenoptera_data/train/ants/x.jpg"), but never
    # through a split folder or into a class folder.
    root: list[str] = []
    while (
        images
        and all(len(parts) >= 3 for _, parts in images)
        and len({parts[0] for _, parts in images}) == 1
        and images[0][1][0].lower() not in _SPLIT_FOLDERS
    ):
        root.append(images[0][1][0])
        images = [(name, parts[1:]) for name, parts in images]
    # A folder with images of its own and no subfolders of them is a class, whatever its name
    # (Bus/, Car/, Train/).
    own_images = {parts[0] for _, parts in images if len(parts) == 2} - {
        parts[0] for _, parts in images if len(parts) >= 3
    }

    def split_name(top: str) -> str | None:
        return None if top in own_images else _SPLIT_FOLDERS.get(top.lower())

    named: dict[str, set[str]] = defaultdict(set)
    for _, parts in images:
        if len(parts) >= 2 and split_name(parts[0]):
            named[split_name(parts[0])].add(parts[0])
    for split, folders in named.items():
        if len(folders) > 1:
            first, second = sorted(folders)[:2]
            raise DataError(
                f"{source.where('/'.join([*root, second]))}: a second {split} split beside "
                f"{first}/; keep one"
            )
    tops = set(named)
    split_layout = bool(tops)

    def split_of(parts: list[str]) -> str | None:
        """The split a <split>/<class>/... path is in; None for a folder deepres ignores."""
        split = split_name(parts[0])
        if split == "val":
            return None if "test" in tops else "test"
        return split

    layout: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    unread: dict[str, str] = {}
    for name, parts in images:
        if not split_layout and len(parts) >= 2:
            layout["train"][parts[0]].append(name)
        elif split_layout and len(parts) >= 3 and split_of(parts):
            layout[split_of(parts)][parts[1]].append(name)
        elif split_layout and len(parts) >= 3 and split_name(parts[0]) == "val":
            unread[parts[0]] = "not read, as the test split beside it is the held-out one"
        elif split_layout and parts[0] in own_images and parts[0].lower() in _SPLIT_FOLDERS:
            # Kaggle's layout: train/<class>/ beside a test/ of unlabelled images.
            unread[parts[0]] = "not read: a split folder of images in no class folder (unlabelled)"
        else:
            # An image in no class would be left out, the set smaller than the folder shows.
            where = source.where(name)
            if len(parts) == 1:
                raise DataError(f"{where}: an image beside the class folders, in no class")
            if split_layout and split_name(parts[0]):
                raise DataError(f"{where}: an image in a split folder but in no class folder")
            splits = ", ".join(f"{top}/" for top in sorted(set().union(*named.values())))
            raise DataError(
                f"{where}: in no split, though this image folder has split folders "
                f"({splits}); move its class into them, or rename a split folder that is a class"
            )
    for top, why in unread.items():
        warnings.warn(f"{source.where('/'.join([*root, top]))}: {why}", stacklevel=1)
    # A class folder without images would be a class no image is labelled with: refused, as
    # torchvision's ImageFolder refuses it.
    for folder in source.folders:
        parts = folder.split("/")
        if parts[: len(root)] != root:
            continue
        parts = parts[len(root) :]
        if in_run(folder) or folder in run_parents:
            continue  # a run, in one, or a folder of runs
        if not split_layout and len(parts) == 1:
            split, name = "train", parts[0]
        elif split_layout and len(parts) == 2 and split_of(parts):
            split, name = split_of(parts), parts[1]
        else:
            continue
        if name not in layout.get(split, {}):
            suffixes = " ".join(sorted(_IMAGE_SUFFIXES))
            raise DataError(f"{source.where(folder)}: class folder with no images ({suffixes})")
    return layout


def _image_folder_split(source: _Source, split: str) -> tuple[list[str], list[int], list[str]]:
    layout = _image_folder(source)
    # Labels follow the training classes, so that test label i names the same class as train's.
    classes = sorted(layout["train"] if "train" in layout else layout[split])
    names, labels = [], []
    for folder, files in sorted(layout[split].items()):
        if folder not in classes:
            raise DataError(f"{source.where(files[0])}: class {folder!r} is not in the train split")
        names += files
        labels += [classes.index(folder)] * len(files)
    return names, labels, classes


def _read_image_folder(
    source: _Source, split: str, image_size: int | None
) -> tuple[np.ndarray, np.ndarray, list]:
    names, labels, classes = _image_folder_split(source, split)
    return _decode_images(source, names, image_size), np.array(labels, np.int64), classes


def _decode_images(source: _Source, names: list[str], image_size: int | None) -> np.ndarray:
    decoded: dict[str, np.ndarray] = {}
    first, counted = None, 0
    for name, data in source.read(names):
        where = source.where(name)
        array = decode_image(data, where, image_size)
        if first is None:
            first = (where, array)
        elif array.shape[:2] != first[1].shape[:2]:
            (height, width), (first_height, first_width) = array.shape[:2], first[1].shape[:2]
            raise MixedSizes(
                f"{where} is {width}x{height} but {first[0]} is {first_width}x{first_height}"
            )
        # At the first image, and again at the first colour one of a set that began gray (one
        # colour image makes the whole set colour).
        channels = 1 if array.ndim == 2 else 3
        if channels > counted:
            _check_memory(source, len(names), array)
            counted = channels
        decoded[name] = array
    arrays = [decoded[name] for name in names]
    if all(array.ndim == 2 for array in arrays):
        return np.stack(arrays)[:, None]
    # Mixed gray and colour: gray becomes RGB the way Pillow's convert("RGB") does it.
    rgb = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    return np.stack(rgb).transpose(0, 3, 1, 2)


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(source: _Source, n: int, first: np.ndarray) -> None:
    # A folder of camera photos of one size would decode whole at full size, held about three
    # times over (the arrays, their stack, the cache's bytes): the OOM killer would end it with
    # no word, after minutes. Counted in the channels of the image given.
    height, width = first.shape[:2]
    channels = 1 if first.ndim == 2 else 3
    need = 3 * n * height * width * channels
    free = available_memory()
    if free is not None and need > free:
        raise TooLarge(
            f"{source.label}: {n:,} images of {width}x{height}",
            f"need about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of memory "
            "free",
        )


def decode_image(data: bytes, where: str, image_size: int | None = None) -> np.ndarray:
    """An encoded image as uint8 HxW (gray) or HxWx3, resized and centre-cropped to image_size."""
    # Pillow identifies the format from the content, so a GIF named .jpg decodes as a GIF.
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = eight_bit(opened)
            image = image.convert("L" if image.mode in _GRAY_MODES else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}: cannot decode image ({error})") from error
    if image_size is not None:
        image = _resize_and_crop(image, image_size)
    return np.asarray(image)


def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[2:] == (size, size):
        return images
    # Through Pillow, so that --image-size means the same for every format.
    channels_last = images.transpose(0, 2, 3, 1)
    if images.shape[1] == 1:
        channels_last = channels_last[..., 0]
    resized = np.stack(
        [np.asarray(_resize_and_crop(Image.fromarray(a), size)) for a in channels_last]
    )
    return resized[:, None] if resized.ndim == 3 else resized.transpose(0, 3, 1, 2)


# ---- cache


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _cache_file(
    cache_dir: str | Path | None, source: _Source, split: str, image_size: int | None
) -> Path:
    root = Path(cache_dir or os.environ.get("DEEPRES_CACHE") or Path.home() / ".cache/deepres")
    # The label matters as well as the path: "fashion-mnist" names its classes, a bare path
    # to the same folder may not.
    identity = _digest([_CACHE_FORMAT, str(source.path), source.label, split, image_size])
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", source.path.name)
    return root / f"{slug}-{identity}-{_digest(source.fingerprint())}.safetensors"


def _load_cache(path: Path) -> ImageDataset | None:
    if not path.is_file():
        return None
    # Any failure to read an entry, whatever its type, only means decoding the source again.
    try:
        with safe_open(path, framework="pt") as file:
            info = json.loads(file.metadata()["deepres"])
            # Copies, not views of the file's memory map: a cache file truncated in place
            # later must not change, or fault on, a live tensor.
            dataset = ImageDataset(
                images=file.get_tensor("images").clone(),
                labels=file.get_tensor("labels").clone(),
                classes=list(info["classes"]),
                source=str(info["source"]),
            )
        _check_cached(dataset)
    except Exception as error:
        warnings.warn(f"ignoring unreadable dataset cache {path} ({error})", stacklevel=3)
        return None
    return dataset


def _check_cached(dataset: ImageDataset) -> None:
    images, labels = dataset.images, dataset.labels
    if images.dtype != torch.uint8 or images.ndim != 4 or labels.dtype != torch.int64:
        raise ValueError("wrong tensor types")
    if labels.shape != (len(images),) or not all(isinstance(c, str) for c in dataset.classes):
        raise ValueError("labels, images and classes disagree")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(dataset.classes):
        raise ValueError("labels out of range")


def _save_cache(path: Path, dataset: ImageDataset) -> None:
    info = json.dumps({"classes": dataset.classes, "source": dataset.source})
    blob = safetensors_bytes(
        {"images": dataset.images, "labels": dataset.labels}, metadata={"deepres": info}
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(blob)
                file.flush()
                os.fsync(file.fileno())
            # Atomic: a reader sees the old entry or the whole new one, never half a file.
            os.replace(temp, path)
        finally:
            Path(temp).unlink(missing_ok=True)
        # Entries for older versions of the same source and request can never match again.
        for stale in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.safetensors"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as error:
        # A read-only or full disk costs the next run a decode, not this one its data.
        warnings.warn(f"could not write dataset cache {path} ({error})", stacklevel=3)
