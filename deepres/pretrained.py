"""Trained nets shipped with deepres: a name like "resnet20-cifar10" wherever a run is taken.

Each shipped net is a small run directory under deepres/weights/<name>/ (config.json,
preprocess.safetensors, model.safetensors), so everything that opens a run opens it as it is;
deepres/weights/manifest.json says where each came from and holds the sha256 of its weights,
of its preprocessing and of the parts of its config.json that shape its predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from deepres.checkpoint import (
    CONFIG,
    PREPROCESS,
    SUMMARY,
    WEIGHTS,
    load_tensors,
    read_config,
    read_json,
    save_tensors,
    usual_mode,
    write_json,
)
from deepres.data.readers import NAMED_DATA, absolute_data, locate_data, open_dataset
from deepres.models import count_params, create_model
from deepres.report import METRICS, final_training, read_metrics, trained_on

SHIPPED = Path(__file__).parent / "weights"
MANIFEST = "manifest.json"
# The limit on a shipped file; larger nets are stored in bf16 (and say so).
MAX_BYTES = 4 * 1024 * 1024
# A folder name inside SHIPPED, never a path out of it.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What of a config.json shapes a net's predictions (inference.load reads these): hashed, so a
# shipped net whose config changed there is refused, while provenance may be added to it.
PREDICTS = ("model", "model_options", "classes", "input_size", "augment")
# A finished run's training record: everything but its weights and checkpoint, which are
# the shipped net's and the bulk of the run.
RECORD = (CONFIG, METRICS, SUMMARY)


# What every reader of a manifest entry takes from it.
_ENTRY_KEYS = ("model", "sha256", "iterations", "train_error", "precision")


def manifest(root: Path | None = None) -> dict[str, dict]:
    """The shipped nets by name, with where each came from."""
    path = Path(root or SHIPPED) / MANIFEST
    if not path.is_file():
        return {}
    # A git-tracked file: a merge conflict or a hand edit could damage it.
    nets = read_json(path)
    nets = nets.get("nets") if isinstance(nets, dict) else None
    if not isinstance(nets, dict):
        raise ValueError(f'{path}: damaged (no "nets" table of shipped nets)')
    for name, entry in nets.items():
        missing = [k for k in _ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{path}: the entry of {name} is damaged (no {', '.join(missing)})")
    return nets


def sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_run(run: str | Path, root: Path | None = None) -> Path:
    """The run directory `run` names: a path, or the name of a shipped net (checked by sha256)."""
    path = Path(run)
    if path.exists() or path.name != str(run):
        return path
    nets = manifest(root)
    if str(run) not in nets:
        shipped = ", ".join(nets) or "none"
        raise FileNotFoundError(
            f"{run}: no such run directory, nor a shipped net (shipped: {shipped})"
        )
    return _verified(str(run), nets[str(run)], root)


def _verified(name: str, entry: dict, root: Path | None) -> Path:
    """The folder of the shipped net name, its files checked against the manifest's sha256s."""
    shipped_dir = Path(root or SHIPPED) / name
    if sha256(shipped_dir / WEIGHTS) != entry["sha256"]:
        raise ValueError(f"{shipped_dir / WEIGHTS}: sha256 differs from the manifest's")
    # (Manifests from before these were recorded hold the weights' sha256 alone.)
    preprocess = entry.get("preprocess_sha256")
    if preprocess and preprocess != sha256(shipped_dir / PREPROCESS):
        raise ValueError(f"{shipped_dir / PREPROCESS}: sha256 differs from the manifest's")
    predicts = entry.get("predicts_sha256")
    if predicts and predicts != predicts_sha256(shipped_dir):
        raise ValueError(
            f"{shipped_dir / CONFIG}: what shapes the net's predictions ({', '.join(PREDICTS)}) "
            "differs from the manifest's"
        )
    return shipped_dir


def _check_loads(run: Path, saved: dict) -> None:
    """Refuse to ship a run whose net does not load and predict as its files describe it."""
    # Imported here: inference finds shipped nets through this module.
    from deepres.inference import load

    classifier = load(run)  # the weights against the net of config.json, named if they differ
    try:
        classifier(torch.zeros(1, *saved["input_size"], dtype=torch.uint8))
    except RuntimeError as err:
        raise ValueError(
            f"{run / CONFIG}: its net does not take its input {saved['input_size']} ({err})"
        ) from None


def predicts_sha256(run: Path) -> str:
    """The sha256 of the parts of a run's config.json that shape its predictions (PREDICTS)."""
    saved = read_config(run)
    part = {key: saved.get(key) for key in PREDICTS}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()


def _trained(saved: dict, metrics: list[dict]) -> tuple:
    """What identifies a finished run among shipped nets: model, iterations, error, precision."""
    error = round(final_training(metrics)[0], 3)
    return saved["model"], metrics[-1]["iteration"], error, saved["config"].get("precision", "fp32")


def _shipped_as(trained: tuple, nets: dict[str, dict]) -> list[str]:
    """The names of the shipped nets that are the run `trained` identifies."""
    return [
        n
        for n, e in nets.items()
        if (e["model"], e["iterations"], e["train_error"], e["precision"]) == trained
    ]


def shipped_iterations(path: Path) -> int | None:
    """The iterations the manifest records for the shipped net in path; None for other paths."""
    if Path(path).parent.resolve() != Path(SHIPPED).resolve():
        return None
    return manifest().get(Path(path).name, {}).get("iterations")


def publish(
    run: str | Path,
    name: str,
    command: str,
    root: Path | None = None,
    bf16: bool | None = None,
    record: Path | None = None,
    once: bool = False,
) -> dict:
    """Copy a finished run's net into root/<name>/ and record it in root/manifest.json.

    Weights are stored in fp32 unless they would pass MAX_BYTES (or bf16=True): then in bf16,
    which `load` casts back to fp32. With record, the run's training record (config, metrics,
    summary) is written there first, for `restore` to rebuild the run from. With once, a run
    shipped already is left as it is (its record, hashes and trained_on added where missing),
    and a name another run holds gets this run's precision: resnet20-cifar10-bf16.
    """
    run, root = Path(run), Path(root or SHIPPED)
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r}: a shipped net's name is letters, digits, '.', '_' and '-'")
    if not (run / "summary.json").is_file():
        raise ValueError(f"{run}: has no summary.json; only a finished run is published")
    saved = read_config(run)
    metrics = read_metrics(run)
    if not metrics:
        raise ValueError(f"{run / METRICS}: no training records to publish")
    if record is not None:
        _check_record_folder(Path(record), run)
    trained = _trained(saved, metrics)
    nets = manifest(root)
    if once:
        mine = _shipped_as(trained, nets)
        if mine:
            if record is not None and not all((Path(record) / n).is_file() for n in RECORD):
                _copy_files(run, Path(record), RECORD)
            return add_missing(mine[0], nets, root)
        if name in nets:
            name = f"{name}-{trained[3]}"
            if name in nets:
                raise ValueError(f"{name}: shipped already, from another run")
    _check_loads(run, saved)
    weights, _ = load_tensors(run / WEIGHTS)
    fp32_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    if bf16 is None:
        bf16 = fp32_bytes > MAX_BYTES
    if bf16:
        weights = {k: v.bfloat16() if v.is_floating_point() else v for k, v in weights.items()}
    # A shipped net does not know where it was trained: drop the run's own directory and the
    # folders above the data. The data's name stays, as provenance, and a fingerprint of its
    # decoded images takes the place of the path in eval's refusal to test a net on its own
    # training images, wherever they lie.
    saved["config"].pop("out", None)
    # (Runs from before data_path was recorded resolve the path as given, from here.)
    data_path = saved.pop("data_path", None) or absolute_data(saved["config"]["data"])
    if data_path not in NAMED_DATA and "data_source" in saved:  # (older runs lack it)
        folder = str(Path(data_path).parent) + os.sep
        saved["data_source"] = saved["data_source"].replace(folder, "", 1)
    if saved.get("augment") is None and "data_sha256" not in saved:  # decoded whole: cached
        data = locate_data(saved["config"]["data"], data_path)
        image_size = saved["config"]["image_size"]
        saved["data_sha256"] = open_dataset(data, "train", image_size=image_size).fingerprint()
    # The record once all of the run has been read (a failure before leaves an old record as
    # it was), and before the weights: weights shipped without it could not be restored, while
    # a record without its weights is published again by the next `publish --once`.
    if record is not None:
        _copy_files(run, Path(record), RECORD)
    out = root / name

    def write(folder: Path) -> None:
        write_json(folder / CONFIG, saved)
        shutil.copyfile(run / PREPROCESS, folder / PREPROCESS)
        save_tensors(folder / WEIGHTS, weights, {"iteration": metrics[-1]["iteration"]})

    train_error, train_loss = final_training(metrics)
    entry = {
        "name": name,
        "model": saved["model"],
        "params": count_params(create_model(saved["model"], **saved["model_options"])),
        "data": saved.get("data_source", saved["config"]["data"]),
        "data_sha256": saved.get("data_sha256"),
        "classes": saved["classes"],
        "iterations": metrics[-1]["iteration"],
        "precision": saved["config"].get("precision", "fp32"),
        "stored_as": "bf16" if bf16 else "fp32",
        "train_error": round(train_error, 3),
        "train_loss": round(train_loss, 5),
        "eval_split": saved.get("eval_split"),
        "command": command,
        "git_commit": saved.get("git_commit"),
        "torch": saved.get("torch"),
        "trained_on": trained_on(saved),
    }

    def record_in_manifest() -> None:
        entry.update(sha256=sha256(out / WEIGHTS), bytes=(out / WEIGHTS).stat().st_size)
        entry.update(_hashes(out))
        nets = manifest(root)
        nets[name] = entry
        write_json(root / MANIFEST, {"nets": dict(sorted(nets.items()))})

    # The manifest is written while the net it replaces is still kept: if that write fails,
    # the old net comes back, which the manifest still describes.
    _swap_in(out, write, then=record_in_manifest)
    return entry


def _hashes(folder: Path) -> dict[str, str]:
    """The sha256s a manifest keeps beside the weights': preprocessing, and config's PREDICTS."""
    return {
        "preprocess_sha256": sha256(folder / PREPROCESS),
        "predicts_sha256": predicts_sha256(folder),
    }


def add_missing(name: str, nets: dict[str, dict], root: Path) -> dict:
    """A shipped net's entry, given what a manifest from before them lacks (written to it): the
    hashes beside the weights', and trained_on, from the shipped config.json.

    `publish --once` does this for a run shipped already; for a net whose run is gone:
    python -c "from deepres.pretrained import *; add_missing(NAME, manifest(), SHIPPED)"
    """
    entry = nets[name]
    missing = {}
    if not all(key in entry for key in _hashes(root / name)):
        _verified(name, entry, root)  # the weights still the ones shipped
        missing.update(_hashes(root / name))
    if "trained_on" not in entry:
        missing["trained_on"] = trained_on(read_config(root / name))
    if not missing:
        return entry
    nets[name] = {**entry, **missing}
    write_json(root / MANIFEST, {"nets": dict(sorted(nets.items()))})
    return nets[name]


def _check_record_folder(record: Path, run: Path) -> None:
    """A record folder is replaced whole: never the run itself, nor a folder of other files."""
    if record.resolve() == run.resolve() or run.resolve() in record.resolve().parents:
        raise ValueError(f"{record}: inside the run {run}; a record goes elsewhere")
    if record.exists() and not record.is_dir():
        raise ValueError(f"{record}: not a folder; a record is a folder of its own")
    if record.is_dir():
        others = sorted(p.name for p in record.iterdir() if p.name not in RECORD)
        if others:
            raise ValueError(f"{record}: holds other files than a record ({', '.join(others)})")


def _copy_files(
    source: Path, dest: Path, names: tuple[str, ...], extra: dict[str, Path] | None = None
) -> None:
    """Copy names from source (and extra: name -> path) into a new dest, swapped in whole."""

    def write(folder: Path) -> None:
        for n in names:
            shutil.copyfile(source / n, folder / n)
        for n, path in (extra or {}).items():
            shutil.copyfile(path, folder / n)

    _swap_in(dest, write)


def _swap_in(
    dest: Path, write: Callable[[Path], None], then: Callable[[], None] | None = None
) -> None:
    """Have write fill a folder beside dest, then put it in dest's place whole.

    then runs once the new folder is in place; if it fails, the old folder comes back.
    """
    # A failure anywhere leaves dest as it was, never half old and half new: the old folder is
    # set aside, not deleted, until the new one is in and `then` has run, and the new one is
    # taken out whole, by a rename, before the old one goes back. Where even that fails, the
    # old one stays beside dest in .NAME.old.*, never lost.
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    usual_mode(staged, 0o777)  # mkdtemp's folder is private (0700)
    old, placed, committed = None, False, False
    try:
        write(staged)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            dest.rename(old / dest.name)
        staged.rename(dest)
        placed = True
        if then is not None:
            then()
        committed = True
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        if placed and not committed:
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new.", dir=dest.parent))
            try:
                dest.rename(trash / dest.name)
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        if old is not None:
            if not committed and not dest.exists():
                (old / dest.name).rename(dest)
            if committed or not (old / dest.name).exists():
                shutil.rmtree(old, ignore_errors=True)


def restore(record: Path, out: Path, name: str | None = None, root: Path | None = None) -> str:
    """Rebuild a shipped net's finished run at out from its training record; the net's name.

    Runs live outside git and a move to a new machine loses them; the shipped weights and the
    record published beside them are in git, and together they are the finished run again, so
    the reports take it as before. The shipped net is the one (or name, checked) with the
    record's model, iterations, final training error and precision in the manifest. A net
    stored in bf16 comes back with those bf16 weights, not the run's fp32 ones.
    """
    record, out = Path(record), Path(out)
    if out.exists():
        raise ValueError(f"{out}: exists; restore writes a new run directory only")
    missing = [n for n in RECORD if not (record / n).is_file()]
    if missing:
        raise ValueError(f"{record}: no {', '.join(missing)}; not a training record")
    saved = read_config(record)
    metrics = read_metrics(record)
    if not metrics:
        raise ValueError(f"{record / METRICS}: no training records")
    trained = _trained(saved, metrics)
    what = f"{trained[0]}, iteration {trained[1]:,}, training error {trained[2]}%, {trained[3]}"
    nets = manifest(root)
    ours = _shipped_as(trained, nets)
    if name is not None and name not in ours:
        raise ValueError(f"{record}: not the record of {name} ({what})")
    if not ours:
        raise ValueError(f"{record}: no shipped net was trained by this record ({what})")
    name = name or ours[0]
    shipped = _verified(name, nets[name], root)
    # The shipped weights go beside the record's config.json: its classes, input and
    # preprocessing must be those the net was shipped with, or the run would mislabel.
    expected = nets[name].get("predicts_sha256")
    if expected and predicts_sha256(record) != expected:
        raise ValueError(
            f"{record / CONFIG}: its classes, input or preprocessing are not those {name} was "
            "shipped with"
        )
    fingerprint = read_config(shipped).get("data_sha256")

    def write(folder: Path) -> None:
        for n in RECORD:
            shutil.copyfile(record / n, folder / n)
        for n in (WEIGHTS, PREPROCESS):
            shutil.copyfile(shipped / n, folder / n)
        # A record from before runs kept their data's fingerprint gets the shipped net's, so
        # that the run still counts where its data lies elsewhere (experiments.same_data).
        if fingerprint and "data_sha256" not in saved:
            write_json(folder / CONFIG, {**saved, "data_sha256": fingerprint})

    _swap_in(out, write)
    return name


def describe(root: Path | None = None) -> list[str]:
    """One line per shipped net, for `deepres pretrained`."""
    nets = manifest(root)
    width = max((len(n) for n in nets), default=0) + 2
    return [
        f"{n:<{width}}{e['model']:<12}{e['params']:>11,}  {e['iterations']:>6} iters  "
        f"train error {e['train_error']:.2f}%  {e.get('precision', 'fp32')}-trained, stored "
        f"{e['stored_as']}  {json.dumps(e['data'])}"
        for n, e in nets.items()
    ]
