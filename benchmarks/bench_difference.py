"""Benchmark: Hessian-vector products from gradient differences (``finite_difference``).

Parts (``--parts``, default all):

* ``accuracy``: float32 difference products against exact float64 answers on
  ``resnet18`` (:func:`flatlens.zoo.resnet18`, CIFAR-shaped, random weights, BatchNorm in
  eval mode, ``--images`` random 3x32x32 images), ``resnet18_gelu`` (the same network with
  every ReLU a GELU: the differences need a loss that is smooth at their step, which ReLU
  kinks are not), ``vit`` (timm ``vit_tiny_patch16_224`` re-sized to 32x32 images, patch 4,
  embed 192, depth 4, 3 heads) and ``gpt2_tiny`` (``GPT2LMHeadModel``: 4 layers, n_embd 256,
  vocab 1000, ``--sequences`` random sequences of 32 tokens). For each: top-1 and top-5 by
  Lanczos with difference products in float32 (tol 1e-5) against the exact top-5 of a
  float64 copy (double backward, tol 1e-8); errors relative to |lambda_1| (target 1e-4).
* ``r1``: on the same models, R1 (rho 0.05, 5 steps, the eigen start solved to 1e-5)
  with difference products against R1 with exact products, both float32 (target 1e-3
  relative).
* ``once``: an MLP (12-16-4) whose GELU is a custom ``autograd.Function`` with a
  ``@once_differentiable`` backward: what autograd's products miss, what ``"auto"`` finds
  and measures, and the errors of lambda_max in float64 and float32.
* ``gpt2_small``: GPT-2 small (124M parameters from ``GPT2Config()``, random weights,
  ``--sequences`` sequences of ``--tokens`` tokens) top-1 (tol 1e-3) with exact products
  (float64 re-evaluation on and off) and with difference products: time, HVPs, gradients,
  peak memory; and the cost of one difference product in gradients (after the step was
  chosen), timed interleaved.
* ``sharded``: the same GPT-2 small top-1 with difference products under FSDP2
  (``fully_shard`` on each block and the root) in two CPU processes over gloo, each with
  one of the sequences: time, the entries each rank holds, peak memory per rank.

Run (a 2-core shared CPU: about 40 minutes for everything)::

    .venv/bin/python benchmarks/bench_difference.py
    .venv/bin/python benchmarks/bench_difference.py --parts once accuracy --models vit

Results: tables on stdout and ``benchmarks/results/bench_difference.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import Column, environment, report, set_threads
from torch import nn

from flatlens import Objective, first_order_flatness, hessian_eigenvalues, zoo
from flatlens.core import causal_lm_loss, token_count
from flatlens.core._memory import PeakMemory

PARTS = ("accuracy", "r1", "once", "gpt2_small", "sharded")
MODELS = ("resnet18", "resnet18_gelu", "vit", "gpt2_tiny")


# ---------------------------------------------------------------------------- models
class _GeluBlock(zoo._BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.gelu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.gelu(out + self.shortcut(x))


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _tokens(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=gen)
    return [{"input_ids": ids, "labels": ids.clone()}]


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, Any, Callable, dict]:
    """``(model, data, loss_fn, objective keywords)`` of a case (float32, eval mode)."""
    torch.manual_seed(0)
    if name in ("resnet18", "resnet18_gelu"):
        model = zoo.resnet18()
        if name == "resnet18_gelu":
            model.stem[2] = nn.GELU()
            for block in model.layers:
                block.__class__ = _GeluBlock
        return model.eval(), _images(args.images), F.cross_entropy, {}
    from flatlens._compat import import_torchvision

    import_torchvision()  # timm and transformers import torchvision (see flatlens/_compat.py)
    if name == "vit":
        import timm

        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=4,
            num_classes=10,
            embed_dim=192,
            depth=4,
            num_heads=3,
        )
        return model.eval(), _images(args.images), F.cross_entropy, {}
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    if name == "gpt2_tiny":
        config = GPT2Config(
            vocab_size=1000,
            n_positions=32,
            n_embd=256,
            n_layer=4,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
        data = _tokens(args.sequences, 32, 1000)
    else:  # gpt2_small: GPT2Config() is GPT-2 small (124M)
        config = GPT2Config()
        data = _tokens(args.sequences, args.tokens, config.vocab_size)
    model = GPT2LMHeadModel(config).eval()
    return model, data, causal_lm_loss, {"batch_weight": token_count(shift=True)}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------- accuracy
def accuracy(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, data, loss_fn, kw = build(name, args)
    n = sum(p.numel() for p in model.parameters())
    ref64 = Objective(copy.deepcopy(model).double(), loss_fn, data, **kw)
    ref, ref_s = _timed(lambda: hessian_eigenvalues(ref64, 5, tol=1e-8, max_hvps=400))
    lam = ref.eigenvalues
    print(f"{name}: n={n}, float64 top-5 {lam.tolist()} ({ref.num_hvps} HVPs, {ref_s:.0f} s)")
    rows = []
    for k in (1, 5):
        obj = Objective(model, loss_fn, data, hvp_method="finite_difference", **kw)
        res, secs = _timed(lambda obj=obj, k=k: hessian_eigenvalues(obj, k, tol=1e-5, max_hvps=300))
        err = float((res.eigenvalues - lam[:k]).abs().max()) / abs(float(lam[0]))
        bound = float(res.error_bounds.max()) / abs(float(lam[0]))
        rows.append(
            {
                "model": name,
                "num_params": n,
                "measure": f"top-{k}",
                "hvp_method": res.hvp_method,
                "error": err,
                "target": 1e-4,
                "met": err <= 1e-4,
                "bound": bound,
                "bound_kind": res.bound_kind,
                "num_hvps": res.num_hvps,
                "gradients": obj.counts["difference_gradients"],
                "relative_step": obj.products["relative_step"],
                "seconds": secs,
                "eigenvalues": res.eigenvalues.tolist(),
                "reference": lam[:k].tolist(),
            }
        )
        print(rows[-1])
    return rows


def r1_rows(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """R1 with difference products against R1 with exact ones (both float32). The eigen
    start is solved to 1e-5 so both ascents start from the same vector: a looser start
    (R1's default 1e-3) lets the two runs pick slightly different vectors, and a 5-step
    ascent from another start finds another lower bound on the maximum (0.4% apart on the
    ViT), which says nothing about the products."""
    model, data, loss_fn, kw = build(name, args)
    r1 = {}
    for method in ("double_backward", "finite_difference"):
        obj = Objective(model, loss_fn, data, hvp_method=method, check_hvp=False, **kw)
        res, secs = _timed(
            lambda obj=obj: first_order_flatness(
                obj, 0.05, steps=5, restarts=0, init=("eigen",), eigen_tol=1e-5, seed=0
            )
        )
        r1[method] = (res, secs)
    exact, fd = r1["double_backward"][0].value, r1["finite_difference"][0].value
    err = abs(fd - exact) / abs(exact)
    row = {
        "model": name,
        "num_params": sum(p.numel() for p in model.parameters()),
        "measure": "R1 rho=0.05",
        "hvp_method": "finite_difference",
        "error": err,
        "target": 1e-3,
        "met": err <= 1e-3,
        "seconds": r1["finite_difference"][1],
        "exact_seconds": r1["double_backward"][1],
        "value": fd,
        "exact_value": exact,
    }
    print(row)
    return [row]


# ---------------------------------------------------------------------------- once
def once_case() -> dict[str, Any]:
    from torch.autograd.function import once_differentiable

    class GeluFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
            return g * (cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))

    class Gelu(nn.Module):
        def forward(self, x):
            return GeluFn.apply(x)

    out: dict[str, Any] = {"rows": []}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), Gelu(), nn.Linear(16, 4)).to(dtype)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(64, 12, generator=gen).to(dtype)
        y = torch.randint(0, 4, (64,), generator=gen)
        plain = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4)).double()
        plain.load_state_dict(model.state_dict())
        x64 = x.double()
        truth = Objective(plain, F.cross_entropy, (x64, y))

        def loss(t, truth=truth, x64=x64, y=y):
            return F.cross_entropy(truth.forward(t, x64), y)

        dense = torch.func.hessian(loss)(truth.theta)
        lam = float(torch.linalg.eigvalsh(dense)[-1])
        v = torch.randn(truth.num_params, generator=gen, dtype=torch.float64)
        exact_hv = dense @ v
        for method in ("double_backward", "forward_over_reverse", "auto"):
            unchecked = Objective(
                model, F.cross_entropy, (x, y), hvp_method=method, check_hvp=False
            )
            miss = float((unchecked.hvp(v.to(dtype)).double() - exact_hv).norm() / exact_hv.norm())
            obj = Objective(model, F.cross_entropy, (x, y), hvp_method=method)
            row = {"dtype": str(dtype), "hvp_method": method, "unchecked_error": miss}
            try:
                res = hessian_eigenvalues(obj, 1, tol=1e-8 if dtype == torch.float64 else 1e-5)
            except Exception as err:  # the explicit exact methods raise
                row.update(outcome=f"raised {type(err).__name__}", note=str(err)[:160])
            else:
                row.update(
                    outcome=f"measured with {res.hvp_method}",
                    lambda_max=float(res.eigenvalues[0]),
                    exact=lam,
                    error=abs(float(res.eigenvalues[0]) - lam) / lam,
                    target=1e-6 if dtype == torch.float64 else 1e-3,
                    note=res.hvp_note[:160],
                )
            out["rows"].append(row)
            print(row)
    return out


# ---------------------------------------------------------------------------- GPT-2 small
GPT2_SETTINGS = {
    "exact, float64 re-check": ({"hvp_method": "double_backward"}, {}),
    "exact, certify=False": ({"hvp_method": "double_backward"}, {"certify": False}),
    "finite_difference": ({"hvp_method": "finite_difference"}, {}),
}


def _gpt2_setting(label: str, args: argparse.Namespace, out: str) -> None:
    """One GPT-2 small top-1 in this (fresh) process; the row is pickled to ``out``."""
    import pickle

    torch.set_num_threads(args.threads)
    model, data, loss_fn, kw = build("gpt2_small", args)
    okw, ekw = GPT2_SETTINGS[label]
    obj = Objective(model, loss_fn, data, **okw, **kw)
    res, secs = _timed(lambda: hessian_eigenvalues(obj, 1, tol=1e-3, **ekw))
    row = {
        "setting": label,
        "num_params": sum(p.numel() for p in model.parameters()),
        "lambda_max": float(res.eigenvalues[0]),
        "bound": float(res.error_bounds[0]),
        "bound_kind": res.bound_kind,
        "num_hvps": res.num_hvps,
        "float64_hvps": res.reference_hvps,
        "gradients": obj.counts["gradient"] + obj.counts["difference_gradients"],
        "relative_step": obj.products["relative_step"],
        "step_rechecks": obj._differences.recalibrations,
        "bound_note": res.bound_note,
        "basis_vectors": res.basis_vectors,
        "seconds": secs,
        "peak_memory_gib": (res.peak_memory_bytes or 0) / 2**30,
        "peak_memory_kind": res.peak_memory_kind,
    }
    if label == "finite_difference":
        # One difference product against one gradient, after the step was chosen.
        v = torch.randn(obj.num_params, generator=torch.Generator().manual_seed(0))
        grads, products = [], []
        for _ in range(args.repeats):
            grads.append(_timed(lambda: obj.gradient())[1])
            products.append(_timed(lambda: obj.hvp(v))[1])
        g, d = statistics.median(grads), statistics.median(products)
        row["cost"] = {
            "gradient_s": g,
            "difference_product_s": d,
            "ratio": d / g,
            "target": 2.1,
            "step_choice_gradients": 2 * obj._differences.levels_tried,
        }
    with open(out, "wb") as fh:
        pickle.dump(row, fh)


def gpt2_small(args: argparse.Namespace) -> dict[str, Any]:
    """Each setting in its own process, so each peak is its own (and memory is returned)."""
    import pickle

    import torch.multiprocessing as mp

    rows = []
    ctx = mp.get_context("spawn")
    for label in GPT2_SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "row.pkl")
            proc = ctx.Process(target=_gpt2_setting, args=(label, args, out))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                rows.append({"setting": label, "error": f"exit code {proc.exitcode}"})
                continue
            with open(out, "rb") as fh:
                rows.append(pickle.load(fh))
        print(rows[-1])
    cost = next((r.pop("cost") for r in rows if "cost" in r), {})
    return {"rows": rows, "cost": cost}


# ---------------------------------------------------------------------------- sharded
def _sharded_rank(rank: int, world: int, port: int, out: str, args: argparse.Namespace) -> None:
    import pickle

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, data, loss_fn, kw = build("gpt2_small", args)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        ids = data[0]["input_ids"][rank::world]
        mine = [{"input_ids": ids, "labels": ids.clone()}]
        obj = Objective(model, loss_fn, mine, **kw)
        with PeakMemory("cpu") as peak:
            res, secs = _timed(lambda: hessian_eigenvalues(obj, 1, tol=1e-3))
        row = {
            "rank": rank,
            "entries": obj.num_params,
            "global": obj.layout.global_size,
            "lambda_max": float(res.eigenvalues[0]),
            "num_hvps": res.num_hvps,
            "seconds": secs,
            "peak_memory_gib": (peak.bytes or 0) / 2**30,
            "peak_memory_kind": peak.kind,
            "vector_gib": obj.num_params * 4 / 2**30,
        }
        with open(Path(out) / f"rank{rank}.pkl", "wb") as fh:
            pickle.dump(row, fh)
    finally:
        dist.destroy_process_group()


def sharded(args: argparse.Namespace) -> list[dict[str, Any]]:
    import pickle

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_sharded_rank, args=(2, port, out, args), nprocs=2, join=True)
        rows = []
        for r in range(2):
            with open(Path(out) / f"rank{r}.pkl", "rb") as fh:
                rows.append(pickle.load(fh))
    for row in rows:
        print(row)
    return rows


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--images", type=int, default=8, help="images of the image models")
    parser.add_argument("--sequences", type=int, default=2, help="sequences of the GPT-2s")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per GPT-2 small sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timings of the cost ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    payload: dict[str, Any] = {"environment": environment("cpu"), "settings": vars(args)}
    tables = {}
    if "once" in args.parts:
        payload["once"] = once_case()
        cols = [Column(k, k) for k in ("dtype", "hvp_method", "unchecked_error", "outcome")]
        cols += [Column("error", "lambda_max error", ".1e"), Column("target", "target", ".0e")]
        tables["once_differentiable GELU in an MLP 12-16-4"] = (payload["once"]["rows"], cols)
    if "accuracy" in args.parts:
        rows = [row for name in args.models for row in accuracy(name, args)]
        payload["accuracy"] = rows
        cols = [
            Column("model", "model"),
            Column("num_params", "params"),
            Column("measure", "measure"),
            Column("error", "error", ".1e"),
            Column("target", "target", ".0e"),
            Column("met", "met"),
            Column("bound", "bound", ".1e"),
            Column("num_hvps", "HVPs"),
            Column("seconds", "s", ".1f"),
        ]
        tables["float32 difference products vs exact float64 (error / |lambda_1|)"] = (rows, cols)
    if "r1" in args.parts:
        rows = [row for name in args.models for row in r1_rows(name, args)]
        payload["r1"] = rows
        cols = [Column(k, k, ".6g") for k in ("model", "value", "exact_value", "error", "target")]
        cols += [Column("met", "met"), Column("seconds", "s", ".0f")]
        tables["R1 (rho 0.05, 5 steps) with difference vs exact products, float32"] = (rows, cols)
    if "gpt2_small" in args.parts:
        payload["gpt2_small"] = gpt2_small(args)
        cols = [Column(k, k, ".3g") for k in ("setting", "lambda_max", "bound_kind", "num_hvps")]
        cols += [
            Column("float64_hvps", "f64 HVPs"),
            Column("gradients", "gradients"),
            Column("seconds", "s", ".1f"),
            Column("peak_memory_gib", "peak GiB", ".2f"),
        ]
        tables["GPT-2 small top-1 (tol 1e-3)"] = (payload["gpt2_small"]["rows"], cols)
        cost = payload["gpt2_small"]["cost"]
        tables["one difference product / one gradient"] = (
            [cost],
            [
                Column(k, k, ".3g")
                for k in ("gradient_s", "difference_product_s", "ratio", "target")
            ],
        )
    if "sharded" in args.parts:
        payload["sharded"] = sharded(args)
        cols = [
            Column(k, k, ".3g") for k in ("rank", "entries", "global", "lambda_max", "num_hvps")
        ]
        cols += [Column("seconds", "s", ".1f"), Column("peak_memory_gib", "peak GiB", ".2f")]
        tables["GPT-2 small top-1 under FSDP2, 2 ranks (gloo)"] = (payload["sharded"], cols)
    report("bench_difference", tables, payload, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
