"""diagnose's data passes under ``torch.distributed`` (two Gloo processes on the CPU): each
rank evaluates only its shard of the measurement subset and of the train and test sets, and
the objective, the performance part and the top eigenvalues equal one process's to 1e-10
(float64)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import gloo_ranks
from torch import nn

import flatlens.report._diagnose as dg
from flatlens import zoo
from flatlens.data import synthetic_classification
from flatlens.measures._spectrum import hessian_eigenvalues
from flatlens.report._diagnose import DiagnoseConfig, measure_objective

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"
)

WORLD = 2
# 65 measurement examples in batches of 16: shards of 32 and 33, i.e. 2 and 3 batches.
CONFIG = DiagnoseConfig(measure_samples=65, batch_size=16)
TINY = DiagnoseConfig(measure_samples=1, batch_size=16)  # fewer examples than ranks


def _data():
    return synthetic_classification(
        num_train=97, num_features=5, num_classes=3, num_test=49, dtype=torch.float64
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return zoo.mlp(in_features=5, hidden=6, depth=1, num_classes=3).double()


def _sizes(objective) -> list[int]:
    return [n for _, _, n in objective.batches()]


def _measure() -> dict:
    """What diagnose computes from its objectives, plus the local batch sizes seen."""
    model, data = _model(), _data()
    objective = measure_objective(model, data, CONFIG)
    v = torch.linspace(-1, 1, objective.num_params, dtype=torch.float64)
    loss, grad = objective.loss_and_gradient()
    out = {
        "sizes": _sizes(objective),
        "distributed": objective.distributed,
        "cache_graph": objective.cache_graph,
        "loss": loss,
        "gradient": grad,
        "hvp": objective.hvp(v),
        "evaluate": objective.evaluate(),
        "eigenvalues": hessian_eigenvalues(objective, 2, seed=0).eigenvalues.clone(),
        "performance": dg._performance(model, data, CONFIG, nn.CrossEntropyLoss()),
    }
    tiny = measure_objective(model, data, TINY)
    out["tiny"] = {"sizes": _sizes(tiny), "distributed": tiny.distributed, "loss": tiny.loss()}
    return out


def _work(rank: int, tmp: Path) -> dict:
    seen: list[list[int]] = []
    real = dg._objective

    def recording(*args, **kwargs):
        objective = real(*args, **kwargs)
        seen.append(_sizes(objective))
        return objective

    dg._objective = recording
    try:
        result = _measure()
    finally:
        dg._objective = real
    result["performance_sizes"] = seen[1:3]  # measure_objective's call came first
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return gloo_ranks(_work, tmp_path_factory.mktemp("diagnose_ranks"), world=WORLD, timeout_s=60)


def _rel(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_each_rank_evaluates_only_its_shard(ranks):
    assert ranks[0]["sizes"] == [16, 16] and ranks[1]["sizes"] == [16, 16, 1]  # 32 + 33
    # performance: train 97 = 48 + 49, test 49 = 24 + 25
    assert ranks[0]["performance_sizes"] == [[16, 16, 16], [16, 8]]
    assert ranks[1]["performance_sizes"] == [[16, 16, 16, 1], [16, 9]]
    for r in ranks:
        assert r["distributed"] and r["cache_graph"]  # the one-process decision on both


@pytest.fixture(scope="module")
def single() -> dict:
    return _measure()


def test_two_ranks_equal_one_process(ranks, single):
    assert single["sizes"] == [16, 16, 16, 16, 1] and not single["distributed"]
    for r in ranks:
        for key in ("loss", "gradient", "hvp", "eigenvalues"):
            assert _rel(r[key], single[key]) <= 1e-10, key
        assert r["evaluate"].keys() == single["evaluate"].keys() == {"loss", "accuracy"}
        assert r["evaluate"]["accuracy"] == single["evaluate"]["accuracy"]
        assert _rel(r["evaluate"]["loss"], single["evaluate"]["loss"]) <= 1e-10
        perf, want = r["performance"], single["performance"]
        assert perf.keys() == want.keys()
        for key, value in want.items():
            if key.endswith("accuracy"):
                assert perf[key] == value, key
            else:
                assert abs(perf[key] - value) <= 1e-10 * max(abs(value), 1.0), key


def test_a_subset_smaller_than_the_world_is_evaluated_whole_on_every_rank(ranks, single):
    for r in ranks:
        assert r["tiny"]["sizes"] == [1] and not r["tiny"]["distributed"]
        assert r["tiny"]["loss"] == single["tiny"]["loss"]
