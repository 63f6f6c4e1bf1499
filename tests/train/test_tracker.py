"""Flatness tracked during training: warm-started λ_max certified like a cold one, R0/R1
under their budget, λ_c along the optimizer's actual update, costs and logs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ModelSnapshot
from torch import nn

from flatlens import Objective, critical_sharpness, hessian_eigenvalues, preserved
from flatlens.data import synthetic_classification
from flatlens.train import FlatnessTracker, Trainer
from flatlens.train._steps import UpdateProbe

DATA = synthetic_classification(
    96, num_features=6, num_classes=3, num_test=32, seed=1, dtype=torch.float64
)


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _subset():
    return DATA.x_train[:64], DATA.y_train[:64]


def test_a_warm_start_is_certified_like_a_cold_one_and_cheaper():
    model = net()
    tracker = FlatnessTracker(model, nn.CrossEntropyLoss(), _subset(), measures=["lambda_max"])
    first = tracker.measure()
    assert first["cost"]["lambda_max"]["start"] == "gradient"
    with torch.no_grad():  # a small training-like move of the parameters
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4),
                                      dtype=p.dtype))  # fmt: skip
    snapshot = ModelSnapshot.take(model)
    warm = tracker.measure()
    snapshot.assert_unchanged(model)
    obj = Objective(model, nn.CrossEntropyLoss(), [_subset()])
    cold = hessian_eigenvalues(obj, 1, tol=1e-4, seed=0)
    warm_result = hessian_eigenvalues(obj, 1, tol=1e-4, seed=0, start=tracker.eigenvector)
    assert warm["cost"]["lambda_max"]["start"] == "given"
    assert warm_result.start == "given" and bool(warm_result.converged.all())
    bound = float(cold.error_bounds[0] + warm_result.error_bounds[0])
    assert abs(warm["lambda_max"] - cold.value) <= bound + 1e-12
    dense = torch.linalg.eigvalsh(_dense_hessian(model))[-1].item()
    assert abs(warm["lambda_max"] - dense) <= float(warm_result.error_bounds[0]) + 1e-10
    assert warm["cost"]["lambda_max"]["hvps"] < first["cost"]["lambda_max"]["hvps"]
    assert warm["cost"]["lambda_max"]["hvps"] < cold.num_hvps


def test_a_warm_start_from_a_stale_direction_still_finds_the_top_eigenvalue():
    model = net()
    tracker = FlatnessTracker(model, nn.CrossEntropyLoss(), _subset(), measures=["lambda_max"])
    values, vectors = torch.linalg.eigh(_dense_hessian(model))
    # the previous top eigenvector is now (almost exactly) the second one: alone, it lets
    # Lanczos certify the second eigenvalue in 3 products
    stale = vectors[:, -2] + 1e-6 * vectors[:, -1] + 1e-3 * vectors[:, 0]
    obj = Objective(model, nn.CrossEntropyLoss(), [_subset()])
    alone = hessian_eigenvalues(obj, 1, start=stale)
    assert alone.value == pytest.approx(values[-2].item(), rel=1e-6)  # the trap
    tracker.eigenvector = stale
    warm = tracker.measure()
    assert warm["cost"]["lambda_max"]["start"] == "given"
    bound = warm["cost"]["lambda_max"]["converged"]
    assert bound and warm["lambda_max"] == pytest.approx(values[-1].item(), rel=1e-4)


def _dense_hessian(model):
    x, y = _subset()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def risk(flat):
        values = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes, strict=True)}
        out = torch.func.functional_call(model, values, (x,))
        return nn.functional.cross_entropy(out, y)

    return torch.func.hessian(risk)(theta)


def test_a_start_vector_of_the_wrong_size_is_refused():
    obj = Objective(net(), nn.CrossEntropyLoss(), [_subset()])
    with pytest.raises(ValueError, match="flat tensor of num_params"):
        hessian_eigenvalues(obj, 1, start=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="nonzero"):
        hessian_eigenvalues(obj, 1, start=torch.zeros(obj.num_params, dtype=torch.float64))
    with pytest.raises(ValueError, match="start must be"):
        hessian_eigenvalues(obj, 1, start="previous")


def test_r0_and_r1_stay_within_their_budget_and_start_from_the_eigenvector():
    tracker = FlatnessTracker(
        net(), nn.CrossEntropyLoss(), _subset(), measures=["r0", "r1"], measure_budget=12
    )
    values = tracker.measure()
    assert values["r0"] <= values["r1"] * (1 + 1e-6)
    for name in ("r0", "r1"):
        assert values["cost"][name]["hvp_equivalents"] <= 12
    assert "eigen_start" in values["cost"]  # the eigenvector behind their eigen start
    assert tracker.totals["r1"]["count"] == 1


def test_the_critical_sharpness_warm_starts_and_the_state_round_trips():
    model = net()
    tracker = FlatnessTracker(model, nn.CrossEntropyLoss(), _subset())
    obj = Objective(model, nn.CrossEntropyLoss(), [_subset()])
    g = obj.gradient()
    first = tracker.critical(g)
    again = tracker.critical(g)
    direct = critical_sharpness(obj, g)
    assert first["lambda_c"] == pytest.approx(direct.value, rel=1e-12)
    assert again["cost"]["lambda_c"]["forward"] <= 5  # warm: two to bracket, one or two more
    assert again["lambda_c_lower"] <= direct.upper and direct.lower <= again["lambda_c_upper"]
    tracker.measure()
    state = tracker.state_dict()
    other = FlatnessTracker(model, nn.CrossEntropyLoss(), _subset())
    other.load_state_dict(state)
    assert other.eta == tracker.eta and torch.equal(other.eigenvector, tracker.eigenvector)
    assert other.totals["lambda_c"]["count"] == 2


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_update_direction_is_the_step_without_its_learning_rate(momentum):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum, weight_decay=1e-2)
    x, y = _subset()
    probe = UpdateProbe(opt, list(model.parameters()))
    for _ in range(2):
        probe.before()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    direction = probe.direction()
    params = list(model.parameters())
    if momentum:  # the momentum buffer
        expected = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in params])
    else:  # the gradient with weight decay, at the point before the step
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        expected = grads + 1e-2 * probe.point()
    assert torch.allclose(direction, expected, atol=1e-10)


def test_the_trainer_records_measures_within_epochs_costs_and_json_lines(tmp_path):
    model = net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(
        model,
        base,
        DATA,
        batch_size=16,
        measures=("lambda_max",),
        measure_every=1,
        measure_every_steps=4,
        critical_every_steps=2,
        measure_samples=32,
        log_dir=tmp_path,
        log_every=3,
    )
    result = trainer.fit(2)
    steps = [m["step"] for m in result.measurements]
    assert steps == sorted(steps) and steps[0] == 2 and 12 in steps  # 6 steps per epoch
    assert all("lambda_c" in m for m in result.measurements)
    assert [("lambda_max" in m) for m in result.measurements] == [s % 4 == 0 for s in steps]
    assert result.history[-1]["lambda_c"] == result.measurements[-1]["lambda_c"]
    assert result.history[0]["step"] == 6 and result.history[1]["step"] == 12
    costs = result.costs
    assert costs["measures"]["lambda_c"]["count"] == 6
    assert costs["measures"]["lambda_max"]["count"] == 3 + 2  # every 4 steps, every epoch
    assert costs["overhead"] == pytest.approx(costs["measure_seconds"] / costs["train_seconds"])
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("epoch") == 2 and events.count("step") == 4
    assert events.count("measure") == 6 + 2
    assert all("images_per_second" in line for line in lines if line["event"] == "step")
    json.dumps(result.to_dict(), allow_nan=False)


def test_the_critical_sharpness_uses_batch_statistics_and_restores_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.5), nn.Linear(12, 3)
    ).double()
    model.eval()  # running statistics at their initial values: the eval-mode loss is another
    tracker = FlatnessTracker(model, nn.CrossEntropyLoss(), _subset())
    train_mode = Objective(model, nn.CrossEntropyLoss(), [_subset()], eval_mode=False)
    model.train()
    model[3].eval()  # the loss the optimizer descends, without dropout's randomness
    with preserved(model):
        g = train_mode.gradient()
    model.eval()
    snapshot = ModelSnapshot.take(model)
    got = tracker.critical(g)
    snapshot.assert_unchanged(model)  # buffers and modes restored
    model.train()
    model[3].eval()
    with torch.no_grad():
        direct = critical_sharpness(
            Objective(model, nn.CrossEntropyLoss(), [_subset()], eval_mode=False), g
        )
    assert got["lambda_c"] == pytest.approx(direct.value, rel=1e-12)
