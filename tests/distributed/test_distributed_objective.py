"""The Objective under ``torch.distributed`` when ranks would choose differently whether to
cache the first-order graph (an in-memory list on one rank, a re-iterable loader on the
other): the choice is made once for all ranks, so HVPs do not deadlock and equal one
process's to 1e-10 (float64)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import gloo_ranks

from flatlens import Objective, zoo

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"
)


class Reiterable:
    """A re-iterable of batches that is not a list (never cached)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _setup():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(0)
    model = zoo.mlp(in_features=5, hidden=6, depth=1, num_classes=3).double()
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    return model, x, y, v


def _work(rank: int, tmp: Path) -> dict:
    model, x, y, v = _setup()
    mine = [(x[:25], y[:25])] if rank == 0 else Reiterable([(x[25:32], y[25:32]), (x[32:], y[32:])])
    objective = Objective(model, F.cross_entropy, mine)
    return {
        "cache_graph": objective.cache_graph,
        "hvp": objective.hvp(v),
        "gradient": objective.gradient(),
    }


def test_ranks_agree_on_caching_and_match_one_process(tmp_path):
    ranks = gloo_ranks(_work, tmp_path, world=2, timeout_s=60)
    model, x, y, v = _setup()
    single = Objective(model, F.cross_entropy, [(x[:25], y[:25]), (x[25:], y[25:])])
    assert [r["cache_graph"] for r in ranks] == [False, False]
    for r in ranks:
        for key, ref in (("hvp", single.hvp(v)), ("gradient", single.gradient())):
            assert torch.allclose(r[key], ref, rtol=1e-10, atol=1e-12)


def _empty_shard(rank: int, tmp: Path) -> dict:
    model, x, y, v = _setup()
    mine = [(x, y)] if rank == 0 else []
    objective = Objective(model, F.cross_entropy, mine)
    return {"loss": objective.loss(), "hvp": objective.hvp(v)}


def test_an_empty_shard_is_allowed_and_the_sum_is_one_process(tmp_path):
    ranks = gloo_ranks(_empty_shard, tmp_path, world=2, timeout_s=60)
    model, x, y, v = _setup()
    single = Objective(model, F.cross_entropy, (x, y))
    for r in ranks:
        assert abs(r["loss"] - single.loss()) <= 1e-12 * single.loss()
        assert torch.allclose(r["hvp"], single.hvp(v), rtol=1e-10, atol=1e-12)
