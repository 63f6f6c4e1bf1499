"""flatlens.distributed without a process group (the one-process case), and the argument
checks of the distributed options, which need no processes."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from flatlens import GAM, SAM, Objective
from flatlens import distributed as fd
from flatlens.cli._session import cli_session
from flatlens.data import synthetic_classification
from flatlens.landscape import plane, random_direction
from flatlens.train import Trainer


@pytest.mark.parametrize("n", [0, 1, 5, 90, 91])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_cover_every_index_once_in_order(n, world):
    blocks = [fd.shard_range(n, rank_id=r, world=world) for r in range(world)]
    covered = [i for b in blocks for i in range(n)[b]]
    assert covered == list(range(n))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_shard_takes_the_same_block_of_each_tensor():
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    xs, ys = fd.shard(x, y, rank_id=1, world=2)
    assert torch.equal(ys, torch.tensor([2, 3, 4])) and torch.equal(xs, x[2:])
    with pytest.raises(ValueError, match="first dimension"):
        fd.shard(x, y[:3])
    with pytest.raises(ValueError, match="outside a world"):
        fd.shard_range(4, rank_id=2, world=2)


def test_without_a_process_group_every_helper_is_the_one_process_case():
    assert not fd.is_distributed()
    assert (fd.rank(), fd.world_size(), fd.is_main()) == (0, 1, True)
    t = torch.randn(3)
    assert fd.all_reduce_mean([t, None]) == [t, None]
    assert fd.all_gather_tensor(t)[0] is t
    assert fd.all_gather_object({"a": 1}) == [{"a": 1}]
    assert fd.broadcast_object("x") == "x"
    assert fd.shard_range(7) == slice(0, 7)
    x, y = torch.randn(5, 2), torch.arange(5)
    for enabled in (True, False):
        xs, ys, split = fd.local_split(x, y, enabled=enabled)
        assert xs is x and ys is y and split is False
    args = argparse.Namespace(out="o", quiet=False, json=True, device="cpu", resume=True)
    with cli_session(args) as same:
        assert same is args and vars(args)["out"] == "o" and args.json
    assert not hasattr(fd, "cli_session")  # argparse namespaces stay in the command line


def test_init_from_env_does_nothing_outside_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not fd.launched_by_torchrun()
    assert fd.init_from_env() is False
    assert not fd.is_distributed()


def _objective() -> Objective:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    return Objective(model, nn.CrossEntropyLoss(), (x, y))


def test_landscape_distribute_options_are_checked():
    objective = _objective()
    d1, d2 = random_direction(objective, seed=0), random_direction(objective, seed=1)
    with pytest.raises(ValueError, match="distribute must be"):
        plane(objective, d1, d2, num_points=3, distribute="ranks")
    with pytest.raises(ValueError, match="distributed=True"):
        plane(objective, d1, d2, num_points=3, distribute="data")
    with pytest.raises(ValueError, match="no process group is initialized"):
        plane(objective, d1, d2, num_points=3, distribute="points")
    alone = plane(objective, d1, d2, num_points=3)  # "auto": this process alone
    assert "distribute" not in alone.settings


def test_perturbations_and_distributed_training_options_are_checked():
    model = nn.Linear(3, 2)
    for cls in (SAM, GAM):
        with pytest.raises(ValueError, match="perturbations must be"):
            cls(model.parameters(), torch.optim.SGD, lr=0.1, perturbations="global")
        assert cls(model.parameters(), torch.optim.SGD, lr=0.1).perturbations == "per_rank"
    data = synthetic_classification(20, num_features=3, num_classes=2, num_test=8, seed=0)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"initialized torch\.distributed process group"):
        Trainer(model, base, data, distributed=True)
    assert not Trainer(model, base, data).distributed
