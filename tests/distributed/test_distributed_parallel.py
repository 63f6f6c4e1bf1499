"""Two Gloo processes on the CPU, float64: landscapes with the grid split across ranks,
resumable stores written by rank 0 only, SAM/GAM steps under DistributedDataParallel and the
data-parallel trainer, each against the one-process result computed here.

One spawn of two processes runs every check (process start-up dominates the cost); each
test below reads its part of the results.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import gloo_ranks
from torch import nn

from flatlens import GAM, SAM, Objective
from flatlens.cli._main import main
from flatlens.data import synthetic_classification
from flatlens.landscape import load, plane, random_direction
from flatlens.report._diagnose import PARTS
from flatlens.train import TrainConfig, Trainer, train
from flatlens.zoo import mlp

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"
)

WORLD = 2
SHARDS = (slice(0, 37), slice(37, 90))
TIMEOUT_S = 150.0


# ---------------------------------------------------------------------- problems
def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(90, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (90,))
    return model, x, y


def _batches(x, y, size=16):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


class _Stop(Exception):
    """Raised by a callback to interrupt a landscape."""


def _stop_after(calls: int) -> Callable[[int, int], None]:
    seen = [0]

    def callback(done: int, total: int) -> None:
        seen[0] += 1
        if seen[0] >= calls:
            raise _Stop

    return callback


PLANE = {"num_points": (5, 4), "method": "serial"}


def _directions(objective: Objective):
    return random_direction(objective, seed=0), random_direction(objective, seed=1)


# SAM/GAM: SGD with momentum and weight decay, so the update is affine in the direction.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sam": lambda m, **kw: SAM(m.parameters(), torch.optim.SGD, model=m, rho=0.05, **kw, **SGD),
    "gam": lambda m, **kw: GAM(m.parameters(), torch.optim.SGD, model=m, **kw, **SGD),
    "gam_exact": lambda m, **kw: GAM(
        m.parameters(),
        torch.optim.SGD,
        model=m,
        mode="exact",
        rho=0.1,
        perturb_rho=0.05,
        flatness_weight=0.2,
        **kw,
        **SGD,
    ),
}
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
OPT_SHARDS = (slice(0, 12), slice(12, 24))  # equal shards: DDP averages over ranks


def _opt_problem():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(24, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return model, x, y


def _closure(optimizer, model, x, y):
    def closure(create_graph: bool = False):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def _run_steps(name: str, model: nn.Module, x, y, steps: int, **kw) -> np.ndarray:
    optimizer = OPTIMIZERS[name](model, **kw)
    for _ in range(steps):
        optimizer.step(_closure(optimizer, model, x, y))
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return _flat(inner)


TRAIN_DATA = dict(
    num_train=96, num_features=6, num_classes=3, num_test=48, seed=1, dtype=torch.float64
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _trainer(name: str, model: nn.Module, data, **kw) -> Trainer:
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if name == "sam":
        optimizer = SAM(
            model.parameters(), base, rho=0.05, model=model, perturbations="synchronized"
        )
    elif name == "gam":
        optimizer = GAM(model.parameters(), base, model=model, perturbations="synchronized")
    else:
        optimizer = base
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=3)
    # 96 samples in batches of 25: shares of 12/13 and, last, 10/11 (uneven on purpose).
    return Trainer(
        model,
        optimizer,
        data,
        batch_size=25,
        scheduler=scheduler,
        seed=3,
        measure_every=2,
        measure_samples=40,
        measure_steps=3,
        trace_probes=3,
        eval_batch_size=16,
        **kw,
    )


def _history(result) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


# ---------------------------------------------------------------------- the ranks
def _landscape_checks(rank: int, tmp: Path) -> dict:
    import flatlens.landscape._evaluate as ev

    saves = []
    real_save = ev.save

    def counting_save(*args, **kwargs):
        saves.append(rank)
        return real_save(*args, **kwargs)

    ev.save = counting_save
    try:
        model, x, y = _problem()
        full = Objective(model, nn.CrossEntropyLoss(), _batches(x, y))
        sharded = Objective(
            model, nn.CrossEntropyLoss(), _batches(x[SHARDS[rank]], y[SHARDS[rank]])
        )
        d1, d2 = _directions(full)
        out: dict = {}
        for method in ("serial", "vmap"):
            ls = plane(
                full, d1, d2, num_points=(5, 4), method=method, chunk_size=3, distribute="points"
            )
            out[f"points_{method}"] = {m: v.copy() for m, v in ls.values.items()}
        out["points_settings"] = {
            k: ls.settings[k] for k in ("distribute", "world_size", "method", "chunk_size")
        }
        for mode, objective in (("points", full), ("data", sharded)):
            store = tmp / f"{mode}_store"
            kwargs = {**PLANE, "chunk_size": 2, "distribute": mode, "save_interval_s": 0.0}
            try:
                plane(objective, d1, d2, store=store, callback=_stop_after(2), **kwargs)
            except _Stop:
                pass
            resumed = plane(objective, d1, d2, store=store, **kwargs)
            straight = plane(objective, d1, d2, **kwargs)
            out[f"{mode}_resume"] = {
                "equal": resumed.equals(straight),
                "evaluated": resumed.num_evaluated,
                "size": int(np.prod(resumed.shape)),
                "loss": resumed.values["loss"].copy(),
                "stored_equal": rank != 0 or load(store).equals(resumed),
            }
        try:
            plane(sharded, d1, d2, num_points=(3, 3), distribute="points")
            out["points_guard"] = None
        except ValueError as err:
            out["points_guard"] = str(err)
        out["saves"] = len(saves)
        return out
    finally:
        ev.save = real_save


def _optimizer_checks(rank: int) -> dict:
    model, x, y = _opt_problem()
    xs, ys = x[OPT_SHARDS[rank]], y[OPT_SHARDS[rank]]
    out = {}
    for name in OPTIMIZERS:
        for perturbations, steps in (("synchronized", 2), ("per_rank", 1)):
            ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
            out[f"{name}/{perturbations}"] = _run_steps(
                name, ddp, xs, ys, steps, perturbations=perturbations
            )
    return out


def _trainer_checks(rank: int, tmp: Path) -> dict:
    import flatlens.train._persist as tr  # where the trainer writes its checkpoints

    writes = []
    real = tr.save_training_checkpoint

    def counting(*args, **kwargs):
        writes.append(rank)
        return real(*args, **kwargs)

    tr.save_training_checkpoint = counting
    try:
        data = synthetic_classification(**TRAIN_DATA)
        out = {}
        for name in ("sgd", "sam", "gam"):
            model = _net()
            result = _trainer(name, model, data, checkpoint_dir=tmp / f"ckpt_{name}").fit(2)
            out[name] = {"history": _history(result), "theta": _flat(model)}
            out[name]["world_size"] = result.settings.get("world_size")
        config = TrainConfig(
            model="mlp",
            model_kwargs={"hidden": 8, "depth": 1},
            optimizer="sam",
            epochs=1,
            batch_size=24,
            scheduler="none",  # a cosine schedule's length would change with the epochs
            dtype="float64",
            checkpoint_dir=str(tmp / "resume"),
        )
        train(config, data)
        config.epochs = 2
        resumed = train(config, data)
        config.checkpoint_dir = None
        straight = train(config, data)
        out["resume_equal"] = _history(resumed) == _history(straight) and np.array_equal(
            _flat(resumed.model), _flat(straight.model)
        )
        out["checkpoint_writes"] = len(writes)
        return out
    finally:
        tr.save_training_checkpoint = real


DIAGNOSE = ["diagnose", "--model", "mlp", "--quick", "--samples", "64", "--json"]


def _cli_checks(rank: int, tmp: Path) -> dict:
    """``flatlens diagnose`` twice (the second with ``--resume``) in the ranks' process group,
    as under ``torchrun``; both ranks pass the same ``--out``."""
    out = {}
    for name, extra in (("first", []), ("resumed", ["--resume"])):
        args = [*DIAGNOSE, "--checkpoint", str(tmp / "model.pt"), "--out", str(tmp / "cli")]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main([*args, *extra])
        text = printed.getvalue()
        out[name] = {"code": code, "report": json.loads(text) if text else None}
    return out


def _work(rank: int, folder: Path) -> dict:
    return {
        "landscape": _landscape_checks(rank, folder),
        "optim": _optimizer_checks(rank),
        "trainer": _trainer_checks(rank, folder),
        "cli": _cli_checks(rank, folder),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(0)
    torch.save(mlp().double().state_dict(), tmp / "model.pt")
    return gloo_ranks(_work, tmp, world=WORLD, timeout_s=TIMEOUT_S)


def _close(a, b, rtol=1e-8) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-12)
    assert float(np.max(np.abs(a - b))) / scale <= rtol, (a, b)


# ---------------------------------------------------------------------- landscapes
def test_points_split_across_ranks_give_the_one_process_plane(ranks):
    model, x, y = _problem()
    single = Objective(model, nn.CrossEntropyLoss(), _batches(x, y))
    d1, d2 = _directions(single)
    for method in ("serial", "vmap"):
        ref = plane(single, d1, d2, num_points=(5, 4), method=method, chunk_size=3)
        for r in range(WORLD):
            got = ranks[r]["landscape"][f"points_{method}"]
            for metric, values in ref.values.items():
                if method == "serial":  # each point's value does not depend on its chunk
                    np.testing.assert_array_equal(got[metric], values)
                else:
                    _close(got[metric], values, rtol=1e-10)
    assert ranks[0]["landscape"]["points_settings"] == {
        "distribute": "points",
        "world_size": 2,
        "method": "vmap",
        "chunk_size": 3,
    }


@pytest.mark.parametrize("mode", ["points", "data"])
def test_interrupted_landscape_resumes_from_rank_0s_store(ranks, mode):
    model, x, y = _problem()
    single = Objective(model, nn.CrossEntropyLoss(), _batches(x, y))
    ref = plane(single, *_directions(single), **PLANE)
    for r in range(WORLD):
        part = ranks[r]["landscape"][f"{mode}_resume"]
        assert part["equal"] and part["stored_equal"]
        assert 0 < part["evaluated"] < part["size"] - 1  # the resumed call skipped points
        _close(part["loss"], ref.values["loss"], rtol=1e-8)


def test_only_rank_0_writes_the_store(ranks):
    assert ranks[0]["landscape"]["saves"] > 0
    assert ranks[1]["landscape"]["saves"] == 0


def test_points_mode_refuses_ranks_holding_shards(ranks):
    for r in range(WORLD):
        message = ranks[r]["landscape"]["points_guard"]
        assert message is not None and "whole data set on every rank" in message


# ---------------------------------------------------------------------- SAM / GAM
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_synchronized_perturbations_equal_one_process_on_the_union_batch(ranks, name):
    model, x, y = _opt_problem()
    ref = _run_steps(name, copy.deepcopy(model), x, y, 2)
    for r in range(WORLD):
        _close(ranks[r]["optim"][f"{name}/synchronized"], ref)
    assert not np.allclose(ref, _flat(model))  # the steps moved the weights


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_per_rank_perturbations_average_the_per_rank_updates(ranks, name):
    model, x, y = _opt_problem()
    updates = [_run_steps(name, copy.deepcopy(model), x[s], y[s], 1) for s in OPT_SHARDS]
    expected = np.mean(updates, axis=0)
    for r in range(WORLD):
        _close(ranks[r]["optim"][f"{name}/per_rank"], expected)
    # and it is not the synchronized (union-batch) step
    union = _run_steps(name, copy.deepcopy(model), x, y, 1)
    assert np.max(np.abs(union - expected)) > 1e-6


# ---------------------------------------------------------------------- trainer
@pytest.mark.parametrize("name", ["sgd", "sam", "gam"])
def test_data_parallel_trainer_equals_one_process(ranks, name):
    data = synthetic_classification(**TRAIN_DATA)
    model = _net()
    ref = _trainer(name, model, data).fit(2)
    ref_history = _history(ref)
    assert ref_history[1]["r1"] is not None  # the measures ran
    for r in range(WORLD):
        got = ranks[r]["trainer"][name]
        assert got["world_size"] == WORLD
        assert len(got["history"]) == len(ref_history)
        for row, want in zip(got["history"], ref_history, strict=True):
            assert set(row) == set(want)
            for key, value in want.items():
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    assert row[key] is None or math.isnan(row[key]), key
                else:
                    _close(row[key], value)
        _close(got["theta"], _flat(model))


def test_trainer_checkpoints_from_rank_0_and_resumes_exactly(ranks):
    assert ranks[0]["trainer"]["checkpoint_writes"] > 0
    assert ranks[1]["trainer"]["checkpoint_writes"] == 0
    for r in range(WORLD):
        assert ranks[r]["trainer"]["resume_equal"]


# ---------------------------------------------------------------------- the command
def test_command_prints_on_rank_0_and_resumes_from_its_parts(ranks):
    first, resumed = ranks[0]["cli"]["first"], ranks[0]["cli"]["resumed"]
    assert first["code"] == resumed["code"] == 0
    assert first["report"]["computed_parts"] == list(PARTS)
    # rank 1 had no --out files of its own: rank 0 sent them, so it reused the same parts
    assert resumed["report"]["reused_parts"] == list(PARTS)
    assert resumed["report"]["computed_parts"] == []
    assert resumed["report"]["summary"] == first["report"]["summary"]
    for run in ("first", "resumed"):
        assert ranks[1]["cli"][run] == {"code": 0, "report": None}  # quiet on rank 1
