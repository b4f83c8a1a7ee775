import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import cifar_jpeg_folder, tiny_config
from PIL import Image

import deepres
from deepres import pretrained
from deepres.checkpoint import CHECKPOINT, PREPROCESS, SUMMARY, WEIGHTS, load_tensors, save_tensors
from deepres.cli import main
from deepres.data import DataError, open_dataset
from deepres.evaluate import evaluate_run
from deepres.models import count_params
from deepres.pretrained import _swap_in, add_missing, manifest, publish, resolve_run, sha256
from deepres.train import train


def tiny_run(folder, out, stop_at=None):
    """A 4-iteration ResNet-20 of width 4 on the tiny colour folder, stopped at stop_at."""
    train(tiny_config(folder, out, iters=4, checkpoint_every=2), stop_at=stop_at, progress=False)
    return out


@pytest.fixture(scope="module")
def finished_run(tiny_folder, tmp_path_factory):
    return tiny_run(tiny_folder, tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture
def shipped(monkeypatch, tmp_path):
    root = tmp_path / "weights"
    monkeypatch.setattr("deepres.pretrained.SHIPPED", root)
    return root


def test_a_published_net_loads_by_name_with_the_runs_outputs(finished_run, shipped, tiny_folder):
    entry = publish(finished_run, "tiny-colours", "deepres train ...", root=shipped)
    assert manifest(shipped)["tiny-colours"] == entry
    assert load_tensors(shipped / "tiny-colours" / WEIGHTS)[1] == {"iteration": 4}
    assert entry["sha256"] == sha256(shipped / "tiny-colours" / WEIGHTS)
    assert entry["stored_as"] == "fp32" and entry["iterations"] == 4
    assert entry["classes"] == ["blue", "green", "red"]
    shipped_config = json.loads((shipped / "tiny-colours" / "config.json").read_text())
    assert "out" not in shipped_config["config"] and "data_path" not in shipped_config
    batch = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    by_name = deepres.load("tiny-colours")(batch)
    assert torch.equal(by_name, deepres.load(finished_run)(batch))
    assert evaluate_run("tiny-colours", str(tiny_folder)) == {
        **evaluate_run(finished_run, str(tiny_folder)),
        "run": str(shipped / "tiny-colours"),
    }


def test_a_shipped_net_refuses_its_training_images_wherever_they_lie(
    tiny_folder, shipped, tmp_path
):
    here = tmp_path / "here" / "colours"
    shutil.copytree(tiny_folder / "train", here)  # one split only: eval would take it whole
    run = tmp_path / "bare"
    train(tiny_config(here, run, iters=2, checkpoint_every=2), progress=False)
    entry = publish(run, "tiny-bare", "cmd", root=shipped)
    # The data's name as provenance, not the folders it lay in on the training machine.
    assert entry["data"] == "colours (image folder, train split)"
    saved = json.loads((shipped / "tiny-bare" / "config.json").read_text())
    assert saved["data_source"] == entry["data"] and "data_path" not in saved
    elsewhere = tmp_path / "elsewhere" / "colours"
    shutil.copytree(here, elsewhere)
    for data in (here, elsewhere):
        with pytest.raises(ValueError, match="tiny-bare was trained on, with no test split"):
            evaluate_run("tiny-bare", str(data))
    # One image less is other data: evaluated whole.
    next((elsewhere / "red").iterdir()).unlink()
    assert evaluate_run("tiny-bare", str(elsewhere))["n"] == 71


def test_bf16_storage_is_cast_back_to_fp32(finished_run, shipped, capsys):
    entry = publish(finished_run, "tiny-bf16", "cmd", root=shipped, bf16=True)
    assert entry["stored_as"] == "bf16"
    # The same from the command line: --bf16, or fp32 for a net this small without it.
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for name, flags, stored in (("tiny-cli-bf16", ["--bf16"], "bf16"), ("tiny-cli", [], "fp32")):
        assert main(["publish", str(finished_run), name, "--command", "cmd", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["stored_as"] == stored
        weights, _ = load_tensors(shipped / name / WEIGHTS)
        assert weights["fc.weight"].dtype == dtypes[stored]
    weights, _ = load_tensors(shipped / "tiny-bf16" / WEIGHTS)
    assert weights["fc.weight"].dtype == torch.bfloat16
    assert weights["bn1.num_batches_tracked"].dtype == torch.int64
    model = deepres.load("tiny-bf16").model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.fc.weight, weights["fc.weight"].float())


def test_a_tampered_or_unknown_net_is_refused(finished_run, shipped):
    publish(finished_run, "tiny-colours", "cmd", root=shipped)
    with pytest.raises(FileNotFoundError, match=r"no-such-net: .*shipped: tiny-colours"):
        resolve_run("no-such-net")
    folder = shipped / "tiny-colours"
    # Provenance added to config.json (a resume recorded afterwards, say) is no tampering...
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "resumed": [{"iteration": 2}]}))
    deepres.load("tiny-colours")
    # ...but classes in another order, another mean image or other weights are.
    reordered = {**saved, "classes": saved["classes"][::-1]}
    (folder / "config.json").write_text(json.dumps(reordered))
    with pytest.raises(ValueError, match=r"config.json: what shapes the net's predictions"):
        deepres.load("tiny-colours")
    (folder / "config.json").write_text(json.dumps(saved))
    for name in (PREPROCESS, WEIGHTS):
        intact = (folder / name).read_bytes()
        (folder / name).write_bytes(intact[:-1] + b"\0")
        with pytest.raises(ValueError, match=f"{name}: sha256 differs"):
            deepres.load("tiny-colours")
        (folder / name).write_bytes(intact)
    deepres.load("tiny-colours")


def test_publish_once_adds_the_hashes_an_older_manifest_lacks(finished_run, shipped):
    publish(finished_run, "tiny", "c", root=shipped)
    nets = manifest(shipped)
    hashes = {k: nets["tiny"].pop(k) for k in ("preprocess_sha256", "predicts_sha256")}
    (shipped / "manifest.json").write_text(json.dumps({"nets": nets}))
    deepres.load("tiny")  # an older manifest: the weights alone are checked
    entry = publish(finished_run, "tiny", "c", root=shipped, once=True)
    assert (
        {k: entry[k] for k in hashes} == hashes == {k: manifest(shipped)["tiny"][k] for k in hashes}
    )


def test_the_manifest_names_each_device_a_run_trained_on(finished_run, shipped, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(finished_run, run)
    config = json.loads((run / "config.json").read_text())
    config["resumed"] = [
        {"iteration": 2, "device": "GPU X", "torch": "9.9"},
        {"iteration": 3, "device": "GPU X", "torch": "9.9"},  # no move: not a new device
        {"iteration": 4, "device": config["device"], "torch": config["torch"]},  # and back
    ]
    (run / "config.json").write_text(json.dumps(config))
    entry = publish(run, "tiny-moved", "cmd", root=shipped)
    assert entry["trained_on"] == [
        {"from_iteration": 0, "device": config["device"], "torch": config["torch"]},
        {"from_iteration": 2, "device": "GPU X", "torch": "9.9"},
        {"from_iteration": 4, "device": config["device"], "torch": config["torch"]},
    ]
    nets = manifest(shipped)
    del nets["tiny-moved"]["trained_on"]  # a net shipped before the manifest kept it
    (shipped / "manifest.json").write_text(json.dumps({"nets": nets}))
    again = publish(run, "tiny-moved", "cmd", root=shipped, once=True)
    assert (
        again["trained_on"] == entry["trained_on"] == manifest(shipped)["tiny-moved"]["trained_on"]
    )
    # A net whose run is gone gets it from its own shipped config.json.
    nets = manifest(shipped)
    del nets["tiny-moved"]["trained_on"]
    (shipped / "manifest.json").write_text(json.dumps({"nets": nets}))
    shutil.rmtree(run)
    assert (
        add_missing("tiny-moved", manifest(shipped), shipped)["trained_on"] == entry["trained_on"]
    )
    assert manifest(shipped)["tiny-moved"]["trained_on"] == entry["trained_on"]


def test_publish_fails_before_it_touches_a_shipped_net(tiny_folder, shipped, tmp_path):
    here = tmp_path / "colours"
    shutil.copytree(tiny_folder, here)
    run = tiny_run(here, tmp_path / "run")
    entry = publish(run, "tiny-colours", "cmd", root=shipped)
    before = {p.name: p.read_bytes() for p in (shipped / "tiny-colours").iterdir()}
    for name in ("", "..", "../outside", "a/b"):
        with pytest.raises(ValueError, match="a shipped net's name is letters"):
            publish(run, name, "cmd", root=shipped)
    # A run from before runs kept their data's fingerprint, its data gone: no fingerprint, so
    # no publishing over the old net.
    saved = json.loads((run / "config.json").read_text())
    del saved["data_sha256"]
    (run / "config.json").write_text(json.dumps(saved))
    shutil.rmtree(here)
    with pytest.raises(DataError, match="colours: no such file or directory"):
        publish(run, "tiny-colours", "other cmd", root=shipped)
    after = {p.name: p.read_bytes() for p in (shipped / "tiny-colours").iterdir()}
    assert after == before and manifest(shipped) == {"tiny-colours": entry}
    assert sorted(p.name for p in shipped.iterdir()) == ["manifest.json", "tiny-colours"]


def test_a_run_that_kept_its_data_fingerprint_publishes_without_its_data(
    tiny_folder, shipped, tmp_path
):
    # Trained on another machine from a copy of the data, then brought back without it.
    here = tmp_path / "colours"
    shutil.copytree(tiny_folder, here)
    run = tiny_run(here, tmp_path / "run")
    recorded = json.loads((run / "config.json").read_text())["data_sha256"]
    shutil.rmtree(here)
    entry = publish(run, "tiny-colours", "cmd", root=shipped)
    assert entry["data_sha256"] == recorded == open_dataset(str(tiny_folder)).fingerprint()


def test_a_publish_whose_manifest_write_fails_keeps_the_old_net(finished_run, shipped, monkeypatch):
    entry = publish(finished_run, "tiny", "cmd", root=shipped)
    before = {p.name: p.read_bytes() for p in (shipped / "tiny").iterdir()}
    listed = (shipped / "manifest.json").read_bytes()

    write_json = pretrained.write_json

    def full_disk(path, data):
        if path.name != "manifest.json":  # the new net's files are written
            return write_json(path, data)
        raise OSError(28, f"{path}: No space left on device")

    monkeypatch.setattr(pretrained, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        publish(finished_run, "tiny", "cmd", root=shipped, bf16=True)  # new weights
    after = {p.name: p.read_bytes() for p in (shipped / "tiny").iterdir()}
    assert after == before and (shipped / "manifest.json").read_bytes() == listed
    assert sorted(p.name for p in shipped.iterdir()) == ["manifest.json", "tiny"]
    assert deepres.load(shipped / "tiny") and manifest(shipped)["tiny"] == entry


def test_a_run_from_before_data_source_was_recorded_is_published(finished_run, tmp_path, shipped):
    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["data_source"]
    (old / "config.json").write_text(json.dumps(saved))
    entry = publish(old, "old", "cmd", root=shipped)
    assert entry["data"] == saved["config"]["data"] and deepres.load(shipped / "old")


def test_an_unfinished_run_is_not_published(tiny_folder, tmp_path, shipped):
    out = tiny_run(tiny_folder, tmp_path / "half", stop_at=2)
    with pytest.raises(ValueError, match="only a finished run"):
        publish(out, "half", "cmd", root=shipped)
    assert not (shipped / "half").exists()


def test_eval_says_which_iteration_the_weights_come_from(tiny_folder, tmp_path, capsys):
    out = tiny_run(tiny_folder, tmp_path / "half", stop_at=2)
    assert load_tensors(out / WEIGHTS)[1] == {"iteration": 2}
    assert deepres.load(out).iteration == 2
    assert main(["eval", str(out), "--data", str(tiny_folder)]) == 0
    assert f"{out} at iteration 2 of 4 (unfinished) on " in capsys.readouterr().out
    config = tiny_config(tiny_folder, out, iters=4, checkpoint_every=2)
    train(config, resume=True, progress=False)
    assert main(["eval", str(out), "--data", str(tiny_folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["iteration"], result["iters"]) == (4, 4)
    assert main(["eval", str(out), "--data", str(tiny_folder)]) == 0
    assert capsys.readouterr().out.startswith(f"{out} at iteration 4 of 4 on ")


def test_weights_from_before_the_iteration_was_recorded_fall_back_on_the_run(
    finished_run, tiny_folder, tmp_path, capsys
):
    out = tmp_path / "old"
    shutil.copytree(finished_run, out)
    weights, _ = load_tensors(out / WEIGHTS)
    save_tensors(out / WEIGHTS, weights)  # no metadata, as runs wrote them before
    assert deepres.load(out).iteration == 4  # from summary.json
    (out / SUMMARY).unlink()
    train(
        tiny_config(tiny_folder, tmp_path / "x", iters=4, checkpoint_every=2),
        stop_at=2,
        progress=False,
    )
    shutil.copyfile(tmp_path / "x" / CHECKPOINT, out / CHECKPOINT)
    assert deepres.load(out).iteration == 2  # from the checkpoint
    (out / CHECKPOINT).write_bytes(b"damaged")
    assert deepres.load(out).iteration is None  # the weights still load
    (out / CHECKPOINT).unlink()
    assert deepres.load(out).iteration is None
    assert main(["eval", str(out), "--data", str(tiny_folder)]) == 0
    assert capsys.readouterr().out.startswith(f"{out} on ")


def test_cli_publish_pretrained_predict_by_name(finished_run, shipped, tmp_path, capsys):
    assert main(["publish", str(finished_run), "tiny-colours", "--command", "make it"]) == 0
    assert json.loads(capsys.readouterr().out)["command"] == "make it"
    assert main(["pretrained"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("tiny-colours")
    precision = json.loads((finished_run / "config.json").read_text())["config"]["precision"]
    assert f"{precision}-trained, stored fp32" in listed
    image = tmp_path / "red.png"
    Image.new("RGB", (12, 12), (200, 30, 30)).save(image)
    assert main(["predict", "tiny-colours", str(image), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    # The shipped net's own answer, by name: every class, likeliest first.
    expected = deepres.load(finished_run).topk(Image.open(image))
    assert [(t["class"], t["probability"]) for t in top] == [
        (name, pytest.approx(p, abs=1e-6)) for name, p in expected
    ]
    assert sorted(t["class"] for t in top) == ["blue", "green", "red"]
    assert main(["eval", "no-such-net"]) == 2
    assert "no such run directory, nor a shipped net" in capsys.readouterr().err


# ---- the nets deepres ships (deepres/weights, landed by issue 9's campaign)

SHIPPED_NETS = manifest()


def test_deepres_ships_nets():
    # The tests below are parametrized by the manifest: without one they would not run at all.
    assert len(SHIPPED_NETS) >= 7 and all(n.endswith(("-cifar10", "-bf16")) for n in SHIPPED_NETS)


@pytest.mark.parametrize("name", sorted(SHIPPED_NETS))
def test_each_shipped_net_is_the_net_its_manifest_names(name):
    entry = SHIPPED_NETS[name]
    # Every file that shapes its predictions is checked: weights, mean image, config.
    assert {"sha256", "preprocess_sha256", "predicts_sha256"} <= set(entry)
    classifier = deepres.load(name)  # refuses files whose sha256 differs from the manifest's
    assert classifier.classes == entry["classes"]
    assert count_params(classifier.model) == entry["params"]
    assert entry["iterations"] > 0 and entry["command"]
    assert classifier.iteration == entry["iterations"]


SHIPPED_CIFAR10 = sorted(
    n for n, e in SHIPPED_NETS.items() if "cifar10-jpeg-train" in json.dumps(e["data"])
)


@pytest.mark.parametrize("name", SHIPPED_CIFAR10)
def test_a_shipped_cifar10_net_classifies_the_images_it_trained_on(name, tmp_path):
    cifar_jpeg_folder(tmp_path, 50)
    result = evaluate_run(name, str(tmp_path))
    assert result["n"] == 500
    # Clean views in eval mode do at least about as well as the augmented batches the training
    # error was taken on; a wrong preprocess or a broken load lands near chance (90%).
    assert result["top1_error"] <= SHIPPED_NETS[name]["train_error"] + 5


def write_cifar10_python_tarball(folder, path) -> None:
    """cifar-10-python.tar.gz as the official one is laid out, its test_batch the images of
    folder/<class>/*.jpg (rows of R, G and B planes), shuffled; one image per training batch."""
    names = sorted(p.name for p in folder.iterdir())
    pairs = [(f, c) for c, name in enumerate(names) for f in sorted((folder / name).iterdir())]
    order = np.random.default_rng(0).permutation(len(pairs))
    rows = np.stack(
        [
            np.asarray(Image.open(pairs[i][0]).convert("RGB")).transpose(2, 0, 1).ravel()
            for i in order
        ]
    )
    labels = [pairs[i][1] for i in order]
    members = {"batches.meta": {b"label_names": [n.encode() for n in names]}}
    for b in range(1, 6):
        members[f"data_batch_{b}"] = {b"data": rows[b : b + 1], b"labels": labels[b : b + 1]}
    members["test_batch"] = {b"data": rows, b"labels": labels}
    with tarfile.open(path, "w:gz") as tar:
        for member, content in members.items():
            data = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("name", SHIPPED_CIFAR10)
def test_a_shipped_cifar10_net_evaluates_the_official_python_format(name, tmp_path):
    # How a user checks a shipped net on the real test split: `deepres eval resnet20-cifar10
    # --data cifar-10-python.tar.gz`. Real images in that format, read without extracting.
    write_cifar10_python_tarball(cifar_jpeg_folder(tmp_path / "jpegs", 50), tmp_path / "c.tar.gz")
    result = evaluate_run(name, str(tmp_path / "c.tar.gz"))
    assert (result["split"], result["n"]) == ("test", 500)
    # A plane order or label mapping gone wrong lands near chance (90%).
    assert result["top1_error"] <= SHIPPED_NETS[name]["train_error"] + 5


def test_the_weights_own_iteration_comes_before_the_run_files(finished_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    weights, _ = load_tensors(out / WEIGHTS)
    # summary.json and the checkpoint say 4; the weights, saved at 3, are what eval holds.
    save_tensors(out / WEIGHTS, weights, {"iteration": 3})
    assert json.loads((out / SUMMARY).read_text())["iteration"] == 4
    assert deepres.load(out).iteration == 3


def test_eval_names_the_iteration_of_a_run_without_a_budget(
    finished_run, tiny_folder, tmp_path, capsys
):
    out = tmp_path / "no-recipe"
    shutil.copytree(finished_run, out)
    saved = json.loads((out / "config.json").read_text())
    saved["recipe"].pop("iters")  # a recipe that names no budget: the iteration alone, no "of N"
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["eval", str(out), "--data", str(tiny_folder)]) == 0
    assert capsys.readouterr().out.startswith(f"{out} at iteration 4 on ")


def test_a_lost_run_is_rebuilt_from_the_shipped_net_and_its_record(
    finished_run, tmp_path, shipped, capsys
):
    from deepres.experiments.common import run_result
    from deepres.report import run_status

    record = tmp_path / "records" / "tiny"
    argv = ["publish", str(finished_run), "tiny-colours", "--command", "c", "--record", str(record)]
    assert main(argv) == 0
    entry = json.loads(capsys.readouterr().out)
    assert main([*argv, "--once"]) == 0  # shipped already: the same entry, nothing written
    assert json.loads(capsys.readouterr().out) == entry
    assert sorted(p.name for p in record.iterdir()) == [
        "config.json",
        "metrics.jsonl",
        "summary.json",
    ]
    # A record from before runs kept their data's fingerprint: the shipped net's stands in.
    saved = json.loads((record / "config.json").read_text())
    fingerprint = saved.pop("data_sha256")
    (record / "config.json").write_text(json.dumps(saved))
    out = tmp_path / "runs" / "tiny"
    assert main(["restore", "--record", str(record), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: the finished run of tiny-colours"
    assert json.loads((out / "config.json").read_text()) == {**saved, "data_sha256": fingerprint}
    # The run the reports took before the loss, weights and all.
    before, after = run_result(finished_run), run_result(out)
    assert {**after, "run": None} == {**before, "run": None}
    assert run_status(out)["finished"] and deepres.load(out).iteration == 4
    torch.testing.assert_close(
        load_tensors(out / WEIGHTS)[0], load_tensors(finished_run / WEIGHTS)[0]
    )
    # Never over a run that is there; never from a record that is not the shipped net's.
    restore = ["restore", "--record", str(record), "--out"]
    assert main([*restore, str(out)]) == 2
    assert "exists; restore writes a new run directory only" in capsys.readouterr().err
    # Named, the net is checked against the record.
    named = tmp_path / "runs" / "named"
    assert main([*restore, str(named), "--name", "tiny-colours"]) == 0
    assert run_result(named)["train_error"] == before["train_error"]
    lines = (record / "metrics.jsonl").read_text().splitlines()
    (record / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    other = tmp_path / "runs" / "other"
    assert main([*restore, str(other), "--name", "tiny-colours"]) == 2
    assert "not the record of tiny-colours (resnet20, iteration 2" in capsys.readouterr().err
    assert main([*restore, str(other)]) == 2
    assert "no shipped net was trained by this record (resnet20, iteration 2" in (
        capsys.readouterr().err
    )
    assert not other.exists()
    (record / "summary.json").unlink()
    assert main([*restore, str(other)]) == 2
    assert "no summary.json; not a training record" in capsys.readouterr().err


def test_publish_once_ships_each_run_once_and_keeps_its_record(finished_run, tmp_path, shipped):
    from deepres.pretrained import restore

    records = tmp_path / "records"
    first = publish(finished_run, "tiny", "c", root=shipped, record=records / "a", once=True)
    assert first["name"] == "tiny"
    # Again: the run is shipped already; nothing is written but a missing record.
    before = (shipped / "tiny" / WEIGHTS).read_bytes()
    shutil.rmtree(records / "a")
    again = publish(finished_run, "tiny", "c", root=shipped, record=records / "a", once=True)
    assert again == first and (shipped / "tiny" / WEIGHTS).read_bytes() == before
    assert (records / "a" / "summary.json").is_file()
    # Another run under a name shipped already (the fp32 ResNet-20 against its bf16 rerun)
    # gets its own precision; the two are told apart on restore by that precision.
    other = tmp_path / "bf16-run"
    shutil.copytree(finished_run, other)
    saved = json.loads((other / "config.json").read_text())
    precision = {"fp32": "bf16", "bf16": "fp32"}[saved["config"]["precision"]]
    saved["config"]["precision"] = precision
    (other / "config.json").write_text(json.dumps(saved))
    entry = publish(other, "tiny", "c", root=shipped, record=records / "b", once=True)
    assert entry["name"] == f"tiny-{precision}"
    assert set(manifest(shipped)) == {"tiny", f"tiny-{precision}"}
    assert restore(records / "b", tmp_path / "r1", root=shipped) == f"tiny-{precision}"
    assert restore(records / "a", tmp_path / "r2", root=shipped) == "tiny"
    # A record folder is replaced whole: never one with other files, nor the run itself.
    (records / "c").mkdir()
    (records / "c" / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files than a record \(notes.md\)"):
        publish(finished_run, "x", "c", root=shipped, record=records / "c")
    assert (records / "c" / "notes.md").read_text() == "mine" and "x" not in manifest(shipped)
    with pytest.raises(ValueError, match="inside the run"):
        publish(finished_run, "x", "c", root=shipped, record=finished_run)
    assert (finished_run / WEIGHTS).is_file()
    (records / "file").write_text("mine")
    with pytest.raises(ValueError, match="file: not a folder"):
        publish(finished_run, "x", "c", root=shipped, record=records / "file")
    assert (records / "file").read_text() == "mine" and "x" not in manifest(shipped)
    # Weights that are not the manifest's are not restored.
    (shipped / "tiny" / WEIGHTS).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256 differs"):
        restore(records / "a", tmp_path / "r3", root=shipped)
    assert not (tmp_path / "r3").exists()


def test_a_net_stored_in_bf16_is_restored_with_its_bf16_weights(finished_run, tmp_path, shipped):
    from deepres.pretrained import restore

    publish(finished_run, "tiny", "c", root=shipped, bf16=True, record=tmp_path / "rec")
    out = tmp_path / "run"
    assert restore(tmp_path / "rec", out, root=shipped) == "tiny"
    weights, _ = load_tensors(out / WEIGHTS)
    original, _ = load_tensors(finished_run / WEIGHTS)
    assert weights["fc.weight"].dtype == torch.bfloat16
    assert torch.equal(weights["fc.weight"], original["fc.weight"].bfloat16())
    # A record whose classes were reordered would restore a run that mislabels: refused.
    saved = json.loads((tmp_path / "rec" / "config.json").read_text())
    saved["classes"] = saved["classes"][::-1]
    (tmp_path / "rec" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="config.json: its classes, input or preprocessing are"):
        restore(tmp_path / "rec", tmp_path / "again", root=shipped)
    assert not (tmp_path / "again").exists()


def test_a_folder_is_swapped_in_whole_or_left_as_it_was(tmp_path, monkeypatch):
    dest = tmp_path / "net"

    def write(text):
        return lambda folder: (folder / "a.txt").write_text(text)

    _swap_in(dest, write("old"))
    _swap_in(dest, write("new"))
    assert (dest / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["net"]

    def broken(folder):
        (folder / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _swap_in(dest, broken)
    assert (dest / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["net"]
    # The new folder fails to go in after the old one has moved aside: the old one comes back.
    rename = type(dest).rename

    def refuse_staged(self, target):
        if self.name.startswith(".net.") and ".old." not in self.name and target == dest:
            raise OSError("rename refused")
        return rename(self, target)

    with monkeypatch.context() as m:
        m.setattr(type(dest), "rename", refuse_staged)
        with pytest.raises(OSError, match="rename refused"):
            _swap_in(dest, write("newer"))
    assert (dest / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["net"]

    def refuse(what):
        def then():
            raise OSError(what)

        return then

    # What runs after the swap fails: the old folder comes back, the new one goes.
    with pytest.raises(OSError, match="manifest"):
        _swap_in(dest, write("newer"), then=refuse("manifest"))
    assert (dest / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["net"]

    # ...and where the new one cannot be taken out again, the old one is kept beside it.
    def refuse_out(self, target):
        if self == dest and type(dest)(target).parent.name.startswith(".net.new."):
            raise OSError("rename refused")
        return rename(self, target)

    monkeypatch.setattr(type(dest), "rename", refuse_out)
    with pytest.raises(OSError, match="rename refused"):
        _swap_in(dest, write("newest"), then=refuse("manifest"))
    (kept,) = tmp_path.glob(".net.old.*")
    assert (kept / "net" / "a.txt").read_text() == "new"


def test_load_with_folded_bn_gives_the_net_s_probabilities(finished_run):
    plain, folded = deepres.load(finished_run), deepres.load(finished_run, fold_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.modules())
    batch = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    torch.testing.assert_close(folded(batch), plain(batch), atol=1e-5, rtol=1e-4)


def test_a_classifier_scores_in_eval_mode_whatever_mode_its_net_was_left_in(finished_run):
    clf = deepres.load(finished_run, device="cpu")
    batch = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    expected = clf(batch)
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    # Fine-tuning the net leaves it in train mode: BN would use the batch's statistics and
    # overwrite its running ones.
    clf.model.train()
    torch.testing.assert_close(clf(batch), expected)
    assert clf.model.training  # left as the caller had it
    assert all(torch.equal(v, before[k]) for k, v in clf.model.state_dict().items())
    assert clf.to("cpu") is clf


def test_importing_deepres_and_plotting_leave_the_matplotlib_backend_alone(tmp_path):
    # A notebook's backend: pyplot with Agg forced on it would stop plt.show() from showing.
    code = (
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot\n"
        "import deepres, deepres.train\n"
        "from deepres.report import plot_status\n"
        f"plot_status([], {str(tmp_path / 'status.png')!r})\n"
        "print(matplotlib.get_backend(), len(matplotlib.pyplot.get_fignums()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # No backend chosen, and no figure left with pyplot (a notebook would show it).
    assert out.stdout.split() == ["svg", "0"] and (tmp_path / "status.png").stat().st_size > 0


def test_a_failed_publish_leaves_an_earlier_record_as_it_was(finished_run, shipped, tmp_path):
    record = tmp_path / "record"
    publish(finished_run, "tiny", "c", root=shipped, record=record)
    before = {p.name: p.read_bytes() for p in record.iterdir()}
    assert record.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    broken = tmp_path / "broken"
    shutil.copytree(finished_run, broken)
    (broken / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        publish(broken, "other", "c", root=shipped, record=record)
    assert {p.name: p.read_bytes() for p in record.iterdir()} == before


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_damaged_manifest_is_named_in_one_line(shipped, capsys):
    shipped.mkdir()
    path = shipped / "manifest.json"
    for text, why in (
        ("[]", 'damaged \\(no "nets" table'),
        ('{"nets": {"x": {"model": "resnet20"}}}', "the entry of x is damaged \\(no sha256,"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path}: {why}"):
            manifest(shipped)
        assert main(["predict", "x", "photo.png"]) == 2
        assert f"{path}: " in capsys.readouterr().err


def test_a_run_whose_files_do_not_make_one_net_is_not_published(finished_run, shipped, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    tensors, meta = load_tensors(run / "preprocess.safetensors")
    save_tensors(run / "preprocess.safetensors", {**tensors, "mean": torch.zeros(3, 5, 5)}, meta)
    with pytest.raises(ValueError, match="preprocess.safetensors: its mean and std do not fit"):
        publish(run, "tiny", "c", root=shipped)
    assert manifest(shipped) == {}
    # Shapes that broadcast, but to more than one image's: refused as well.
    save_tensors(run / "preprocess.safetensors", {**tensors, "mean": torch.zeros(2, 3, 1, 1)}, meta)
    with pytest.raises(ValueError, match="preprocess.safetensors: its mean and std do not fit"):
        publish(run, "tiny", "c", root=shipped)
    save_tensors(run / "preprocess.safetensors", tensors, meta)
    weights, meta = load_tensors(finished_run / WEIGHTS)
    save_tensors(run / WEIGHTS, {**weights, "fc.weight": torch.zeros(7, 1)}, meta)
    with pytest.raises(ValueError, match="model.safetensors: does not match"):
        publish(run, "tiny", "c", root=shipped)
    # A setting of the wrong type in config.json: named, not a TypeError from deep in torch.
    saved = json.loads((run / "config.json").read_text())
    saved["model_options"]["width"] = "4"
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="config.json: its net's settings are damaged"):
        publish(run, "tiny", "c", root=shipped)
