"""ONNX export: a trained run as one file that deployment runtimes load.

The exported graph takes what deepres.load(RUN) takes, a uint8 [N, C, H, W] batch of the
run's image size, and returns class probabilities [N, classes]: the run's mean-image
subtraction and the softmax are in the graph, so a runtime needs nothing from deepres.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from deepres.checkpoint import atomic_write
from deepres.data.loader import Preprocess
from deepres.inference import load


class _Deployed(nn.Module):
    """A net with its preprocessing in front and the softmax behind."""

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images)).softmax(1)


def export_onnx(run: str | Path, path: str | Path) -> Path:
    """Write a run's net as ONNX: uint8 images in, probabilities out, class names in metadata."""
    run, path = Path(run), Path(path)
    # Before the export's minute of work: a folder that is not there, or a file that is not an
    # ONNX model (a run's model.safetensors, mistyped for --onnx), would be lost or replaced.
    if not path.parent.is_dir():
        raise OSError(f"{path}: cannot write (no folder {path.parent})")
    if path.is_file() and path.suffix.lower() != ".onnx":
        raise ValueError(f"{path}: exists and is not an .onnx file; give a new path for --onnx")
    classifier = load(run)
    deployed = _Deployed(classifier.model, classifier.preprocess).eval()
    # Two images, not one: torch.export specialises a dimension traced at size 1.
    example = torch.zeros(2, *classifier.input_size, dtype=torch.uint8)
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    try:
        # The exporter's notes (torchvision ops it skips, deprecations inside PyTorch) say
        # nothing about this net: kept off the user's terminal.
        logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # torch.export's exporter, PyTorch's default since 2.9; it needs onnxscript.
            program = torch.onnx.export(
                deployed,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=["probabilities"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    except ImportError as err:
        raise OSError(
            f"ONNX export needs the onnx and onnxscript packages ({err}): "
            "pip install 'deepres[onnx]'"
        ) from None
    except MemoryError:
        raise
    except Exception as err:
        # The exporter's failures run to pages, colour codes included, and the first line of
        # torch.export's wrapper is a banner: the cause it wraps says what went wrong.
        cause = err.__cause__ or err
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
        first = text.splitlines()[0] if text else ""
        raise ValueError(f"{run}: ONNX export failed ({type(cause).__name__}: {first})") from err
    finally:
        logger.setLevel(level)
    proto = program.model_proto
    metadata = {
        "classes": json.dumps(classifier.classes),
        "input_size": json.dumps(classifier.input_size),
        # How a photo becomes that input: its shorter side resized to this, then the centre
        # crop (null: resized to cover the input size, then cropped).
        "resize": json.dumps(classifier.resize),
        # The training iteration the weights come from (null where the run does not say).
        "iteration": json.dumps(classifier.iteration),
        "input": "uint8 images [batch, channels, height, width], RGB or gray, 0-255",
        "output": "class probabilities [batch, classes], in the order of classes",
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    blob = proto.SerializeToString()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))
    return path
