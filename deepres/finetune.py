"""Fine-tuning: a net started from another's weights, all but the fc, its fc trained alone or not.

The weights come from a deepres run, a shipped net by name (resnet20-cifar10), a safetensors
file or a torchvision-style state dict; a .pth is read only with torch.load(weights_only=True),
which builds tensors and plain containers and refuses any other object, so no code in the file
runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from deepres.checkpoint import CONFIG, WEIGHTS, read_config, read_json, trained_iteration
from deepres.pretrained import manifest, resolve_run

# The classifier: replaced for the new class count, never loaded.
HEAD = "fc."
_EXPECTED = (
    "expected a deepres run directory, a shipped net's name (deepres pretrained), "
    "a .safetensors file or a .pth/.pt state dict"
)


def init_source(path: str | Path) -> Path | None:
    """The run --init names (a run, its weights file, a shipped net); None for other weights."""
    if not Path(path).exists() and str(path) in manifest():
        return resolve_run(path)
    path = Path(path)
    if path.name == WEIGHTS and (path.parent / CONFIG).is_file():
        # A Hub or timm snapshot holds a model.safetensors beside a config.json of its own; a
        # deepres run's has these keys (and one damaged otherwise is refused by read_config).
        saved = read_json(path.parent / CONFIG)
        ours = isinstance(saved, dict) and {"model", "config"} <= saved.keys()
        return path.parent if ours else None
    return path if path.is_dir() else None


def check_init(path: str | Path, model: str) -> None:
    """Refuse, before any data is read, an --init that names nothing or another net."""
    if not Path(path).exists() and str(path) not in manifest():
        raise FileNotFoundError(f"--init {path}: no such file, folder or shipped net ({_EXPECTED})")
    source = init_source(path)
    if source is not None and (source / CONFIG).is_file():
        # A plain net and its residual twin have the same tensors (option A adds none): only
        # the name tells them apart.
        theirs = read_config(source)["model"]
        if theirs != model:
            raise ValueError(f"--init {path}: the weights of {theirs}, not of {model}")


def read_init(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict --init names, and where it came from: its file's absolute path and
    sha256 and, for a run or shipped net, the iteration: all from one read of the file."""
    source = init_source(path)
    if source is not None:
        if not (source / WEIGHTS).is_file():
            raise FileNotFoundError(f"{source}: no {WEIGHTS} in it ({_EXPECTED})")
        file = source / WEIGHTS
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file or directory ({_EXPECTED})")
        if file.suffix not in (".safetensors", ".pth", ".pt"):
            raise ValueError(f"{file}: {_EXPECTED}")
    # One read: a run still training rewrites its weights, and the record must be of these.
    data = file.read_bytes()
    record = {"path": str(file.resolve()), "sha256": hashlib.sha256(data).hexdigest()}
    if file.suffix == ".safetensors":
        try:
            weights = safetensors.torch.load(data)
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        except (SafetensorError, ValueError) as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from None
        if source is not None:
            try:
                meta = json.loads(header.get("__metadata__", {}).get("json", "{}"))
            except (ValueError, AttributeError) as err:
                raise ValueError(f"{file}: its metadata is damaged ({err})") from None
            record["iteration"] = trained_iteration(source, meta)
        return weights, record
    return _state_dict(file, data), record


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a run directory, a shipped net, a .safetensors or a .pth/.pt file."""
    return read_init(path)[0]


def _state_dict(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        # torch warns about the pickle protocol of the very files it is about to refuse.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        # Whatever the file holds that is not a plain state dict ends here, as one short line.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first if len(first) <= 160 else first[:157] + "..."
        raise ValueError(f"{path}: not a state dict torch.load reads safely ({first})") from None
    if not (
        isinstance(loaded, dict)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in loaded.items())
    ):
        raise ValueError(f"{path}: not a state dict (a dict of parameter names to tensors)")
    return loaded


def load_backbone(
    model: nn.Module, path: str | Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """Load every tensor but the fc's from path (or its weights, read) into model, strictly."""
    weights = read_weights(path) if weights is None else weights
    weights = {k: v for k, v in weights.items() if not k.startswith(HEAD)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD)}
    for key, value in own.items():
        if key not in weights and key.endswith("num_batches_tracked"):
            # Absent from files saved before torch 0.4.1 (torchvision's first model zoo among
            # them), as load_state_dict allows: a count of BN updates, no weight.
            weights[key] = torch.zeros_like(value)
        if key not in weights:
            raise ValueError(f"{path}: does not fit the net: it has no {key}")
        if value.is_floating_point() and not weights[key].is_floating_point():
            raise ValueError(
                f"{path}: {key} holds {weights[key].dtype}, not floating-point weights"
            )
        if weights[key].shape != value.shape:
            raise ValueError(
                f"{path}: does not fit the net: {key} is {list(weights[key].shape)} there, "
                f"{list(value.shape)} in the net"
            )
    # The first by stage and block (layer1.3 before layer1.4), whatever order the file stored
    # them in; within a block, as the file has them.
    extras = sorted(
        (k for k in weights if k not in own), key=lambda k: [int(n) for n in re.findall(r"\d+", k)]
    )
    extra = extras[0] if extras else None
    if extra is not None:
        raise ValueError(f"{path}: does not fit the net: the net has no {extra}")
    # Caught here, not as a "divergence" at the first step that would blame the learning rate.
    broken = next(
        (k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()), None
    )
    if broken is not None:
        raise ValueError(f"{path}: {broken} holds NaN or infinite values")
    model.load_state_dict(weights, strict=False)


def freeze_backbone(model: nn.Module) -> None:
    """Train the fc alone: no gradients elsewhere, and the rest always in eval mode."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(HEAD))
    model.register_forward_pre_hook(_backbone_in_eval)


def _backbone_in_eval(model: nn.Module, args: tuple) -> None:
    # The loop puts the whole net in train mode, after each evaluation too: every forward puts
    # the backbone back in eval mode, so BN normalises with the loaded statistics and keeps them.
    for name, child in model.named_children():
        if name != HEAD.rstrip("."):
            child.eval()
