"""flatlens.Objective against dense float64 references (torch.func.hessian, closed forms)."""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch
from helpers import (
    ModelSnapshot,
    OneShot,
    ReIterable,
    bn_cnn,
    classification_data,
    dense_reference,
    image_data,
    logistic_data,
    logistic_hessian,
    logistic_regression,
    objective_reference,
    rel_err,
    tiny_mlp,
    uneven_batches,
    with_unused,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatlens import DataChangedError, NonFiniteLossError, Objective

TOL64 = 1e-10
METHODS = ["double_backward", "forward_over_reverse"]
SIZES = [5, 5, 5, 5, 3]  # N = 23, uneven last batch


def make_data(kind: str, x: torch.Tensor, y: torch.Tensor):
    """The same 23 samples as one batch, a list of uneven batches, or a DataLoader."""
    if kind == "single":
        return (x, y)
    if kind == "list":
        return uneven_batches(x, y, SIZES)
    if kind == "loader":
        return DataLoader(TensorDataset(x, y), batch_size=5)
    if kind == "shuffled_loader":
        gen = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=gen)
    if kind == "reiterable":
        return ReIterable(lambda _: uneven_batches(x, y, [7, 7, 7, 2]))
    raise AssertionError(kind)


@functools.cache
def mlp_reference():
    model = tiny_mlp()
    x, y = classification_data()
    return model, x, y, dense_reference(model, F.cross_entropy, (x, y))


def probe_vectors(n: int, count: int = 3, seed: int = 0) -> torch.Tensor:
    """A few random directions plus one coordinate direction, as rows."""
    gen = torch.Generator().manual_seed(seed)
    vs = torch.randn(count, n, generator=gen, dtype=torch.float64)
    e = torch.zeros(1, n, dtype=torch.float64)
    e[0, n // 2] = 1.0
    return torch.cat([vs, e])


def assert_matches(obj: Objective, ref, tol: float = TOL64, at=None) -> None:
    assert abs(obj.loss(at=at) - ref.loss) <= tol * abs(ref.loss)
    assert rel_err(obj.gradient(at=at), ref.gradient) <= tol
    value, grad = obj.loss_and_gradient(at=at)
    assert abs(value - ref.loss) <= tol * abs(ref.loss)
    assert rel_err(grad, ref.gradient) <= tol
    for v in probe_vectors(obj.num_params):
        v = v.to(obj.dtype)
        hv = obj.hvp(v, at=at)
        assert hv.shape == (obj.num_params,) and hv.dtype == obj.dtype
        assert rel_err(hv, ref.hessian @ v.double()) <= tol


def hessian_from_hvps(obj: Objective, at=None) -> torch.Tensor:
    eye = torch.eye(obj.num_params, dtype=obj.dtype)
    return torch.stack([obj.hvp(e, at=at) for e in eye], dim=1).double()


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("cache", [None, True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["single", "list", "loader", "shuffled_loader", "reiterable"])
def test_loss_gradient_hvp_match_dense(kind, method, cache):
    model, x, y, ref = mlp_reference()
    snap = ModelSnapshot.take(model)
    obj = Objective(
        model, F.cross_entropy, make_data(kind, x, y), hvp_method=method, cache_graph=cache
    )
    assert obj.num_params == 4 * 5 + 5 + 5 * 3 + 3
    assert torch.equal(obj.theta, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert_matches(obj, ref)
    assert obj.num_samples == 23
    snap.assert_unchanged(model)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["single", "list"])
def test_full_hessian_matches_dense(kind, method):
    model, x, y, ref = mlp_reference()
    obj = Objective(model, F.cross_entropy, make_data(kind, x, y), hvp_method=method)
    hess = hessian_from_hvps(obj)
    assert rel_err(hess, ref.hessian) <= TOL64
    assert rel_err(hess, hess.T) <= TOL64


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_logistic_regression_closed_form(method, cache):
    model = logistic_regression()
    x, y = logistic_data()
    closed = logistic_hessian(model, x)
    # The dense reference itself agrees with the closed form.
    ref = dense_reference(model, F.binary_cross_entropy_with_logits, (x, y))
    assert rel_err(ref.hessian, closed) <= 1e-12
    p = torch.sigmoid(model(x)).detach()
    closed_grad = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).T @ (p - y) / len(x)
    data = uneven_batches(x, y, [16, 16, 8])
    obj = Objective(model, nn.BCEWithLogitsLoss(), data, hvp_method=method, cache_graph=cache)
    assert rel_err(obj.gradient(), closed_grad.reshape(-1)) <= TOL64
    assert rel_err(hessian_from_hvps(obj), closed) <= TOL64


def test_uneven_batches_are_weighted_by_size_not_uniformly():
    """The peers' bug: averaging per-batch means uniformly. Make it visible, then absent."""
    model, x, y, ref = mlp_reference()
    batches = uneven_batches(x, y, [20, 3])
    uniform = float(np.mean([F.cross_entropy(model(b[0]), b[1]).item() for b in batches]))
    assert abs(uniform - ref.loss) > 1e-3  # the test data can tell the difference
    obj = Objective(model, F.cross_entropy, batches)
    assert abs(obj.loss() - ref.loss) <= TOL64 * ref.loss


def test_sum_reduction_inferred_and_explicit():
    model, x, y, _ = mlp_reference()
    ref = dense_reference(model, nn.CrossEntropyLoss(reduction="sum"), (x, y))
    data = uneven_batches(x, y, SIZES)
    inferred = Objective(model, nn.CrossEntropyLoss(reduction="sum"), data)
    assert inferred.reduction == "sum"
    assert_matches(inferred, ref)

    def summed(out, target):
        return F.cross_entropy(out, target, reduction="sum")

    for method in METHODS:
        explicit = Objective(model, summed, data, reduction="sum", hvp_method=method)
        assert_matches(explicit, ref)
    mean = Objective(model, F.cross_entropy, data)
    assert abs(inferred.loss() - 23 * mean.loss()) <= TOL64 * inferred.loss()
    with pytest.raises(ValueError, match="reduction"):
        Objective(model, F.cross_entropy, data, reduction="none")


def test_at_evaluates_elsewhere_and_cache_follows_the_point():
    model, x, y, ref = mlp_reference()
    obj = Objective(model, F.cross_entropy, (x, y), cache_graph=True)
    gen = torch.Generator().manual_seed(3)
    at = obj.theta + 0.3 * torch.randn(obj.num_params, generator=gen, dtype=torch.float64)
    ref_at = dense_reference(model, F.cross_entropy, (x, y), at=at)
    assert rel_err(ref_at.hessian, ref.hessian) > 1e-3  # the two points really differ
    assert_matches(obj, ref)
    assert_matches(obj, ref_at, at=at)
    assert_matches(obj, ref)  # a stale cached graph would give H(at) here


def test_model_updated_in_place_between_calls():
    """An optimizer step between calls must be seen (no stale cache, no stale theta)."""
    model = tiny_mlp()
    x, y = classification_data()
    obj = Objective(model, F.cross_entropy, (x, y))
    obj.hvp(obj.zeros() + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert_matches(obj, dense_reference(model, F.cross_entropy, (x, y)))


def test_counts():
    model, x, y, _ = mlp_reference()
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, SIZES))
    obj.loss()
    obj.gradient()
    obj.hvp(obj.zeros())
    obj.hvp(obj.zeros())
    obj.loss_and_gradient()
    # A zero vector's product is not checked against differences: no difference gradients.
    assert obj.counts == {"loss": 1, "gradient": 2, "hvp": 2, "difference_gradients": 0}


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.HuberLoss(delta=0.5)], ids=["mse", "huber"])
def test_regression_losses_with_the_default_hvp(loss_fn):
    model = tiny_mlp(num_classes=2)
    x, _ = classification_data()
    y = torch.randn(23, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = dense_reference(model, loss_fn, (x, y))
    obj = Objective(model, loss_fn, uneven_batches(x, y, SIZES))
    assert_matches(obj, ref)


# ---------------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["single", "list"])
def test_batchnorm_cnn_uses_running_stats_and_restores_mode(kind, method):
    model = bn_cnn()
    model.train()
    model[4].eval()  # a mixed set of flags must come back exactly
    x, y = image_data()
    snap = ModelSnapshot.take(model)
    ref = dense_reference(model, F.cross_entropy, (x, y))
    with torch.no_grad():
        evaluated = F.cross_entropy(copy.deepcopy(model).eval()(x), y).item()
        batch_stats = F.cross_entropy(copy.deepcopy(model).train()(x), y).item()
    assert abs(ref.loss - evaluated) <= 1e-12 * evaluated
    assert abs(evaluated - batch_stats) > 1e-3  # running statistics differ from batch ones
    data = (x, y) if kind == "single" else uneven_batches(x, y, [5, 5, 3])
    obj = Objective(model, F.cross_entropy, data, hvp_method=method)
    assert_matches(obj, ref)
    assert rel_err(hessian_from_hvps(obj), ref.hessian) <= TOL64
    snap.assert_unchanged(model)
    assert model.training and not model[4].training


def test_batchnorm_train_mode_uses_batch_stats_and_leaves_running_stats():
    model = bn_cnn()
    model.train()  # eval_mode=False evaluates in the model's own (here: train) mode
    x, y = image_data()
    batches = uneven_batches(x, y, [5, 5, 3])
    snap = ModelSnapshot.take(model)
    # Train-mode BatchNorm normalizes each batch by its own statistics, so the reference is
    # the size-weighted mean of per-batch train-mode losses.
    expected = 0.0
    for bx, by in batches:
        expected += len(by) * F.cross_entropy(copy.deepcopy(model).train()(bx), by).item()
    expected /= 13
    obj = Objective(model, F.cross_entropy, batches, eval_mode=False)
    assert abs(obj.loss() - expected) <= TOL64 * expected
    obj.gradient()
    obj.hvp(obj.zeros() + 1)
    snap.assert_unchanged(model)  # running_mean/var/num_batches_tracked untouched
    assert model.training


# ---------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_unused_parameter_gets_zero_gradient_and_hvp(method, cache):
    model = with_unused()
    x, y = classification_data()
    obj = Objective(
        model, F.cross_entropy, uneven_batches(x, y, SIZES), hvp_method=method, cache_graph=cache
    )
    names = obj.space.names
    assert names[-2:] == ("unused.weight", "unused.bias")
    ref = dense_reference(model, F.cross_entropy, (x, y), names)
    unused = slice(obj.num_params - 6, obj.num_params)
    assert torch.count_nonzero(ref.hessian[unused]) == 0  # reference: zero rows
    grad = obj.gradient()
    assert torch.count_nonzero(grad[unused]) == 0
    assert rel_err(grad, ref.gradient) <= TOL64
    for v in probe_vectors(obj.num_params):
        v[unused] = 1.0  # the unused coordinates must not contribute either
        hv = obj.hvp(v)
        assert torch.count_nonzero(hv[unused]) == 0
        assert rel_err(hv, ref.hessian @ v) <= TOL64


def test_only_unused_parameters_selected():
    model = with_unused()
    x, y = classification_data()
    obj = Objective(model, F.cross_entropy, (x, y), params="unused")
    assert obj.num_params == 6
    assert torch.count_nonzero(obj.gradient()) == 0
    assert torch.count_nonzero(obj.hvp(obj.zeros() + 1)) == 0


@pytest.mark.parametrize(
    "which",
    ["name", "prefix", "module", "tensor", "list"],
)
def test_params_selection_gives_the_sub_block(which):
    model, x, y, ref = mlp_reference()
    spec = {
        "name": "2.weight",
        "prefix": "2",
        "module": model[2],
        "tensor": model[2].weight,
        "list": [model[2].bias, "0.weight"],
    }[which]
    full = Objective(model, F.cross_entropy, (x, y))
    idx = torch.cat(
        [
            torch.arange(full.num_params)[sl]
            for name, sl, _ in full.space.segments()
            if name
            in {
                "name": ["2.weight"],
                "prefix": ["2.weight", "2.bias"],
                "module": ["2.weight", "2.bias"],
                "tensor": ["2.weight"],
                "list": ["0.weight", "2.bias"],
            }[which]
        ]
    )
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, SIZES), params=spec)
    assert obj.num_params == idx.numel()
    assert rel_err(obj.gradient(), ref.gradient[idx]) <= TOL64
    assert rel_err(hessian_from_hvps(obj), ref.hessian[idx][:, idx]) <= TOL64
    assert torch.equal(obj.theta, full.theta[idx])


class TiedMLP(nn.Module):
    """Two layers sharing one weight: the flat vector holds it once, both uses count."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.c = nn.Linear(4, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_tied_weights(method, cache):
    torch.manual_seed(0)
    model = TiedMLP().double()
    x, y = classification_data()
    obj = Objective(
        model, F.cross_entropy, uneven_batches(x, y, SIZES), hvp_method=method, cache_graph=cache
    )
    assert obj.space.names == ("a.weight", "a.bias", "b.bias", "c.weight", "c.bias")
    assert_matches(obj, dense_reference(model, F.cross_entropy, (x, y), obj.space.names))


class ScaledLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) / self.temperature


def test_scalar_parameter():
    torch.manual_seed(0)
    model = ScaledLinear().double()
    x, y = classification_data()
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, SIZES))
    assert obj.num_params == 16
    assert_matches(obj, dense_reference(model, F.cross_entropy, (x, y), obj.space.names))


def test_frozen_parameters_are_left_out_and_stay_frozen():
    model = tiny_mlp()
    model[0].weight.requires_grad_(False)
    x, y = classification_data()
    snap = ModelSnapshot.take(model)
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, SIZES))
    assert obj.space.names == ("0.bias", "2.weight", "2.bias")
    ref = dense_reference(model, F.cross_entropy, (x, y), obj.space.names)
    assert_matches(obj, ref)
    snap.assert_unchanged(model)


# ---------------------------------------------------------------------------------- float32
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["single", "list"])
def test_float32(kind, method):
    model = tiny_mlp(dtype=torch.float32)
    x, y = classification_data(dtype=torch.float32)
    ref = dense_reference(model, F.cross_entropy, (x, y))
    obj = Objective(model, F.cross_entropy, make_data(kind, x, y), hvp_method=method)
    assert obj.dtype == torch.float32
    assert obj.gradient().dtype == torch.float32
    assert_matches(obj, ref, tol=1e-5)
    # float64 inputs are cast to the model's dtype rather than failing
    obj64 = Objective(model, F.cross_entropy, (x.double(), y))
    assert abs(obj64.loss() - ref.loss) <= 1e-5 * ref.loss


# ---------------------------------------------------------------------------------- hypothesis
@functools.cache
def hypothesis_objective() -> Objective:
    model, x, y, _ = mlp_reference()
    return Objective(model, F.cross_entropy, uneven_batches(x, y, SIZES))


@given(
    seed=st.integers(0, 2**16),
    a=st.floats(-3, 3, allow_nan=False),
    b=st.floats(-3, 3, allow_nan=False),
)
def test_hvp_is_symmetric_and_linear(seed, a, b):
    obj = hypothesis_objective()
    gen = torch.Generator().manual_seed(seed)
    u, v = torch.randn(2, obj.num_params, generator=gen, dtype=torch.float64)
    hu, hv = obj.hvp(u), obj.hvp(v)
    scale = float(u.norm() * v.norm() * (hu.norm() / u.norm()))
    assert abs(float(u @ hv) - float(v @ hu)) <= 1e-12 * scale
    combo = obj.hvp(a * u + b * v)
    expected = a * hu + b * hv
    assert float((combo - expected).norm()) <= 1e-12 * (abs(a) + abs(b) + 1) * float(
        hu.norm() + hv.norm()
    )


# ---------------------------------------------------------------------------------- state safety
def test_model_unchanged_after_every_call():
    model = bn_cnn()
    model.train()
    model[1].eval()
    x, y = image_data()
    F.cross_entropy(model(x), y).backward()  # a .grad the objective must not touch
    model[1].running_mean.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    snap = ModelSnapshot.take(model)
    for method in METHODS:
        for cache in (True, False):
            for eval_mode in (True, False):
                obj = Objective(
                    model,
                    F.cross_entropy,
                    uneven_batches(x, y, [6, 7]),
                    hvp_method=method,
                    cache_graph=cache,
                    eval_mode=eval_mode,
                )
                obj.loss()
                snap.assert_unchanged(model)
                obj.gradient()
                snap.assert_unchanged(model)
                obj.loss_and_gradient()
                obj.hvp(obj.zeros() + 1)
                snap.assert_unchanged(model)
                obj.hvp(obj.zeros() + 1, at=obj.theta * 2)
                obj.as_linear_operator().matvec(np.ones(obj.num_params))
                snap.assert_unchanged(model)


class Boom(Exception):
    pass


class ArmedLoss:
    """Cross-entropy that raises ``exc`` from the 2nd batch of a pass on, once armed."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.armed = False
        self.calls = 0

    def __call__(self, out, target):
        if self.armed:
            self.calls += 1
            if self.calls >= 2:
                raise self.exc
        return F.cross_entropy(out, target)


@pytest.mark.parametrize("exc", [Boom("loss failed"), KeyboardInterrupt()])
@pytest.mark.parametrize(
    ("call", "method", "cache"),
    [
        ("loss", "double_backward", False),
        ("gradient", "double_backward", False),
        ("gradient", "double_backward", True),
        ("hvp", "double_backward", False),
        ("hvp", "forward_over_reverse", False),
        ("hvp", "double_backward", True),
    ],
)
def test_model_unchanged_after_a_call_that_raises_midway(exc, call, method, cache):
    model = bn_cnn()
    model.train()
    model[4].eval()
    x, y = image_data()
    batches = uneven_batches(x, y, [5, 5, 3])
    ref = dense_reference(model, F.cross_entropy, (x, y))
    snap = ModelSnapshot.take(model)
    loss_fn = ArmedLoss(exc)
    obj = Objective(model, loss_fn, batches, hvp_method=method, cache_graph=cache)
    obj.loss()  # the determinism check passes first
    loss_fn.armed = True
    v = obj.zeros() + 1
    with pytest.raises(type(exc)):
        {"loss": obj.loss, "gradient": obj.gradient, "hvp": lambda: obj.hvp(v)}[call]()
    snap.assert_unchanged(model)
    assert model.training and model[1].training and not model[4].training
    loss_fn.armed = False  # the objective is still usable and correct afterwards
    assert_matches(obj, ref)
    snap.assert_unchanged(model)


# ---------------------------------------------------------------------------------- determinism
def test_data_that_changes_between_passes_is_detected():
    model = tiny_mlp()

    def fresh(pass_index):
        x, y = classification_data(seed=100 + pass_index)
        return uneven_batches(x, y, SIZES)

    obj = Objective(model, F.cross_entropy, ReIterable(fresh))
    with pytest.raises(DataChangedError, match="check_determinism=False"):
        obj.loss()
    assert issubclass(DataChangedError, ValueError)
    # Asked not to check, it evaluates (whatever the data is this pass).
    Objective(model, F.cross_entropy, ReIterable(fresh), check_determinism=False).loss()


def test_data_change_is_reported_on_every_call():
    def fresh(pass_index):
        return [classification_data(seed=100 + pass_index)]

    obj = Objective(tiny_mlp(), F.cross_entropy, ReIterable(fresh))
    for _ in range(2):
        with pytest.raises(DataChangedError):
            obj.loss()


@pytest.mark.parametrize("call", ["loss", "gradient", "hvp"])
def test_dropout_in_train_mode_is_detected(call):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x, y = classification_data()
    snap = ModelSnapshot.take(model)
    obj = Objective(model, F.cross_entropy, (x, y), eval_mode=False)
    run = {"loss": obj.loss, "gradient": obj.gradient, "hvp": lambda: obj.hvp(obj.zeros())}
    with pytest.raises(DataChangedError, match="dropout"):
        run[call]()
    assert obj._graph is None  # a graph built by the failed check is not kept
    snap.assert_unchanged(model)
    # In eval mode dropout is off and the objective is exact.
    obj = Objective(model, F.cross_entropy, (x, y))
    assert_matches(obj, dense_reference(model, F.cross_entropy, (x, y)))


@pytest.mark.parametrize("call", ["gradient", "hvp"])
def test_the_check_reuses_the_forward_pass_of_the_cached_graph(call):
    model = tiny_mlp()
    x, y = classification_data()
    passes = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    # check_hvp=False: the check of the first product runs passes of its own.
    obj = Objective(model, F.cross_entropy, (x, y), check_hvp=False)
    assert obj.cache_graph is None  # decided by the first second-order call
    run = {"gradient": obj.gradient, "hvp": lambda: obj.hvp(obj.zeros() + 1)}[call]
    run()
    assert obj.cache_graph is True and obj.estimated_graph_bytes > 0
    assert len(passes) == 2  # the graph's forward and one more, not two more
    run()
    assert len(passes) == 2
    hook.remove()
    assert_matches(obj, dense_reference(model, F.cross_entropy, (x, y)))


def test_the_first_loss_is_the_checks_second_pass():
    model = tiny_mlp()
    x, y = classification_data()
    passes = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, SIZES))
    first = obj.loss()
    assert len(passes) == 2 * len(SIZES)  # two passes over five batches, not three
    assert obj.counts["loss"] == 1
    assert obj.loss() == first and len(passes) == 3 * len(SIZES)
    hook.remove()


def test_the_check_runs_at_the_point_asked_for():
    # The model's own parameters are NaN; every call at a good point works and is exact.
    model = tiny_mlp()
    x, y = classification_data()
    good = Objective(model, F.cross_entropy, (x, y))
    point, ref_loss = good.theta.clone(), good.loss()
    v = good.zeros() + 1
    ref_hvp = good.hvp(v)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    for call in ("loss", "evaluate", "gradient", "hvp"):
        obj = Objective(model, F.cross_entropy, (x, y))
        run = {
            "loss": lambda o: o.loss(at=point),
            "evaluate": lambda o: o.evaluate(at=point)["loss"],
            "gradient": lambda o: o.gradient(at=point),
            "hvp": lambda o: o.hvp(v, at=point),
        }[call]
        out = run(obj)
        if call in ("loss", "evaluate"):
            assert out == ref_loss
        elif call == "hvp":
            assert torch.equal(out, ref_hvp)
    with pytest.raises(NonFiniteLossError, match="weights are not finite"):
        Objective(model, F.cross_entropy, (x, y)).loss()


# ---------------------------------------------------------------------------------- errors
def squared_error(out, target):
    return ((out - target) ** 2).mean()


def regression_batches(bad_batch: int, value: float):
    x, _ = classification_data()
    y = torch.zeros(23, 1, dtype=torch.float64)
    batches = uneven_batches(x, y, SIZES)
    batches[bad_batch][1][0, 0] = value
    return batches


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("bad", "value"), [(1, float("nan")), (4, float("inf"))])
def test_non_finite_loss_names_the_batch(bad, value, method, cache):
    model = tiny_mlp(num_classes=1)
    snap = ModelSnapshot.take(model)
    kw = {"hvp_method": method, "cache_graph": cache}
    obj = Objective(model, squared_error, regression_batches(bad, value), **kw)
    with pytest.raises(NonFiniteLossError, match=f"batch {bad}"):
        obj.loss()
    obj = Objective(
        model, squared_error, regression_batches(bad, value), check_determinism=False, **kw
    )
    for call in (obj.loss, obj.gradient, lambda: obj.hvp(obj.zeros() + 1)):
        with pytest.raises(NonFiniteLossError, match=f"batch {bad}"):
            call()
    snap.assert_unchanged(model)


def test_non_finite_loss_in_a_dataloader_names_the_batch():
    x, _ = classification_data()
    y = torch.zeros(23, 1, dtype=torch.float64)
    y[21, 0] = float("nan")  # in the last, short batch
    obj = Objective(tiny_mlp(num_classes=1), squared_error, DataLoader(TensorDataset(x, y), 5))
    with pytest.raises(NonFiniteLossError, match="batch 4"):
        obj.loss()


def test_empty_data():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="empty"):
        Objective(model, F.cross_entropy, [])
    x, y = classification_data()
    empty_loader = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        Objective(model, F.cross_entropy, empty_loader).loss()


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("call", ["loss", "gradient", "hvp"])
def test_empty_data_without_determinism_check(call, cache):
    model = tiny_mlp()
    x, y = classification_data()
    obj = Objective(
        model, F.cross_entropy, [(x[:0], y[:0])], check_determinism=False, cache_graph=cache
    )
    run = {"loss": obj.loss, "gradient": obj.gradient, "hvp": lambda: obj.hvp(obj.zeros())}
    with pytest.raises(ValueError, match="empty"):
        run[call]()


def test_no_parameter_requires_grad():
    model = tiny_mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        Objective(model, F.cross_entropy, classification_data())


def test_data_on_another_device():
    model = tiny_mlp()
    x, y = classification_data()
    meta = (x.to("meta"), y.to("meta"))
    with pytest.raises(ValueError, match="meta"):
        Objective(model, F.cross_entropy, meta)
    with pytest.raises(ValueError, match="meta"):
        Objective(model, F.cross_entropy, [(x, y), meta])
    lazy = Objective(model, F.cross_entropy, ReIterable(lambda _: [(x, y), meta]))
    with pytest.raises(ValueError, match="meta"):
        lazy.loss()
    with pytest.raises(ValueError, match="meta"):
        Objective(model, F.cross_entropy, (x, y), device="meta")
    obj = Objective(model, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match="meta"):
        obj.hvp(obj.zeros().to("meta"))


@pytest.mark.parametrize(
    "make",
    [
        lambda b: iter(b),
        lambda b: (batch for batch in b),
        lambda b: OneShot(b),
    ],
    ids=["iter", "generator", "custom"],
)
def test_one_shot_iterator_is_rejected(make):
    x, y = classification_data()
    with pytest.raises(TypeError, match="one-shot"):
        Objective(tiny_mlp(), F.cross_entropy, make(uneven_batches(x, y, SIZES)))


def test_other_bad_input():
    model = tiny_mlp()
    data = classification_data()
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        Objective(lambda t: t, F.cross_entropy, data)
    with pytest.raises(TypeError, match="callable"):
        Objective(model, "cross_entropy", data)
    with pytest.raises(ValueError, match="hvp_method"):
        Objective(model, F.cross_entropy, data, hvp_method="finite_differences")
    with pytest.raises(ValueError, match="pair"):
        Objective(model, F.cross_entropy, [(data[0], data[1], data[1])])
    obj = Objective(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), data)
    with pytest.raises(ValueError, match="scalar"):
        obj.loss()
    obj = Objective(model, F.cross_entropy, data)
    with pytest.raises(ValueError, match=r"shape \(43,\)"):
        obj.hvp(torch.zeros(42, dtype=torch.float64))
    with pytest.raises(ValueError, match="length 43"):
        obj.loss(at=torch.zeros(44, dtype=torch.float64))


# ---------------------------------------------------------------------------------- interop
def test_as_linear_operator():
    from scipy.sparse.linalg import eigsh

    model, x, y, ref = mlp_reference()
    obj = Objective(model, F.cross_entropy, uneven_batches(x, y, SIZES))
    op = obj.as_linear_operator()
    assert op.shape == (43, 43) and op.dtype == np.float64
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(43)
    expected = ref.hessian.numpy() @ vec
    for out in (op.matvec(vec), op @ vec, op.rmatvec(vec), op.matvec(vec[:, None]).ravel()):
        assert np.linalg.norm(out - expected) <= TOL64 * np.linalg.norm(expected)
    top = eigsh(op, k=2, which="LA", return_eigenvectors=False, tol=1e-12)
    assert np.allclose(np.sort(top), ref.eigenvalues[-2:].numpy(), rtol=1e-8)
    # at= takes the Hessian elsewhere
    at = obj.theta * 0.5
    ref_at = dense_reference(model, F.cross_entropy, (x, y), at=at)
    out = obj.as_linear_operator(at=at).matvec(vec)
    assert np.linalg.norm(out - ref_at.hessian.numpy() @ vec) <= TOL64 * np.linalg.norm(out)


def test_objective_reference_helper_matches_dense_reference():
    """The shared helper other test files use is itself checked against the direct form."""
    model, x, y, ref = mlp_reference()
    obj = Objective(model, F.cross_entropy, DataLoader(TensorDataset(x, y), batch_size=5))
    via_obj = objective_reference(obj)
    assert rel_err(via_obj.hessian, ref.hessian) <= 1e-13
    assert json.dumps(repr(obj))


# ------------------------------------------------------------------ checks at construction
@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (None, TypeError, "data is None; pass a DataLoader"),
        (torch.zeros(4, 3), TypeError, r"bare tensor of shape \(4, 3\): the targets are missing"),
        (5, TypeError, "data is a int, not batches"),
        ((torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)), ValueError, "4 inputs but 5"),
        ([(torch.zeros(2, 3),)], ValueError, "batch 0 of data is not an"),
        ((x for x in []), TypeError, "one-shot iterator"),
    ],
)
def test_bad_data_is_refused_at_construction_with_what_to_pass(data, error, match):
    model = nn.Linear(3, 2)
    with pytest.raises(error, match=match):
        Objective(model, F.cross_entropy, data)


def test_bad_models_are_refused_at_construction():
    data = (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="has no parameters"):
        Objective(nn.ReLU(), F.cross_entropy, data)
    with pytest.raises(ValueError, match="'meta' device"):
        Objective(nn.Linear(3, 2, device="meta"), F.cross_entropy, data)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        Objective(frozen, F.cross_entropy, data)


def test_non_finite_weights_are_named_as_such():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    data = (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    obj = Objective(model, F.cross_entropy, data)
    for call in (obj.loss, obj.gradient, lambda: obj.hvp(obj.zeros())):
        with pytest.raises(NonFiniteLossError, match=r"parameter '2\.weight' holds NaN"):
            call()
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_the_objective_runs_the_model_as_written_global_hooks_included():
    """A global forward hook fires for every Conv2d and BatchNorm2d in a plain forward; the
    Objective runs the same modules (no rewriting), so it fires for the same ones."""
    model = bn_cnn()
    x, y = image_data()

    def kinds_seen(run) -> list[str]:
        seen: list[str] = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append(type(m).__name__)
        )
        try:
            run()
        finally:
            handle.remove()
        return seen

    plain = kinds_seen(lambda: model.eval()(x))
    assert {"Conv2d", "BatchNorm2d"} <= set(plain)
    obj = Objective(model, F.cross_entropy, (x, y), check_determinism=False, check_hvp=False)
    assert kinds_seen(obj.loss) == plain
    assert kinds_seen(lambda: obj.hvp(torch.ones(obj.num_params, dtype=x.dtype))) == plain


def test_replace_keeps_every_setting_and_restricts_the_space():
    model = tiny_mlp()
    x, y = classification_data()
    data = uneven_batches(x, y, SIZES)
    obj = Objective(model, F.cross_entropy, data, reduction="sum", hvp_method="double_backward")
    child = obj.replace(params=["0.weight"])
    assert child.reduction == "sum" and child.hvp_method == "double_backward"
    assert child.space.names == ("0.weight",)
    assert child.loss() == obj.loss()  # same data, same function
    # The child's Hessian is the diagonal block of the parent's.
    sl = next(s for name, s, _ in obj.space.segments() if name == "0.weight")
    v = torch.zeros(obj.num_params, dtype=obj.dtype)
    u = torch.randn(child.num_params, dtype=obj.dtype, generator=torch.Generator().manual_seed(0))
    v[sl] = u
    torch.testing.assert_close(child.hvp(u), obj.hvp(v)[sl], rtol=1e-12, atol=1e-14)
    one = obj.replace(data=[data[0]])
    assert one.loss() == F.cross_entropy(model(data[0][0]), data[0][1]).item()  # sum of one


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvps_through_stacked_layernorms_match_finite_differences(method):
    """torch.func.hessian is wrong here in torch 2.13 (the vmapped cross terms of two
    LayerNorms); the Objective's HVPs, both methods, are not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)
    ).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)
    obj = Objective(model, nn.MSELoss(), (x, y), hvp_method=method)
    theta = obj.theta
    v = torch.randn(obj.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def central(eps):
        return (obj.gradient(at=theta + eps * v) - obj.gradient(at=theta - eps * v)) / (2 * eps)

    fd = (4 * central(1e-4) - central(2e-4)) / 3  # Richardson: O(eps^4)
    torch.testing.assert_close(obj.hvp(v), fd, rtol=1e-6, atol=1e-7)
