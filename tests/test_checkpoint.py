import errno
import json
import os
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import tiny_config

from deepres import checkpoint
from deepres.checkpoint import (
    CHECKPOINT,
    FORMAT,
    append_text,
    atomic_write,
    checkpoint_state,
    load_checkpoint,
    load_tensors,
    read_json,
    save_checkpoint,
    save_tensors,
    write_json,
)
from deepres.train import train


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"iteration": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write('{"iteration": 2')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert read_json(path) == {"iteration": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_tensors_and_metadata_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": torch.arange(6.0).view(2, 3)}, {"iteration": 7})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["w"], torch.arange(6.0).view(2, 3)) and meta == {"iteration": 7}


def test_weights_are_read_with_the_iteration_of_the_same_file(tmp_path, monkeypatch):
    # A run saving while eval reads its weights: the next save lands just after the reader's
    # first open. What one open reads is the old file whole; a second open would see the new.
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, {"iteration": 4})
    saves = [({"w": torch.ones(2)}, {"iteration": 8})]

    def saved_meanwhile(real_open):
        def opened(*args, **kwargs):
            handle = real_open(*args, **kwargs)
            if saves:
                save_tensors(path, *saves.pop())
            return handle

        return opened

    # Every way safetensors opens a file from Python, deepres's and its own load_file's.
    monkeypatch.setattr(checkpoint, "safe_open", saved_meanwhile(checkpoint.safe_open))
    monkeypatch.setattr(
        safetensors.torch, "safe_open", saved_meanwhile(safetensors.torch.safe_open)
    )
    tensors, meta = load_tensors(path)
    assert (tensors["w"].sum().item(), meta["iteration"]) == (0.0, 4)


def test_metrics_reach_the_disk_before_the_checkpoint_that_follows_them(
    tiny_folder, tmp_path, monkeypatch
):
    # The last record on the disk when each checkpoint is synced: that checkpoint's iteration.
    on_disk, at_checkpoints = [None], []
    real_fsync = os.fsync

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name == "metrics.jsonl":
            on_disk[0] = json.loads(path.read_text().splitlines()[-1])["iteration"]
        elif path.name.startswith(".checkpoint"):
            at_checkpoints.append(on_disk[0])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train(tiny_config(tiny_folder, tmp_path / "run", iters=8), progress=False)
    assert at_checkpoints == [4, 8]  # checkpoint_every 4, a record every 2 iterations


def test_unreadable_files_are_named_in_one_line_errors(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="model.safetensors") as err:
        load_tensors(bad)
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        read_json(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_write_errors_name_the_file_and_leave_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    save_tensors(path, {"w": torch.ones(3)})

    def disk_fills(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", disk_fills)
        with pytest.raises(OSError) as err:
            save_tensors(path, {"w": torch.zeros(3)})
    assert str(err.value) == f"{path}: cannot write (No space left on device)"
    assert torch.equal(load_tensors(path)[0]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_append_text_cuts_a_failed_append_back(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_text(path, '{"iteration": 1}\n')
    write = os.write

    def disk_fills(fd, data):
        if len(data) > 4:
            return write(fd, data[:4])  # part of the line, as a filling disk does
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk_fills)
        with pytest.raises(OSError) as err:
            append_text(path, '{"iteration": 2}\n')
    assert str(err.value) == f"{path}: cannot write (No space left on device)"
    assert path.read_text() == '{"iteration": 1}\n'
    append_text(path, '{"iteration": 2}\n')
    assert path.read_text().splitlines() == ['{"iteration": 1}', '{"iteration": 2}']


def test_a_checkpoint_with_damaged_loop_state_or_optimizer_entries_is_named(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"iteration": 4, "seconds": 1.5, "warming_up": False, "window": [0.0, 0.0, 0]}
    save_checkpoint(tmp_path, model, optimizer, state)
    assert checkpoint_state(tmp_path) == {"format": FORMAT, **state}
    assert load_checkpoint(tmp_path, model, optimizer) == state
    path = tmp_path / CHECKPOINT
    damages = [{**state, "iteration": "4"}, {**state, "window": [1]}, {"iteration": 4}]
    damages.append({**state, "window": [0.0, "x", 0]})  # went on to a TypeError traceback
    for damaged in damages:
        save_checkpoint(tmp_path, model, optimizer, damaged)
        for read in (
            lambda: checkpoint_state(tmp_path),
            lambda: load_checkpoint(tmp_path, model, optimizer),
        ):
            with pytest.raises(ValueError, match=f"{path}: its loop state .* is damaged"):
                read()
    tensors, meta = load_tensors(path)
    save_tensors(path, tensors, [1, 2])  # metadata that is JSON, but no dict
    with pytest.raises(ValueError, match="not a deepres checkpoint"):
        load_checkpoint(tmp_path, model, optimizer)
    tensors["optim/gone/momentum_buffer"] = torch.zeros(2)
    save_tensors(path, tensors, {**meta, **state})
    with pytest.raises(ValueError, match="optim/gone/momentum_buffer belongs to no parameter"):
        load_checkpoint(tmp_path, model, optimizer)
    # Weights of another net: the cause named, not torch's first line alone.
    other = {**tensors, "model/weight": torch.zeros(5, 3)}
    other.pop("optim/gone/momentum_buffer")
    save_tensors(path, other, {**meta, **state})
    with pytest.raises(ValueError, match=r"does not match the net of .*\(size mismatch for weight"):
        load_checkpoint(tmp_path, model, optimizer)
    # A checkpoint without a parameter's momentum would resume a different run.
    del tensors["optim/gone/momentum_buffer"], tensors["optim/bias/momentum_buffer"]
    save_tensors(path, tensors, {**meta, **state})
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=f"{path}: no momentum for bias"):
        load_checkpoint(tmp_path, model, fresh)


def test_resumed_momentum_is_laid_out_as_its_parameter(tiny_folder, tmp_path):
    from deepres.models import create_model

    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=4, channels_last=True), stop_at=2, progress=False)
    model = create_model("resnet20", num_classes=3, width=4).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_checkpoint(run, model, optimizer)
    # Saved contiguous; restored channels_last like the conv weights, which SGD's fused
    # multi-tensor update needs of every buffer to take them all at once.
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(
        optimizer.state[p]["momentum_buffer"].stride() == p.stride() for p in convs
    )
    assert any(p.stride() != p.contiguous().stride() for p in convs)


def test_the_umask_is_read_without_being_changed(monkeypatch):
    from deepres import checkpoint

    set_to = []
    umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: set_to.append(mask) or umask(mask))
    before = umask(0o022)
    try:
        assert checkpoint._umask() == 0o022 and set_to == []
    finally:
        umask(before)
