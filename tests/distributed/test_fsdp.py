"""An Objective over a model sharded with FSDP2 (``fully_shard``), two CPU processes over gloo.

Each rank holds half of every parameter's rows and half of the data; the measures run on
the rank's rows only (about n / 2 entries per vector) and must equal one process's on the
whole unsharded model and data: loss and gradient to rounding, difference products to the
difference error, Lanczos, Hutch++, SLQ, R0 and R1 to what that error allows, all against
the same measures on one process (and the eigenvalues against exact double-backward ones).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import gloo_ranks, import_model_library
from torch import nn

from flatlens import Objective, hessian_density, hessian_eigenvalues, hessian_trace
from flatlens.core import causal_lm_loss, token_count
from flatlens.measures import first_order_flatness, zeroth_order_sharpness

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"
)

VOCAB, T = 11, 7
PROBES = ("num_probes", "num_samples")
STEPS = ("lanczos_steps", "steps")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 3),
    ).double()


def _cnn_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 6, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (24,), generator=gen)


def _gpt2() -> nn.Module:
    transformers = import_model_library("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=8,
        vocab_size=VOCAB,
        n_positions=T,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).double()


def _lm_batches(seed: int, sizes=(3, 2)):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ids = torch.randint(0, VOCAB, (n, T), generator=gen)
        lengths = torch.randint(3, T + 1, (n,), generator=gen)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask.long(),
                "labels": ids.masked_fill(~mask, -100),
            }
        )
    return out


def _shard(model: nn.Module, layers) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def _named(fn, names: tuple[str, ...], value: int) -> dict:
    """``{name: value}`` for the first of ``names`` that ``fn`` takes (names being renamed)."""
    params = inspect.signature(fn).parameters
    return {next(n for n in names if n in params): value}


def _measure(obj, seed: int = 0) -> dict:
    eig = hessian_eigenvalues(obj, 2, tol=1e-6, seed=seed)
    trace = hessian_trace(obj, seed=seed, **_named(hessian_trace, PROBES, 9))
    runs = _named(hessian_density, ("num_runs",), 1)
    dens = hessian_density(obj, seed=seed, **runs, **_named(hessian_density, STEPS, 8))
    r0 = zeroth_order_sharpness(obj, 0.05, steps=2, restarts=1, seed=seed)
    r1 = first_order_flatness(obj, 0.05, steps=2, restarts=1, seed=seed)
    return {
        "eigenvalues": eig.eigenvalues,
        "bounds": eig.error_bounds,
        "bound_kind": eig.bound_kind,
        "method": eig.hvp_method,
        "eig_vectors": eig.eigenvectors,
        "trace": trace.value,
        "nodes": dens.nodes,
        "r0": r0.value,
        "r1": r1.value,
    }


def _local_pieces(segments, full: torch.Tensor) -> torch.Tensor:
    return torch.cat([full[s : s + n] for s, n in segments])


def _assemble(ranks, key: str, n: int) -> torch.Tensor:
    """The global vector(s) from the ranks' pieces (rows for a 2-D result)."""
    first = ranks[0][key]
    out = torch.zeros(*first.shape[:-1], n, dtype=first.dtype)
    for r in ranks:
        offset = 0
        for s, m in r["segments"]:
            out[..., s : s + m] = r[key][..., offset : offset + m]
            offset += m
    return out


def _run(build, layers, data, loss_fn, **kw) -> dict:
    model = build()
    _shard(model, layers(model))
    obj = Objective(model, loss_fn, data, **kw)
    before = obj.theta.clone()
    gen = torch.Generator().manual_seed(5)
    full_v = torch.randn(obj.layout.global_size, generator=gen, dtype=torch.float64)
    out = {
        "rank_entries": obj.num_params,
        "global": obj.layout.global_size,
        "segments": obj.layout.segments,
        "loss": obj.loss(),
        "gradient": obj.gradient(),
        "hvp": obj.hvp(_local_pieces(obj.layout.segments, full_v)),
        "v": full_v,
        **_measure(obj),
    }
    out["restored"] = torch.equal(obj.theta, before)
    return out


def _check(ranks, build, data, loss_fn, **kw) -> None:
    """The sharded results against one process: the unsharded model on all the data, with
    difference products (the sharded run's algorithm) and with exact ones."""
    model = build()
    fd = Objective(model, loss_fn, data, distributed=False, hvp_method="finite_difference", **kw)
    exact = Objective(model, loss_fn, data, distributed=False, **kw)
    n = fd.num_params
    assert sum(r["rank_entries"] for r in ranks) == n == ranks[0]["global"]
    assert 0.3 < ranks[0]["rank_entries"] / n < 0.7
    assert all(r["restored"] for r in ranks)
    full_v = ranks[0]["v"]
    grad, hv_exact, hv_fd = exact.gradient(), exact.hvp(full_v), fd.hvp(full_v)
    torch.testing.assert_close(_assemble(ranks, "gradient", n), grad, rtol=1e-10, atol=1e-12)
    scale = float(hv_exact.norm())
    sharded_hv = _assemble(ranks, "hvp", n)
    assert float((sharded_hv - hv_fd).norm()) <= 1e-7 * scale
    assert float((sharded_hv - hv_exact).norm()) <= 1e-6 * scale
    ref = _measure(fd)
    lam = hessian_eigenvalues(exact, 2, tol=1e-10).eigenvalues
    vecs = _assemble(ranks, "eig_vectors", n)
    for r in ranks:
        assert abs(r["loss"] - exact.loss()) <= 1e-12 * abs(exact.loss())
        assert r["method"] == "finite_difference" and r["bound_kind"] == "estimate"
        assert torch.allclose(r["eigenvalues"], lam, rtol=1e-6, atol=0)
        assert bool(((r["eigenvalues"] - lam).abs() <= r["bounds"] + 1e-12).all())
        torch.testing.assert_close(r["eigenvalues"], ref["eigenvalues"], rtol=1e-8, atol=0)
        # Hutch++ and SLQ draw the same probes as one process.
        assert abs(r["trace"] - ref["trace"]) <= 1e-6 * abs(ref["trace"])
        for a, b in zip(r["nodes"], ref["nodes"], strict=True):
            assert a.shape == b.shape
            assert float(abs(a - b).max()) <= 1e-5 * float(abs(b).max())
        assert abs(r["r0"] - ref["r0"]) <= 1e-6 * abs(ref["r0"])
        assert abs(r["r1"] - ref["r1"]) <= 1e-6 * abs(ref["r1"])
    for i in range(2):  # the same vectors, the same signs
        assert float(vecs[i] @ ref["eig_vectors"][i]) > 1 - 1e-6


def _cnn_batches(rank: int | None = None):
    x, y = _cnn_data()
    cuts = [(0, 8), (8, 12), (12, 20), (20, 24)]
    mine = cuts if rank is None else cuts[2 * rank : 2 * rank + 2]
    return [(x[a:b], y[a:b]) for a, b in mine]


def _cnn_rank(rank: int, tmp: Path) -> dict:
    return _run(_cnn, lambda m: [m[0], m[3], m[7]], _cnn_batches(rank), F.cross_entropy)


def test_fsdp2_cnn_equals_one_process(tmp_path):
    ranks = gloo_ranks(_cnn_rank, tmp_path, world=2, timeout_s=240)
    _check(ranks, _cnn, _cnn_batches(), F.cross_entropy)


def _gpt2_rank(rank: int, tmp: Path) -> dict:
    weight = token_count(shift=True)
    layers = lambda m: list(m.transformer.h)  # noqa: E731
    return _run(_gpt2, layers, _lm_batches(seed=rank), causal_lm_loss, batch_weight=weight)


def test_fsdp2_tiny_gpt2_equals_one_process(tmp_path):
    import_model_library("transformers")
    ranks = gloo_ranks(_gpt2_rank, tmp_path, world=2, timeout_s=240)
    data = _lm_batches(seed=0) + _lm_batches(seed=1)
    _check(ranks, _gpt2, data, causal_lm_loss, batch_weight=token_count(shift=True))
