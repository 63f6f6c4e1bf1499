"""Benchmark: top-k Hessian eigenvalues with flatlens (Lanczos) vs PyHessian 0.1 (power iteration).

Two cases, each with the same trained weights, data and dtype (float32) for both tools:

* ``mlp``: :func:`flatlens.zoo.mlp` over all 1797 digits in mini-batches of 256 (the last
  has 5 samples), passed to both tools as the same list of batches (PyHessian's
  ``dataloader=`` mode, which weights each batch by its size).
* ``cnn``: :func:`flatlens.zoo.cnn` (BatchNorm, eval mode) on one batch of 1024 digits
  images (PyHessian's ``data=`` single-batch mode, which reuses the first-order graph;
  flatlens caches it too).

For k = 1 and 5 it reports wall time (construction included) and HVP count, each the
median over start-vector seeds 0, 1, ... (one interleaved round per seed, the same seed for
both tools), the worst relative difference to PyHessian's eigenvalues and each tool's worst
error against a float64 reference (flatlens at tol=1e-10 on a float64 copy, cross-checked
with ARPACK), so "equal or better accuracy" is measured, not assumed. It also reports the
cost of one HVP relative to one gradient for every HVP method. Run::

    .venv/bin/python benchmarks/bench_spectrum.py            # full run, about 8 minutes
    .venv/bin/python benchmarks/bench_spectrum.py --quick    # CI smoke run, < 1 minute

Results: a table on stdout and ``benchmarks/results/bench_spectrum.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
import torch
from _common import (
    Column,
    Timing,
    environment,
    relative_difference,
    report,
    set_threads,
    synchronize,
    time_interleaved,
)
from torch import Tensor, nn

from flatlens import Objective, zoo
from flatlens.data import batches, load_digits
from flatlens.measures._spectrum import hessian_eigenvalues

PYHESSIAN_MAX_ITER = 100
PYHESSIAN_TOL = 1e-3
HVP_METHODS = ("double_backward", "forward_over_reverse")
BOUND_FLOOR = 1e-6  # relative errors below this are float32 round-off, not solver error
ARPACK_TOL = 1e-7  # ARPACK's tolerance on the float32 operator: the accuracy of its values


@dataclass
class Case:
    """A trained model with the data both tools measure its Hessian on.

    Attributes:
        name: Short name (``mlp``, ``cnn``).
        description: One line for reports.
        model: The trained model, in eval mode, on ``device``.
        loss_fn: Mean-reduced cross-entropy.
        data: A list of ``(inputs, targets)`` batches, or one such tuple (single batch).
        device: Where model and data live.
        train_loss: Loss over ``data`` after training.
    """

    name: str
    description: str
    model: nn.Module
    loss_fn: nn.Module
    data: list[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor]
    device: torch.device
    train_loss: float

    @property
    def single_batch(self) -> bool:
        """Whether ``data`` is one ``(inputs, targets)`` tuple."""
        return isinstance(self.data, tuple)

    @property
    def num_params(self) -> int:
        """Scalars in the model's trainable parameters."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the case."""
        sizes = [len(self.data[1])] if self.single_batch else [len(y) for _, y in self.data]
        return {
            "name": self.name,
            "description": self.description,
            "num_params": self.num_params,
            "num_samples": sum(sizes),
            "batch_sizes": sizes,
            "train_loss": self.train_loss,
            "dtype": str(next(self.model.parameters()).dtype),
        }


# ---------------------------------------------------------------------------- cases
def digits(image: bool) -> tuple[Tensor, Tensor]:
    """All 1797 digits (train and test split concatenated), float32 inputs in [0, 1]."""
    d = load_digits(image=image)
    return torch.cat([d.x_train, d.x_test]), torch.cat([d.y_train, d.y_test])


def train(
    model: nn.Module, x: Tensor, y: Tensor, *, steps: int, seed: int, lr: float = 0.05
) -> None:
    """``steps`` of SGD with momentum 0.9 on random mini-batches of 64, in train mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen).to(x.device)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def _mean_loss(model: nn.Module, loss_fn: nn.Module, data: Any) -> float:
    parts = [data] if isinstance(data, tuple) else data
    total = sum(float(loss_fn(model(x), y)) * len(y) for x, y in parts)
    return total / sum(len(y) for _, y in parts)


def mlp_case(
    device: torch.device | str = "cpu",
    *,
    train_steps: int = 300,
    batch_size: int = 256,
    seed: int = 0,
) -> Case:
    """The MLP over all 1797 digits in uneven mini-batches of ``batch_size``."""
    device = torch.device(device)
    x, y = digits(image=False)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    model = zoo.mlp().to(device)
    train(model, x, y, steps=train_steps, seed=seed)
    data = batches(x, y, batch_size)
    loss_fn = nn.CrossEntropyLoss()
    sizes = sorted({len(b[1]) for b in data}, reverse=True)
    return Case(
        name="mlp",
        description=f"zoo.mlp, {len(y)} digits in {len(data)} batches of sizes {sizes}",
        model=model,
        loss_fn=loss_fn,
        data=data,
        device=device,
        train_loss=_mean_loss(model, loss_fn, data),
    )


def cnn_case(
    device: torch.device | str = "cpu",
    *,
    train_steps: int = 300,
    num_samples: int = 1024,
    seed: int = 0,
) -> Case:
    """The BatchNorm CNN (eval mode) on one batch of the first ``num_samples`` digits images."""
    device = torch.device(device)
    x, y = digits(image=True)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    model = zoo.cnn().to(device)
    train(model, x, y, steps=train_steps, seed=seed)
    data = (x[:num_samples], y[:num_samples])
    loss_fn = nn.CrossEntropyLoss()
    return Case(
        name="cnn",
        description=f"zoo.cnn (BatchNorm, eval mode), one batch of {num_samples} digits images",
        model=model,
        loss_fn=loss_fn,
        data=data,
        device=device,
        train_loss=_mean_loss(model, loss_fn, data),
    )


# ---------------------------------------------------------------------------- the two tools
def _pyhessian() -> tuple[Any, Any]:
    """PyHessian's ``hessian`` class and the module whose globals its methods use."""
    try:
        module = importlib.import_module("pyhessian.hessian")
    except ImportError as err:
        raise SystemExit(
            "PyHessian is not installed: .venv/bin/pip install -c constraints.txt "
            "--no-deps PyHessian==0.1"
        ) from err
    return module.hessian, module


def pyhessian_version() -> str | None:
    """The installed PyHessian version, if its metadata can be found."""
    try:
        return importlib.metadata.version("PyHessian")
    except importlib.metadata.PackageNotFoundError:
        return None


def _clear_grads(model: nn.Module) -> None:
    # PyHessian leaves .grad holding a differentiable graph; drop it between runs.
    for p in model.parameters():
        p.grad = None


@contextlib.contextmanager
def _counting_pyhessian() -> Iterator[tuple[Any, list[int]]]:
    """PyHessian's class with its HVP entry points counted: yields ``(cls, [count])``."""
    cls, module = _pyhessian()
    count = [0]
    single = module.hessian_vector_product
    full = cls.dataloader_hv_product

    def single_hvp(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return single(*args, **kwargs)

    def full_hvp(self: Any, v: Any) -> Any:
        count[0] += 1
        return full(self, v)

    with (
        mock.patch.object(module, "hessian_vector_product", single_hvp),
        mock.patch.object(cls, "dataloader_hv_product", full_hvp),
    ):
        yield cls, count


def pyhessian_hessian(case: Case, cls: Any = None) -> Any:
    """A PyHessian ``hessian`` object for ``case`` (single-batch or dataloader mode)."""
    cls = cls or _pyhessian()[0]
    _clear_grads(case.model)
    cuda = case.device.type == "cuda"
    if case.single_batch:
        return cls(case.model, case.loss_fn, data=case.data, cuda=cuda)
    return cls(case.model, case.loss_fn, dataloader=case.data, cuda=cuda)


def run_pyhessian(case: Case, k: int, *, seed: int = 0) -> dict[str, Any]:
    """PyHessian's ``eigenvalues(maxIter=100, tol=1e-3, top_n=k)``, construction included.

    PyHessian draws its start vectors from the global generator, seeded here (in a fork, so
    the caller's generator is untouched) for reproducible HVP counts.
    """
    with torch.random.fork_rng(devices=[]), _counting_pyhessian() as (cls, count):
        torch.manual_seed(seed)
        h = pyhessian_hessian(case, cls)
        values, _ = h.eigenvalues(maxIter=PYHESSIAN_MAX_ITER, tol=PYHESSIAN_TOL, top_n=k)
        del h
        _clear_grads(case.model)
    return {
        "eigenvalues": sorted((float(v) for v in values), reverse=True),
        "num_hvps": count[0],
    }


@dataclass(frozen=True)
class Setting:
    """One flatlens configuration: ``tol`` and extra :class:`Objective` keyword arguments."""

    tol: float
    objective: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """Short description for tables, e.g. ``tol=0.001 hvp_method=double_backward``."""
        extra = " ".join(f"{k}={v}" for k, v in self.objective)
        return f"tol={self.tol:g}" + (f" {extra}" if extra else " (default Objective)")


def run_flatlens(case: Case, k: int, setting: Setting, *, seed: int = 0) -> dict[str, Any]:
    """flatlens ``hessian_eigenvalues(Objective(...), k, tol=tol)``, construction included."""
    obj = Objective(case.model, case.loss_fn, case.data, **dict(setting.objective))
    res = hessian_eigenvalues(obj, k, tol=setting.tol, seed=seed)
    values = res.eigenvalues.tolist()
    bounds = [float(b) / max(abs(v), 1e-300) for b, v in zip(res.error_bounds, values, strict=True)]
    return {
        "eigenvalues": values,
        "num_hvps": res.num_hvps,
        "relative_bounds": bounds,
        "relative_bound": max(bounds),
        "converged": bool(res.converged.all()),
        "num_restarts": res.num_restarts,
    }


def flatlens_settings(case: Case, quick: bool) -> list[Setting]:
    """The default Objective at tol 1e-2, 1e-3, 1e-4; for a list of batches also the
    alternatives to the default HVP (double backward, a cached graph) at tol 1e-3."""
    if quick:
        return [Setting(1e-3)]
    out = [Setting(tol) for tol in (1e-2, 1e-3, 1e-4)]
    if not case.single_batch:
        out += [
            Setting(1e-3, (("hvp_method", "double_backward"),)),
            Setting(1e-3, (("cache_graph", True),)),
        ]
    return out


# ---------------------------------------------------------------------------- reference
def reference_spectrum(case: Case, k: int, *, arpack: bool = True) -> dict[str, Any]:
    """Top-k (largest algebraic) eigenvalues in float64, cross-checked, and the smallest one.

    The reference is flatlens' Lanczos at tol=1e-10 on a float64 copy of the model and data.
    With ``arpack`` it is cross-checked against an independent solver, ARPACK ``eigsh``
    (tol 1e-7) on the float32 Hessian (float64 convolutions on a CPU are too slow for it), so
    ``crosscheck`` should be ~1e-6. The smallest eigenvalue (float32, 1e-2) shows whether
    the top-k by magnitude (what power iteration finds) is the top-k by value.
    """
    from scipy.sparse.linalg import eigsh

    start = time.perf_counter()
    model = copy.deepcopy(case.model).double()
    obj64 = Objective(model, case.loss_fn, case.data, cache_graph=True)
    lanczos = hessian_eigenvalues(obj64, k, tol=1e-10, seed=1)
    obj32 = Objective(case.model, case.loss_fn, case.data, cache_graph=True)
    smallest = hessian_eigenvalues(obj32, 1, which="SA", tol=1e-2, seed=2)
    out: dict[str, Any] = {
        "method": "flatlens lanczos float64 tol=1e-10",
        "eigenvalues": lanczos.eigenvalues.tolist(),
        "num_hvps": lanczos.num_hvps,
        "smallest": float(smallest.eigenvalues[0]),
    }
    if arpack:
        rng = np.random.default_rng(0)
        op = obj32.as_linear_operator()
        v0 = rng.standard_normal(obj32.num_params)
        vals = eigsh(op, k=k, which="LA", tol=1e-7, v0=v0, return_eigenvectors=False)
        out["arpack_float32"] = sorted(vals.tolist(), reverse=True)
        out["crosscheck"] = relative_difference(out["arpack_float32"], out["eigenvalues"])
    out["seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------- measurements
def compare_eigenvalues(
    case: Case,
    reference: Sequence[float],
    settings: Sequence[Setting],
    *,
    ks: Sequence[int] = (1, 5),
    repeats: int = 3,
    warmup: bool = True,
    bound_reference: Sequence[float] | None = None,
    round_off: float = BOUND_FLOOR,
) -> list[dict[str, Any]]:
    """Time PyHessian and every flatlens setting, interleaved, over ``repeats`` seeds, for each k.

    Round ``r`` runs every contender once with start-vector seed ``r`` (PyHessian's global
    generator, flatlens' ``seed=``), so the medians are over seeds, not over one draw that
    may be lucky for one tool and unlucky for the other (on the CNN, PyHessian's top-5 took
    34 to 62 HVPs across seeds 0-7, and flatlens' with a random start 11 to 15), and each
    per-round ratio compares the two tools on the same seed. With ``warmup`` each contender
    first runs once untimed at the smallest k. A certified bound is checked against
    ``bound_reference`` (default ``reference``): the eigenvalues of the operator flatlens
    applied, where known; differences below ``round_off`` are that reference's own
    inaccuracy.

    Returns:
        One row per (k, tool, setting): median time and HVPs over the seeds (and the HVPs
        of each), the speed-up over PyHessian (ratio of medians, and the median of per-round
        ratios), and the worst relative difference to PyHessian (same seed) and relative
        error against ``reference`` over the seeds.
    """

    def contenders(k: int) -> dict[str, Any]:
        fns = {"pyhessian": lambda seed: run_pyhessian(case, k, seed=seed)}
        for s in settings:
            fns[f"flatlens {s.label}"] = lambda seed, s=s: run_flatlens(case, k, s, seed=seed)
        return fns

    if warmup:
        for fn in contenders(min(ks)).values():
            fn(0)
    rows: list[dict[str, Any]] = []
    for k in ks:
        fns = contenders(k)
        timings = {name: Timing() for name in fns}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in fns}
        for seed in range(repeats):
            for name, fn in fns.items():
                synchronize(case.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                results[name].append(fn(seed))
                synchronize(case.device)
                timings[name].times.append(time.perf_counter() - start)
                timings[name].cpu_times.append(time.process_time() - cpu_start)
        base_timing, base = timings["pyhessian"], results["pyhessian"]
        for name, timing in timings.items():
            tool, _, setting = name.partition(" ")
            if tool == "pyhessian":
                setting = f"maxIter={PYHESSIAN_MAX_ITER} tol={PYHESSIAN_TOL:g}"
            runs = results[name]
            hvps = [r["num_hvps"] for r in runs]
            per_round = [b / t for b, t in zip(base_timing.times, timing.times, strict=True)]
            errors = [relative_difference(r["eigenvalues"], reference[:k]) for r in runs]
            held = [_bound_holds(r, bound_reference or reference, round_off) for r in runs]
            violations = "; ".join(f"seed {i}: {h}" for i, h in enumerate(held) if h != "yes")
            bounds = [r["relative_bound"] for r in runs if "relative_bound" in r]
            rows.append(
                {
                    "case": case.name,
                    "k": k,
                    "tool": tool,
                    "setting": setting,
                    "seeds": list(range(repeats)),
                    "time_s": timing.median,
                    "timing": timing.to_dict(),
                    "num_hvps": float(np.median(hvps)),
                    "num_hvps_per_seed": hvps,
                    "hvps_text": f"{np.median(hvps):g} ({min(hvps)}-{max(hvps)})",
                    "cpu_time_s": timing.cpu_median,
                    "speedup": base_timing.median / timing.median,
                    "cpu_speedup": base_timing.cpu_median / timing.cpu_median,
                    "speedup_per_round": float(np.median(per_round)),
                    "diff_vs_pyhessian": max(
                        relative_difference(r["eigenvalues"], b["eigenvalues"])
                        for r, b in zip(runs, base, strict=True)
                    ),
                    "error_vs_reference": max(errors),
                    "error_per_seed": errors,
                    "relative_bound": max(bounds) if bounds else None,
                    "bound_holds": None if held[0] is None else violations or "yes",
                    "converged": all(r["converged"] for r in runs) if bounds else None,
                    "eigenvalues": runs[0]["eigenvalues"],
                }
            )
    return rows


def _bound_holds(
    result: dict[str, Any], reference: Sequence[float], round_off: float = BOUND_FLOOR
) -> str | None:
    """``"yes"`` when every eigenvalue's error is within its bound, else the violations.

    Differences below ``round_off`` (the reference's own inaccuracy) are not counted.
    """
    if "relative_bounds" not in result:
        return None
    bad = [
        f"#{i + 1}: {err:.1e} > {bound:.1e}"
        for i, (value, ref, bound) in enumerate(
            zip(result["eigenvalues"], reference, result["relative_bounds"], strict=False)
        )
        if (err := abs(value - ref) / abs(ref)) > max(bound, round_off)
    ]
    return "; ".join(bad) if bad else "yes"


def hvp_costs(
    case: Case, *, repeats: int = 5, warmup: int = 2, number: int = 3, seed: int = 0
) -> list[dict[str, Any]]:
    """Seconds per gradient and per HVP for each way of computing it, and their ratio.

    * ``gradient``: one forward + backward over the data (no graph kept).
    * ``double_backward`` / ``forward_over_reverse``: an HVP from scratch (forward, first
      backward with a graph, then a second backward or a JVP through the gradient).
    * ``cached graph``: an HVP that reuses the first-order graph (the default for a single
      batch, opt-in with ``cache_graph=True`` for a list): only the second backward.
    * ``pyhessian``: PyHessian's own HVP in the mode this case uses.
    """
    gen = torch.Generator().manual_seed(seed)
    plain = Objective(case.model, case.loss_fn, case.data, cache_graph=False)
    v = torch.randn(plain.num_params, generator=gen).to(case.device)
    fns: dict[str, Any] = {"gradient": plain.gradient}
    for method in HVP_METHODS:
        obj = Objective(case.model, case.loss_fn, case.data, cache_graph=False, hvp_method=method)
        fns[f"hvp {method}"] = lambda obj=obj: obj.hvp(v)
    cached = Objective(case.model, case.loss_fn, case.data, cache_graph=True)
    fns["hvp cached graph"] = lambda: cached.hvp(v)

    h = pyhessian_hessian(case)
    _, module = _pyhessian()
    pv = [t.view_as(p) for t, p in zip(plain.space.unflatten(v), h.params, strict=True)]
    if case.single_batch:
        fns["hvp pyhessian"] = lambda: module.hessian_vector_product(h.gradsH, h.params, pv)
    else:
        fns["hvp pyhessian"] = lambda: h.dataloader_hv_product(pv)

    timings = time_interleaved(
        fns, repeats=repeats, warmup=warmup, number=number, device=case.device
    )
    _clear_grads(case.model)
    grad_s = timings["gradient"][0].median
    rows = [
        {
            "case": case.name,
            "method": name,
            "time_ms": 1e3 * timing.median,
            "ratio_to_gradient": timing.median / grad_s,
            "cpu_ratio_to_gradient": timing.cpu_median / timings["gradient"][0].cpu_median,
            "spread": timing.spread,
            "timing": timing.to_dict(),
        }
        for name, (timing, _) in timings.items()
    ]
    default = Objective(case.model, case.loss_fn, case.data)
    chosen = "cached graph" if default.cache_graph else default.hvp_method
    resolve = getattr(default, "_resolved_hvp_method", None)
    if not default.cache_graph and default.hvp_method == "auto" and resolve is not None:
        chosen = f"auto -> {resolve()}"
    rows.append({"case": case.name, "method": f"(default Objective: {chosen})"})
    return rows


def hvp_agreement(case: Case, seed: int = 0) -> float:
    """||Hv_fwd_rev - Hv_double_backward|| / ||Hv_double_backward|| for one random v."""
    gen = torch.Generator().manual_seed(seed)
    products = []
    for method in HVP_METHODS:
        obj = Objective(case.model, case.loss_fn, case.data, cache_graph=False, hvp_method=method)
        if not products:
            v = torch.randn(obj.num_params, generator=gen).to(case.device)
        products.append(obj.hvp(v))
    return float((products[1] - products[0]).norm() / products[0].norm())


# ---------------------------------------------------------------------------- driver
EIGEN_COLUMNS = [
    Column("case", "case"),
    Column("k", "k"),
    Column("tool", "tool"),
    Column("setting", "setting"),
    Column("time_s", "time [s]", ".3f"),
    Column("hvps_text", "HVPs (range)"),
    Column("speedup_text", "speed-up"),
    Column("cpu_time_s", "CPU [s]", ".3f"),
    Column("cpu_speedup_text", "CPU speed-up"),
    Column("diff_vs_pyhessian", "rel. diff vs PyHessian", ".1e"),
    Column("error_vs_reference", "rel. error vs float64 ref", ".1e"),
    Column("relative_bound", "certified bound", ".1e"),
    Column("bound_holds", "bound holds"),
]
HVP_COLUMNS = [
    Column("case", "case"),
    Column("method", "method"),
    Column("time_ms", "time [ms]", ".2f"),
    Column("ratio_text", "/ gradient"),
    Column("cpu_ratio_text", "/ gradient (CPU time)"),
    Column("spread", "spread", ".0%"),
]


def measure_case(
    name: str,
    device: torch.device | str = "cpu",
    *,
    quick: bool = False,
    repeats: int | None = None,
) -> dict[str, Any]:
    """Every measurement for one case (``"mlp"`` or ``"cnn"``) on ``device``.

    ``quick`` trains 100 instead of 300 steps, shrinks the CNN batch to 256, times one
    repeat of the default setting only, and skips the ARPACK cross-check.
    """
    start = time.perf_counter()
    device = torch.device(device)
    repeats = repeats or (1 if quick else 5)
    steps = 100 if quick else 300
    if name == "mlp":
        case = mlp_case(device, train_steps=steps)
    elif name == "cnn":
        case = cnn_case(device, train_steps=steps, num_samples=256 if quick else 1024)
    else:
        raise ValueError(f"unknown case {name!r}; choose 'mlp' or 'cnn'")
    settings = flatlens_settings(case, quick)
    ref = reference_spectrum(case, 5, arpack=not quick)
    # flatlens certifies the eigenvalues of the float32 operator it applies. They differ
    # from the float64 reference by up to the ARPACK cross-check (2.4e-6 on the CNN), so
    # bounds are checked against ARPACK's values for the same float32 operator; without
    # them (--quick), against the float64 reference with a 1e-6 round-off allowance.
    if "arpack_float32" in ref:
        bound_reference, round_off = ref["arpack_float32"], ARPACK_TOL
    else:
        bound_reference, round_off = ref["eigenvalues"], BOUND_FLOOR
    rows = compare_eigenvalues(
        case,
        ref["eigenvalues"],
        settings,
        repeats=repeats,
        warmup=True,
        bound_reference=bound_reference,
        round_off=round_off,
    )
    costs = hvp_costs(case, repeats=1 if quick else 7, warmup=1, number=1 if quick else 3)
    return {
        "case": case.summary(),
        "settings": {
            "quick": quick,
            "repeats": repeats,
            "train_steps": steps,
            "bound_reference": "arpack_float32" if "arpack_float32" in ref else "float64",
            "bound_round_off": round_off,
            "pyhessian": {
                "version": pyhessian_version(),
                "maxIter": PYHESSIAN_MAX_ITER,
                "tol": PYHESSIAN_TOL,
            },
            "flatlens": [{"tol": s.tol, **dict(s.objective)} for s in settings],
        },
        "reference": ref,
        "hvp_method_agreement": hvp_agreement(case),
        "eigenvalues": rows,
        "hvp_costs": costs,
        "summary": summarize(rows),
        "seconds": time.perf_counter() - start,
    }


def tables(results: dict[str, dict[str, Any]], device: str, note: str = "") -> dict[str, Any]:
    """``{title: (rows, columns)}`` for :func:`_common.report` from :func:`measure_case` output."""
    eigen_rows = [dict(r) for res in results.values() for r in res["eigenvalues"]]
    cost_rows = [dict(r) for res in results.values() for r in res["hvp_costs"]]
    for row in eigen_rows:
        if row["tool"] != "pyhessian":
            row["speedup_text"] = f"{row['speedup']:.2f}x"
            row["cpu_speedup_text"] = f"{row['cpu_speedup']:.2f}x"
    for row in cost_rows:
        if "ratio_to_gradient" in row:
            row["ratio_text"] = f"{row['ratio_to_gradient']:.2f}x"
            row["cpu_ratio_text"] = f"{row['cpu_ratio_to_gradient']:.2f}x"
    return {
        f"Top-k Hessian eigenvalues on {device} (float32{note})": (eigen_rows, EIGEN_COLUMNS),
        f"Cost of one HVP relative to one gradient on {device}": (cost_rows, HVP_COLUMNS),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Check the targets: top-5 >= 4x and top-1 >= 1.5x faster than PyHessian, at equal or
    better error against the float64 reference.

    For each k: ``same_tol`` is the default Objective at tol=1e-3 (PyHessian's nominal
    tol); ``default`` the fastest default-Objective tol whose error is at most PyHessian's on
    every seed; ``any`` the fastest setting of all with that accuracy.
    """
    targets = {1: 1.5, 5: 4.0}
    out: dict[str, Any] = {}
    for k in sorted({r["k"] for r in rows}):
        group = [r for r in rows if r["k"] == k]
        base = next(r for r in group if r["tool"] == "pyhessian")
        ours = [r for r in group if r["tool"] == "flatlens"]
        # Equal or better accuracy on every seed (same seed, same start for both tools).
        accurate = [
            r
            for r in ours
            if all(e <= b for e, b in zip(r["error_per_seed"], base["error_per_seed"], strict=True))
        ]
        picks = {
            "same_tol": [r for r in ours if r["setting"] == "tol=0.001 (default Objective)"],
            "default": [r for r in accurate if "(default Objective)" in r["setting"]],
            "any": accurate,
        }
        entry: dict[str, Any] = {
            "target_speedup": targets.get(k),
            "pyhessian_error": base["error_vs_reference"],
            "pyhessian_hvps": base["num_hvps"],
        }
        for key, candidates in picks.items():
            best = max(candidates, key=lambda r: r["speedup"], default=None)
            entry[key] = best and {
                "setting": best["setting"],
                "speedup": best["speedup"],
                "cpu_speedup": best["cpu_speedup"],
                "error": best["error_vs_reference"],
                "num_hvps": best["num_hvps"],
                "meets_target": targets.get(k) is None or best["speedup"] >= targets[k],
            }
        out[f"k={k}"] = entry
    return out


def summary_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per case and k: speed-ups against the target."""
    lines = []
    for name, res in results.items():
        for key, s in res["summary"].items():
            parts = []
            for pick in ("same_tol", "default", "any"):
                e = s[pick]
                if e:
                    mark = "ok" if e["meets_target"] else "MISS"
                    parts.append(
                        f"{pick}: {e['speedup']:.2f}x (CPU {e['cpu_speedup']:.2f}x) "
                        f"[{e['setting']}] {mark}"
                    )
            lines.append(f"{name} {key} (target {s['target_speedup']}x): " + "; ".join(parts))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (< 1 minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds, one start-vector seed each (default 5)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cases", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(cli_args)
    threads = set_threads(args.threads)
    results = {
        name: measure_case(name, args.device, quick=args.quick, repeats=args.repeats)
        for name in args.cases
    }
    repeats = next(iter(results.values()))["settings"]["repeats"]
    payload = {
        "command": " ".join(["benchmarks/bench_spectrum.py", *cli_args]),
        "environment": environment(args.device),
        "cases": results,
    }
    note = f", threads={threads}, median over {repeats} seeds"
    report(
        "bench_spectrum",
        tables(results, args.device, note),
        payload,
        out_dir=args.out,
        markdown=args.markdown,
    )
    print()
    print("\n".join(summary_lines(results)))
    if args.quick:
        print(
            "(--quick is a smoke run: 100 training steps, a CNN batch of 256, one seed; "
            "its speed-ups are not the benchmark's)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
