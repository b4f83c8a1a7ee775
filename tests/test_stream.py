import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import patch_zip_headers, run_torchrun, sharded, write_photos, write_shard
from PIL import Image

from deepres.data import DataError
from deepres.data.augment import Augment, Lighting
from deepres.data.loader import Preprocess
from deepres.data.stream import (
    _MAX_CLASSES,
    PhotoStream,
    _ShardMembers,
    decode_center,
    default_workers,
    fit_statistics,
    open_image_files,
    open_photos,
    statistics_from,
    statistics_tensors,
    stream_kind,
    stream_splits,
)

AUGMENT = Augment(crop=16, sizes=(20, 30))
REPO = str(Path(__file__).resolve().parents[1])


def zipped(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(folder.rglob("*.jpg")):
            out.write(path, f"wrapper/{path.relative_to(folder)}")
    return archive


def contents(files) -> list[tuple[bytes, int]]:
    return sorted((files.read(i)[0], files.labels[i]) for i in range(len(files)))


def stream(files, **options) -> PhotoStream:
    preprocess = Preprocess(torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25))
    settings = dict(batch_size=8, seed=3, augment=AUGMENT)
    return PhotoStream(files, preprocess, **{**settings, **options})


def test_folder_zip_and_shards_list_the_same_photos(photo_folder, tmp_path):
    folder = open_image_files(str(photo_folder))
    archive = open_image_files(str(zipped(photo_folder, tmp_path / "photos.zip")))
    shards = open_image_files(str(sharded(photo_folder, tmp_path / "shards")[0].parent))
    assert len(folder) == len(archive) == len(shards) == 24
    assert folder.classes == archive.classes == ["ants", "bees"]
    assert shards.classes == ["0", "1"]  # shards carry class numbers only
    assert contents(folder) == contents(archive) == contents(shards)
    test = open_image_files(str(photo_folder), "test")
    assert len(test) == 6 and test.labels == [0, 0, 0, 1, 1, 1]


def test_a_streamed_path_that_is_not_there_is_said_to_be_missing(tmp_path):
    with pytest.raises(DataError, match="gone: no such file or directory"):
        open_image_files(str(tmp_path / "gone"))


def test_shards_are_read_with_a_bounded_number_of_open_files(photo_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(_ShardMembers, "OPEN_AT_MOST", 3)
    files = open_image_files(str(sharded(photo_folder, tmp_path / "shards", per_shard=1)[0].parent))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    read = sorted((files.read(i)[0], files.labels[i]) for i in order + order)
    assert read == sorted(contents(open_image_files(str(photo_folder))) * 2)
    assert len(files.members._files[1]) == 3


def test_what_streams_and_its_splits(photo_folder, tmp_path, tiny_folder):
    shards = sharded(photo_folder, tmp_path / "flat")
    split = tmp_path / "split"
    sharded(photo_folder, split / "train")
    (split / "val").mkdir()
    (shards[0]).rename(split / "val" / "val-000000.tar")
    assert stream_kind(str(photo_folder)) == "image folder"
    assert stream_splits(str(photo_folder)) == ["train", "test"]
    assert stream_kind(str(shards[1])) == "tar shards"
    assert stream_splits(str(tmp_path / "flat")) == ["train"]
    assert stream_splits(str(split)) == ["train", "test"]
    assert len(open_image_files(str(split), "test")) == 10
    assert stream_kind(str(tiny_folder)) == "image folder"
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "train-images-idx3-ubyte").write_bytes(b"")
    assert stream_kind(str(idx)) is None


def test_shards_are_read_by_the_webdataset_key_rule(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 60), (200, 10, 10)).save(jpeg, "JPEG")
    data = jpeg.getvalue()
    shard = write_shard(
        tmp_path / "s.tar", [("dir/a.b", data, b"2\n"), ("dir/c", data, b" 0 ")]
    )  # the key ends at the first dot of the file name: "dir/a", with "b.jpg" and "b.cls"
    with pytest.raises(DataError, match=r"s.tar:dir/a.b.jpg: no dir/a.cls label"):
        open_image_files(str(shard))
    shard = write_shard(tmp_path / "t.tar", [("dir/a", data, b"2\n"), ("dir/c", data, b" 0 ")])
    files = open_image_files(str(shard))
    assert files.labels == [2, 0] and files.classes == ["0", "1", "2"]
    assert files.read(0) == (data, f"{shard}:dir/a.jpg")
    bad = write_shard(tmp_path / "u.tar", [("x", data, b"ant")])
    with pytest.raises(DataError, match=r"u.tar:x.cls: not a class number"):
        open_image_files(str(bad))
    # An image stored as a link is named, not left out of the data set.
    linked = write_shard(tmp_path / "v.tar", [("a", data, b"0"), ("b", data, b"1")])
    with tarfile.open(linked, "a") as shard:
        link = tarfile.TarInfo("c.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        shard.addfile(link)
        label = tarfile.TarInfo("c.cls")
        label.size = 1
        shard.addfile(label, io.BytesIO(b"1"))
    with pytest.raises(DataError, match=r"v.tar:c.jpg: a symbolic link inside the tar"):
        open_image_files(str(linked))


def test_a_shard_cut_inside_a_header_is_truncated(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [(f"k{i}", b"\xff\xd8", b"0") for i in range(4)])
    with tarfile.open(shard) as packed:
        last_image = packed.getmembers()[-2].offset
    # tarfile reads the cut header as the end: the shard would just hold three samples.
    shard.write_bytes(shard.read_bytes()[: last_image + 100])
    with pytest.raises(DataError, match=f"^{shard}: truncated archive"):
        open_image_files(str(shard))


def test_a_class_number_past_the_bound_is_refused(tmp_path):
    # Classes are named 0..the largest number: one huge .cls would make billions of names.
    too_large = str(_MAX_CLASSES).encode()
    shard = write_shard(
        tmp_path / "s.tar", [("a", b"\xff\xd8", b"0"), ("b", b"\xff\xd8", too_large)]
    )
    with pytest.raises(DataError, match=f"s.tar:b.cls: class {too_large.decode()} is too large"):
        open_image_files(str(shard))


@pytest.mark.parametrize(
    ("method", "flags", "cause"),
    [(9, None, r"compression method 9 \(deflate64\)"), (None, 0x1, "the member is encrypted")],
    ids=["deflate64", "encrypted"],
)
def test_a_zip_member_zipfile_cannot_read_is_named(tmp_path, method, flags, cause):
    write_photos(tmp_path / "photos", per_class=2)
    archive = patch_zip_headers(zipped(tmp_path / "photos", tmp_path / "p.zip"), method, flags)
    files = open_image_files(str(archive))
    with pytest.raises(DataError, match=f"^{archive}:wrapper/ants/000.jpg: {cause}"):
        files.read(0)
    with pytest.raises(DataError, match=cause):
        stream(files, batch_size=4).batch(0)


def test_a_compressed_shard_is_refused_with_the_reason(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [("a", b"\xff\xd8", b"0")])
    packed = tmp_path / "s.tar.gz"
    with tarfile.open(packed, "w:gz") as out:
        out.add(shard, "a.jpg")
        info = tarfile.TarInfo("a.cls")
        info.size = 1
        out.addfile(info, io.BytesIO(b"0"))
    with pytest.raises(DataError, match="not an uncompressed tar"):
        open_image_files(str(packed))
    # A folder of them too: it was taken for no data at all.
    folder = tmp_path / "shards"
    folder.mkdir()
    packed.rename(folder / "train-000.tar.gz")
    with pytest.raises(DataError, match="train-000.tar.gz: not an uncompressed tar"):
        open_image_files(str(folder))
    # A compressed shard beside plain ones is refused as well, not left out.
    write_shard(folder / "train-001.tar", [("b", b"\xff\xd8", b"1")])
    with pytest.raises(DataError, match="train-000.tar.gz: not an uncompressed tar"):
        open_image_files(str(folder))
    # A compressed archive that is no shard, beside shards or photos, is not data.
    (folder / "train-000.tar.gz").write_bytes(b"\x1f\x8b\x08")  # cut short
    assert len(open_image_files(str(folder))) == 1
    write_photos(tmp_path / "photos", per_class=2)
    (tmp_path / "photos" / "backup.tgz").write_bytes(b"\x1f\x8b\x08")  # cut short
    assert len(open_image_files(str(tmp_path / "photos"))) == 4


def test_the_shuffle_is_a_function_of_seed_and_epoch(photo_folder):
    files = open_image_files(str(photo_folder))
    a, b, c = stream(files), stream(files), stream(files, seed=4)
    assert a.steps_per_epoch == 3
    epochs = [torch.cat([a.indices(3 * e + s) for s in range(3)]) for e in range(3)]
    assert all(sorted(e.tolist()) == list(range(24)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) == 3  # a new order every epoch
    assert torch.equal(torch.cat([b.indices(s) for s in range(3, 6)]), epochs[1])
    assert not torch.equal(torch.cat([c.indices(s) for s in range(3)]), epochs[0])
    # The labels of a batch are those of its images.
    x, y = a.batch(4)
    assert y.tolist() == [files.labels[i] for i in a.indices(4)]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    # Training views are random crops, not the centre views a test sees.
    centre = a.preprocess(decode_center(files, AUGMENT)[a.indices(4)])
    assert not torch.isclose(x, centre, atol=1e-4).flatten(1).all(1).any()


def test_a_resumed_stream_gives_exactly_the_same_batches(photo_folder):
    files = open_image_files(str(photo_folder))
    lighting = Lighting(torch.tensor([0.2, 0.02, 0.005]), torch.eye(3))
    whole = stream(files, lighting=lighting, channels_last=True)
    batches = [whole.batch(i) for i in range(7)]  # across two epoch boundaries
    resumed = stream(files, lighting=lighting, channels_last=True)
    for i in (4, 5, 6, 2):  # mid-epoch, in order, then asked again from earlier
        x, y = resumed.batch(i)
        assert torch.equal(x, batches[i][0]) and torch.equal(y, batches[i][1])
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(batches[0][0], batches[3][0])
    # The lighting noise is part of the batch, drawn from (seed, iteration).
    plain = stream(files, channels_last=True).batch(4)[0]
    assert not torch.equal(plain, batches[4][0])
    offset = (batches[4][0] - plain).mean((2, 3))
    assert torch.allclose(batches[4][0] - plain, offset[:, :, None, None], atol=1e-5)


def test_worker_processes_decode_the_same_batches(photo_folder):
    files = open_image_files(str(photo_folder))
    in_process = stream(files)
    workers = stream(files, workers=2)
    try:
        for i in range(3):
            assert torch.equal(workers.batch(i)[0], in_process.batch(i)[0])
    finally:
        workers.close()  # a failed comparison must not leave worker processes behind


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_shares_of_the_global_batch(photo_folder, world):
    files = open_image_files(str(photo_folder))
    whole = stream(files, batch_size=6)
    ranks = [stream(files, batch_size=6, shard=(r, world)) for r in range(world)]
    for iteration in (0, 1, 5):
        x, y = whole.batch(iteration)
        parts = [r.batch(iteration) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    epoch = [torch.cat([r.indices(i) for i in range(4)]).tolist() for r in ranks]
    assert sum(map(len, epoch)) == len(set().union(*epoch)) == 24


def test_statistics_come_from_centre_views_of_a_sample(photo_folder):
    files = open_image_files(str(photo_folder))
    views = decode_center(files, AUGMENT, workers=0)
    assert views.shape == (24, 3, 16, 16) and views.dtype == torch.uint8
    preprocess, lighting = fit_statistics(files, AUGMENT, sample=24)
    pixels = views.permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    assert torch.allclose(preprocess.mean.flatten().double(), pixels.mean(1), atol=1e-6)
    assert torch.allclose(preprocess.std.flatten().double(), pixels.std(1), atol=1e-6)
    covariance = lighting.eigvec @ torch.diag(lighting.eigval) @ lighting.eigvec.T
    assert torch.allclose(covariance.double(), torch.cov(pixels), atol=1e-6)
    assert preprocess.mean.shape == (3, 1, 1)
    smaller, _ = fit_statistics(files, AUGMENT, sample=5)
    assert not torch.equal(smaller.mean, preprocess.mean)


def test_statistics_are_saved_and_read_back(photo_folder):
    preprocess, lighting = fit_statistics(open_image_files(str(photo_folder)), AUGMENT, 0.2, 8)
    tensors = statistics_tensors(preprocess, lighting)
    again, light = statistics_from(tensors, 0.2, "run/preprocess.safetensors")
    assert torch.equal(again.mean, preprocess.mean) and torch.equal(again.std, preprocess.std)
    assert torch.equal(light.eigvec, lighting.eigvec) and light.std == 0.2
    del tensors["lighting_eigvec"]
    with pytest.raises(ValueError, match="run/preprocess.safetensors: missing tensor"):
        statistics_from(tensors, 0.2, "run/preprocess.safetensors")


def test_the_held_out_split_is_val_or_val_split(photo_folder):
    data = open_photos(str(photo_folder), 0, AUGMENT)
    assert data.eval_split == "test" and data.eval_images.shape == (6, 3, 16, 16)
    assert data.eval_labels.tolist() == [0, 0, 0, 1, 1, 1] and len(data.train) == 24
    held = open_photos(str(photo_folder), 4, AUGMENT)
    assert held.eval_split == "val" and len(held.train) == 20 and len(held.eval_labels) == 4
    assert set(held.train.entries) < set(data.train.entries)
    held_labels = held.eval_labels.tolist()
    assert sorted(held_labels + held.train.labels) == sorted(data.train.labels)


def test_a_folder_is_walked_once_for_both_splits(photo_folder, tmp_path, monkeypatch):
    import deepres.data.readers as readers

    walks = []
    walk = readers._walk
    monkeypatch.setattr(readers, "_walk", lambda *args: walks.append(args) or walk(*args))
    data = open_photos(str(photo_folder), 0, AUGMENT, decode_eval=False)
    assert data.eval_split == "test" and len(data.train) == 24 and len(data.eval_labels) == 6
    assert len(walks) == 1
    shutil.copytree(photo_folder / "val", tmp_path / "only" / "val")
    with pytest.raises(DataError, match="only: image folder with no train split .found: test"):
        open_photos(str(tmp_path / "only"), 0, AUGMENT)


def test_a_held_out_class_the_training_photos_lack_is_refused(tmp_path):
    write_photos(tmp_path / "photos" / "train", per_class=2)
    write_photos(tmp_path / "photos" / "val", per_class=2)
    (tmp_path / "photos" / "val" / "bees").rename(tmp_path / "photos" / "val" / "Bees")
    with pytest.raises(DataError, match="class 'Bees' is not in the train split"):
        open_photos(str(tmp_path / "photos"), 0, AUGMENT)


def test_a_corrupt_photo_stops_the_stream_with_one_line_naming_it(tmp_path):
    write_photos(tmp_path / "photos", per_class=4)
    bad = tmp_path / "photos" / "bees" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    files = open_image_files(str(tmp_path / "photos"))
    for workers in (0, 1):
        with pytest.raises(DataError, match=f"{bad}: cannot decode image") as error:
            for i in range(2):
                stream(files, batch_size=4, workers=workers).batch(i)
        assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=f"{bad}: cannot decode image"):
        decode_center(files, AUGMENT, workers=1)


def test_an_empty_folder_or_too_few_photos_is_named_in_the_error(tmp_path):
    (tmp_path / "empty" / "ants").mkdir(parents=True)
    for call in (stream_kind, open_image_files):
        with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: not a dataset"):
            call(str(tmp_path / "empty"))
    write_photos(tmp_path / "few", per_class=2)
    with pytest.raises(ValueError, match="4 images, fewer than one batch of 8"):
        stream(open_image_files(str(tmp_path / "few")))


DDP_SCRIPT = """
import json, sys, torch
from deepres import distributed
from deepres.data.augment import Augment
from deepres.data.loader import Preprocess
from deepres.data.stream import PhotoStream, open_image_files

distributed.setup(torch.device("cpu"))
rank, world = distributed.world()
files = open_image_files(sys.argv[1])
pre = Preprocess(torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25))
stream = PhotoStream(files, pre, 8, 3, Augment(crop=16, sizes=(20, 30)), shard=(rank, world))
seen = {i: stream.indices(i).tolist() for i in range(6)}
sums = {i: stream.batch(i)[0].double().sum((1, 2, 3)).tolist() for i in range(6)}
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as out:
    json.dump({"world": world, "seen": seen, "sums": sums}, out)
distributed.teardown()
"""


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed with the gloo backend",
)
def test_two_processes_under_torchrun_split_each_epoch(photo_folder, tmp_path):
    script = tmp_path / "ranks.py"
    path = os.environ.get("PYTHONPATH", "")
    script.write_text(DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    done = run_torchrun(
        [*command, "2", str(script), str(photo_folder), str(tmp_path)],
        {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + path},
    )
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    whole = stream(open_image_files(str(photo_folder)))
    for epoch in range(2):
        steps = [str(3 * epoch + s) for s in range(3)]
        mine = [[i for s in steps for i in r["seen"][s]] for r in ranks]
        assert not set(mine[0]) & set(mine[1])  # disjoint within the epoch
        assert sorted(mine[0] + mine[1]) == list(range(24))  # and together the whole of it
    for i in range(6):
        # The two halves are the single-process global batch, image for image.
        x = whole.batch(i)[0].double().sum((1, 2, 3))
        halves = ranks[0]["sums"][str(i)] + ranks[1]["sums"][str(i)]
        assert torch.allclose(torch.tensor(halves, dtype=torch.float64), x)


def test_a_photo_worker_outlives_a_sigterm_by_its_grace_then_ends():
    # A stop sent to the whole group reaches the workers too: they must not die before the main
    # process has checkpointed and shut them down, nor live on for ever if it never does.
    code = (
        "import os, signal, time\n"
        "from deepres.data import stream\n"
        "stream.WORKER_GRACE = 1\n"
        "stream._quiet_worker(0)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.3)\n"
        "print('alive', flush=True)\n"
        "time.sleep(10)\n"
        "print('never')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout == "alive\n" and done.returncode == -signal.SIGALRM


def test_each_torchrun_process_takes_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers() == 1
