"""Benchmark: flatlens on ResNet-18, a ViT and GPT-2 against PyHessian 0.1 and curvlinops 3.

Every tool gets the same model, data, dtype (float32) and accuracy target (tol=1e-3), in
one interleaved run (PyHessian, curvlinops, flatlens, flatlens at tol=1e-2 and 3e-2, then
the next measure) on one CPU thread:

* ``resnet18``: torchvision's ResNet-18 with 10 classes in its CIFAR form (conv1 3x3 stride
  1, no max-pool), BatchNorm in eval mode, trained briefly (SGD) on a learnable synthetic
  task: 3x32x32 images of one of 10 smooth random class templates plus Gaussian noise. The
  trained weights are cached in ``benchmarks/results/`` so reruns skip training. On one
  batch of ``--images`` images (default 16: one HVP takes about 1 s at 16 images and 5 s
  at 64 on one CPU thread, too slow for 64 in a 15-minute run) it measures the top-1 and
  top-5 eigenvalues (trained weights) and the top-1 (untrained weights) with

  - PyHessian 0.1: ``hessian(model, criterion, data=(x, y), cuda=False)
    .eigenvalues(top_n=k, maxIter=100, tol=1e-3)`` (power iteration with deflation);
  - curvlinops 3.0.1: ``HessianLinearOperator(model, criterion, params, [(x, y)])
    .to_scipy()`` with ``scipy.sparse.linalg.eigsh(k=k, which="LA", tol=1e-3)``;
  - flatlens: ``hessian_eigenvalues(Objective(model, criterion, (x, y)), k, tol=1e-3)``,
    and the same at tol=1e-2 and 3e-2 (its error at 1e-3 is far below PyHessian's),

  and the trace (PyHessian ``.trace(maxIter=100, tol=1e-3)``, curvlinops ``hutchpp_trace``
  and flatlens ``hessian_trace`` with the same HVP budget). Each call is timed with its
  construction, its HVPs counted (PyHessian's ``hessian_vector_product`` and curvlinops'
  ``_matmat`` columns, determinism checks included), its peak memory taken (CPU: peak RSS
  of the process during the call, after freed memory is returned to the system) and its
  eigenvalues compared with a float64 reference on the same images (flatlens Lanczos at
  tol=1e-8 on a float64 copy of the model; cached beside the weights).
* ``vit`` (timm ``vit_tiny_patch16_224`` re-sized: 32x32 images, patch 4, embed 192, depth
  4, fused attention as timm sets it) and ``gpt2`` (Hugging Face ``GPT2LMHeadModel`` from a
  config: 4 layers, n_embd 256, vocab 1000, padded batches of up to 64 tokens weighted with
  ``token_count(shift=True)``, loss ``causal_lm_loss``), both trained briefly: flatlens'
  top-1 eigenvalue, R1 (rho=0.05, steps=5, restarts=0, init=("eigen",)) and a 21-point
  line along a filter-normalized random direction: time, HVPs, peak memory.
* ``hvp_cost``: one HVP against one gradient for each model (the default Objective's HVP,
  which reuses a cached first-order graph, and one from scratch).

Run::

    .venv/bin/python benchmarks/bench_models.py          # ~15 min cold, ~9 min cached
    .venv/bin/python benchmarks/bench_models.py --quick  # smoke run, < 2 minutes
    .venv/bin/python benchmarks/bench_models.py --images 64 --parts resnet_eigen --out DIR

Results: tables on stdout and ``benchmarks/results/bench_models.json`` (``--out DIR``:
``DIR/bench_models.json``); docs/benchmarks-models.md holds the default run's tables.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import hashlib
import importlib
import importlib.metadata
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    Column,
    environment,
    relative_difference,
    report,
    results_dir,
    set_threads,
    synchronize,
    time_interleaved,
    write_json,
)
from bench_spectrum import _clear_grads, _counting_pyhessian, _pyhessian
from torch import Tensor, nn

from flatlens._compat import import_torchvision

# torchvision (and so timm and transformers' model classes) must be imported through this
# beside a CPU build of torch; see flatlens/_compat.py.
import_torchvision()

from flatlens import (  # noqa: E402
    Objective,
    causal_lm_loss,
    first_order_flatness,
    hessian_eigenvalues,
    hessian_trace,
    token_count,
)
from flatlens import landscape as fl  # noqa: E402
from flatlens.core import PeakMemory, save_torch  # noqa: E402

TOL = 1e-3  # the accuracy target every tool gets (PyHessian's default tol)
LOOSE_TOLS = (1e-2, 3e-2)  # more flatlens rows: the error PyHessian reaches may need no more
PYHESSIAN_MAX_ITER = 100
REFERENCE_TOL = 1e-8
RHO = 0.05
NUM_CLASSES = 10
CACHE_VERSION = 2  # bump when the synthetic tasks or training change


# ---------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """Every size the run uses (recorded in the JSON)."""

    images: int = 16  # ResNet-18 eval batch
    resnet_train_steps: int = 40
    resnet_train_batch: int = 32
    ks: tuple[int, ...] = (1, 5)
    trace_hvps: int = 30  # flatlens / curvlinops Hutch++ budget (PyHessian stops itself)
    reference_tol: float = REFERENCE_TOL
    vit_depth: int = 4
    vit_embed: int = 192
    vit_heads: int = 3
    vit_images: int = 32
    vit_train_steps: int = 60
    gpt2_layers: int = 4
    gpt2_embd: int = 256
    gpt2_heads: int = 4
    gpt2_vocab: int = 1000
    gpt2_seq: int = 64
    gpt2_batches: tuple[int, ...] = (8, 8, 8, 4)  # sequences per padded batch
    gpt2_train_steps: int = 60
    r1_steps: int = 5
    line_points: int = 21
    hvp_cost_repeats: int = 3


QUICK = Sizes(
    images=4,
    resnet_train_steps=4,
    resnet_train_batch=8,
    ks=(1,),
    trace_hvps=3,
    reference_tol=1e-3,
    vit_depth=1,
    vit_embed=48,
    vit_images=8,
    vit_train_steps=4,
    gpt2_layers=1,
    gpt2_embd=64,
    gpt2_batches=(3, 2),
    gpt2_train_steps=4,
    r1_steps=2,
    hvp_cost_repeats=1,
)

# The GPU check's sizes (benchmarks/gpu_check.py): ResNet-18 on 512 images, more data for the
# transformers; the architectures are the CPU run's.
GPU = Sizes(
    images=512,
    resnet_train_steps=40,
    resnet_train_batch=128,
    vit_images=256,
    vit_train_steps=60,
    gpt2_batches=(32, 32, 32, 24),
    hvp_cost_repeats=5,
)

PARTS = ("resnet_eigen", "resnet_untrained", "resnet_trace", "hvp_cost", "vit", "gpt2")


# ---------------------------------------------------------------------------- memory / timing
def _settle(device: torch.device) -> None:
    """Free what is unreferenced and hand freed heap back, so each call's peak starts low."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _current_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def measured(fn: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, Any]]:
    """``fn()`` with its wall and CPU seconds, its peak memory and the memory at entry."""
    _settle(device)
    entry = _current_bytes(device)
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with PeakMemory(device) as peak:
        out = fn()
    synchronize(device)
    stats = {
        "time_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,
        "peak_bytes": peak.bytes,
        "peak_kind": peak.kind,
        "entry_bytes": entry,
        "peak_over_entry_bytes": None if entry is None else peak.bytes - entry,
    }
    return out, stats


# ---------------------------------------------------------------------------- tasks
def class_templates(num_classes: int = NUM_CLASSES, seed: int = 1234) -> Tensor:
    """Smooth random 3x32x32 templates, one per class (bilinear up-sampling of 3x4x4 noise)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(num_classes, 3, 4, 4, generator=gen)
    return F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)


def synthetic_images(
    n: int, *, seed: int, contrast: float = 0.3, noise: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``n`` images contrast * template[y] + noise * N(0, 1), labels y uniform: learnable
    but not trivially (ResNet-18 after 40 SGD steps: about 0.5 loss, 80% accuracy)."""
    templates = class_templates()
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = contrast * templates[y] + noise * torch.randn(n, 3, 32, 32, generator=gen)
    return x, y


def markov_tokens(
    batch_sizes: Sequence[int], *, vocab: int, seq: int, seed: int, active: int = 64
) -> list[dict[str, Tensor]]:
    """Padded Hugging Face batches of sequences from a fixed sparse Markov chain.

    The chain runs over ``active`` of the ``vocab`` token ids, each with 2 likely successors
    (a task a small model learns in a few dozen steps); lengths are uniform in [seq/4, seq];
    padding has ``attention_mask`` 0 and label -100.
    """
    chain = torch.Generator().manual_seed(4321)
    tokens = torch.randperm(vocab, generator=chain)[: min(active, vocab)]
    successors = torch.randint(0, len(tokens), (len(tokens), 2), generator=chain)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in batch_sizes:
        ids = torch.zeros(b, seq, dtype=torch.long)
        mask = torch.zeros(b, seq, dtype=torch.long)
        for i in range(b):
            length = int(torch.randint(seq // 4, seq + 1, (1,), generator=gen))
            state = int(torch.randint(0, len(tokens), (1,), generator=gen))
            for t in range(length):
                ids[i, t], mask[i, t] = tokens[state], 1
                state = int(successors[state, int(torch.randint(0, 2, (1,), generator=gen))])
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


# ---------------------------------------------------------------------------- models
def resnet18_cifar() -> nn.Module:
    """torchvision ResNet-18, 10 classes, CIFAR stem (3x3 stride-1 conv1, no max-pool)."""
    tv = import_torchvision()
    model = tv.models.resnet18(num_classes=NUM_CLASSES)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vit_small(sizes: Sizes) -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` re-sized for 32x32 images (patch 4)."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        num_classes=NUM_CLASSES,
        embed_dim=sizes.vit_embed,
        depth=sizes.vit_depth,
        num_heads=sizes.vit_heads,
    )


def gpt2_small(sizes: Sizes) -> nn.Module:
    """A Hugging Face GPT-2 causal LM built from a config (default attention: sdpa)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=sizes.gpt2_vocab,
        n_positions=sizes.gpt2_seq,
        n_embd=sizes.gpt2_embd,
        n_layer=sizes.gpt2_layers,
        n_head=sizes.gpt2_heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _digest(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def state_digest(model: nn.Module) -> str:
    """Hash of a model's parameters and buffers (keys the reference cache)."""
    return _digest([t for t in model.state_dict().values() if t.is_floating_point()])


def data_digest(data: Any) -> str:
    """Hash of every tensor in ``data`` (a batch or a list of batches)."""
    out: list[Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for k in sorted(x):
                walk(x[k])
        elif isinstance(x, list | tuple):
            for t in x:
                walk(t)

    walk(data)
    return _digest(out)


def cached_training(
    model: nn.Module,
    name: str,
    train: Callable[[nn.Module], None],
    tag: str,
    device: torch.device,
) -> tuple[nn.Module, bool]:
    """``model`` on ``device`` with trained weights: loaded from ``results/`` (weights
    trained on another kind of device are not reused) or trained there and saved."""
    if device.type != "cpu":
        tag += f"_{device.type}"
    path = results_dir() / f"bench_models_{name}_{tag}.pt"
    model = model.to(device)
    if path.exists():
        with contextlib.suppress(Exception):
            model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            return model.eval(), True
    train(model)
    save_torch(path, {k: v.cpu() for k, v in model.state_dict().items()})
    return model.eval(), False


def _train_images(
    model: nn.Module, *, steps: int, batch: int, lr: float, adam: bool, seed: int = 0
) -> None:
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    if adam:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for step in range(steps):
        x, y = (t.to(device) for t in synthetic_images(batch, seed=10_000 + step))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    # Re-estimate BatchNorm statistics as a plain average over fresh batches.
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        with torch.no_grad():
            for i in range(4):
                model(synthetic_images(max(batch, 32), seed=20_000 + i)[0].to(device))
        for m in bns:
            m.momentum = 0.1
    model.eval()


def _train_lm(model: nn.Module, sizes: Sizes, *, steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        (batch,) = markov_tokens(
            [16], vocab=sizes.gpt2_vocab, seq=sizes.gpt2_seq, seed=10_000 + step
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        opt.zero_grad(set_to_none=True)
        causal_lm_loss(model(**batch), labels).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


@dataclass
class Case:
    """A model with its data and loss, as every tool receives them."""

    name: str
    model: nn.Module
    loss_fn: Callable[..., Tensor]
    data: Any
    device: torch.device
    weights: str  # "trained" or "untrained"
    batch_weight: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def objective(self, **kwargs: Any) -> Objective:
        """The default flatlens Objective of this case (``kwargs`` override)."""
        if self.batch_weight is not None:
            kwargs.setdefault("batch_weight", self.batch_weight)
        return Objective(self.model, self.loss_fn, self.data, **kwargs)

    def summary(self) -> dict[str, Any]:
        obj = self.objective(cache_graph=False)
        return {
            "name": self.name,
            "weights": self.weights,
            "num_params": obj.num_params,
            **obj.evaluate(),
            "dtype": str(obj.dtype),
            **self.info,
        }


def resnet_case(
    sizes: Sizes, device: torch.device, *, trained: bool, images: int | None = None
) -> Case:
    """ResNet-18 (CIFAR stem) on one batch of ``images`` synthetic images."""
    torch.manual_seed(0)
    model = resnet18_cifar()
    cached = None
    if trained:
        tag = f"v{CACHE_VERSION}_s{sizes.resnet_train_steps}_b{sizes.resnet_train_batch}"
        model, cached = cached_training(
            model,
            "resnet18",
            lambda m: _train_images(
                m,
                steps=sizes.resnet_train_steps,
                batch=sizes.resnet_train_batch,
                lr=0.05,
                adam=False,
            ),
            tag,
            device,
        )
    model = model.eval().to(device)
    n = images or sizes.images
    x, y = synthetic_images(n, seed=0)
    info = {
        "images": n,
        "train_steps": sizes.resnet_train_steps if trained else 0,
        "weights_from_cache": cached,
        "description": f"ResNet-18 CIFAR stem, eval mode, one batch of {n} 3x32x32 images",
    }
    return Case(
        "resnet18",
        model,
        nn.CrossEntropyLoss(),
        (x.to(device), y.to(device)),
        device,
        "trained" if trained else "untrained",
        info=info,
    )


def vit_case(sizes: Sizes, device: torch.device) -> Case:
    torch.manual_seed(0)
    model = vit_small(sizes)
    tag = f"v{CACHE_VERSION}_d{sizes.vit_depth}_e{sizes.vit_embed}_s{sizes.vit_train_steps}"
    model, cached = cached_training(
        model,
        "vit",
        lambda m: _train_images(m, steps=sizes.vit_train_steps, batch=32, lr=1e-3, adam=True),
        tag,
        device,
    )
    model = model.eval().to(device)
    x, y = synthetic_images(sizes.vit_images, seed=0)
    fused = getattr(getattr(model.blocks[0], "attn", None), "fused_attn", None)
    info = {
        "images": sizes.vit_images,
        "weights_from_cache": cached,
        "fused_attn": fused,
        "description": (
            f"timm vit_tiny (img 32, patch 4, embed {sizes.vit_embed}, depth "
            f"{sizes.vit_depth}, heads {sizes.vit_heads}), {sizes.vit_images} images"
        ),
    }
    return Case(
        "vit",
        model,
        nn.CrossEntropyLoss(),
        (x.to(device), y.to(device)),
        device,
        "trained",
        info=info,
    )


def gpt2_case(sizes: Sizes, device: torch.device) -> Case:
    torch.manual_seed(0)
    model = gpt2_small(sizes)
    tag = (
        f"v{CACHE_VERSION}_l{sizes.gpt2_layers}_e{sizes.gpt2_embd}_v{sizes.gpt2_vocab}"
        f"_s{sizes.gpt2_train_steps}"
    )
    model, cached = cached_training(
        model, "gpt2", lambda m: _train_lm(m, sizes, steps=sizes.gpt2_train_steps), tag, device
    )
    model = model.eval().to(device)
    data = markov_tokens(sizes.gpt2_batches, vocab=sizes.gpt2_vocab, seq=sizes.gpt2_seq, seed=0)
    data = [{k: v.to(device) for k, v in b.items()} for b in data]
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
    info = {
        "batches": list(sizes.gpt2_batches),
        "seq": sizes.gpt2_seq,
        "target_tokens": tokens,
        "weights_from_cache": cached,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "description": (
            f"GPT-2 ({sizes.gpt2_layers} layers, n_embd {sizes.gpt2_embd}, vocab "
            f"{sizes.gpt2_vocab}), padded batches of {list(sizes.gpt2_batches)} sequences "
            f"<= {sizes.gpt2_seq} tokens ({tokens} target tokens)"
        ),
    }
    return Case(
        "gpt2",
        model,
        causal_lm_loss,
        data,
        device,
        "trained",
        batch_weight=token_count(shift=True),
        info=info,
    )


# ---------------------------------------------------------------------------- the tools
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _counting_curvlinops() -> Iterator[list[int]]:
    """Count curvlinops' Hessian-vector products (columns of every ``_matmat``)."""
    from curvlinops._torch_base import CurvatureLinearOperator

    count = [0]
    original = CurvatureLinearOperator._matmat

    def counted(self: Any, M: list[Tensor]) -> list[Tensor]:
        count[0] += int(M[0].shape[-1])
        return original(self, M)

    with mock.patch.object(CurvatureLinearOperator, "_matmat", counted):
        yield count


def _pyhessian_object(case: Case, cls: Any) -> Any:
    _clear_grads(case.model)
    return cls(case.model, case.loss_fn, data=case.data, cuda=case.device.type == "cuda")


def pyhessian_eigen(case: Case, k: int, seed: int = 0) -> dict[str, Any]:
    """PyHessian ``eigenvalues(top_n=k, maxIter=100, tol=1e-3)``, construction included."""
    with torch.random.fork_rng(devices=[]), _counting_pyhessian() as (cls, count):
        torch.manual_seed(seed)
        h = _pyhessian_object(case, cls)
        values, _ = h.eigenvalues(maxIter=PYHESSIAN_MAX_ITER, tol=TOL, top_n=k)
        del h
        _clear_grads(case.model)
    return {"eigenvalues": sorted((float(v) for v in values), reverse=True), "num_hvps": count[0]}


def pyhessian_trace(case: Case, seed: int = 0) -> dict[str, Any]:
    """PyHessian ``trace(maxIter=100, tol=1e-3)`` (Hutchinson, Rademacher)."""
    with torch.random.fork_rng(devices=[]), _counting_pyhessian() as (cls, count):
        torch.manual_seed(seed)
        h = _pyhessian_object(case, cls)
        samples = np.asarray(h.trace(maxIter=PYHESSIAN_MAX_ITER, tol=TOL), dtype=np.float64)
        del h
        _clear_grads(case.model)
    stderr = float(samples.std(ddof=1) / math.sqrt(samples.size)) if samples.size > 1 else None
    return {"value": float(samples.mean()), "stderr": stderr, "num_hvps": count[0]}


def _curvlinops_operator(case: Case) -> Any:
    from curvlinops import HessianLinearOperator

    params = [p for p in case.model.parameters() if p.requires_grad]
    return HessianLinearOperator(case.model, case.loss_fn, params, [case.data])


def curvlinops_eigen(case: Case, k: int, seed: int = 0) -> dict[str, Any]:
    """curvlinops ``HessianLinearOperator(...).to_scipy()`` with ARPACK ``eigsh``."""
    from scipy.sparse.linalg import eigsh

    with _counting_curvlinops() as count:
        op = _curvlinops_operator(case).to_scipy()
        v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
        values = eigsh(op, k=k, which="LA", tol=TOL, v0=v0, return_eigenvectors=False)
    return {"eigenvalues": sorted(values.tolist(), reverse=True), "num_hvps": count[0]}


def curvlinops_trace(case: Case, num_hvps: int, seed: int = 0) -> dict[str, Any]:
    """curvlinops ``hutchpp_trace(op, num_matvecs)`` on the PyTorch operator."""
    from curvlinops import hutchpp_trace

    with torch.random.fork_rng(devices=[]), _counting_curvlinops() as count:
        torch.manual_seed(seed)
        op = _curvlinops_operator(case)
        value = float(hutchpp_trace(op, num_matvecs=num_hvps))
    return {"value": value, "stderr": None, "num_hvps": count[0]}


def flatlens_eigen(case: Case, k: int, seed: int = 0, tol: float = TOL) -> dict[str, Any]:
    """flatlens ``hessian_eigenvalues(Objective(...), k, tol=tol)``, construction included."""
    res = hessian_eigenvalues(case.objective(), k, tol=tol, seed=seed)
    values = res.eigenvalues.tolist()
    bounds = [float(b) / max(abs(v), 1e-300) for b, v in zip(res.error_bounds, values, strict=True)]
    return {
        "eigenvalues": values,
        "num_hvps": res.num_hvps,
        "relative_bounds": bounds,
        "converged": bool(res.converged.all()),
    }


def flatlens_trace(case: Case, num_hvps: int, seed: int = 0) -> dict[str, Any]:
    """flatlens ``hessian_trace(Objective(...), num_probes=num_hvps)`` (Hutch++)."""
    res = hessian_trace(case.objective(), num_probes=num_hvps, seed=seed)
    stderr = res.stderr if math.isfinite(res.stderr) else None  # NaN from one sample
    return {"value": res.value, "stderr": stderr, "num_hvps": res.num_hvps}


TOOLS = ("pyhessian", "curvlinops", "flatlens")


# ---------------------------------------------------------------------------- reference
REFERENCE_FILE = "bench_models_reference.json"


def reference_eigenvalues(case: Case, k: int, tol: float) -> dict[str, Any]:
    """Top-k eigenvalues of the same Hessian in float64 (flatlens Lanczos at ``tol`` on a
    float64 copy of the model and the same data), cached by weights, data, k and tol."""
    key = (
        f"{case.name}|{state_digest(case.model)}|{data_digest(case.data)}|k={k}|tol={tol:g}"
        f"|{case.device.type}"
    )
    path = results_dir() / REFERENCE_FILE
    cache: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            cache = json.loads(path.read_text())
    if key in cache:
        return {**cache[key], "from_cache": True}
    start = time.perf_counter()
    model64 = copy.deepcopy(case.model).double()
    obj = Objective(model64, case.loss_fn, case.data, cache_graph=True)
    res = hessian_eigenvalues(obj, k, tol=tol, seed=1)
    entry = {
        "method": f"flatlens lanczos float64 tol={tol:g}",
        "eigenvalues": res.eigenvalues.tolist(),
        "relative_bounds": [
            float(b) / abs(float(v)) for b, v in zip(res.error_bounds, res.eigenvalues, strict=True)
        ],
        "converged": bool(res.converged.all()),
        "num_hvps": res.num_hvps,
        "seconds": time.perf_counter() - start,
    }
    del model64, obj, res
    cache[key] = entry
    write_json(REFERENCE_FILE.removesuffix(".json"), cache)
    return {**entry, "from_cache": False}


# ---------------------------------------------------------------------------- measurements
def compare_eigen(
    case: Case, ks: Sequence[int], reference: Sequence[float] | None, seed: int = 0
) -> list[dict[str, Any]]:
    """PyHessian, curvlinops and flatlens top-k, interleaved per k, against ``reference``."""
    rows = []
    for k in ks:
        fns = {
            "pyhessian": lambda k=k: pyhessian_eigen(case, k, seed),
            "curvlinops": lambda k=k: curvlinops_eigen(case, k, seed),
            "flatlens": lambda k=k: flatlens_eigen(case, k, seed),
            **{
                name: lambda k=k, tol=tol: flatlens_eigen(case, k, seed, tol)
                for name, tol in FLATLENS_LOOSE.items()
            },
        }
        group = []
        for tool, fn in fns.items():
            out, stats = measured(fn, case.device)
            err = (
                None
                if reference is None
                else relative_difference(out["eigenvalues"], reference[:k])
            )
            row = {
                "case": case.name,
                "weights": case.weights,
                "measure": f"top-{k}",
                "k": k,
                "tool": tool,
                "setting": _setting(tool, "eigen"),
                **stats,
                "num_hvps": out["num_hvps"],
                "eigenvalues": out["eigenvalues"],
                "error": err,
                "value_text": f"{out['eigenvalues'][0]:.5g}",
            }
            if "relative_bounds" in out:
                row["relative_bound"] = max(out["relative_bounds"])
                row["converged"] = out["converged"]
            group.append(row)
            print(
                f"  {case.name} {case.weights} top-{k} {tool}: {stats['time_s']:.1f}s "
                f"{out['num_hvps']} HVPs error {err if err is None else f'{err:.1e}'}",
                flush=True,
            )
        _add_speedups(group)
        rows += group
    return rows


def compare_trace(case: Case, num_hvps: int, seed: int = 0) -> list[dict[str, Any]]:
    """PyHessian (Hutchinson, self-stopping), curvlinops and flatlens (Hutch++) trace."""
    fns = {
        "pyhessian": lambda: pyhessian_trace(case, seed),
        "curvlinops": lambda: curvlinops_trace(case, num_hvps, seed),
        "flatlens": lambda: flatlens_trace(case, num_hvps, seed),
    }
    group = []
    for tool, fn in fns.items():
        out, stats = measured(fn, case.device)
        stderr = out["stderr"]
        text = f"{out['value']:.5g}" + (f" ± {stderr:.2g}" if stderr is not None else "")
        group.append(
            {
                "case": case.name,
                "weights": case.weights,
                "measure": "trace",
                "tool": tool,
                "setting": _setting(tool, "trace", num_hvps),
                **stats,
                "num_hvps": out["num_hvps"],
                "value": out["value"],
                "stderr": stderr,
                "value_text": text,
            }
        )
        print(f"  {case.name} trace {tool}: {stats['time_s']:.1f}s {text}", flush=True)
    _add_speedups(group)
    return group


FLATLENS_LOOSE = {f"flatlens tol={tol:g}": tol for tol in LOOSE_TOLS}


def _setting(tool: str, what: str, num_hvps: int | None = None) -> str:
    if what == "eigen":
        return {
            "pyhessian": f"power iteration maxIter={PYHESSIAN_MAX_ITER} tol={TOL:g}",
            "curvlinops": f"scipy eigsh (ARPACK) which=LA tol={TOL:g}",
            "flatlens": f"Lanczos tol={TOL:g} (default Objective)",
            **{
                name: f"Lanczos tol={tol:g} (default Objective)"
                for name, tol in FLATLENS_LOOSE.items()
            },
        }[tool]
    return {
        "pyhessian": f"Hutchinson maxIter={PYHESSIAN_MAX_ITER} tol={TOL:g}",
        "curvlinops": f"hutchpp_trace num_matvecs={num_hvps}",
        "flatlens": f"Hutch++ num_samples={num_hvps}",
    }[tool]


def _add_speedups(group: list[dict[str, Any]]) -> None:
    """On each flatlens row: how many times faster it ran than each baseline (wall, CPU)."""
    base = {r["tool"]: r for r in group if not r["tool"].startswith("flatlens")}
    for row in group:
        if not row["tool"].startswith("flatlens"):
            continue
        for tool, b in base.items():
            row[f"speedup_{tool}"] = b["time_s"] / row["time_s"]
            row[f"cpu_speedup_{tool}"] = b["cpu_s"] / row["cpu_s"]
            row[f"speedup_{tool}_text"] = f"{b['time_s'] / row['time_s']:.2f}x"


def hvp_cost(case: Case, *, repeats: int = 3, warmup: int = 1, seed: int = 0) -> list[dict]:
    """Seconds per gradient and per HVP (default Objective, and from scratch), interleaved."""
    plain = case.objective(cache_graph=False)
    default = case.objective()
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(plain.num_params, generator=gen, dtype=plain.dtype).to(case.device)
    fns = {
        "gradient": plain.gradient,
        "hvp (default Objective)": lambda: default.hvp(v),
        "hvp (cache_graph=False)": lambda: plain.hvp(v),
    }
    _settle(case.device)
    timings = time_interleaved(fns, repeats=repeats, warmup=warmup, device=case.device)
    grad = timings["gradient"][0]
    rows = []
    for name, (timing, _) in timings.items():
        label = name
        if name == "hvp (default Objective)":
            label += " [cached graph]" if default.cache_graph else " [no cached graph]"
        rows.append(
            {
                "case": case.name,
                "method": label,
                "time_s": timing.median,
                "ratio": timing.median / grad.median,
                "cpu_ratio": timing.cpu_median / grad.cpu_median,
                "spread": timing.spread,
                "timing": timing.to_dict(),
                "ratio_text": f"{timing.median / grad.median:.2f}x",
                "cpu_ratio_text": f"{timing.cpu_median / grad.cpu_median:.2f}x",
            }
        )
    _clear_grads(case.model)
    return rows


def flatlens_measures(case: Case, sizes: Sizes, seed: int = 0) -> list[dict[str, Any]]:
    """Top-1 eigenvalue, R1 and a line with flatlens: time, HVPs, passes, peak memory."""

    def top1(obj: Objective) -> tuple[str, Any]:
        res = hessian_eigenvalues(obj, 1, tol=TOL, seed=seed)
        return f"{float(res.eigenvalues[0]):.5g}", res

    def r1(obj: Objective) -> tuple[str, Any]:
        res = first_order_flatness(
            obj, RHO, steps=sizes.r1_steps, restarts=0, init=("eigen",), seed=seed
        )
        return f"{res.value:.5g}", res

    def line(obj: Objective) -> tuple[str, Any]:
        d = fl.random_direction(obj, seed=seed)
        ls = fl.line(obj, d, num_points=sizes.line_points)
        loss = np.asarray(ls.values["loss"])
        return f"loss {loss.min():.4g}..{loss.max():.4g}", ls

    jobs = {
        "top-1": (top1, f"Lanczos tol={TOL:g}"),
        "R1": (r1, f"rho={RHO} steps={sizes.r1_steps} restarts=0 init=eigen"),
        "line": (line, f"{sizes.line_points} points, filter-normalized random direction"),
    }
    rows = []
    for measure, (fn, setting) in jobs.items():
        obj = case.objective()
        before = dict(obj.counts)
        (text, res), stats = measured(lambda fn=fn, obj=obj: fn(obj), case.device)
        counts = {k: obj.counts[k] - before.get(k, 0) for k in obj.counts}
        row = {
            "case": case.name,
            "weights": case.weights,
            "measure": measure,
            "tool": "flatlens",
            "setting": setting,
            **stats,
            "num_hvps": counts["hvp"],
            "num_gradients": counts["gradient"],
            "num_losses": counts["loss"],
            "value_text": text,
            "result": res.to_dict(),
            "cache_graph": obj.cache_graph,
        }
        rows.append(row)
        print(f"  {case.name} {measure}: {stats['time_s']:.1f}s {counts} {text}", flush=True)
        del obj, res
    return rows


def available(tool: str) -> bool:
    """Whether a baseline is installed (the GPU machine may lack PyHessian or curvlinops)."""
    module = {"pyhessian": "pyhessian.hessian", "curvlinops": "curvlinops"}.get(tool, "flatlens")
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def warm_up(case: Case) -> None:
    """One HVP per tool on two inputs, so no timed call pays one-time set-up costs."""
    tiny = replace(case, data=_head(case.data, 2))
    obj = tiny.objective()
    obj.hvp(torch.ones(obj.num_params, dtype=obj.dtype, device=case.device))
    if case.name == "resnet18" and available("pyhessian"):
        cls, module = _pyhessian()
        h = _pyhessian_object(tiny, cls)
        module.hessian_vector_product(h.gradsH, h.params, [torch.ones_like(p) for p in h.params])
        del h
    if case.name == "resnet18" and available("curvlinops"):
        _curvlinops_operator(tiny).to_scipy().matvec(np.ones(obj.num_params))
    del obj
    _clear_grads(case.model)


def _head(data: Any, n: int) -> Any:
    if isinstance(data, tuple):
        return tuple(t[:n] for t in data)
    return data[:1]


# ---------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]], costs: list[dict[str, Any]]) -> list[str]:
    """One line per target: met or missed, with the numbers.

    * top-5: >= 3x faster than PyHessian and than curvlinops, at no worse error than each;
    * top-1: >= 1.5x faster than both at the error PyHessian reaches (flatlens' error <=
      PyHessian's);
    * peak memory <= PyHessian's; one HVP <= 2 gradients.

    Each speed-up line gives flatlens at tol=1e-3 (the tol every tool got) and, when their
    errors also meet the accuracy condition, flatlens at the looser tols.
    """
    lines = []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["case"] == "resnet18":
            groups.setdefault((r["weights"], r["measure"]), {})[r["tool"]] = r
    for (weights, measure), g in groups.items():
        if "flatlens" not in g or "pyhessian" not in g:
            continue
        ours = g["flatlens"]
        if measure.startswith("top-"):
            k = int(measure.split("-")[1])
            target = 3.0 if k >= 5 else 1.5
            for tool in ("pyhessian", "curvlinops"):
                if tool not in g:
                    continue
                # top-1: at the error PyHessian reaches; top-5: no worse than this tool's.
                bar = g["pyhessian" if k == 1 else tool].get("error")
                parts = []
                for name in ("flatlens", *FLATLENS_LOOSE):
                    r = g.get(name)
                    if r is None:
                        continue
                    err = r.get("error")
                    accurate = err is not None and bar is not None and err <= max(bar, 1e-6)
                    if name != "flatlens" and not accurate:
                        continue
                    mark = "ok" if r[f"speedup_{tool}"] >= target and accurate else "MISS"
                    acc = "n/a" if err is None or bar is None else f"{err:.1e} vs {bar:.1e}"
                    label = f"flatlens tol={TOL:g}" if name == "flatlens" else name
                    speed, cpu = r[f"speedup_{tool}"], r[f"cpu_speedup_{tool}"]
                    parts.append(f"{label} {speed:.2f}x (CPU {cpu:.2f}x), error {acc} {mark}")
                lines.append(
                    f"resnet18 {weights} {measure} vs {tool} (target {target}x): "
                    + "; ".join(parts)
                )
        pk_ours, pk_ph = ours["peak_bytes"], g["pyhessian"]["peak_bytes"]
        d_ours, d_ph = ours["peak_over_entry_bytes"], g["pyhessian"]["peak_over_entry_bytes"]
        if pk_ours is not None and pk_ph is not None:
            mark = "ok" if pk_ours <= pk_ph else "MISS"
            extra = ""
            if d_ours is not None and d_ph is not None:
                extra = f"; above entry {d_ours / 2**20:.0f} vs {d_ph / 2**20:.0f} MiB"
            lines.append(
                f"resnet18 {weights} {measure} peak memory <= PyHessian: {pk_ours / 2**20:.0f} vs "
                f"{pk_ph / 2**20:.0f} MiB {mark}{extra}"
            )
    for r in costs:
        if r["method"].startswith("hvp"):
            mark = "ok" if r["ratio"] <= 2.0 else "MISS"
            lines.append(
                f"{r['case']} {r['method']} = {r['ratio']:.2f} gradients "
                f"(CPU {r['cpu_ratio']:.2f}) (target <= 2) {mark}"
            )
    return lines


EIGEN_COLUMNS = [
    Column("case", "model"),
    Column("weights", "weights"),
    Column("measure", "measure"),
    Column("tool", "tool"),
    Column("time_s", "time [s]", ".1f"),
    Column("cpu_s", "CPU [s]", ".1f"),
    Column("num_hvps", "HVPs"),
    Column("speedup_pyhessian_text", "x PyHessian"),
    Column("speedup_curvlinops_text", "x curvlinops"),
    Column("value_text", "top eigenvalue / trace"),
    Column("error", "rel. error vs fp64", ".1e"),
    Column("bound_text", "flatlens bound"),
    Column("peak_mib", "peak RSS [MiB]", ".0f"),
    Column("over_mib", "above entry [MiB]", ".0f"),
]
FLATLENS_COLUMNS = [
    Column("case", "model"),
    Column("measure", "measure"),
    Column("setting", "setting"),
    Column("time_s", "time [s]", ".1f"),
    Column("num_hvps", "HVPs"),
    Column("num_gradients", "gradients"),
    Column("num_losses", "losses"),
    Column("value_text", "value"),
    Column("peak_mib", "peak RSS [MiB]", ".0f"),
    Column("over_mib", "above entry [MiB]", ".0f"),
]
COST_COLUMNS = [
    Column("case", "model"),
    Column("method", "method"),
    Column("time_s", "time [s]", ".3f"),
    Column("ratio_text", "/ gradient"),
    Column("cpu_ratio_text", "/ gradient (CPU)"),
    Column("spread", "spread", ".0%"),
]


def _with_mib(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        r = dict(r)
        if r.get("peak_bytes") is not None:
            r["peak_mib"] = r["peak_bytes"] / 2**20
        if r.get("peak_over_entry_bytes") is not None:
            r["over_mib"] = r["peak_over_entry_bytes"] / 2**20
        if r.get("relative_bound") is not None:
            r["bound_text"] = f"{r['relative_bound']:.1e}" + (
                "" if r.get("converged", True) else " (not met)"
            )
        out.append(r)
    return out


def tables(results: dict[str, Any], device: str) -> dict[str, Any]:
    """``{title: (rows, columns)}`` for :func:`_common.report`."""
    mem = "peak CUDA allocated" if device.startswith("cuda") else "peak RSS"
    eigen_cols = [replace(c, header=c.header.replace("peak RSS", mem)) for c in EIGEN_COLUMNS]
    out: dict[str, Any] = {}
    if results.get("comparison"):
        out[f"ResNet-18: flatlens vs PyHessian 0.1 vs curvlinops on {device} (float32)"] = (
            _with_mib(results["comparison"]),
            eigen_cols,
        )
    if results.get("flatlens"):
        out[f"ViT and GPT-2: flatlens measures on {device} (float32)"] = (
            _with_mib(results["flatlens"]),
            [replace(c, header=c.header.replace("peak RSS", mem)) for c in FLATLENS_COLUMNS],
        )
    if results.get("hvp_cost"):
        out[f"One HVP relative to one gradient on {device}"] = (results["hvp_cost"], COST_COLUMNS)
    return out


# ---------------------------------------------------------------------------- driver
def _print_case(summary: dict[str, Any]) -> None:
    acc = f", accuracy {summary['accuracy']:.2f}" if "accuracy" in summary else ""
    print(
        f"[{summary['name']} {summary['weights']}] {summary['description']}; "
        f"{summary['num_params']} parameters, loss {summary['loss']:.4g}{acc}",
        flush=True,
    )


def run(
    sizes: Sizes,
    device: torch.device,
    parts: Sequence[str],
    *,
    reference: bool = True,
) -> dict[str, Any]:
    """Every measurement of the selected ``parts``; returns the JSON payload's results."""
    start = time.perf_counter()
    out: dict[str, Any] = {
        "cases": [],
        "references": {},
        "comparison": [],
        "flatlens": [],
        "hvp_cost": [],
    }
    resnet_parts = {"resnet_eigen", "resnet_trace", "hvp_cost"} & set(parts)
    if resnet_parts:
        case = resnet_case(sizes, device, trained=True)
        out["cases"].append(case.summary())
        _print_case(out["cases"][-1])
        warm_up(case)
        if "resnet_eigen" in parts:
            ref = None
            if reference:
                ref = reference_eigenvalues(case, max(sizes.ks), sizes.reference_tol)
                out["references"]["resnet18 trained"] = ref
                print(
                    f"  reference {ref['eigenvalues']} ({ref['num_hvps']} HVPs, "
                    f"{ref['seconds']:.0f}s{', cached' if ref['from_cache'] else ''})",
                    flush=True,
                )
            out["comparison"] += compare_eigen(case, sizes.ks, ref and ref["eigenvalues"])
        if "resnet_trace" in parts:
            out["comparison"] += compare_trace(case, sizes.trace_hvps)
        if "hvp_cost" in parts:
            out["hvp_cost"] += hvp_cost(case, repeats=sizes.hvp_cost_repeats)
        del case
    if "resnet_untrained" in parts:
        case = resnet_case(sizes, device, trained=False)
        out["cases"].append(case.summary())
        _print_case(out["cases"][-1])
        ref = None
        if reference:
            ref = reference_eigenvalues(case, 1, sizes.reference_tol)
            out["references"]["resnet18 untrained"] = ref
            print(
                f"  reference {ref['eigenvalues']} ({ref['num_hvps']} HVPs, "
                f"{ref['seconds']:.0f}s{', cached' if ref['from_cache'] else ''})",
                flush=True,
            )
        out["comparison"] += compare_eigen(case, (1,), ref and ref["eigenvalues"])
        del case
    for name, make in (("vit", vit_case), ("gpt2", gpt2_case)):
        if name not in parts:
            continue
        case = make(sizes, device)
        out["cases"].append(case.summary())
        _print_case(out["cases"][-1])
        warm_up(case)
        out["flatlens"] += flatlens_measures(case, sizes)
        if "hvp_cost" in parts:
            out["hvp_cost"] += hvp_cost(case, repeats=sizes.hvp_cost_repeats)
        del case
    out["summary"] = summarize(out["comparison"], out["hvp_cost"])
    out["seconds"] = time.perf_counter() - start
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes)")
    parser.add_argument("--images", type=int, default=None, help="ResNet-18 images (default 16)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=None,
        help="what to measure (default: all; --quick: all but resnet_untrained)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    parser.add_argument(
        "--hvp-repeats", type=int, default=None, help="timed rounds of hvp_cost (default 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(cli_args)
    threads = set_threads(args.threads)
    device = torch.device(args.device)
    sizes = QUICK if args.quick else Sizes()
    if args.images is not None:
        sizes = replace(sizes, images=args.images)
    if args.hvp_repeats is not None:
        sizes = replace(sizes, hvp_cost_repeats=args.hvp_repeats)
    parts = args.parts or [p for p in PARTS if not (args.quick and p == "resnet_untrained")]
    results = run(sizes, device, parts, reference=not args.no_reference)
    payload = {
        "command": " ".join(["benchmarks/bench_models.py", *cli_args]),
        "environment": environment(device),
        "versions": {
            "pyhessian": _version("PyHessian"),
            "curvlinops": _version("curvlinops-for-pytorch"),
            "torchvision": _version("torchvision"),
            "timm": _version("timm"),
            "transformers": _version("transformers"),
            "scipy": _version("scipy"),
        },
        "sizes": asdict(sizes),
        "tol": TOL,
        "threads": threads,
        **results,
    }
    name = "bench_models_quick" if args.quick else "bench_models"
    report(name, tables(results, str(device)), payload, out_dir=args.out, markdown=args.markdown)
    print()
    print("\n".join(results["summary"]))
    print(f"\ntotal {results['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
