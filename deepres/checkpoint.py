"""Checkpoints: atomic writes, exact resume, and loading that never unpickles.

Everything is safetensors (tensors) or JSON (the rest), so a run directory from anywhere can
be opened without running its code. One file holds all a resume needs, written to a temp
file, fsynced and renamed, so a crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from deepres.models.registry import check_options

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
PREPROCESS = "preprocess.safetensors"
CONFIG = "config.json"
SUMMARY = "summary.json"
FORMAT = "deepres-checkpoint-1"


def _cannot_write(path: Path, err: OSError) -> OSError:
    # One line that names the run file, whatever low-level call failed (a full disk shows up
    # in write, fsync or rename alike).
    return OSError(f"{path}: cannot write ({err.strerror or err})")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(temp_path), fsync the result, then rename it over path.

    Any OSError becomes one naming path; the temp file is removed and path is left as it was.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        os.close(fd)
        # mkstemp makes the file private (0600); the result should get the usual permissions.
        usual_mode(Path(tmp), 0o666)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _cannot_write(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        _fsync(path.parent)  # the rename itself
    except OSError as err:
        raise _cannot_write(path, err) from None


def usual_mode(path: Path, mode: int) -> None:
    """Give a file or folder made private (mkstemp, mkdtemp) the mode the umask allows."""
    os.chmod(path, mode & ~_umask())


def _umask() -> int:
    # Read, not set and set back: os.umask(0) would leave, for that moment, every file another
    # thread (a DataLoader's pin-memory thread, a caller's) creates open to all.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # elsewhere: the brief value is the private one, never the open one
    os.umask(umask)
    return umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def append_text(path: Path, text: str) -> None:
    """Append to a text file; if the write fails, the file is cut back to what it was."""
    path = Path(path)
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                # os.write may write part of the data before the disk fills: no half line stays.
                while data:
                    data = data[os.write(fd, data) :]
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    except OSError as err:
        raise _cannot_write(path, err) from None


def sync_file(path: Path) -> None:
    """Flush a file that is appended to onto the disk, so that what follows cannot outlive it."""
    try:
        _fsync(path)
    except OSError as err:
        raise _cannot_write(path, err) from None


def write_json(path: Path, data: dict) -> None:
    """Write a JSON file atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """Read a JSON file, with an error that names it."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            f"{path}: no such file (is this a deepres run directory?)"
        ) from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a folder, where a JSON file belongs") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


# What every reader of a run's config.json takes from it, and the kind each must be.
_CONFIG_KEYS = {
    "model": str,
    "model_options": dict,
    "classes": list,
    "input_size": list,
    "config": dict,
    "recipe": dict,
}

# Settings of the run's TrainConfig that eval and predict read: without them a config is
# damaged, and a reader would fail later with a KeyError instead of naming the file.
_RUN_KEYS = {"data": str, "image_size": (int, type(None)), "val_split": int}


def read_config(run: Path) -> dict:
    """A run's config.json, checked to be a deepres run's, with an error that names it."""
    path = Path(run) / CONFIG
    saved = read_json(path)
    wrong = next(
        (
            k
            for k, kind in _CONFIG_KEYS.items()
            if not isinstance(saved, dict) or not isinstance(saved.get(k), kind)
        ),
        None,
    )
    if wrong is None:
        wrong = next(
            (
                k
                for k, kind in _RUN_KEYS.items()
                if k not in saved["config"] or not isinstance(saved["config"][k], kind)
            ),
            None,
        )
    if wrong is not None:
        raise ValueError(f"{path}: not the config of a deepres run ({wrong!r} missing or damaged)")
    try:
        check_options(saved["model"], saved["model_options"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    augment = saved.get("augment")  # a streamed run's views: eval and predict take its crop
    if augment is not None and not (
        isinstance(augment, dict) and isinstance(augment.get("crop"), int)
    ):
        raise ValueError(f"{path}: not the config of a deepres run ('augment' damaged)")
    if not all(isinstance(name, str) for name in saved["classes"]):
        raise ValueError(f"{path}: its class names are not all strings")
    outputs = saved["model_options"].get("num_classes", len(saved["classes"]))
    if outputs != len(saved["classes"]):
        raise ValueError(f"{path}: names {len(saved['classes'])} classes for a net of {outputs}")
    return saved


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Write tensors to a safetensors file atomically; metadata is stored as JSON."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata)} if metadata is not None else None
    # Serialised here and written by Python, so that a full disk raises an OSError with its
    # errno, not a SafetensorError wrapping it.
    blob = save(tensors, metadata=meta)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file and its JSON metadata, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return _read(path, _tensors_and_metadata)


def _tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    # One open: a file replaced while it is read (a run saving) cannot pair two versions.
    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        meta = f.metadata() or {}
    return tensors, json.loads(meta.get("json", "{}"))


def _metadata(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("json", "{}"))


def _read(path: Path, reader):
    try:
        return reader(path)
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _loop_state(path: Path, state: object) -> dict:
    """The loop state of a checkpoint, checked to be one a run can go on from."""
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("iteration"), int)
        and state["iteration"] >= 0
        and isinstance(state.get("seconds"), int | float)
        and isinstance(state.get("warming_up"), bool)
        and isinstance(state.get("window"), list)
        and len(state["window"]) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in state["window"])
    )
    if not ok:
        raise ValueError(f"{path}: its loop state (iteration, seconds, window) is damaged")
    return state


def checkpoint_state(run: Path) -> dict | None:
    """The loop state saved with a run's checkpoint (iteration, seconds), no tensor read."""
    path = Path(run) / CHECKPOINT
    return _loop_state(path, _read(path, _metadata)) if path.is_file() else None


def trained_iteration(run: Path, meta: dict) -> int | None:
    """The iteration a run's weights were saved at, from the metadata read with them; weights
    written before they carried it fall back on the run's summary.json, then its checkpoint."""
    if isinstance(meta, dict) and isinstance(meta.get("iteration"), int):
        return meta["iteration"]
    run = Path(run)
    # Only a label: a damaged summary or checkpoint leaves it unknown, the weights still usable.
    try:
        if (run / SUMMARY).is_file():
            summary = read_json(run / SUMMARY)
            iteration = summary.get("iteration") if isinstance(summary, dict) else None
            return iteration if isinstance(iteration, int) else None
        state = checkpoint_state(run)
    except (ValueError, OSError):
        return None
    return state["iteration"] if state else None


def save_checkpoint(
    run: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Everything a resume needs, in one atomically written file."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    tensors[f"optim/{names[id(p)]}/{key}"] = value
    save_tensors(Path(run) / CHECKPOINT, tensors, {"format": FORMAT, **state})


def load_checkpoint(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer from a run's checkpoint; returns the saved loop state."""
    path = Path(run) / CHECKPOINT
    tensors, state = load_tensors(path)
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path}: not a deepres checkpoint (format {found!r})")
    weights = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        # torch's first line only says "Error(s) in loading state_dict for ResNet:".
        lines = [line.strip() for line in str(err).strip().splitlines()]
        first = (lines[1] if len(lines) > 1 else lines[0])[:200]  # a key list can run long
        raise ValueError(f"{path}: does not match the net of {CONFIG} ({first})") from None
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, slot = key[len("optim/") :].rsplit("/", 1)
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"{path}: {key} belongs to no parameter of the net")
            # In the parameter's own layout (channels_last convs): SGD's fused multi-tensor
            # update takes only buffers laid out as their parameters.
            optimizer.state[params[name]][slot] = torch.empty_like(params[name]).copy_(value)
    # Without its momentum a run would resume, but not as the one that stopped.
    names = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        if group.get("momentum"):
            for p in group["params"]:
                if "momentum_buffer" not in optimizer.state[p]:
                    raise ValueError(
                        f"{path}: no momentum for {names[id(p)]}, which a resume needs"
                    )
    return _loop_state(path, {k: v for k, v in state.items() if k != "format"})


def load_preprocess(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std a run's net expects its input normalised with."""
    tensors, _ = load_tensors(Path(run) / PREPROCESS)
    try:
        return tensors["mean"], tensors["std"]
    except KeyError as err:
        raise ValueError(f"{Path(run) / PREPROCESS}: missing tensor {err}") from None
