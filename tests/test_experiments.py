import fcntl
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_folder
from matplotlib.figure import Figure

from deepres import train as train_module
from deepres.checkpoint import load_tensors, read_config
from deepres.cli import main
from deepres.data import open_dataset
from deepres.experiments import degradation, reproduce, responses, shortcuts, table6
from deepres.experiments.common import BUDGETS, Context, ensure_run, paper_protocol
from deepres.experiments.responses import layer_stds, response_layers
from deepres.models import create_model
from deepres.paper import CIFAR10_CLASSES
from deepres.recipes import get_recipe
from deepres.report import (
    final_training,
    final_window,
    paper_ylim,
    read_metrics,
    response_scale,
    write_report,
)
from deepres.train import TrainConfig, load_config, train


def smoke(tiny_folder, tmp_path, experiment, models):
    return reproduce(
        experiment,
        str(tiny_folder),
        "smoke",
        out=tmp_path / experiment,
        runs=tmp_path / "runs",
        models=models,
        progress=False,
        command="test",
    )


def check_report(result, out, figures):
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"].keys() == result["runs"].keys()
    report = (out / "report.md").read_text()
    for name, r in saved["runs"].items():
        assert r["iters"] == BUDGETS["smoke"].iters
        assert 0 <= r["train_error"] <= 100 and 0 <= r["test_error"] <= 100
        assert r["eval_split"] == "test"
        assert r["curve"]["eval_error"][-1] == r["test_error"]
        assert r["curve"]["iteration"][-1] == r["iters"]
        assert len(r["curve"]["train_error"]) == len(r["curve"]["iteration"])
        # The images behind the training error: those of the records it is the mean over.
        tail = final_window(read_metrics(Path(r["run"])))
        assert r["train_images"] == sum(m["images"] for m in tail) > 0
        assert f"| {name} | {r['params']:,} |" in report
    for claim in saved["claims"]:
        assert claim["verdict"] in ("yes", "no", "yes, within chance", "no, within chance")
        assert f"{claim['claim']}: **{claim['verdict']}**" in report
    for figure in figures:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure})" in report
    assert saved["machine"]["torch"] == torch.__version__
    # The precision each run resolved to and trained in, named in the report.
    precision_line = next(line for line in report.splitlines() if line.startswith("- precision:"))
    for name, r in saved["runs"].items():
        assert r["precision"] in ("fp32", "bf16")
        assert name in precision_line.split(f"{r['precision']} (")[1].split(")")[0]
    # And where each started, as its config.json names it: here, this CPU.
    trained_on = next(line for line in report.splitlines() if line.startswith("- started on:"))
    for name, r in saved["runs"].items():
        assert r["device"] == read_config(Path(r["run"]))["device"] and r["device"]
        assert f"{r['device']}, torch {torch.__version__} (" in trained_on and name in trained_on
    assert "JPEG copy" not in report
    return saved


def test_degradation_smoke_and_reuse(tiny_folder, tmp_path):
    models = ["plain20", "plain32", "resnet20", "resnet32"]
    result = smoke(tiny_folder, tmp_path, "degradation", models)
    saved = check_report(result, tmp_path / "degradation", ["degradation.png"])
    claims = [c["claim"] for c in saved["claims"]]
    assert any("plain32 trains to a higher training error than plain20" in c for c in claims)
    assert any("its plain twin plain32" in c for c in claims)
    report = (tmp_path / "degradation" / "report.md").read_text()
    assert "- resumed on another device:" not in report
    # Its runs are ordinary runs: reused as they are by the next experiment.
    before = (tmp_path / "runs" / "resnet20" / "model.safetensors").stat().st_mtime_ns
    # One resumed here and then on a GPU (config.json's record): the report names the move.
    config = tmp_path / "runs" / "resnet20" / "config.json"
    saved = json.loads(config.read_text())
    saved["resumed"] = [
        {"iteration": 2, "device": saved["device"]},
        {"iteration": 3, "device": "NVIDIA H200"},
        {"iteration": 4, "device": "NVIDIA H200"},
    ]
    config.write_text(json.dumps(saved))
    again = smoke(tiny_folder, tmp_path, "table6", ["resnet20", "resnet32"])
    assert again["runs"]["resnet20"]["moved"] == [{"iteration": 3, "device": "NVIDIA H200"}]
    assert again["runs"]["resnet32"]["moved"] == []
    report = (tmp_path / "table6" / "report.md").read_text()
    assert "- resumed on another device: resnet20 on NVIDIA H200 from iteration 3\n" in report
    assert (tmp_path / "runs" / "resnet20" / "model.safetensors").stat().st_mtime_ns == before
    assert again["runs"]["resnet20"]["test_error"] == result["runs"]["resnet20"]["test_error"]
    table = {row["model"]: row for row in again["table"]}
    # Three colours at the smoke budget: the paper's number is shown, no gap to it is.
    assert table["resnet20"]["paper"] == 8.75 and table["resnet20"]["gap"] is None
    assert not again["runs"]["resnet20"]["paper_protocol"]
    check_report(again, tmp_path / "table6", [])
    # The paper's ResNet-110 figure is a best of 5 runs, and the report says so beside it; one
    # CIFAR-10 run at the full budget is set against the mean of the five.
    full = {**again["runs"]["resnet32"], "test_error": 7.0, "eval_split": "test"}
    renamed = {**again, "runs": {"resnet110": {**full, "paper_protocol": True}}}
    report = write_report(renamed, tmp_path / "renamed").read_text()
    assert "| 6.43 (best of 5 runs; mean 6.61 +/- 0.16, which the gap is to) | 0.39 |" in report


def test_only_a_run_of_the_papers_net_recipe_and_budget_is_set_against_table6():
    # config.json of a campaign run: CIFAR-10, 64k iterations, the paper's recipe and net.
    saved = {
        "model": "resnet110",
        "classes": CIFAR10_CLASSES,
        "input_size": [3, 32, 32],
        "normalize": "pixel",
        "model_options": {"num_classes": 10, "in_channels": 3},
        "recipe": {**get_recipe("cifar-warmup").to_dict(), "milestones": [32000, 48000]},
        "config": {"init": None},
        "data_source": "/data/cifar-10-batches-py (CIFAR-10 python, train split)",
    }
    assert paper_protocol(saved)
    options = {"num_classes": 10, "in_channels": 3, "shortcut": "A"}
    assert paper_protocol({**saved, "model_options": options})
    recipe = saved["recipe"]
    other = [
        {"recipe": {**recipe, "lr": 0.05}},  # a resume with another --lr
        {"recipe": {**recipe, "momentum": 0.0}},
        {"recipe": {**recipe, "weight_decay": 5e-4}},
        {"recipe": {**recipe, "gamma": 0.2}},
        {"recipe": {**recipe, "augment": False}},
        {"recipe": {**recipe, "batch_size": 64}},
        {"recipe": {**recipe, "warmup_lr": None}},  # --recipe cifar for ResNet-110
        {"recipe": {**recipe, "milestones": [30000, 48000]}},
        {"recipe": {**recipe, "iters": 2000}},
        {"model_options": {**options, "shortcut": "B"}},
        {"model_options": {**options, "width": 32}},
        {"normalize": "channel"},
        {"config": {"init": "resnet20-cifar10"}},
        {"classes": CIFAR10_CLASSES[::-1]},
        # The JPEG copy, its classes CIFAR-10's: other data (about 3 points of error).
        {"data_source": "/data/cifar10-jpeg-train.zip:train (image folder, train split)"},
        {"data_source": None},  # runs from before it was recorded
    ]
    assert not any(paper_protocol({**saved, **change}) for change in other)


def test_table6_sets_no_gap_between_a_validation_error_and_the_paper_s_test_error(monkeypatch):
    class FakeContext:
        def config(self, name, model):
            return name

    splits = {"resnet20": "val", "resnet32": "test", "resnet44": "test"}
    monkeypatch.setattr(table6, "ensure_run", lambda ctx, config: config)
    monkeypatch.setattr(
        table6,
        "run_result",
        lambda name: {
            "params": 1,
            "test_error": 9.0,
            "eval_split": splits[name],
            # resnet44: other data, or fewer than the paper's 64k iterations.
            "paper_protocol": name != "resnet44",
        },
    )
    rows = table6.run(FakeContext(), ["resnet20", "resnet32", "resnet44"])["table"]
    assert [row["gap"] for row in rows] == [None, pytest.approx(9.0 - 7.51), None]


def test_responses_smoke(tiny_folder, tmp_path):
    result = smoke(tiny_folder, tmp_path, "responses", ["plain20", "resnet20"])
    saved = check_report(result, tmp_path / "responses", ["responses.png"])
    # 3x3 layers of a 20-layer net: the stem's and two per block.
    assert [len(saved["responses"][n]) for n in ("plain20", "resnet20")] == [19, 19]
    assert all(s > 0 for s in saved["responses"]["resnet20"])
    assert any("resnet20 responds more weakly than plain20" in c["claim"] for c in saved["claims"])


def test_shortcuts_smoke(tiny_folder, tmp_path):
    result = smoke(tiny_folder, tmp_path, "shortcuts", ["resnet20"])
    check_report(result, tmp_path / "shortcuts", ["shortcuts.png"])
    assert [r["shortcut"] for r in result["runs"].values()] == ["A", "B", "C"]
    # Scored on the folder's test split, 18 images: what the verdicts' chance note needs.
    assert {r["eval_images"] for r in result["runs"].values()} == {18}
    assert (
        result["runs"]["resnet20-C"]["params"]
        > result["runs"]["resnet20-B"]["params"]
        > (result["runs"]["resnet20"]["params"])
    )


def test_a_report_write_that_fails_leaves_the_old_report(tiny_folder, tmp_path, monkeypatch):
    result = smoke(tiny_folder, tmp_path, "shortcuts", ["resnet20"])
    out = tmp_path / "shortcuts"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_text = Path.write_text

    def half_text(self, text, *args, **kwargs):
        if not text.startswith("# "):  # report.md only
            return write_text(self, text, *args, **kwargs)
        write_text(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    def half_figure(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    for patch in ((Path, "write_text", half_text), (Figure, "savefig", half_figure)):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            with pytest.raises(OSError, match="No space left"):
                write_report({**result, "wall_seconds": result["wall_seconds"] + 1}, out)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_shortcuts_label_each_run_with_the_option_its_net_has(monkeypatch):
    # An ImageNet net defaults to option B: its option-A run must ask for A.
    class FakeContext:
        def config(self, name, model, shortcut=None):
            return replace(TrainConfig(model=model, data="d", out=name), shortcut=shortcut)

    monkeypatch.setattr(shortcuts, "ensure_run", lambda ctx, config: config)

    def result(config):
        net = create_model(
            config.model, **({"shortcut": config.shortcut} if config.shortcut else {})
        )
        return {"train_error": 1.0, "test_error": 1.0, "net": net}

    monkeypatch.setattr(shortcuts, "run_result", result)
    for model in ("resnet20", "resnet18"):
        runs = shortcuts.run(FakeContext(), [model])["runs"]
        assert sorted(r["shortcut"] for r in runs.values()) == ["A", "B", "C"]
        for name, r in runs.items():
            projections = sum(p.dim() == 4 and p.shape[-1] == 1 for p in r["net"].parameters())
            # A: no projection; B: one per stage that changes shape; C: one per block.
            expected = {"A": 0, "B": {"resnet20": 2, "resnet18": 3}[model]}
            expected["C"] = {"resnet20": 9, "resnet18": 8}[model]
            assert projections == expected[r["shortcut"]], (name, r["shortcut"])


def test_shortcuts_without_held_out_images_judge_training_errors(tiny_folder, tmp_path):
    # Trained on every image, as the full-budget campaign does: no test error to compare.
    args = dict(out=tmp_path / "out", runs=tmp_path / "runs", val_split=0, progress=False)
    result = reproduce(
        "shortcuts",
        str(tiny_folder / "train"),
        "smoke",
        models=["resnet20"],
        command="test",
        **args,
    )
    assert all(r["test_error"] is None for r in result["runs"].values())
    assert len(result["claims"]) == 2
    for claim in result["claims"]:
        assert "(training error)" in claim["claim"]
        assert claim["verdict"] in ("yes", "no", "yes, within chance", "no, within chance")
    with pytest.raises(ValueError, match="plain20: a plain net has no shortcuts"):
        reproduce("shortcuts", str(tiny_folder / "train"), "smoke", models=["plain20"], **args)


def test_a_stopped_run_stops_the_experiment(tiny_folder, tmp_path, monkeypatch, capsys):
    # SIGTERM checkpoints the run being trained and train returns unfinished (stop_at stands in
    # for the signal): the experiment must end there, not start the next net or write a report.
    from deepres.experiments import common

    real_train = common.train
    monkeypatch.setattr(common, "train", lambda config, **kw: real_train(config, stop_at=2, **kw))
    args = ["reproduce", "degradation", "--data", str(tiny_folder), "--budget", "smoke"]
    args += ["--models", "resnet20,resnet32", "--runs", str(tmp_path / "runs")]
    args += ["--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet20: stopped at iteration 2; run again to resume" in err[0]
    assert (tmp_path / "runs" / "resnet20" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "runs" / "resnet32").exists()
    assert not (tmp_path / "out").exists()
    # Run again: it resumes and goes on to the next net.
    monkeypatch.setattr(common, "train", real_train)
    assert main(args) == 0
    assert (tmp_path / "out" / "report.md").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_again(tiny_folder, tmp_path, capsys):
    # --device cpu: the two trainings are compared bit for bit.
    args = ["reproduce", "degradation", "--data", str(tiny_folder), "--budget", "smoke"]
    args += ["--device", "cpu"]
    args += ["--models", "resnet20", "--runs", str(tmp_path / "runs")]
    args += ["--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    first = (tmp_path / "runs" / "resnet20" / "summary.json").read_text()
    copy = tmp_path / "first"
    shutil.copytree(tmp_path / "runs" / "resnet20", copy)
    # What a SIGKILL before the first checkpoint leaves: config.json and a record or two.
    run = tmp_path / "runs" / "resnet20"
    for name in ("checkpoint.safetensors", "model.safetensors", "summary.json"):
        (run / name).unlink()
    # While another process trains it, it is left alone...
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(args) == 2
        assert "another process is training this run" in capsys.readouterr().err
        assert (run / "config.json").is_file()
    finally:
        os.close(fd)
    # ...and otherwise trained again from the start, to the same end (deterministic smoke).
    assert main(args) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["iteration"] == json.loads(first)["iteration"]
    assert again["train_error"] == json.loads(first)["train_error"]
    assert torch.equal(
        *(load_tensors(r / "model.safetensors")[0]["fc.weight"] for r in (run, copy))
    )


def fake_runs(**errors) -> dict:
    """Run results with the given (training, held-out) errors in %; held-out None: not at hand."""
    return {
        n.replace("_", "-"): {"train_error": t, "test_error": h, "eval_split": "val" if h else None}
        for n, (t, h) in errors.items()
    }


def verdicts(claims: list[dict]) -> list[tuple[str, str]]:
    return [(c["claim"], c["verdict"]) for c in claims]


def test_degradation_claims_are_judged_the_paper_s_way_round():
    # The paper's picture: plain56 above plain20, resnet56 below resnet20 and below plain56.
    paper = fake_runs(plain20=(5, 9), plain56=(8, 12), resnet20=(2, 8), resnet56=(1, 7))
    assert verdicts(degradation.claims(paper)) == [
        ("plain56 trains to a higher training error than plain20 (the degradation problem)", "yes"),
        ("resnet56 trains to a lower training error than resnet20", "yes"),
        ("resnet56 reaches a lower val error than resnet20", "yes"),
        ("resnet20 reaches a lower training error than its plain twin plain20", "yes"),
        ("resnet56 reaches a lower training error than its plain twin plain56", "yes"),
    ]
    # Every comparison the other way round.
    flipped = fake_runs(plain20=(8, 12), plain56=(5, 9), resnet20=(9, 7), resnet56=(10, 13))
    assert [v for _, v in verdicts(degradation.claims(flipped))] == ["no"] * 5
    # No held-out error: the held-out claim is said to be not judged, not judged on nothing.
    training_only = fake_runs(resnet20=(2, None), resnet56=(1, None))
    assert verdicts(degradation.claims(training_only)) == [
        ("resnet56 trains to a lower training error than resnet20", "yes"),
        ("resnet56 reaches a lower test error than resnet20 (Fig. 6's bold curves)", "not judged"),
    ]
    mixed = degradation.claims(fake_runs(resnet20=(2, 8), resnet56=(1, None)))
    assert mixed[-1]["evidence"] == "not every run has a held-out error"
    big = fake_runs(resnet110=(0.1, 6.4), resnet1202=(0.1, 7.9))
    assert verdicts(degradation.claims(big))[-1] == (
        "resnet1202 has a higher val error than resnet110 (it overfits)",
        "yes",
    )
    big = fake_runs(resnet110=(0.1, None), resnet1202=(0.1, None))
    assert verdicts(degradation.claims(big))[-1] == (
        "resnet1202 has a higher test error than resnet110 (it overfits)",
        "not judged",
    )
    assert degradation.claims(fake_runs(resnet20=(2, None))) == []
    # Plain-110 (not in Fig. 6) is judged against plain-56, which stays judged against plain-20.
    deeper = fake_runs(plain20=(2.5, None), plain56=(5.7, None), plain110=(80.0, None))
    assert verdicts(degradation.claims(deeper)) == [
        ("plain56 trains to a higher training error than plain20 (the degradation problem)", "yes"),
        ("plain110 trains to a higher training error than plain56", "yes"),
    ]
    assert verdicts(degradation.claims(fake_runs(plain20=(2.5, None), plain110=(2.0, None)))) == [
        ("plain110 trains to a higher training error than plain20", "no")
    ]


def test_table6_responses_and_shortcut_claims_are_judged_the_paper_s_way_round():
    runs = fake_runs(resnet20=(3, 9), resnet32=(2, 8), resnet56=(1, 7))
    assert verdicts(table6.claims(runs)) == [
        ("error falls at each step of depth from resnet20 to resnet56", "yes")
    ]
    # The ends alone would say yes; a net in the middle above its shallower neighbour says no.
    runs = fake_runs(resnet20=(3, 9), resnet32=(2, 9.5), resnet56=(1, 7))
    assert verdicts(table6.claims(runs))[0][1] == "no"
    runs = fake_runs(resnet20=(1, None), resnet56=(2, None))
    assert verdicts(table6.claims(runs)) == [
        ("training error falls at each step of depth from resnet20 to resnet56", "no"),
        (
            "test error falls at each step of depth from resnet20 to resnet56 (Table 6 itself)",
            "not judged",
        ),
    ]
    stds = {"plain20": [1.0, 1.2], "resnet20": [0.8, 0.9], "resnet56": [0.5, 0.6]}
    assert [v for _, v in verdicts(responses.claims(stds))] == ["yes", "yes"]
    stds["resnet56"] = [0.95, 0.95]  # mean 0.95 above resnet20's 0.85
    assert verdicts(responses.claims(stds))[-1] == (
        "the deeper ResNet responds more weakly at each step from resnet20 to resnet56",
        "no",
    )
    # The ends alone would say yes; a net in the middle above its shallower neighbour says no.
    stds = {"resnet20": [0.8], "resnet32": [0.9], "resnet56": [0.5]}
    assert responses.claims(stds)[-1]["verdict"] == "no"
    assert (
        responses.claims(stds)[-1]["evidence"] == "resnet20 0.800, resnet32 0.900, resnet56 0.500"
    )
    runs = fake_runs(resnet20=(3, 9.0), resnet20_B=(3, 8.5), resnet20_C=(3, 8.6))
    assert [v for _, v in verdicts(shortcuts.claims(runs, ["resnet20"]))] == ["yes", "no"]
    assert "(held-out error)" in shortcuts.claims(runs, ["resnet20"])[0]["claim"]
    # Over 5,000 validation images, half a point apart is within chance, and the evidence says so;
    # 4 points apart is not.
    for r, error in zip(runs.values(), (26.20, 25.58, 21.58), strict=True):
        r.update(test_error=error, eval_images=5000)
    b_vs_a, c_vs_b = (c["evidence"] for c in shortcuts.claims(runs, ["resnet20"]))
    assert b_vs_a == (
        "B 25.58% vs A 26.20%; within chance: 0.62 points apart, where two standard errors of a "
        "difference over 5,000 images are 1.75"
    )
    assert c_vs_b == "C 21.58% vs B 25.58%"
    assert [v for _, v in verdicts(shortcuts.claims(runs, ["resnet20"]))] == [
        "yes, within chance",
        "yes",
    ]


def test_training_error_verdicts_say_when_a_difference_is_within_chance():
    # The campaign's ends over the last 500 iterations (64,000 augmented images): ResNet-32 and
    # ResNet-44 are 0.07 points apart, just over two standard errors (0.067) of the difference.
    runs = fake_runs(resnet20=(1.50, None), resnet32=(0.40, None), resnet44=(0.33, None))
    for r in runs.values():
        r["train_images"] = 64_000
    falls, _ = table6.claims(runs)
    assert falls["verdict"] == "yes" and "within chance" not in falls["evidence"]
    runs["resnet44"]["train_error"] = 0.36
    falls, _ = table6.claims(runs)
    assert falls["verdict"] == "yes, within chance" and falls["evidence"] == (
        "resnet20 1.50%, resnet32 0.40%, resnet44 0.36%; resnet32 to resnet44 within chance: "
        "0.04 points apart, where two standard errors of a difference over 64,000 images are 0.07"
    )
    # A no says within chance only where the step that breaks the trend is within it.
    runs["resnet56"] = {**runs["resnet44"], "train_error": 0.90}
    assert table6.claims(runs)[0]["verdict"] == "no"
    runs["resnet56"]["train_error"] = 0.38
    assert table6.claims(runs)[0]["verdict"] == "no, within chance"
    twins = fake_runs(plain20=(2.51, None), resnet20=(2.49, None))
    for r in twins.values():
        r["train_images"] = 64_000
    (twin,) = degradation.claims(twins)
    assert twin["verdict"] == "yes, within chance" and twin["evidence"].startswith(
        "2.49% vs 2.51%; within chance: 0.02 points apart"
    )
    # Records from before the count was kept carry no note.
    del twins["resnet20"]["train_images"]
    assert degradation.claims(twins)[0]["evidence"] == "2.49% vs 2.51%"
    # Shortcut options judged on training errors get the note too.
    options = fake_runs(resnet20=(1.50, None), resnet20_B=(1.48, None), resnet20_C=(1.20, None))
    for r in options.values():
        r["train_images"] = 64_000
    b_vs_a, c_vs_b = (c["evidence"] for c in shortcuts.claims(options, ["resnet20"]))
    assert "within chance: 0.02 points apart" in b_vs_a and "within chance" not in c_vs_b


def test_layer_stds_match_a_direct_computation():
    model = create_model("resnet20").eval()
    x = torch.randn(6, 3, 32, 32)
    outputs = []
    # clone: the in-place ReLU after a BN would otherwise overwrite what was kept
    handles = [
        m.register_forward_hook(lambda m, i, o: outputs.append(o.clone()))
        for m in response_layers(model)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    stds = layer_stds(model, [x[:4], x[4:]])
    assert len(stds) == 19
    # Fig. 7's responses: the BN after each 3x3 conv (before the addition and the ReLU), the
    # stem's first, then each block's two, in depth order.
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    assert response_layers(model) == [model.bn1, *[bn for b in blocks for bn in (b.bn1, b.bn2)]]
    # A bottleneck's one 3x3 conv is its second; an ImageNet net's 7x7 stem is no 3x3 layer.
    resnet50 = create_model("resnet50")
    stages = (resnet50.layer1, resnet50.layer2, resnet50.layer3, resnet50.layer4)
    assert response_layers(resnet50) == [b.bn2 for s in stages for b in s]
    expected = [o.double().std(unbiased=False).item() for o in outputs]
    assert stds == pytest.approx(expected, rel=1e-6)


def test_a_run_with_other_settings_is_not_reused(tiny_folder, tmp_path):
    ctx = Context(str(tiny_folder), BUDGETS["smoke"], tmp_path, val_split=0, progress=False)
    ensure_run(ctx, ctx.config("resnet20", "resnet20"))
    other = Context(str(tiny_folder), BUDGETS["smoke"], tmp_path, val_split=12, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        ensure_run(other, other.config("resnet20", "resnet20"))


def test_a_run_trained_on_a_copy_of_the_data_elsewhere_is_reused(tiny_folder, tmp_path):
    # A run trained on a GPU machine from its own copy of the data, then brought back.
    copy = tmp_path / "elsewhere" / "colours"
    shutil.copytree(tiny_folder, copy)
    there = Context(str(copy), BUDGETS["smoke"], tmp_path / "runs", val_split=0, progress=False)
    run = ensure_run(there, there.config("resnet20", "resnet20"))
    assert read_config(run)["data_sha256"] == open_dataset(str(tiny_folder), "train").fingerprint()
    here = Context(str(tiny_folder), BUDGETS["smoke"], tmp_path / "runs", val_split=0)
    trained = (run / "model.safetensors").read_bytes()
    assert ensure_run(here, here.config("resnet20", "resnet20")) == run
    assert (run / "model.safetensors").read_bytes() == trained
    # Told by the images, not the name: the copy gone, its fingerprint still counts, ...
    shutil.rmtree(copy)
    assert ensure_run(here, here.config("resnet20", "resnet20")) == run
    # ... and a run that kept none is compared with its data where that is still found.
    saved = read_config(run)
    fingerprint = saved.pop("data_sha256")
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="which is not here to compare with"):
        ensure_run(here, here.config("resnet20", "resnet20"))
    shutil.copytree(tiny_folder, copy)
    assert ensure_run(here, here.config("resnet20", "resnet20")) == run
    # Other images under the data's own name are other data, under its very path too.
    changed = tmp_path / "changed" / "colours"
    write_folder(changed / "train", per_class=24, seed=5)
    other = Context(str(changed), BUDGETS["smoke"], tmp_path / "runs", val_split=0)
    with pytest.raises(ValueError, match="holds a run trained on other data"):
        ensure_run(other, other.config("resnet20", "resnet20"))
    (run / "config.json").write_text(json.dumps({**saved, "data_sha256": fingerprint}))
    shutil.rmtree(copy)
    shutil.copytree(changed, copy)
    with pytest.raises(ValueError, match="holds a run trained on other data"):
        ensure_run(there, there.config("resnet20", "resnet20"))


def test_a_run_stopped_elsewhere_resumes_here_on_this_copy_of_the_data(
    tiny_folder, tmp_path, monkeypatch
):
    copy = tmp_path / "elsewhere" / "colours"
    shutil.copytree(tiny_folder, copy)
    there = Context(str(copy), BUDGETS["smoke"], tmp_path / "runs", val_split=0, progress=False)
    config = there.config("resnet20", "resnet20")
    train(config, stop_at=2, progress=False)
    shutil.rmtree(copy)
    here = Context(str(tiny_folder), BUDGETS["smoke"], tmp_path / "runs", val_split=0)
    run = ensure_run(here, here.config("resnet20", "resnet20"))
    assert read_metrics(run)[-1]["iteration"] == BUDGETS["smoke"].iters
    # The same as a run trained here from the start.
    whole = Context(str(tiny_folder), BUDGETS["smoke"], tmp_path / "whole", val_split=0)
    ensure_run(whole, whole.config("resnet20", "resnet20"))
    a = (run / "model.safetensors").read_bytes()
    assert a == (tmp_path / "whole" / "resnet20" / "model.safetensors").read_bytes()


def test_a_run_with_an_old_config_json_is_resumed_with_the_new_defaults(tiny_folder, tmp_path):
    ctx = Context(str(tiny_folder), BUDGETS["smoke"], tmp_path, val_split=0, progress=False)
    config = ctx.config("resnet20", "resnet20")
    assert config.precision == "auto"
    train(replace(config, precision="fp32"), stop_at=2, progress=False)
    # config.json as the code before --precision auto wrote it: out recorded as the path it
    # was started with, fp32, and other settings of how (not what) it trains.
    path = tmp_path / "resnet20" / "config.json"
    saved = json.loads(path.read_text())
    saved["config"].update(
        out="runs/reproduce-cifar10-jpeg-train-zip-full/resnet20",
        precision="fp32",
        checkpoint_every=500,
        channels_last=False,
        compile=False,
        device="auto",
    )
    path.write_text(json.dumps(saved))
    run = ensure_run(ctx, config)
    assert run == tmp_path / "resnet20"
    assert json.loads((run / "summary.json").read_text())["iteration"] == 4
    # Resumed as it was started: fp32, whatever auto would pick on this machine.
    assert load_config(run).precision == "fp32"
    assert [m.get("precision") for m in read_metrics(run)] == ["fp32", "fp32"]


def test_a_resumed_run_saves_as_often_as_the_budget_says_now(tiny_folder, tmp_path, monkeypatch):
    ctx = Context(str(tiny_folder), BUDGETS["smoke"], tmp_path, val_split=0, progress=False)
    config = replace(ctx.config("resnet20", "resnet20"), iters=8, checkpoint_every=4)
    train(config, stop_at=2, progress=False)
    saves, save = [], train_module._save
    monkeypatch.setattr(train_module, "_save", lambda s, i, w: (saves.append(i), save(s, i, w)))
    ensure_run(ctx, replace(config, checkpoint_every=3))
    assert saves == [3, 6, 8]


def test_cli_reproduce(tiny_folder, tmp_path, capsys):
    out = tmp_path / "report"
    args = [
        "reproduce",
        "degradation",
        "--data",
        str(tiny_folder),
        "--budget",
        "smoke",
        "--models",
        "plain20,resnet20",
        "--out",
        str(out),
        "--runs",
        str(tmp_path / "r"),
        "--quiet",
    ]
    assert main(args) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == {"plain20", "resnet20"}
    assert saved["command"].startswith("deepres ")
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "nothing", "--data", str(tiny_folder)])
    assert exit_info.value.code == 2


def test_final_training_error_is_the_image_weighted_mean_of_the_last_128th():
    metrics = [
        {"iteration": i, "images": 100, "train_error": float(i), "train_loss": i / 10}
        for i in range(50, 6401, 50)
    ]
    metrics[-1]["images"] = 300
    # 6,400 iterations: the last 50 are the last record alone; 12,800: the last 100, two.
    assert final_training(metrics) == (6400.0, 640.0)
    metrics += [{"iteration": 12_750, "images": 100, "train_error": 1.0, "train_loss": 3.0}]
    metrics += [{"iteration": 12_800, "images": 300, "train_error": 5.0, "train_loss": 1.0}]
    assert final_training(metrics) == pytest.approx((4.0, 1.5))


def test_trained_on_every_image_reports_training_error_only(tmp_path):
    # One split and no hold-out: the paper's final protocol, as in issue 9's full runs.
    data = write_folder(tmp_path / "cifar10-jpeg-train", per_class=24)
    result = reproduce(
        "table6",
        str(data),
        "smoke",
        out=tmp_path / "table6",
        runs=tmp_path / "runs",
        models=["resnet20", "resnet32"],
        val_split=0,
        progress=False,
        command="test",
    )
    for r in result["runs"].values():
        assert r["eval_split"] is None and r["test_error"] is None
        assert 0 <= r["train_error"] <= 100 and r["train_loss"] > 0
    assert [row["gap"] for row in result["table"]] == [None, None]
    assert result["claims"][0]["claim"].startswith("training error falls at each step of depth")
    report = (tmp_path / "table6" / "report.md").read_text()
    assert "**training** error and loss only" in report
    # The paper's test errors beside training errors: said to be no comparison.
    assert "paper's test error % (Table 6; not comparable with a training error) | gap |" in report
    assert "Our errors here are training errors, on the images the nets learned" in report
    not_judged = "- test error falls at each step of depth from resnet20 to resnet32 (Table 6"
    assert not_judged + " itself): **not judged**, no held-out images" in report
    # Named as the JPEG copy of CIFAR-10: the paper's numbers on that data stand beside ours.
    assert "the paper reproduced is about resnet20 11.8%, resnet56 10.3% test error" in report
    responses = reproduce(
        "responses",
        str(data),
        "smoke",
        out=tmp_path / "responses",
        runs=tmp_path / "runs",
        models=["resnet20"],
        val_split=0,
        progress=False,
        command="test",
    )
    assert responses["response_images"] == "training" and responses["n_images"] == 71


def test_reproduce_compile_compiles_new_and_resumed_runs(tiny_folder, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    runs = tmp_path / "r"
    # A run stopped without compiling is resumed compiled: how it trains, not what.
    ctx = Context(str(tiny_folder), BUDGETS["smoke"], runs, val_split=0, progress=False)
    train(ctx.config("resnet20", "resnet20"), stop_at=2, progress=False)
    assert compiled == []
    args = ["reproduce", "degradation", "--data", str(tiny_folder), "--budget", "smoke"]
    args += ["--models", "resnet20,plain20", "--runs", str(runs), "--out", str(tmp_path / "o")]
    assert main([*args, "--quiet", "--compile"]) == 0
    assert len(compiled) == 2  # the resumed resnet20 and the new plain20
    # config.json records how each run started.
    assert load_config(runs / "plain20").compile and not load_config(runs / "resnet20").compile
    assert json.loads((runs / "resnet20" / "summary.json").read_text())["iteration"] == 4


def test_reproduce_no_cuda_graph_reaches_new_and_resumed_runs(tiny_folder, tmp_path, monkeypatch):
    trained = []
    real = train_module.train
    monkeypatch.setattr(
        "deepres.experiments.common.train", lambda c, **kw: trained.append(c) or real(c, **kw)
    )
    runs = tmp_path / "r"
    ctx = Context(str(tiny_folder), BUDGETS["smoke"], runs, val_split=0, progress=False)
    train(ctx.config("resnet20", "resnet20"), stop_at=2, progress=False)
    args = ["reproduce", "degradation", "--data", str(tiny_folder), "--budget", "smoke"]
    args += ["--models", "resnet20,plain20", "--runs", str(runs), "--out", str(tmp_path / "o")]
    assert main([*args, "--quiet", "--no-cuda-graph"]) == 0
    assert [(c.model, c.cuda_graph) for c in trained] == [("resnet20", False), ("plain20", False)]
    trained.clear()
    assert main([*args, "--quiet", "--out", str(tmp_path / "o2")]) == 0
    assert trained == []  # both finished: reused


def test_fig6_axis_is_the_paper_s_where_every_curve_ends_inside_it():
    def ending(train, held_out=None):
        return {"train_error": [80.0, train], "eval_error": [held_out] if held_out else []}

    assert paper_ylim([ending(5.7), ending(0.2)]) == (0.0, 20.0)
    # An error that ends high (a short budget) keeps matplotlib's own range, held-out ones too.
    assert paper_ylim([ending(5.7), ending(25.0)]) is None
    assert paper_ylim([ending(5.7, held_out=31.0)]) is None
    assert paper_ylim([{"train_error": [], "eval_error": []}]) is None


def test_each_fig6_panel_takes_the_paper_s_axis_where_its_own_curves_fit(tmp_path, monkeypatch):
    from deepres import report

    def run(end):
        curve = {"iteration": [1, 2], "train_error": [90.0, end], "eval_iteration": []}
        return {"curve": curve, "eval_split": None}

    ends = {"plain20": 3.0, "plain110": 81.0, "resnet20": 1.5, "resnet110": 0.07}
    result = {
        "experiment": "degradation",
        "budget": "full",
        "val_split": 0,
        "runs": {n: run(e) for n, e in ends.items()},
    }
    limits = {}
    panel = report._curve_panel
    monkeypatch.setattr(
        report,
        "_curve_panel",
        lambda ax, result, names, title, ylim: (
            limits.__setitem__(title, ylim),
            panel(ax, result, names, title, ylim),
        ),
    )
    report._figures(result, tmp_path)
    # Plain-110 beside Fig. 6's plain nets, as the paper leaves it out: on an axis of its own.
    assert limits == {
        "plain nets": (0.0, 20.0),
        "deeper plain nets (not in Fig. 6)": None,
        "ResNets": (0.0, 20.0),
    }


def test_figures_draw_nets_by_depth_and_plain_nets_dashed(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from deepres import report

    names = ["resnet110", "plain56", "resnet20", "plain20", "resnet56"]
    curve = {"iteration": [1, 2], "train_error": [50.0, 40.0], "eval_iteration": []}
    result = {
        "experiment": "degradation",
        "budget": "smoke",
        "val_split": 0,
        "runs": {n: {"curve": curve, "eval_split": None} for n in names},
        "responses": {n: [1.0, 0.5] for n in names},
    }
    drawn = []
    monkeypatch.setattr(report, "plot_curves", lambda ax, curve, name: drawn.append(name))
    report._figures(result, tmp_path)
    # Each panel by depth; with no ResNet-1202, no panel of ResNet-110 against it...
    assert drawn == ["plain20", "plain56", "resnet20", "resnet56", "resnet110"]
    # ...and with it, ResNet-110 again in the panel beside ResNet-1202's, as in Fig. 6.
    drawn.clear()
    both = {**result, "runs": {**result["runs"], "resnet1202": result["runs"]["resnet20"]}}
    report._figures(both, tmp_path)
    assert drawn == [
        "plain20",
        "plain56",
        "resnet20",
        "resnet56",
        "resnet110",
        "resnet110",
        "resnet1202",
    ]

    styles = []
    plot = Axes.plot

    def recorded(ax, *args, **kwargs):
        styles.append((kwargs["label"], args[2]))
        return plot(ax, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recorded)
    report._figures({**result, "experiment": "responses"}, tmp_path)
    top = styles[::2]
    assert [n for n, _ in top] == ["plain20", "plain56", "resnet20", "resnet56", "resnet110"]
    assert [s for _, s in top] == ["--", "--", "-", "-", "-"]


def test_fig7_turns_log_scale_when_one_nets_responses_dwarf_the_rest(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from deepres import report

    # The shipped plain-110's first layers respond with a std near 700, the ResNets' near 0.5.
    healthy = {"plain56": [1.03, 0.28, 0.5], "resnet56": [0.9, 0.3, 0.4]}
    assert response_scale(healthy) == "linear"
    dwarfed = {**healthy, "plain110": [686.7, 0.41, 0.6]}
    assert response_scale(dwarfed) == "log"
    # And both panels of the figure take it.
    scales = []
    set_yscale = Axes.set_yscale
    monkeypatch.setattr(
        Axes, "set_yscale", lambda ax, value, **kw: scales.append(value) or set_yscale(ax, value)
    )
    runs = {n: {"curve": {}, "eval_split": None} for n in dwarfed}
    result = {"experiment": "responses", "runs": runs, "responses": dwarfed}
    report._figures(result, tmp_path)
    assert scales == ["log", "log"]
