"""The streaming data path: full-size photos decoded in DataLoader workers, batch by iteration.

A data set of photos does not fit in memory as one tensor (ImageNet: 1.28M JPEGs), so this
path keeps only where each encoded image is and its label. It reads image folders (a folder or
.zip, the layouts deepres.data.readers detects) and tar shards in the WebDataset layout
(`key.jpg` beside `key.cls`, the class number as text). Shards are read by offset, from an
index of their members built when they are opened, so every epoch is a full shuffle as with a
folder; they must be uncompressed .tar files, as WebDataset writes them.

PhotoStream keeps BatchStream's contract: batch(i) is the batch of iteration i, the same
whenever it is asked for. The shuffle is a function of (seed, epoch), each view of a function
of (seed, iteration, position in the global batch), and the lighting noise of (seed,
iteration), so neither the number of workers nor of ranks, nor a resume, changes a batch.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import tarfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepres.data.augment import Augment, Lighting, colour_statistics, view
from deepres.data.loader import SPLIT_SEED, Preprocess, split_train_val
from deepres.data.readers import (
    available_splits,
    decode_image,
    list_image_folder,
    list_image_folders,
    read_zip_member,
    refuse_link,
    tar_members,
)
from deepres.data.safe_pickle import DataError

# WebDataset's rule: the key is the path up to the first dot of the file name, the rest the
# extension, so `n0144/x_1.seg.png` is key `n0144/x_1`, extension `seg.png`.
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")
_IMAGE_EXTENSIONS = {
    "jpg",
    "jpeg",
    "jfif",
    "png",
    "bmp",
    "gif",
    "webp",
    "tif",
    "tiff",
    "ppm",
    "pgm",
}
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}
# Shards name classes by number and the classes are 0..the largest: a bound on the largest keeps
# one bad .cls from making billions of names. Four times ImageNet-21k's 21,841 classes.
_MAX_CLASSES = 100_000
# Centre views decoded per DataLoader batch when a whole split is read (held-out set, sample).
_DECODE_BATCH = 32
# Images the colour statistics (mean, std, lighting) are computed from.
STATISTICS_SAMPLE = 500


def default_workers() -> int:
    """DataLoader worker processes: one per CPU core this process may use, at most 8."""
    # torchrun starts LOCAL_WORLD_SIZE processes on a machine, each with its own workers:
    # each takes its share of the cores.
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        local = 1
    return max(1, min(8, len(os.sched_getaffinity(0)) // local))


# ---- where the encoded images are


class _Folder:
    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as error:
            raise DataError(f"{self.where(name)}: cannot read ({error.strerror})") from error

    def where(self, name: str) -> str:
        return str(self.root / name)


class _ZipMembers:
    # One open handle per process: a handle inherited through fork would share its file
    # position with the parent's and with every other worker's.
    def __init__(self, path: Path) -> None:
        self.path = path
        self._archive: tuple[int, zipfile.ZipFile] | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_archive": None}

    def read(self, name: str) -> bytes:
        try:
            if self._archive is None or self._archive[0] != os.getpid():
                self._archive = (os.getpid(), zipfile.ZipFile(self.path))
            return read_zip_member(self._archive[1], name, self.where(name))
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, KeyError) as error:
            raise DataError(f"{self.where(name)}: cannot read ({error})") from error

    def where(self, name: str) -> str:
        return f"{self.path}:{name}"


class _ShardMembers:
    # Entries are (shard number, member name, offset of the data, size). The handles a
    # process keeps open are bounded: a full shuffle reaches every shard, and ImageNet's
    # 1,282 shards of 1,000 images would pass the usual limit of 1,024 files open per process.
    OPEN_AT_MOST = 64

    def __init__(self, shards: list[Path]) -> None:
        self.shards = shards
        self._files: tuple[int, OrderedDict] | None = None

    def __getstate__(self) -> dict:
        return {"shards": self.shards, "_files": None}

    def read(self, entry: tuple[int, str, int, int]) -> bytes:
        shard, _, offset, size = entry
        if self._files is None or self._files[0] != os.getpid():
            self._files = (os.getpid(), OrderedDict())
        files = self._files[1]
        try:
            if shard in files:
                files.move_to_end(shard)
            else:
                if len(files) >= self.OPEN_AT_MOST:
                    files.popitem(last=False)[1].close()
                files[shard] = open(self.shards[shard], "rb")
            file = files[shard]
            file.seek(offset)
            data = file.read(size)
        except OSError as error:
            raise DataError(f"{self.where(entry)}: cannot read ({error.strerror})") from error
        if len(data) != size:
            raise DataError(f"{self.where(entry)}: the shard ends inside this member")
        return data

    def where(self, entry: tuple[int, str, int, int]) -> str:
        return f"{self.shards[entry[0]]}:{entry[1]}"


@dataclass
class ImageFiles:
    """A split of encoded photos: how to read each, its label, the class names; none decoded."""

    members: _Folder | _ZipMembers | _ShardMembers
    entries: list
    labels: list[int]
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, index: int) -> tuple[bytes, str]:
        """The encoded bytes of one image and where it is, for messages."""
        entry = self.entries[index]
        return self.members.read(entry), self.members.where(entry)

    def full_size(self) -> Iterator[tuple[np.ndarray, int]]:
        """(uint8 image as stored, label) of each image in order, decoded one by one."""
        for index, label in enumerate(self.labels):
            yield decode_image(*self.read(index)), label

    def subset(self, index: torch.Tensor) -> ImageFiles:
        """The images at these positions, in this order."""
        picked = index.tolist()
        return ImageFiles(
            self.members,
            [self.entries[i] for i in picked],
            [self.labels[i] for i in picked],
            self.classes,
            self.source,
        )


# ---- opening a data set for streaming


def stream_kind(spec: str) -> str | None:
    """'tar shards' or 'image folder' when the photos at spec can stream, else None."""
    if _shard_layout(spec) is not None:
        return "tar shards"
    path = Path(spec).expanduser()
    if not (path.is_dir() or zipfile.is_zipfile(path)):
        return None
    return "image folder" if list_image_folder(spec) is not None else None


def stream_splits(spec: str) -> list[str]:
    """Which of 'train'/'test' the photos at spec have ('val' counts as 'test')."""
    shards = _shard_layout(spec)
    if shards is not None:
        return [split for split in ("train", "test") if shards.get(split)]
    # Only a split that is not there is left out: one that is there but wrong (a class the
    # training split lacks) is refused, not trained beside without a held-out split.
    listings = list_image_folders(spec) or {}
    return [s for s in ("train", "test") if s in listings]


def open_image_files(
    spec: str, split: str = "train", classes: list[str] | None = None
) -> ImageFiles:
    """The photos of a split of an image folder or of tar shards, listed, not decoded."""
    return open_image_splits(spec, [split], classes)[split]


def open_image_splits(
    spec: str, splits: list[str] | None = None, classes: list[str] | None = None
) -> dict[str, ImageFiles]:
    """Splits of the photos at spec, listed once: those named (each must be there), else all.

    Shards name their classes by number: a held-out split takes classes, else the training
    split's where that is listed too.
    """
    opened = streamable_splits(spec, splits, classes)
    if opened is None:
        if not Path(spec).expanduser().exists():
            available_splits(spec)  # a path that is not there: said as such
        raise DataError(
            f"{spec}: the streaming path reads image folders (a folder or .zip of"
            " <class>/<image> or train|val/<class>/<image>) or WebDataset tar shards"
        )
    return opened


def streamable_splits(
    spec: str, splits: list[str] | None = None, classes: list[str] | None = None
) -> dict[str, ImageFiles] | None:
    """open_image_splits where the photos at spec can stream; None where they cannot."""
    shards = _shard_layout(spec)
    if shards is not None:
        opened: dict[str, ImageFiles] = {}
        for split in splits or [s for s in ("train", "test") if shards.get(s)]:
            if not shards.get(split):
                found = ", ".join(s for s in ("train", "test") if shards.get(s))
                raise DataError(f"{spec}: tar shards with no {split} split (found: {found})")
            known = classes or (opened["train"].classes if "train" in opened else None)
            opened[split] = _index_shards(shards[split], split, known)
        return opened
    path = Path(spec).expanduser()
    if not (path.is_dir() or zipfile.is_zipfile(path)):
        return None
    listings = list_image_folders(spec, splits)
    if listings is None:
        return None
    opened = {}
    for split, listing in listings.items():
        if not listing.names:
            raise DataError(f"{spec}: no images in the {split} split")
        members = _ZipMembers(listing.path) if listing.is_zip else _Folder(listing.path)
        opened[split] = ImageFiles(
            members, listing.names, listing.labels, listing.classes, listing.source
        )
    return opened


def shard_files(spec: str, split: str = "train") -> set[Path]:
    """The real paths of a split's tar shards at spec; none where spec is not tar shards."""
    layout = _shard_layout(spec) if spec else None
    return {path.resolve() for path in (layout or {}).get(split, [])}


def _shard_layout(spec: str) -> dict[str, list[Path]] | None:
    """Shards by split: a .tar shard, a folder of them, or train/ and val/ folders of them."""
    path = Path(spec).expanduser()
    if path.is_file():
        return {"train": [path]} if _is_shard(path) else None
    if not path.is_dir():
        return None
    top = _tars(path)
    if top and _is_shard(top[0]):
        return {"train": top}
    layout = {}
    for split, folders in _SPLIT_FOLDERS.items():
        for folder in folders:
            found = _tars(path / folder)
            if found and split not in layout:
                layout[split] = found
    if not layout.get("train") or not _is_shard(layout["train"][0]):
        return None
    return layout


def _tars(folder: Path) -> list[Path]:
    # Compressed shards are listed too, so that they are refused with the reason (no offsets
    # to seek to) rather than left out or taken for a folder of no data; a compressed archive
    # that is no shard (a backup.tar.gz beside the photos, one cut short) is not data.
    def is_shard(path: Path) -> bool:
        try:
            return _is_shard(path)
        except DataError:
            return False

    packed = [p for pattern in ("*.tar.gz", "*.tgz") for p in folder.glob(pattern) if is_shard(p)]
    return sorted([*folder.glob("*.tar"), *packed])


def _is_shard(path: Path, look_at: int = 16) -> bool:
    # A WebDataset shard names its labels key.cls; a tar of class folders or CIFAR has none.
    try:
        is_tar = tarfile.is_tarfile(path)
    except (EOFError, tarfile.TarError, zlib.error) as error:  # a compressed file cut short
        raise DataError(f"{path}: corrupt archive ({type(error).__name__}: {error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if not is_tar:
        return False
    try:
        with tarfile.open(path, "r|*") as archive:
            members = (m.name for m in archive if m.isfile())
            return any(name.endswith(".cls") for name in itertools.islice(members, look_at))
    except _TAR_ERRORS as error:
        raise DataError(f"{path}: corrupt tar shard ({type(error).__name__}: {error})") from error


def _index_shards(shards: list[Path], split: str, classes: list[str] | None) -> ImageFiles:
    entries, labels = [], []
    for number, shard in enumerate(shards):
        for name, offset, size, label in _index_shard(shard):
            entries.append((number, name, offset, size))
            labels.append(label)
    if not entries:
        raise DataError(f"{shards[0].parent}: no samples in the {split} shards")
    # Shards carry class numbers, not names: the classes are the numbers of the training split.
    classes = classes or [str(c) for c in range(max(labels) + 1)]
    members = _ShardMembers(shards)
    for entry, label in zip(entries, labels, strict=True):
        if not 0 <= label < len(classes):
            raise DataError(
                f"{members.where(entry)}: class {label} is outside the {len(classes)} classes"
                " of the train split"
            )
    where = shards[0] if len(shards) == 1 else f"{shards[0].parent} ({len(shards)} shards)"
    return ImageFiles(members, entries, labels, classes, f"{where} (tar shards, {split} split)")


def _index_shard(shard: Path) -> Iterator[tuple[str, int, int, int]]:
    """(image member, data offset, size, class) of each sample of one uncompressed shard."""
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, int] = {}
    try:
        # "r:" refuses compressed tars: their members have no offset to seek to.
        with tarfile.open(shard, "r:") as archive:
            for member in tar_members(archive, shard):
                match = _KEY.match(member.name.removeprefix("./"))
                if match and match.group(2).rsplit(".", 1)[-1].lower() in _IMAGE_EXTENSIONS:
                    refuse_link(member, f"{shard}:{member.name}")
                if not (member.isfile() and match):
                    continue
                key, extension = match.groups()
                if extension.rsplit(".", 1)[-1].lower() in _IMAGE_EXTENSIONS:
                    if key in images:
                        raise DataError(f"{shard}:{member.name}: a second image for key {key!r}")
                    images[key] = member
                elif extension == "cls":
                    text = archive.extractfile(member).read()
                    try:
                        labels[key] = int(text.decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        raise DataError(
                            f"{shard}:{member.name}: not a class number ({text[:20]!r})"
                        ) from None
                    if labels[key] >= _MAX_CLASSES:
                        raise DataError(
                            f"{shard}:{member.name}: class {labels[key]} is too large"
                            f" (at most {_MAX_CLASSES - 1})"
                        )
    except tarfile.ReadError as error:
        raise DataError(
            f"{shard}: not an uncompressed tar ({error}); streaming reads shards by offset,"
            " so write them as plain .tar, as WebDataset does"
        ) from error
    except _TAR_ERRORS as error:
        raise DataError(f"{shard}: corrupt tar shard ({type(error).__name__}: {error})") from error
    for key, member in images.items():
        if key not in labels:
            raise DataError(f"{shard}:{member.name}: no {key}.cls label beside it")
        yield member.name, member.offset_data, member.size, labels[key]


# ---- decoding in DataLoader workers


class _Views(Dataset):
    """Requests (image index, draw key) to (uint8 view [H, W, 3], label); key None: the centre."""

    def __init__(self, files: ImageFiles, augment: Augment) -> None:
        self.files, self.augment = files, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, request: tuple[int, list[int] | None]):
        index, key = request
        try:
            data, where = self.files.read(index)
            rng = None if key is None else np.random.default_rng(key)
            return view(data, where, self.augment, rng), self.files.labels[index]
        except DataError as error:
            # Handed back as the message: an exception raised in a worker reaches the main
            # process wrapped in a many-line traceback, and the CLI prints one line.
            return str(error)


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor] | str:
    failed = next((item for item in items if isinstance(item, str)), None)
    if failed is not None:
        return failed
    pixels = np.stack([pixels for pixels, _ in items])
    # NHWC memory seen as NCHW: the channels_last layout the nets train in, with no copy.
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return images, torch.tensor([label for _, label in items], dtype=torch.int64)


# Seconds a photo-loading worker lives on after a SIGTERM (see _quiet_worker).
WORKER_GRACE = 20


def _quiet_worker(_: int) -> None:
    # Ctrl-C reaches the whole process group, and a stop by SIGTERM often does too (kill -- -PGID,
    # a batch system or systemd stopping the job). The main process stops the run at a step
    # boundary, checkpoints it and shuts the workers down itself; a worker that died first
    # would turn that clean stop into a "DataLoader worker killed" crash and lose the
    # checkpoint. A worker whose main process is gone exits by itself (DataLoader's watchdog).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGTERM leaves the worker WORKER_GRACE seconds to be shut down by its main process, as
    # it is at a clean stop; one still alive then (stuck, or orphaned) ends by SIGALRM.
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(WORKER_GRACE))


def _loader(views: _Views, requests, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        views,
        batch_sampler=requests,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        worker_init_fn=_quiet_worker if workers else None,
    )


def _unpack(got: tuple[torch.Tensor, torch.Tensor] | str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(got, str):
        raise DataError(got)
    return got


def decode_center(files: ImageFiles, augment: Augment, workers: int = 0) -> torch.Tensor:
    """Every image's centre view (shorter side to augment.center_resize) as uint8 [N, 3, S, S]."""
    requests = [
        [(i, None) for i in range(start, min(start + _DECODE_BATCH, len(files)))]
        for start in range(0, len(files), _DECODE_BATCH)
    ]
    # Filled batch by batch: a list of batches, their concatenation and its contiguous copy
    # held the views up to three times (7.5 GB each for ImageNet's 50,000 at 224).
    views = torch.empty(len(files), 3, augment.crop, augment.crop, dtype=torch.uint8)
    for start, got in zip(
        range(0, len(files), _DECODE_BATCH),
        _loader(_Views(files, augment), requests, workers, False),
        strict=True,
    ):
        batch = _unpack(got)[0]
        views[start : start + len(batch)] = batch
    return views


def fit_statistics(
    files: ImageFiles,
    augment: Augment,
    lighting_std: float = 0.1,
    sample: int = STATISTICS_SAMPLE,
    workers: int = 0,
) -> tuple[Preprocess, Lighting]:
    """Per-channel mean and std, and the lighting's eigenvectors, from a fixed sample of images."""
    # Centre views of the same images for every run on these files: a fixed seed.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(SPLIT_SEED))
    images = decode_center(files.subset(order[:sample].sort().values), augment, workers)
    mean, covariance = colour_statistics(images)
    std = covariance.diagonal().sqrt()
    return Preprocess(mean.view(3, 1, 1), std.view(3, 1, 1)), Lighting.fit(covariance, lighting_std)


@dataclass
class PhotoData:
    """The streaming path's data: the training photos and the held-out split's centre views."""

    train: ImageFiles
    eval_split: str | None
    eval_images: torch.Tensor | None
    eval_labels: torch.Tensor | None


def open_photos(
    spec: str,
    val_split: int,
    augment: Augment,
    workers: int = 0,
    decode_eval: bool = True,
    opened: dict[str, ImageFiles] | None = None,
) -> PhotoData:
    """The training photos and the held-out split: val_split of them, else ROOT/val or test.

    opened: the splits as streamable_splits listed them, where the caller has them already.
    """
    # One listing for both splits: walking a folder of a million photos takes a while.
    if opened is None:
        opened = open_image_splits(spec, ["train"] if val_split else None)
    if "train" not in opened:
        raise DataError(f"{spec}: image folder with no train split (found: {', '.join(opened)})")
    files = opened["train"]
    if val_split:
        train_index, val_index = split_train_val(len(files), val_split)
        held, split = files.subset(val_index), "val"
        files = files.subset(train_index)
    elif "test" in opened:
        held, split = opened["test"], "test"
    else:
        return PhotoData(files, None, None, None)
    # Centre views (Sec. 3.4's single-view test), decoded once: a held-out set is evaluated
    # many times in a run. uint8, 150 KB an image at 224.
    images = decode_center(held, augment, workers) if decode_eval else None
    return PhotoData(files, split, images, torch.tensor(held.labels, dtype=torch.int64))


def statistics_tensors(preprocess: Preprocess, lighting: Lighting) -> dict[str, torch.Tensor]:
    """What a run saves of its photo statistics (preprocess.safetensors): mean, std, PCA."""
    return {
        "mean": preprocess.mean,
        "std": preprocess.std,
        "lighting_eigval": lighting.eigval,
        "lighting_eigvec": lighting.eigvec,
    }


def statistics_from(
    tensors: dict[str, torch.Tensor], lighting_std: float, where: str
) -> tuple[Preprocess, Lighting]:
    """The Preprocess and Lighting of statistics_tensors(), read back from a run's file."""
    try:
        preprocess = Preprocess(tensors["mean"], tensors["std"])
        lighting = Lighting(tensors["lighting_eigval"], tensors["lighting_eigvec"], lighting_std)
    except KeyError as error:
        raise ValueError(f"{where}: missing tensor {error}") from None
    return preprocess, lighting


# ---- training batches


def _generator(seed: int, stream: int, key: int) -> torch.Generator:
    # The seeding BatchStream uses, so both paths shuffle n images the same way.
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + key) % (2**63))


class _Order:
    """Which images each rank takes at each iteration: epoch-wise shuffles from (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, shard: tuple[int, int]) -> None:
        self.n, self.batch_size, self.seed, self.shard = n, batch_size, seed, shard
        self.steps_per_epoch = n // batch_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, iteration: int) -> torch.Tensor:
        epoch, step = divmod(iteration, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = torch.randperm(self.n, generator=_generator(self.seed, 0, epoch))
            self._epoch = epoch
        rank, world = self.shard
        share = self.batch_size // world
        start = step * self.batch_size + rank * share
        return self._order[start : start + share]

    def requests(self, start: int) -> Iterator[list[tuple[int, list[int]]]]:
        """The DataLoader's batches from iteration start on: (image, draw key) per image."""
        rank, world = self.shard
        first_slot = rank * (self.batch_size // world)
        for iteration in itertools.count(start):
            # Keyed by the slot in the global batch: the view of an image does not depend on
            # how many ranks share the batch.
            yield [
                (int(index), [iteration, first_slot + slot, self.seed % 2**63])
                for slot, index in enumerate(self.indices(iteration))
            ]


class PhotoStream:
    """Training batches by iteration number, decoded and augmented in DataLoader workers.

    The streaming counterpart of BatchStream, with the same contract: batch(i) gives this rank's
    contiguous share of global batch i on the device, normalised and with lighting noise.
    """

    def __init__(
        self,
        files: ImageFiles,
        preprocess: Preprocess,
        batch_size: int,
        seed: int,
        augment: Augment,
        lighting: Lighting | None = None,
        device: torch.device | str = "cpu",
        workers: int = 0,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if len(files) < batch_size:
            raise ValueError(
                f"the training set has {len(files)} images, fewer than one batch of "
                f"{batch_size}; lower --batch-size"
            )
        if batch_size % shard[1]:
            raise ValueError(
                f"--batch-size {batch_size} does not split evenly over {shard[1]} processes; "
                f"choose a multiple of {shard[1]}"
            )
        self.device = torch.device(device)
        self.preprocess = preprocess.to(self.device)
        self.lighting = lighting.to(self.device) if lighting is not None else None
        self.batch_size, self.seed, self.shard = batch_size, seed, shard
        self.workers, self.channels_last = workers, channels_last
        self._views = _Views(files, augment)
        self._order = _Order(len(files), batch_size, seed, shard)
        # Every step sees a full batch (BN statistics); the remainder waits for the next epoch.
        self.steps_per_epoch = self._order.steps_per_epoch
        self._batches: Iterator | None = None
        self._next = -1

    def indices(self, iteration: int) -> torch.Tensor:
        """Positions in the file list of the images of this rank's share of an iteration."""
        return self._order.indices(iteration)

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented, normalised batch (this rank's share) of an iteration, and its labels."""
        if iteration != self._next or self._batches is None:
            # One DataLoader serves the iterations in order from here; asking for another
            # iteration (a resume, a test) starts a new one there.
            requests = _Order(self._order.n, self.batch_size, self.seed, self.shard)
            loader = _loader(
                self._views, requests.requests(iteration), self.workers, self.device.type == "cuda"
            )
            self._batches, self._next = iter(loader), iteration
        try:
            images, labels = _unpack(next(self._batches))
        except DataError:
            self._batches = None
            raise
        self._next += 1
        x = self.preprocess(images.to(self.device, non_blocking=True))
        if self.lighting is not None:
            rank, world = self.shard
            share = self.batch_size // world
            # Drawn for the global batch and sliced, like pad_crop_flip's draws.
            alpha = torch.randn(self.batch_size, 3, generator=_generator(self.seed, 2, iteration))
            alpha = alpha[rank * share : (rank + 1) * share]
            if self.device.type == "cuda":
                # From pinned memory the copy is queued behind the step, not waited for.
                alpha = alpha.pin_memory()
            noise = self.lighting.offsets(alpha.to(self.device, non_blocking=True))
            x = x + (noise / self.preprocess.std.view(1, 3))[:, :, None, None]
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format), labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the worker processes now rather than when the stream is collected."""
        self._batches = None
