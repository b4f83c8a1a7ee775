import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cifar_jpeg_folder, tiny_config
from PIL import Image

import deepres
from deepres.cli import main
from deepres.data import open_dataset
from deepres.train import train

# Not 4: see test_train_photos for what width 4 meets in torch's CPU convolutions.
PHOTO_RUN = dict(model="resnet18", iters=2, batch_size=8, width=8, crop_size=32, workers=0)


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    """24 real CIFAR-10 JPEGs, 8 of each of 3 classes, as <class>/*.jpg."""
    return cifar_jpeg_folder(tmp_path_factory.mktemp("cifar"), 8, ("airplane", "cat", "ship"))


def test_onnx_export_matches_deepres_on_real_images(cifar_folder, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (dev extras)")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (dev extras)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (dev extras)")
    run = tmp_path / "run"
    config = tiny_config(cifar_folder, run, iters=2, precision="fp32")
    train(config, progress=False)
    path = tmp_path / "model.onnx"
    assert main(["export", str(run), "--onnx", str(path)]) == 0
    assert str(path) in capsys.readouterr().out

    model = onnx.load(path)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["classes"]) == ["airplane", "cat", "ship"]
    assert json.loads(metadata["input_size"]) == [3, 32, 32]
    assert json.loads(metadata["resize"]) is None  # a CIFAR run: images fitted to 32x32
    assert json.loads(metadata["iteration"]) == 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.type == "tensor(uint8)" and given.shape[1:] == [3, 32, 32]
    assert isinstance(given.shape[0], str)  # the batch dimension is dynamic

    images = open_dataset(str(cifar_folder)).images
    expected = deepres.load(run)(images).numpy()
    # A batch of all 24, and of one: the batch size is free.
    for batch in (images, images[:1]):
        (probs,) = session.run(None, {"images": batch.numpy()})
        assert probs.shape == (len(batch), 3)
        assert np.abs(probs - expected[: len(batch)]).max() < 1e-4
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # Not a constant net: the images are told apart.
    assert torch.from_numpy(expected).std(0).max() > 1e-3


def test_onnx_export_of_a_streamed_photo_run_says_how_to_view_a_photo(photo_folder, tmp_path):
    # No ../shared/data needed: the synthetic photos. A run trained on streamed photos is tested
    # on the centre crop of the photo resized to a shorter side of crop x 256/224; the exported
    # file says which, and matches deepres on exactly that view.
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (dev extras)")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (dev extras)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (dev extras)")
    run = tmp_path / "photos"
    train(tiny_config(photo_folder, run, precision="fp32", **PHOTO_RUN), progress=False)
    path = tmp_path / "photos.onnx"
    assert main(["export", str(run), "--onnx", str(path)]) == 0
    metadata = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(metadata["resize"]) == 37 and json.loads(metadata["input_size"]) == [
        3,
        32,
        32,
    ]
    assert json.loads(metadata["classes"]) == ["ants", "bees"]
    classifier = deepres.load(run)
    views = [
        classifier.to_tensor(Image.open(p)) for p in sorted((photo_folder / "val").rglob("*.jpg"))
    ]
    batch = torch.cat(views)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"images": batch.numpy()})
    assert np.abs(probs - classifier(batch).numpy()).max() < 1e-4


def test_an_exporter_failure_is_one_line_naming_the_run(tiny_folder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(tiny_config(tiny_folder, run, iters=2), progress=False)

    def fails(*args, **kwargs):
        # As torch.export's wrapper raises: a coloured banner, the cause behind it.
        banner = "Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m"
        try:
            raise TypeError("\x1b[1mcannot trace this op\x1b[0m\n\npages of graph dump\n...")
        except TypeError as cause:
            raise RuntimeError(banner) from cause

    monkeypatch.setattr(torch.onnx, "export", fails)
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    why = "ONNX export failed (TypeError: cannot trace this op)"
    assert err == [f"deepres export: error: {run}: {why}"]
    assert not (tmp_path / "m.onnx").exists()
    # Checked before the export's work: a run's own weights mistyped for --onnx, or no folder.
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported"))
    before = (run / "model.safetensors").read_bytes()
    assert main(["export", str(run), "--onnx", str(run / "model.safetensors")]) == 2
    assert "model.safetensors: exists and is not an .onnx file" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before
    assert main(["export", str(run), "--onnx", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "m.onnx: cannot write (no folder" in capsys.readouterr().err
