"""Fine-tuning: a net started from another's weights, all but the fc, its fc trained alone or not.

The weights come from a deepres run, a shipped net by name (resnet20-cifar10), a safetensors
file or a torchvision-style state dict; a .pth is read only with torch.load(weights_only=True),
which builds tensors and plain containers and refuses any other object, so no code in the file
runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from deepres.checkpoint import WEIGHTS, load_tensors, trained_iteration
from deepres.pretrained import manifest, resolve_run, sha256

# The classifier: replaced for the new class count, never loaded.
HEAD = "fc."
_EXPECTED = (
    "expected a deepres run directory, a shipped net's name (deepres pretrained), "
    "a .safetensors file or a .pth/.pt state dict"
)


def init_source(path: str | Path) -> Path | None:
    """The run directory --init names (a run or a shipped net), None for a weights file."""
    if not Path(path).exists() and str(path) in manifest():
        return resolve_run(path)
    return Path(path) if Path(path).is_dir() else None


def init_record(path: str | Path) -> dict:
    """What --init started a run from: the file's absolute path and sha256, a run's iteration."""
    source = init_source(path)
    weights = (source / WEIGHTS) if source is not None else Path(path)
    record = {"path": str(weights.resolve()), "sha256": sha256(weights)}
    if source is not None:
        record["iteration"] = trained_iteration(source, load_tensors(weights)[1])
    return record


def check_init(path: str | Path) -> None:
    """Refuse, before any data is read, an --init that names nothing deepres can load."""
    if not Path(path).exists() and str(path) not in manifest():
        raise FileNotFoundError(f"--init {path}: no such file, folder or shipped net ({_EXPECTED})")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a run directory, a shipped net, a .safetensors or a .pth/.pt file."""
    if not Path(path).exists() and str(path) in manifest():
        # A shipped net is a run directory; resolving it checks its sha256.
        path = resolve_run(path)
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS} in it ({_EXPECTED})")
        return load_tensors(path / WEIGHTS)[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory ({_EXPECTED})")
    if path.suffix == ".safetensors":
        return load_tensors(path)[0]
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"{path}: {_EXPECTED}")
    try:
        # torch warns about the pickle protocol of the very files it is about to refuse.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
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


def load_backbone(model: nn.Module, path: str | Path) -> None:
    """Load every tensor but the fc's from path into model, strictly; the fc keeps its init."""
    weights = {k: v for k, v in read_weights(path).items() if not k.startswith(HEAD)}
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
    extra = next((k for k in weights if k not in own), None)
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
