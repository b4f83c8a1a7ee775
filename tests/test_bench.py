import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepres import report
from deepres.bench import REFERENCE, save_result
from deepres.cli import main
from deepres.inference import fold_batchnorm
from deepres.models import count_params, create_model
from deepres.provenance import git_commit, git_dirty, machine


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread here and in the reference's process: these nets are too small to share."""
    # On a busy machine OpenMP threads that wait for each other make tiny ops 100x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """benchmarks/reference.py, loaded from its file as `deepres bench` runs it."""
    spec = importlib.util.spec_from_file_location("reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, params", [("resnet20", 269_722), ("resnet50", 25_557_032)])
def test_reference_nets_have_deepres_parameter_counts(reference, name, params):
    assert count_params(reference.build_model(name)) == params
    assert count_params(create_model(name)) == params


def test_reference_nets_reject_what_they_do_not_have(reference):
    with pytest.raises(ValueError, match="resnet1202"):
        reference.build_model("plain20")


def test_reference_augmentation_crops_the_padded_image_and_flips(reference):
    pixels = np.random.default_rng(0).integers(1, 256, (6, 5, 3), dtype=np.uint8)
    padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0)))
    crops = {
        (dy, dx, flip): crop[:, ::-1] if flip else crop
        for dy in range(9)
        for dx in range(9)
        for flip in (False, True)
        for crop in [padded[dy : dy + 6, dx : dx + 5]]
    }
    flips = set()
    torch.manual_seed(0)
    for _ in range(30):
        out = np.asarray(reference.pad_crop_flip(Image.fromarray(pixels)))
        matches = [key for key, crop in crops.items() if np.array_equal(out, crop)]
        assert len(matches) == 1, "not one (flipped) crop of the zero-padded image"
        flips.add(matches[0][2])
    assert flips == {False, True}


def test_folded_batchnorm_gives_the_same_outputs():
    torch.manual_seed(0)
    nets = [(create_model("resnet50", width=8), 64), (create_model("resnet20", width=4), 16)]
    for net, size in nets:
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
        x = torch.randn(2, 3, size, size)
        folded = fold_batchnorm(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net.eval()(x), atol=1e-4, rtol=1e-4)


def test_bench_train_cli_compares_both_sides_and_saves(tiny_folder, tmp_path, capsys):
    argv = ["bench", "train", "--model", "resnet20", "--data", str(tiny_folder)]
    argv += ["--iters", "4", "--windows", "2", "--batch-size", "8", "--width", "4"]
    argv += ["--val-split", "12", "--workers", "1", "--json"]
    argv += ["--save", "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    ours, theirs = result["deepres_images_per_sec"], result["reference_images_per_sec"]
    assert ours > 0 and theirs > 0
    assert result["ratio"] == pytest.approx(ours / theirs)
    assert len(result["windows"]["deepres"]) == len(result["windows"]["reference"]) == 2
    for side in ("deepres", "reference"):
        assert 0 <= result[f"{side}_val_error"] <= 100
    assert result["command"].startswith("deepres bench train")
    assert {"torch", "git_commit", "date", "machine"} <= result.keys()
    (saved,) = tmp_path.glob("cpu-*.json")
    assert json.loads(saved.read_text())["runs"] == [result]


def test_bench_infer_cli(tmp_path, capsys):
    argv = ["bench", "infer", "--model", "resnet20", "--batch-sizes", "2,1"]
    argv += ["--iters", "2", "--image-size", "16", "--json", "--device", "auto"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["batch_sizes"]) == {"2", "1"}
    # "auto" resolved once, for both sides and the record.
    gpu = torch.cuda.is_available()
    assert result["device_name"] == (torch.cuda.get_device_name(0) if gpu else "cpu")
    for row in result["batch_sizes"].values():
        assert row["deepres_images_per_sec"] > 0 and row["reference_images_per_sec"] > 0
    for sizes in ("0", "abc", "32,-1"):
        assert main(["bench", "infer", "--batch-sizes", sizes]) == 2
        assert f"--batch-sizes {sizes}: expected sizes of 1 or more" in capsys.readouterr().err


def test_saved_results_keep_earlier_runs(tmp_path):
    run = {"date": "2026-01-02T03:04:05+00:00", "device_name": "NVIDIA H100 80GB HBM3"}
    save_result({**run, "n": 1}, tmp_path)
    path = save_result({**run, "n": 2}, tmp_path)
    assert path.name == "nvidia-h100-80gb-hbm3-2026-01-02.json"
    saved = json.loads(path.read_text())
    assert [r["n"] for r in saved["runs"]] == [1, 2]


def test_bench_train_refuses_nets_the_reference_lacks(tiny_folder, capsys):
    assert main(["bench", "train", "--model", "resnet50", "--data", str(tiny_folder)]) == 2
    assert "CIFAR ResNets" in capsys.readouterr().err


def test_bench_settings_that_cannot_run_are_one_line_errors(tiny_folder, photo_folder, capsys):
    train = ["bench", "train", "--data", str(tiny_folder)]
    data = ["bench", "data", "--data", str(photo_folder)]
    for argv, why in (
        (["bench", "infer", "--device", "foo"], "--device foo: not a device"),
        (["bench", "infer", "--iters", "0"], "--iters 0: must be at least 1"),
        (["bench", "infer", "--image-size", "0"], "--image-size 0: must be at least 1"),
        ([*train, "--epochs", "1", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        ([*train, "--epochs", "0"], "--epochs 0.0: must be a positive number"),
        ([*train, "--epochs", "nan"], "--epochs nan: must be a positive number"),
        ([*train, "--val-split", "-1"], "--val-split -1: must be at least 0"),
        ([*train, "--workers", "-1"], "--workers -1: must be at least 0"),
        ([*data, "--train-steps", "0"], "--train-steps 0: must be at least 1"),
        ([*data, "--crop-size", "0"], "--crop-size 0: must be at least 1"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], (argv, err)


def test_bench_data_cli_times_both_loaders_and_a_training_step(photo_folder, tmp_path, capsys):
    argv = ["bench", "data", "--data", str(photo_folder), "--batches", "4", "--windows", "2"]
    argv += ["--batch-size", "4", "--workers", "1", "--crop-size", "32", "--train-steps", "1"]
    argv += ["--train-batch-size", "2"]
    argv += ["--json", "--save", "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scale"] == [37, 69] and result["n_images"] == 24  # 256..480 scaled to 32
    assert result["train_batch_size"] == 2
    for key in ("deepres", "deepres_no_draft", "reference", "train"):
        assert result[f"{key}_images_per_sec"] > 0
    assert result["ratio"] == pytest.approx(
        result["deepres_images_per_sec"] / result["reference_images_per_sec"]
    )
    assert result["keeps_up"] == (
        result["deepres_images_per_sec"] >= result["train_images_per_sec"]
    )
    assert [len(result["windows"][k]) for k in ("deepres", "reference", "train_steps")] == [2, 2, 1]
    assert result["command"].startswith("deepres bench data")
    (saved,) = tmp_path.glob("cpu-*.json")
    assert json.loads(saved.read_text())["runs"] == [result]


@pytest.mark.parametrize("augment", ["scale", "rrc"])
def test_reference_photo_views_have_the_crop_size(reference, augment):
    photo = Image.fromarray(np.zeros((40, 60, 3), np.uint8))
    torch.manual_seed(0)
    for _ in range(20):
        if augment == "rrc":
            out = reference.random_resized_crop(photo, 16)
        else:
            out = reference.scale_crop(photo, 16, 20, 30)
        assert out.size == (16, 16)


def test_machine_record_says_what_shared_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("os.getloadavg", lambda: (2.004, 1.5, 0.25))
    record = machine()
    assert (
        record["omp_env"].items() >= {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}.items()
    )
    assert record["load_average"] == [2.0, 1.5, 0.25]
    assert record["cpu_mhz"] is None or record["cpu_mhz"] > 0


@pytest.mark.parametrize(("mhz", "expected"), [("2445.428", 2445.428), ("unknown", None)])
def test_machine_record_reads_the_clock_and_the_vector_flags(monkeypatch, mhz, expected):
    cpuinfo = f"model name\t: AMD EPYC\ncpu MHz\t\t: {mhz}\nflags\t\t: avx2 fma sse2\n"
    read = Path.read_text
    monkeypatch.setattr(
        Path, "read_text", lambda p, *a, **k: cpuinfo if str(p) == "/proc/cpuinfo" else read(p)
    )
    record = machine()
    # A clock that does not parse leaves the flags read after it alone.
    assert (record["cpu"], record["cpu_mhz"]) == ("AMD EPYC", expected)
    assert record["cpu_flags"] == ["avx2", "fma"]


def test_provenance_marks_code_that_differs_from_its_commit(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo, package = tmp_path / "repo", tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "net.py").write_text("depth = 20\n")

    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=repo,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "net")
    assert len(git_commit(package)) == 40 and git_dirty(package) is False
    (repo / "results.json").write_text("{}")  # written beside the code: no change to it
    assert git_dirty(package) is False
    (package / "net.py").write_text("depth = 56\n")
    assert git_dirty(package) is True
    git("commit", "-qam", "deeper")
    (package / "new.py").write_text("")  # a new module counts too
    assert git_dirty(package) is True
    git("add", ".")
    git("commit", "-qm", "new")
    # Shipped weights are results, not code; a benchmark script beside the package is code.
    (package / "weights").mkdir()
    (package / "weights" / "manifest.json").write_text("{}")
    assert git_dirty(package) is False
    (repo / "benchmarks").mkdir()
    (repo / "benchmarks" / "lanes.py").write_text("")
    assert git_dirty(package) is True
    assert git_commit(tmp_path) is None and git_dirty(tmp_path) is None  # outside git
    assert machine()["git_dirty"] == git_dirty()  # every record says it, of deepres itself
    # and a report names the commit of such code with the mark
    assert report._commit({"git_commit": "c0ffee", "git_dirty": True}) == (
        "`c0ffee` (with uncommitted changes)"
    )
    assert report._commit({"git_commit": "c0ffee", "git_dirty": False}) == "`c0ffee`"


def _script(name: str):
    """A script of benchmarks/ imported as a module (they import each other by name)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_profile_kinds_tell_the_head_and_the_optimizer_from_the_additions():
    kind_of = _script("profile_train").kind_of
    kinds = {
        name: kind_of(name)
        for name in (
            "aten::add_",
            "aten::add",
            "aten::addmm",
            "AddmmBackward0",
            "aten::_foreach_add_",
        )
    }
    assert kinds == {
        "aten::add_": "relu_and_add",
        "aten::add": "relu_and_add",
        "aten::addmm": "loss_and_head",
        "AddmmBackward0": "loss_and_head",
        "aten::_foreach_add_": "optimizer",
    }


def test_omp_wait_policy_hands_its_lanes_a_precision(monkeypatch, capsys):
    script = _script("omp_wait_policy")
    seen = []
    monkeypatch.setattr(script, "run_lanes", lambda args, *a: seen.append(args.precision) or [1.0])
    argv = ["omp_wait_policy.py", "--rounds", "2", "--seconds", "1", "--precision", "bf16"]
    monkeypatch.setattr("sys.argv", argv)
    script.main()
    assert seen == ["bf16"] * 4
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16"
