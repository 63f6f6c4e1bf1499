"""diagnose(): every number in report.json against a dense float64 reference or the measure
it comes from, the model left untouched, and resuming (whole, partial and interrupted)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ModelSnapshot, dense_hessian
from torch.func import functional_call

import flatlens.landscape as fl
from flatlens import block_spectra, zoo
from flatlens.cli import main
from flatlens.data import load_digits, synthetic_classification
from flatlens.measures._bounds import check_bound
from flatlens.measures._sharpness import zeroth_order_sharpness
from flatlens.report._diagnose import (
    BLOCK_PART,
    PARTS,
    DiagnoseConfig,
    diagnose,
    measure_objective,
)

CONFIG = DiagnoseConfig(
    rhos=(0.05, 0.01),
    k=3,
    measure_samples=64,
    batch_size=40,  # two uneven batches: 40 + 24
    trace_probes=3 * 57 + 3,  # Hutch++ with a full sketch is exact
    density_runs=1,
    lanczos_steps=12,
    steps=3,
    landscape_1d=5,
    landscape_2d=5,
)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.mlp(in_features=5, hidden=6, depth=1, num_classes=3).double()  # 57 parameters


@pytest.fixture(scope="module")
def data():
    return synthetic_classification(
        num_train=96, num_features=5, num_classes=3, num_test=48, dtype=torch.float64
    )


@pytest.fixture(scope="module")
def diagnosed(data, tmp_path_factory):
    model = _model()
    model.train()  # diagnose measures in eval mode and must restore this flag
    before = ModelSnapshot.take(model)
    out = tmp_path_factory.mktemp("diagnosis")
    report = diagnose(model, data, out, config=CONFIG)
    before.assert_unchanged(model)
    return {"model": model, "report": report, "out": out}


def test_performance_matches_a_direct_evaluation(diagnosed, data):
    model, perf = diagnosed["model"], diagnosed["report"]["performance"]
    with torch.no_grad():
        for split, (x, y) in (("train", data.train()), ("test", data.test())):
            logits = model(x)  # no dropout or BatchNorm: the mode does not matter
            assert perf[f"{split}_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), 1e-12)
            accuracy = float((logits.argmax(1) == y).double().mean())
            assert perf[f"{split}_accuracy"] == pytest.approx(accuracy, abs=1e-15)
    assert perf["gap_loss"] == pytest.approx(perf["test_loss"] - perf["train_loss"])
    assert perf["gap_accuracy"] == pytest.approx(perf["train_accuracy"] - perf["test_accuracy"])


def test_spectrum_and_trace_match_the_dense_hessian(diagnosed, data):
    report = diagnosed["report"]
    objective = measure_objective(diagnosed["model"], data, CONFIG)
    hessian = dense_hessian(objective)
    assert hessian.shape == (57, 57)
    reference = torch.linalg.eigvalsh(hessian).flip(0)
    assert report["spectrum"]["eigenvalues"] == pytest.approx(reference[:3].tolist(), rel=1e-6)
    assert report["trace"]["value"] == pytest.approx(float(hessian.trace()), rel=1e-9)
    assert report["summary"]["λ_max"] == report["spectrum"]["eigenvalues"][0]
    grid = report["density"]["grid"]
    assert grid[0] <= float(reference[-1]) and grid[-1] >= float(reference[0])


def _one_process_objective_checks(data) -> None:
    model = _model()
    objective = measure_objective(model, data, CONFIG)
    assert not objective.distributed
    x, y = data.train()
    seen = list(objective.batches())
    assert [n for _, _, n in seen] == [40, 24]  # the first 64 examples, in order, unsharded
    assert torch.equal(torch.cat([b[0] for b in seen]), x[:64])
    assert torch.equal(torch.cat([b[1] for b in seen]), y[:64])
    assert objective.memory_budget is None
    budget = measure_objective(model, data, dataclasses.replace(CONFIG, memory_budget=1024))
    assert budget.memory_budget == 1024
    whole = measure_objective(model, data, dataclasses.replace(CONFIG, measure_samples=None))
    assert sum(n for _, _, n in whole.batches()) == len(y) == 96


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_the_measure_objective_is_the_first_examples_in_one_process(data, tmp_path):
    _one_process_objective_checks(data)
    # A process group of one rank (torchrun --nproc_per_node 1) splits nothing either.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = _model()
        objective = measure_objective(model, data, CONFIG)
        assert [n for _, _, n in objective.batches()] == [40, 24]
        x, y = data.train()
        with torch.no_grad():
            assert objective.loss() == pytest.approx(float(F.cross_entropy(model(x[:64]), y[:64])))
    finally:
        torch.distributed.destroy_process_group()
    _one_process_objective_checks(data)


def test_sharpness_part_is_the_bound_check_with_the_same_settings(diagnosed, data):
    report = diagnosed["report"]
    objective = measure_objective(diagnosed["model"], data, CONFIG)
    bound = check_bound(objective, [0.05, 0.01], steps=3, seed=0).to_dict()
    stored = report["sharpness"]["bound"]
    assert [r["rho"] for r in stored["rows"]] == [0.01, 0.05]
    for key in ("r0", "r1", "lambda_max", "holds"):
        assert [r[key] for r in stored["rows"]] == [r[key] for r in bound["rows"]]
    # The headline radius is the middle of the sorted radii: 0.05 of (0.01, 0.05).
    adaptive = zeroth_order_sharpness(objective, 0.05, adaptive=True, steps=3, seed=0)
    assert report["sharpness"]["rho"] == 0.05
    assert report["sharpness"]["adaptive_r0"]["value"] == adaptive.value
    mid = stored["rows"][1]
    assert report["summary"]["ρ"] == 0.05
    assert report["summary"]["R0"] == mid["r0"] and report["summary"]["R1"] == mid["r1"]


def test_landscapes_hold_the_loss_along_the_directions(diagnosed, data):
    out, model = diagnosed["out"], diagnosed["model"]
    objective = measure_objective(model, data, CONFIG)
    d1 = fl.random_direction(objective, seed=0).vector
    d2 = fl.random_direction(objective, seed=1).vector
    x, y = data.x_train[:64], data.y_train[:64]

    def loss(theta: torch.Tensor) -> float:
        params = objective.space.as_dict(theta)
        with torch.no_grad():
            return float(F.cross_entropy(functional_call(model, params, (x,)), y))

    theta = objective.theta
    line = fl.load(out / "landscape_1d.npz")
    for a, value in zip(line.x, line.values["loss"], strict=True):
        assert value == pytest.approx(loss(theta + a * d1), rel=1e-10)
    plane = fl.load(out / "landscape_2d.npz")
    for i, j in ((0, 0), (1, 3), (4, 2)):
        expected = loss(theta + plane.x[i] * d1 + plane.y[j] * d2)
        assert plane.values["loss"][i, j] == pytest.approx(expected, rel=1e-10)
    info = diagnosed["report"]["landscape"]["landscape_2d"]
    assert info["loss_center"] == pytest.approx(loss(theta), rel=1e-12)
    assert info["loss_min"] == float(plane.values["loss"].min())


def test_report_files(diagnosed):
    out, report = diagnosed["out"], diagnosed["report"]
    assert json.loads((out / "report.json").read_text()) == report
    assert report["computed_parts"] == list(PARTS) and report["reused_parts"] == []
    assert report["model"]["num_params"] == 57 and report["model"]["dtype"] == "float64"
    page = (out / "report.html").read_text()
    for title in ("Summary", "Hessian spectrum", "Sharpness, flatness and the bound"):
        assert f"<h2>{title}</h2>" in page
    assert page.count('<img alt="') == 5  # spectrum, density, bound, two slices
    assert 'class="plotly-graph-div"' in page


def _without_memory(value):
    """A report part without the peak-memory fields (they differ between two runs)."""
    if isinstance(value, dict):
        return {k: _without_memory(v) for k, v in value.items() if not k.startswith("peak_memory_")}
    if isinstance(value, list):
        return [_without_memory(v) for v in value]
    return value


def test_resume_reuses_exactly_what_still_applies(diagnosed, data, tmp_path):
    out = tmp_path / "d"
    model = _model()
    diagnose(model, data, out, config=CONFIG)
    again = diagnose(model, data, out, config=CONFIG, resume=True)
    assert again["reused_parts"] == list(PARTS) and again["computed_parts"] == []
    first = diagnosed["report"]
    for key in ("performance", "spectrum", "trace", "landscape"):
        assert _without_memory(again[key]) == _without_memory(first[key])
    assert again["sharpness"]["bound"]["rows"] == first["sharpness"]["bound"]["rows"]

    more_radii = dataclasses.replace(CONFIG, rhos=(0.01, 0.02, 0.05))
    changed = diagnose(model, data, out, config=more_radii, resume=True)
    assert changed["computed_parts"] == ["sharpness"]
    assert len(changed["sharpness"]["bound"]["rows"]) == 3

    with torch.no_grad():
        model[1].bias[0] += 1e-3
    moved = diagnose(model, data, out, config=more_radii, resume=True)
    assert moved["reused_parts"] == [] and moved["computed_parts"] == list(PARTS)
    assert moved["performance"] != changed["performance"]


def test_an_interrupted_plane_continues_where_it_stopped(data, tmp_path, monkeypatch):
    config = dataclasses.replace(CONFIG, landscape_2d=7)
    model = _model()
    plane = fl.plane

    def interrupted(*args, **kwargs):
        def stop(done: int, total: int) -> None:
            raise KeyboardInterrupt

        return plane(*args, **kwargs, callback=stop)

    monkeypatch.setattr(fl, "plane", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diagnose(model, data, tmp_path / "d", config=config)
    monkeypatch.setattr(fl, "plane", plane)
    partial = fl.load(tmp_path / "d" / "landscape_2d.npz")
    done = int(np.isfinite(partial.values["loss"]).sum())
    assert 1 < done < 49

    resumed = diagnose(model, data, tmp_path / "d", config=config, resume=True)
    assert resumed["computed_parts"] == ["landscape_2d"]
    finished = fl.load(tmp_path / "d" / "landscape_2d.npz")
    assert finished.num_evaluated == 49 - done
    fresh = diagnose(model, data, tmp_path / "fresh", config=config)
    assert fresh["landscape"] == resumed["landscape"]
    reference = fl.load(tmp_path / "fresh" / "landscape_2d.npz")
    assert reference.num_evaluated == 49
    assert (finished.values["loss"] == reference.values["loss"]).all()


def test_config_checks_and_quick_settings():
    with pytest.raises(ValueError, match="rhos"):
        DiagnoseConfig(rhos=())
    with pytest.raises(ValueError, match="rhos"):
        DiagnoseConfig(rhos=(0.1, -0.1))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        DiagnoseConfig(k=0)
    with pytest.raises(ValueError, match="landscape_2d"):
        DiagnoseConfig(landscape_2d=1)
    with pytest.raises(ValueError, match="measure_samples"):
        DiagnoseConfig(measure_samples=0)
    quick = DiagnoseConfig(k=10, measure_samples=None).quick()
    assert (quick.k, quick.measure_samples, quick.landscape_2d) == (3, 256, 7)
    assert DiagnoseConfig(landscape_1d=0).quick().landscape_1d == 0


def test_the_loss_and_notes_are_in_the_report_and_parts_follow_the_loss(data, tmp_path):
    config = dataclasses.replace(CONFIG, landscape_1d=0, landscape_2d=0)
    model = _model()
    first = diagnose(model, data, tmp_path, config=config, notes=["weights were float16"])
    assert first["loss"] == "torch.nn.modules.loss.CrossEntropyLoss"
    assert first["notes"] == ["weights were float16"]
    assert "Note: weights were float16." in (tmp_path / "report.html").read_text()
    mse = torch.nn.MSELoss()

    def loss(outputs, targets):
        return mse(outputs, F.one_hot(targets, 3).to(outputs.dtype))

    named = {"loss_fn": loss, "loss_name": "mse"}
    other = diagnose(model, data, tmp_path, config=config, resume=True, **named)
    assert other["reused_parts"] == [] and other["loss"] == "mse"
    x, y = data.train()
    with torch.no_grad():
        assert other["performance"]["train_loss"] == pytest.approx(loss(model(x), y).item())
    again = diagnose(model, data, tmp_path, config=config, loss_fn=loss, resume=True)
    assert again["computed_parts"] == []


# ---------------------------------------------------------------------- per-block spectra
def _digits_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.build("mlp", load_digits(image=True))


# The quick settings on the digits MLP (8,970 parameters), without the slices (not tested here).
BLOCKS = dataclasses.replace(
    DiagnoseConfig(blocks="layers").quick(), landscape_1d=0, landscape_2d=0
)


def test_blocks_part_section_figure_and_resume(tmp_path):
    data = load_digits(image=True)
    model = _digits_mlp()
    before = ModelSnapshot.take(model)
    out = tmp_path / "d"
    report = diagnose(model, data, out, config=BLOCKS)
    before.assert_unchanged(model)
    assert report["computed_parts"] == [*PARTS[:4], BLOCK_PART, "sharpness"]
    blocks = report[BLOCK_PART]
    assert [b["name"] for b in blocks["blocks"]] == ["1", "3", "5"]  # the three Linear layers
    assert [b["num_params"] for b in blocks["blocks"]] == [64 * 64 + 64, 64 * 64 + 64, 650]
    # The same numbers as the measure itself on the same objective and settings.
    reference = block_spectra(
        measure_objective(model, data, BLOCKS),
        "layers",
        k=1,
        density=True,
        tol=1e-3,
        seed=0,
        density_kwargs={"num_runs": 1, "lanczos_steps": 20},
    ).to_dict()
    for got, ref in zip(blocks["blocks"], reference["blocks"], strict=True):
        assert got["eigenvalues"] == ref["eigenvalues"]
        assert got["error_bounds"] == ref["error_bounds"] and all(got["converged"])
        assert got["density"]["grid"] == ref["density"]["grid"]
    assert json.loads((out / "report.json").read_text())[BLOCK_PART] == blocks
    assert json.loads((out / "parts" / f"{BLOCK_PART}.json").read_text())["value"] == blocks
    assert (out / "figures" / "block_spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "<h2>Per-block spectra</h2>" in page
    assert "<th>block</th><th>params</th><th>λ_max</th><th>bound</th><th>HVPs</th>" in page
    assert page.count('<img alt="') == 4  # spectrum, density, blocks, bound
    assert (
        page.index("<h2>Hessian spectrum")
        < page.index("<h2>Per-block")
        < page.index("<h2>Sharpness")
    )

    again = diagnose(model, data, out, config=BLOCKS, resume=True)
    assert again["computed_parts"] == [] and BLOCK_PART in again["reused_parts"]
    assert again[BLOCK_PART] == blocks
    assert (out / "figures" / "block_spectra.png").is_file()
    # Another block setting recomputes that part only; switching blocks off drops the
    # section and the figure but keeps the part for a later resume.
    groups = diagnose(
        model, data, out, config=dataclasses.replace(BLOCKS, blocks="params"), resume=True
    )
    assert groups["computed_parts"] == [BLOCK_PART]
    assert len(groups[BLOCK_PART]["blocks"]) == 6
    off = diagnose(model, data, out, config=dataclasses.replace(BLOCKS, blocks=None), resume=True)
    assert off["computed_parts"] == [] and BLOCK_PART not in off
    assert "Per-block" not in (out / "report.html").read_text()
    assert not (out / "figures" / "block_spectra.png").exists()
    assert (out / "parts" / f"{BLOCK_PART}.json").is_file()
    fresh = diagnose(model, data, out, config=dataclasses.replace(BLOCKS, blocks=None))
    assert BLOCK_PART not in fresh and not (out / "parts" / f"{BLOCK_PART}.json").exists()


def test_blocks_by_mapping_and_config_checks(data, tmp_path):
    config = dataclasses.replace(
        CONFIG,
        landscape_1d=0,
        landscape_2d=0,
        blocks={"hidden": ["1.weight", "1.bias"], "out": "3"},
        block_k=2,
        block_density=False,
    )
    report = diagnose(_model(), data, tmp_path, config=config)
    blocks = report[BLOCK_PART]
    assert [(b["name"], b["num_params"]) for b in blocks["blocks"]] == [("hidden", 36), ("out", 21)]
    assert all(len(b["eigenvalues"]) == 2 and b["density"] is None for b in blocks["blocks"])
    assert report["settings"]["blocks"] == {"hidden": ["1.weight", "1.bias"], "out": "3"}
    # The block H_bb of the output layer is a principal submatrix of the dense Hessian.
    hessian = dense_hessian(measure_objective(_model(), data, CONFIG))
    top = torch.linalg.eigvalsh(hessian[36:, 36:]).flip(0)[:2]
    assert blocks["blocks"][1]["eigenvalues"] == pytest.approx(top.tolist(), rel=1e-3)
    # A mapping in another order is another part (the block order is part of its key).
    swapped = dataclasses.replace(config, blocks={"out": "3", "hidden": ["1.weight", "1.bias"]})
    again = diagnose(_model(), data, tmp_path, config=swapped, resume=True)
    assert again["computed_parts"] == [BLOCK_PART]

    with pytest.raises(ValueError, match="blocks must be None"):
        DiagnoseConfig(blocks="modules")
    with pytest.raises(TypeError, match="non-empty mapping"):
        DiagnoseConfig(blocks={})
    with pytest.raises(TypeError, match="block 'a'"):
        DiagnoseConfig(blocks={"a": [torch.nn.Linear(1, 1)]})
    with pytest.raises(ValueError, match="block_k"):
        DiagnoseConfig(blocks="layers", block_k=0)
    assert DiagnoseConfig().blocks is None and DiagnoseConfig(blocks="groups").quick().blocks


def test_cli_blocks_flag_end_to_end(tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    torch.save(_digits_mlp().state_dict(), checkpoint)
    args = ["diagnose", "--model", "mlp", "--checkpoint", str(checkpoint), "--quick"]
    args += ["--blocks", "layers", "--out", str(tmp_path / "d"), "--quiet", "--threads", "1"]
    assert main(args) == 0
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["settings"]["blocks"] == "layers"
    assert BLOCK_PART in report["computed_parts"]
    assert [b["name"] for b in report[BLOCK_PART]["blocks"]] == ["1", "3", "5"]
    assert (tmp_path / "d" / "figures" / "block_spectra.png").is_file()
    assert "<h2>Per-block spectra</h2>" in (tmp_path / "d" / "report.html").read_text()
    assert main([*args, "--resume"]) == 0
    again = json.loads((tmp_path / "d" / "report.json").read_text())
    assert again["computed_parts"] == [] and BLOCK_PART in again["reused_parts"]
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", "--model", "mlp", "--checkpoint", str(checkpoint), "--blocks", "x"])
    assert exc.value.code == 2
    assert "argument --blocks: invalid choice: 'x'" in capsys.readouterr().err
