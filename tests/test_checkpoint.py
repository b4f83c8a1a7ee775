import os
import stat

import pytest
import torch

from deepres.checkpoint import atomic_write, load_tensors, read_json, save_tensors, write_json


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
