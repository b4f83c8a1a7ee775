import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import sharded, tiny_config
from PIL import Image

import deepres
from deepres.checkpoint import checkpoint_state, load_tensors
from deepres.cli import main
from deepres.data import DataError, readers
from deepres.evaluate import center_crop, evaluate_run, resize_shorter
from deepres.report import read_metrics
from deepres.train import TrainConfig, load_config, train


def photo_config(folder, out, **kw) -> TrainConfig:
    base = dict(
        model="resnet18",
        iters=6,
        batch_size=8,
        # Not 4: torch 2.13's CPU kernel for a channels_last 1x1 stride-2 convolution from 4
        # channels has a nondeterministic weight gradient (and corrupts the heap in one thread).
        width=8,
        crop_size=32,
        workers=0,
    )
    return tiny_config(folder, out, **{**base, **kw})


def test_an_imagenet_net_on_photos_streams_them_with_the_imagenet_recipe(
    photo_folder, tmp_path, monkeypatch
):
    walks, walk = [], readers._walk
    monkeypatch.setattr(readers, "_walk", lambda *args: walks.append(args) or walk(*args))
    summary = train(photo_config(photo_folder, tmp_path / "run"), progress=False)
    assert summary["finished"] and summary["eval_split"] == "test"
    assert len(walks) == 1  # the folder listed once, both splits from it
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"]["name"] == "imagenet" and config["normalize"] == "channel"
    assert config["recipe"]["milestones"] == [2, 4]  # epochs 30 and 60 of 90, scaled to 6
    assert config["input_size"] == [3, 32, 32] and config["n_train"] == 24
    assert config["augment"]["sizes"] == [37, 69] and config["augment"]["kind"] == "scale"
    assert config["data_source"].endswith("(image folder, train split)")
    tensors, _ = load_tensors(tmp_path / "run" / "preprocess.safetensors")
    assert tensors["mean"].shape == (3, 1, 1) and tensors["lighting_eigvec"].shape == (3, 3)
    assert [m["iteration"] for m in read_metrics(tmp_path / "run")] == [2, 4, 6]
    assert "test_error" in read_metrics(tmp_path / "run")[-1]
    # deepres.load takes the run as it is: a photo in, classes out.
    classifier = deepres.load(tmp_path / "run")
    photo = Image.open(photo_folder / "val/ants/000.jpg")
    probs = classifier(classifier.to_tensor(photo))[0].tolist()
    expected = sorted(zip(classifier.classes, probs, strict=True), key=lambda c: -c[1])
    assert classifier.topk(photo) == expected and sum(probs) == pytest.approx(1.0)


def test_eval_of_a_streamed_run_defaults_to_its_centre_view(photo_folder, tmp_path):
    summary = train(photo_config(photo_folder, tmp_path / "run"), progress=False)
    result = evaluate_run(tmp_path / "run")
    assert result["protocol"] == "center" and result["n"] == 6
    assert result["top1_error"] == pytest.approx(summary["test_error"])
    tenfold = evaluate_run(tmp_path / "run", protocol="10crop")
    assert tenfold["protocol"] == "10crop" and tenfold["n"] == 6
    # A bare <class>/ folder of photos of two sizes is tested whole, through the same centre
    # view, without decoding it first; the run's own photos, however the path is spelled, not.
    bare = evaluate_run(tmp_path / "run", data=str(photo_folder / "val"))
    assert (bare["split"], bare["protocol"], bare["n"]) == ("all", "center", 6)
    assert bare["top1_error"] == pytest.approx(result["top1_error"])
    for own in (photo_folder / "train", photo_folder / "val" / ".." / "train"):
        with pytest.raises(ValueError, match="the data .* was trained on"):
            evaluate_run(tmp_path / "run", data=str(own))


def test_a_run_trained_on_tar_shards_is_evaluated_on_their_images(photo_folder, tmp_path):
    shards = tmp_path / "shards"
    sharded(photo_folder, shards / "train")
    sharded(photo_folder, shards / "val", split="val")
    summary = train(photo_config(shards, tmp_path / "run"), progress=False)
    assert summary["eval_split"] == "test"
    result = evaluate_run(tmp_path / "run")
    assert result["protocol"] == "center" and result["n"] == 6
    assert result["top1_error"] == pytest.approx(summary["test_error"])
    # Shards of one split given as --data are evaluated whole, but not the run's own.
    tenfold = evaluate_run(tmp_path / "run", data=str(shards / "val"), protocol="10crop")
    assert tenfold["split"] == "all" and tenfold["n"] == 6
    for spelled in (shards / "train", shards / "val" / ".." / "train"):
        with pytest.raises(ValueError, match="the data .* was trained on"):
            evaluate_run(tmp_path / "run", data=str(spelled))
    # A run from before data_path was recorded: its data as given.
    config = tmp_path / "run" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "data_path": None}))
    with pytest.raises(ValueError, match="the data .* was trained on"):
        evaluate_run(tmp_path / "run", data=str(shards / "train"))


def test_a_streamed_run_predicts_on_the_centre_view_it_is_tested_on(photo_folder, tmp_path):
    train(photo_config(photo_folder, tmp_path / "run"), progress=False)
    classifier = deepres.load(tmp_path / "run")
    assert classifier.resize == 37  # 256/224 of the 32-pixel crop
    photo = Image.open(photo_folder / "val/bees/001.jpg").convert("RGB")
    view = np.asarray(resize_shorter(photo, 37))
    expected = center_crop(torch.from_numpy(view.copy()).permute(2, 0, 1), 32)[None]
    assert photo.size != (37, 37) and torch.equal(classifier.to_tensor(photo), expected)
    # A photo that has the crop's size already is seen as eval sees it: resized, then cropped.
    small = photo.resize((32, 32))
    view = np.asarray(resize_shorter(small, 37))
    expected = center_crop(torch.from_numpy(view.copy()).permute(2, 0, 1), 32)[None]
    assert torch.equal(classifier.to_tensor(small), expected)


def test_a_streamed_run_resumes_with_exactly_the_same_weights(photo_folder, tmp_path):
    whole = photo_config(photo_folder, tmp_path / "whole", val_split=4)
    train(whole, progress=False)
    stopped = replace(whole, out=str(tmp_path / "stopped"))
    train(stopped, stop_at=3, progress=False)  # mid-epoch: 20 images make 2 steps of 8
    # Resumed with worker processes this time: the batches do not depend on them.
    resumed = replace(load_config(tmp_path / "stopped"), workers=1)
    train(resumed, resume=True, progress=False)
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    b = (tmp_path / "stopped" / "model.safetensors").read_bytes()
    assert a == b
    keep = ("iteration", "train_loss", "train_error", "val_error")
    assert [{k: m.get(k) for k in keep} for m in read_metrics(tmp_path / "whole")] == [
        {k: m.get(k) for k in keep} for m in read_metrics(tmp_path / "stopped")
    ]


def test_a_photo_unreadable_mid_run_checkpoints_the_run_and_says_how_to_go_on(
    photo_folder, tmp_path
):
    data = tmp_path / "photos"
    shutil.copytree(photo_folder, data)
    whole = photo_config(data, tmp_path / "whole")
    train(whole, progress=False)
    run = tmp_path / "run"
    train(replace(whole, out=str(run)), stop_at=2, progress=False)
    bad = data / "train" / "bees" / "004.jpg"
    photo = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8 not really a jpeg")  # after the statistics' sample had read it
    with pytest.raises(DataError, match=f"{bad}: cannot decode image") as error:
        train(load_config(run), resume=True, progress=False)
    stopped = int(re.search(r"checkpointed at iteration (\d+)", str(error.value)).group(1))
    assert stopped >= 2 and checkpoint_state(run)["iteration"] == stopped
    assert f"deepres train --resume {run}" in str(error.value)
    bad.write_bytes(photo)
    train(load_config(run), resume=True, progress=False)
    assert (run / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()


def test_a_dataloader_worker_killed_mid_run_ends_in_one_line_after_a_checkpoint(
    photo_folder, tmp_path, monkeypatch, capsys
):
    from deepres.data.stream import PhotoStream

    batch = PhotoStream.batch

    def killed_at_3(self, iteration):
        if iteration == 3:  # as PyTorch says it when the OOM killer took a worker
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
        return batch(self, iteration)

    monkeypatch.setattr(PhotoStream, "batch", killed_at_3)
    flags = ["--model", "resnet18", "--width", "8", "--crop-size", "32", "--batch-size", "8"]
    run = tmp_path / "run"
    flags += ["--iters", "6", "--workers", "0", "--quiet", "--data", str(photo_folder)]
    assert main(["train", *flags, "--out", str(run)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "DataLoader worker (pid 4242) is killed" in error
    assert f"{run} is checkpointed at iteration 3" in error and "--workers" in error
    assert checkpoint_state(run)["iteration"] == 3


def test_a_worker_death_reported_mid_step_leaves_the_last_checkpoint(
    photo_folder, tmp_path, monkeypatch, capsys
):
    # PyTorch reports a killed worker wherever the main thread is: mid-step, BN statistics and
    # weights may have moved, so that state is not saved as an iteration's.
    from deepres import train as train_module

    step, calls = train_module._step, [0]

    def killed_in_the_fourth(*args):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("DataLoader worker (pid 4243) is killed by signal: Killed. ")
        return step(*args)

    monkeypatch.setattr(train_module, "_step", killed_in_the_fourth)
    flags = ["--model", "resnet18", "--width", "8", "--crop-size", "32", "--batch-size", "8"]
    flags += ["--iters", "6", "--workers", "0", "--quiet", "--checkpoint-every", "2"]
    run = tmp_path / "run"
    assert main(["train", *flags, "--data", str(photo_folder), "--out", str(run)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "DataLoader worker (pid 4243) is killed" in error
    assert "checkpointed at" not in error and "--workers" in error and "--resume" in error
    assert checkpoint_state(run)["iteration"] == 2


def test_image_size_keeps_an_imagenet_net_on_the_in_memory_path(photo_folder, tmp_path):
    train(photo_config(photo_folder, tmp_path / "run", image_size=32, iters=1), progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["augment"] is None and config["recipe"]["name"] == "cifar"


def test_photos_refuse_a_per_pixel_mean(photo_folder, tmp_path):
    with pytest.raises(ValueError, match="--normalize pixel: photos of many sizes"):
        train(photo_config(photo_folder, tmp_path / "run", normalize="pixel"), progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_trains_on_photos_and_names_a_corrupt_one(photo_folder, tmp_path, capsys):
    flags = ["--model", "resnet18", "--width", "8", "--crop-size", "32", "--batch-size", "8"]
    flags += ["--iters", "2", "--workers", "0", "--augment", "rrc", "--quiet"]
    run = tmp_path / "run"
    assert main(["train", *flags, "--data", str(photo_folder), "--out", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["finished"]
    assert json.loads((run / "config.json").read_text())["augment"]["kind"] == "rrc"
    broken = tmp_path / "broken"
    for path in sorted(photo_folder.rglob("*.jpg")):
        (broken / path.relative_to(photo_folder)).parent.mkdir(parents=True, exist_ok=True)
        (broken / path.relative_to(photo_folder)).write_bytes(path.read_bytes())
    bad = broken / "train" / "bees" / "004.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["train", *flags, "--data", str(broken), "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("deepres train: error:") and f"{bad}: cannot decode image" in error
    assert "\n" not in error
    out = str(tmp_path / "c")
    assert main(["train", *flags, "--scale", "20,480", "--data", str(broken), "--out", out]) == 2
    assert "--scale 20,480: need 32 (the crop size) <= LOW" in capsys.readouterr().err


def test_photos_stream_from_a_zip_as_from_a_folder(photo_folder, tmp_path):
    # The zip holds the folder's train/ and val/ as they are: the run is the same run.
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(photo_folder.rglob("*.jpg")):
            z.write(path, path.relative_to(photo_folder))
    from_zip = train(photo_config(archive, tmp_path / "zip", iters=2), progress=False)
    from_folder = train(photo_config(photo_folder, tmp_path / "folder", iters=2), progress=False)
    assert from_zip["finished"] and from_zip["test_error"] == from_folder["test_error"]
    assert (tmp_path / "zip" / "model.safetensors").read_bytes() == (
        tmp_path / "folder" / "model.safetensors"
    ).read_bytes()


def test_a_stop_signalled_to_the_whole_group_checkpoints_a_streamed_run(photo_folder, tmp_path):
    # kill -- -PGID, a batch system or systemd: the DataLoader workers get the SIGTERM too.
    run = tmp_path / "run"
    command = [sys.executable, "-m", "deepres.cli", "train", "--model", "resnet18", "--width", "8"]
    command += ["--data", str(photo_folder), "--crop-size", "32", "--workers", "2", "--quiet"]
    command += ["--batch-size", "8", "--iters", "100000", "--checkpoint-every", "100000"]
    command += ["--device", "cpu", "--out", str(run)]
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if (run / "metrics.jsonl").is_file() and read_metrics(run):
                break
            time.sleep(0.05)
        assert read_metrics(run), "no log record within 120 s"
        os.killpg(child.pid, signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        try:  # the workers too, should the test fail with them alive
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert child.returncode == 130, err
    stopped_at = json.loads(out)["iteration"]
    assert checkpoint_state(run)["iteration"] == stopped_at >= 50
