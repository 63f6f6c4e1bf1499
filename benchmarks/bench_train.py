"""bench_train: what training as researchers train costs, on a CIFAR-shaped ResNet-18.

Batch 128, one thread, synthetic CIFAR-shaped data (uint8 pixels, 10 learnable classes), ratios
measured in one run:

1. images per second of SGD, SAM, GAM and GAM-exact, in memory (crop-flip on the device,
   per batch) and streamed (a data set decoded per example, crop-flip through
   torchvision.transforms.v2 in 2 DataLoader workers), timed interleaved step by step;
   target: streaming costs <= 5% over in memory;
2. flatlens' SAM and GAM steps beside plain reference loops of the published algorithms
   (davda54/sam's two passes, xxgege/GAM's four), interleaved; target: within 5%;
3. λ_max warm-started from the previous eigenvector (after ``--between`` SGD steps) against
   a cold start at the same point and tol (1e-4), and λ_c's forward passes cold and warm;
   targets: warm <= 1/3 of cold HVPs, λ_c <= 8 forward passes;
4. the overhead of λ_max + λ_c every epoch (256 training images, every check the measures
   make by default) projected to a 50,000-image epoch (391 steps) from the measured step
   and measure times, against an SGD epoch (target <= 5%); with R1 under its budget of 40
   HVP-equivalents as well, against a GAM epoch (target <= 15%).

Usage::

    python benchmarks/bench_train.py                 # ResNet-18 at width 64 (hours on a CPU)
    python benchmarks/bench_train.py --width 16      # the same network 4x narrower
    python benchmarks/bench_train.py --quick         # width 8, 2 steps, a smoke run

Prints the tables and writes ``benchmarks/results/bench_train.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import numpy as np
import torch
from _common import Column, environment, report, set_threads
from torch import nn

from flatlens import Objective, hessian_eigenvalues
from flatlens._readers import _Images
from flatlens._streams import Streams
from flatlens.data import Dataset
from flatlens.optim import GAM, SAM
from flatlens.train import FlatnessTracker, TrainConfig, Trainer, augmentation
from flatlens.train import build_model as build_net
from flatlens.train import build_optimizer as build_opt
from flatlens.train._steps import UpdateProbe

EPOCH_STEPS = 391  # 50,000 images in batches of 128
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images whose class is a fixed function of them (learnable): the argmax
    of 10 fixed random projections of the 4x4-pooled, standardized image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    pooled = pixels.reshape(n, 3, 4, 8, 4, 8).mean(axis=(3, 5)).reshape(n, -1)
    pooled = (pooled - pooled.mean(0)) / pooled.std(0)
    weights = np.random.default_rng(1234).standard_normal((48, 10))
    return pixels, (pooled @ weights).argmax(1).astype(np.int64)


def in_memory(pixels: np.ndarray, labels: np.ndarray) -> Dataset:
    x = torch.from_numpy(pixels).float().div(255)
    m, s = torch.tensor(MEAN)[None, :, None, None], torch.tensor(STD)[None, :, None, None]
    x = (x - m) / s
    y = torch.from_numpy(labels)
    return Dataset(x, y, x[:256], y[:256], 10, "synthetic-cifar", MEAN, STD)


def streamed(pixels: np.ndarray, labels: np.ndarray) -> Streams:
    train, test = _Images(pixels, labels, MEAN, STD), _Images(pixels[:256], labels[:256], MEAN, STD)
    return Streams(train, test, num_classes=10, name="synthetic-cifar", mean=MEAN, std=STD)


def _trainer(optimizer: str, data: Any, width: int, **kw: Any) -> Trainer:
    config = TrainConfig(
        model="resnet18", model_kwargs={"width": width}, optimizer=optimizer, batch_size=128,
        augment="crop-flip", lr=0.05, **kw,
    )  # fmt: skip
    model = build_net(config, data)
    return Trainer(
        model, build_opt(config, model), data, batch_size=128, seed=0,
        augment=augmentation(config, data), augment_on=config.augment_on,
        num_workers=config.num_workers,
    )  # fmt: skip


def _timed_steps(trainer: Trainer) -> Any:
    """A generator: each next() times reading one batch and one optimizer step (epoch after
    epoch): ``(wall seconds, CPU seconds of this process)``."""
    trainer.model.train()
    while True:
        batches = trainer.feed.epoch()
        while True:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                x, y, weight = next(batches)
            except StopIteration:
                break
            trainer.stepper.step(x, y, weight)
            yield time.perf_counter() - start, time.process_time() - cpu


def _timed(fn: Any) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and its CPU seconds (this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def throughput(width: int, steps: int, workers: int) -> list[dict[str, Any]]:
    """Images per second in memory vs streamed, per optimizer (interleaved step by step)."""
    n = 128 * (steps + 2)
    pixels, labels = synthetic(n)
    memory, stream = in_memory(pixels, labels), streamed(pixels, labels)
    rows = []
    for name in ("sgd", "sam", "gam", "gam-exact"):
        a = _trainer(name, memory, width)
        b = _trainer(name, stream, width, augment_on="workers", num_workers=workers)
        ta, tb = _timed_steps(a), _timed_steps(b)
        start = time.perf_counter()
        next(ta)  # warm-up (allocator, autograd)
        first_a = time.perf_counter() - start
        start = time.perf_counter()
        next(tb)  # warm-up, and the workers start
        first_b = time.perf_counter() - start
        times_a, times_b = [], []
        for _ in range(steps):
            times_a.append(next(ta))
            times_b.append(next(tb))
        ma, mb = (statistics.median(t[0] for t in times) for times in (times_a, times_b))
        ca, cb = (statistics.median(t[1] for t in times) for times in (times_a, times_b))
        rows.append(
            {
                "optimizer": name,
                "memory_images_per_s": 128 / ma,
                "streamed_images_per_s": 128 / mb,
                "streaming_cost": mb / ma - 1,
                "streaming_cost_cpu": cb / ca - 1,
                "first_step_memory_s": first_a,
                "first_step_streamed_s": first_b,
                "startup_per_epoch": max(first_b - first_a, 0.0) / (EPOCH_STEPS * ma),
                "step_s": ma,
                "step_cpu_s": ca,
                "implementation": b.feed.implementation,
                "times_memory": times_a,
                "times_streamed": times_b,
            }
        )
        print(f"  {name}: {128 / ma:.1f} vs {128 / mb:.1f} images/s", flush=True)
    return rows


# ---------------------------------------------------------------------- reference loops
def _norm(vs):
    return torch.sqrt(sum((v**2).sum() for v in vs))


def _grads(model, x, y):
    for p in model.parameters():
        p.grad = None
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _bn(model, momentum):
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append(m.momentum)
            m.momentum = momentum
    return saved


def _unbn(model, saved):
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, value in zip(bns, saved, strict=True):
        m.momentum = value


def reference_sam_step(model, base, x, y, rho=0.05, eps=1e-12):
    """davda54/sam: ascend rho g/||g||, BatchNorm momentum 0 in pass 2, back, base step."""
    params = list(model.parameters())
    g = _grads(model, x, y)
    with torch.no_grad():
        old = [p.detach().clone() for p in params]
        scale = rho / (_norm(g) + eps)
        for p, gi in zip(params, g, strict=True):
            p.add_(gi * scale)
    saved = _bn(model, 0.0)
    g2 = _grads(model, x, y)
    _unbn(model, saved)
    with torch.no_grad():
        for p, o, gi in zip(params, old, g2, strict=True):
            p.copy_(o)
            p.grad = gi
    base.step()


def reference_gam_step(model, base, x, y, rho=0.2, rho_p=0.03, b0=0.1, b1=0.1, gamma=0.05):
    """xxgege/GAM gam/gam.py: g0, g1 at +rho' g0, g2 at +rho (g1-g0), g3 at +rho' g2, the
    decomposition of h+ and h- = g0 + |1-b0| g2, back to theta, base step."""
    eps, params = 1e-12, list(model.parameters())
    theta = [p.detach().clone() for p in params]
    g0 = _grads(model, x, y)
    with torch.no_grad():
        e0 = [g * (rho_p / (_norm(g0) + eps)) for g in g0]
        for p, e in zip(params, e0, strict=True):
            p.add_(e)
    saved = _bn(model, 0.0)
    g1 = _grads(model, x, y)
    with torch.no_grad():
        diff = [a - b for a, b in zip(g1, g0, strict=True)]
        scale = rho / (_norm(diff) + eps)
        for p, t, d in zip(params, theta, diff, strict=True):
            p.copy_(t + d * scale)
    g2 = _grads(model, x, y)
    with torch.no_grad():
        scale = rho_p / (_norm(g2) + eps)
        for p, g in zip(params, g2, strict=True):
            p.add_(g * scale)
    g3 = _grads(model, x, y)
    _unbn(model, saved)
    with torch.no_grad():
        minus = [a + abs(1 - b0) * b for a, b in zip(g0, g2, strict=True)]
        plus = [b1 * a + (1 - b1) * b for a, b in zip(g1, g3, strict=True)]
        n_plus, n_minus = _norm(plus), _norm(minus)
        cos = sum((a * b).sum() for a, b in zip(minus, plus, strict=True)) / (
            n_plus * n_minus + eps
        )
        for p, t, m, h in zip(params, theta, minus, plus, strict=True):
            p.copy_(t)
            p.grad = h - gamma * (m - cos * n_minus * h / (n_plus + eps))
    base.step()


def versus_reference(width: int, steps: int) -> list[dict[str, Any]]:
    """flatlens' SAM and GAM (official form) steps beside the reference loops."""
    from _common import time_interleaved

    pixels, labels = synthetic(128)
    data = in_memory(pixels, labels)
    x, y = data.x_train, data.y_train

    def make(kind):
        torch.manual_seed(0)
        from flatlens.zoo import resnet18

        model = resnet18(width=width)
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        if kind == "flatlens SAM":
            opt = SAM(model.parameters(), base, rho=0.05, model=model)
        elif kind == "flatlens GAM":
            opt = GAM.from_official(
                model.parameters(), base, model=model, grad_rho=0.03, grad_norm_rho=0.2,
                grad_beta_0=0.1, grad_beta_1=0.1, grad_gamma=0.05,
            )  # fmt: skip
        else:
            opt = base

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if kind.startswith("flatlens"):
            return lambda: opt.step(closure)
        step = reference_sam_step if "SAM" in kind else reference_gam_step
        return lambda: step(model, base, x, y)

    names = ["flatlens SAM", "reference SAM", "flatlens GAM", "reference GAM"]
    timed = time_interleaved({n: make(n) for n in names}, repeats=steps, warmup=1)
    rows = []
    for algo in ("SAM", "GAM"):
        mine, ref = timed[f"flatlens {algo}"][0], timed[f"reference {algo}"][0]
        rows.append(
            {
                "algorithm": algo,
                "flatlens_s": mine.median,
                "reference_s": ref.median,
                "ratio": mine.median / ref.median,
                "flatlens_cpu_s": mine.cpu_median,
                "reference_cpu_s": ref.cpu_median,
                "cpu_ratio": mine.cpu_median / ref.cpu_median,
            }
        )
    return rows


# ---------------------------------------------------------------------- measures
def measures(
    width: int, warmup_steps: int, between: int, samples: int, rounds: int
) -> dict[str, Any]:
    """λ_max cold, then ``rounds`` times (``between`` SGD steps later) warm and cold at the
    same point, R1 under its budget at the last one; λ_c cold, then warm each round."""
    pixels, labels = synthetic(128 * 8, seed=1)
    data = in_memory(pixels, labels)
    trainer = _trainer("sgd", data, width)
    steps = _timed_steps(trainer)
    for _ in range(warmup_steps):
        next(steps)
    subset = (data.x_train[:samples], data.y_train[:samples])
    model, loss = trainer.model, nn.CrossEntropyLoss()
    tracker = FlatnessTracker(model, loss, subset, measures=["lambda_max"])
    probe = UpdateProbe(trainer.optimizer, list(model.parameters()))

    def critical():
        probe.before()
        next(steps)
        return _timed(lambda: tracker.critical(probe.direction(), at=probe.point()))

    def cpu(timed):
        value, wall, cpu_s = timed
        value["wall_s"], value["cpu_s"] = wall, cpu_s
        return value

    first = cpu(_timed(tracker.measure))
    lc = [cpu(critical())]
    pairs = []
    for _ in range(rounds):
        for _ in range(between):
            next(steps)
        warm = cpu(_timed(tracker.measure))
        # the cold solve at the very point of the warm one (λ_c's probe takes a step)
        obj = Objective(model, loss, [subset], check_determinism=False)
        cold, cold_s, cold_cpu = _timed(lambda obj=obj: hessian_eigenvalues(obj, 1, seed=0))
        pairs.append(
            {
                "warm": warm,
                "cold": {
                    "lambda_max": cold.value,
                    "hvps": cold.num_hvps,
                    "seconds": cold_s,
                    "cpu_s": cold_cpu,
                    "error_bound": float(cold.error_bounds[0]),
                    "converged": bool(cold.converged.all()),
                },
            }
        )
        lc.append(cpu(critical()))
    r1 = FlatnessTracker(model, loss, subset, measures=["r1"], measure_budget=40.0)
    r1.load_state_dict({**tracker.state_dict(), "checked": True})  # eigen start: warm
    r1_values = cpu(_timed(r1.measure))
    return {
        "first": first,
        "pairs": pairs,
        "lambda_c": lc,
        "r1": r1_values,
        "samples": samples,
        "between_steps": between,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (64: the real)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per contender")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20, help="SGD steps before measuring")
    parser.add_argument("--between", type=int, default=40, help="SGD steps between λ_max")
    parser.add_argument("--rounds", type=int, default=3, help="warm/cold measurement rounds")
    parser.add_argument("--samples", type=int, default=256, help="images of the measures")
    parser.add_argument("--quick", action="store_true", help="width 8, 2 steps: a smoke run")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.steps, args.warmup, args.between, args.samples = 8, 2, 5, 5, 64
        args.rounds = 2
    set_threads(args.threads)
    print(f"ResNet-18 width {args.width}, batch 128, {args.threads} thread(s)", flush=True)
    print("1. throughput", flush=True)
    rows = throughput(args.width, args.steps, args.workers)
    print("2. flatlens vs reference steps", flush=True)
    ref = versus_reference(args.width, args.steps)
    print("3. measures", flush=True)
    m = measures(args.width, args.warmup, args.between, args.samples, args.rounds)
    step = {r["optimizer"]: r["step_cpu_s"] for r in rows}
    pairs = m["pairs"]
    warm_hvps = sum(p["warm"]["cost"]["lambda_max"]["hvps"] for p in pairs)
    cold_hvps = sum(p["cold"]["hvps"] for p in pairs)
    ratio = warm_hvps / cold_hvps
    lc_warm = m["lambda_c"][1:]
    r1_cost = m["r1"]["cost"]["r1"]
    # CPU seconds of this one-thread process: far less sensitive than wall time to the load
    # of a shared machine, and the projection divides times taken minutes apart
    lam_cpu = statistics.median(p["warm"]["cpu_s"] for p in pairs)
    lc_cpu = statistics.median(c["cpu_s"] for c in lc_warm)
    r1_cpu = m["r1"]["cpu_s"] * r1_cost["seconds"] / max(m["r1"]["wall_s"], 1e-9)
    per_epoch = lam_cpu + lc_cpu
    projection = [
        {
            "case": "λ_max + λ_c every epoch / SGD epoch",
            "measure_s": per_epoch,
            "epoch_s": EPOCH_STEPS * step["sgd"],
            "overhead": per_epoch / (EPOCH_STEPS * step["sgd"]),
            "target": 0.05,
        },
        {
            "case": "λ_max + λ_c + R1 (budget 40) every epoch / GAM epoch",
            "measure_s": per_epoch + r1_cpu,
            "epoch_s": EPOCH_STEPS * step["gam"],
            "overhead": (per_epoch + r1_cpu) / (EPOCH_STEPS * step["gam"]),
            "target": 0.15,
        },
    ]
    costs = [
        {
            "measure": "λ_max cold (first)",
            "value": m["first"]["lambda_max"],
            **_cost(m["first"]["cost"]["lambda_max"]),
            "cpu_s": m["first"]["cpu_s"],
        }
    ]
    for i, p in enumerate(pairs, 1):
        w = p["warm"]
        costs.append(
            {"measure": f"λ_max warm, round {i}", "value": w["lambda_max"],
             **_cost(w["cost"]["lambda_max"]), "cpu_s": w["cpu_s"]}
        )  # fmt: skip
        costs.append(
            {"measure": f"λ_max cold, round {i}", "value": p["cold"]["lambda_max"],
             "hvps": p["cold"]["hvps"], "seconds": p["cold"]["seconds"],
             "cpu_s": p["cold"]["cpu_s"]}
        )  # fmt: skip
    for i, c in enumerate(m["lambda_c"]):
        cost = c["cost"]["lambda_c"]
        costs.append(
            {"measure": "λ_c cold" if i == 0 else f"λ_c warm, round {i}", "value": c["lambda_c"],
             "forward": cost["forward"], "seconds": cost["seconds"], "cpu_s": c["cpu_s"]}
        )  # fmt: skip
    costs.append(
        {"measure": "R1, budget 40", "value": m["r1"]["r1"], **_cost(r1_cost), "cpu_s": r1_cpu}
    )
    tables = {
        f"images/s, ResNet-18 width {args.width}, batch 128, {args.threads} thread": (
            rows,
            [
                Column("optimizer", "optimizer"),
                Column("memory_images_per_s", "in memory", ".2f"),
                Column("streamed_images_per_s", "streamed (2 workers)", ".2f"),
                Column("streaming_cost", "streaming cost (wall)", "+.1%"),
                Column("streaming_cost_cpu", "(main CPU)", "+.1%"),
                Column("startup_per_epoch", "worker start / epoch", ".2%"),
            ],
        ),
        "flatlens vs reference loops (s per step)": (
            ref,
            [
                Column("algorithm", "algorithm"),
                Column("flatlens_s", "flatlens", ".2f"),
                Column("reference_s", "reference", ".2f"),
                Column("ratio", "ratio (wall)", ".3f"),
                Column("cpu_ratio", "ratio (CPU)", ".3f"),
            ],
        ),
        f"measure costs ({args.samples} images; λ_max tol 1e-4; first after {args.warmup} "
        f"SGD steps, then {args.rounds} rounds of {args.between} steps; warm/cold HVPs "
        f"{ratio:.2f})": (
            costs,
            [
                Column("measure", "measure"),
                Column("value", "value", ".4g"),
                Column("hvps", "HVPs"),
                Column("gradients", "gradients"),
                Column("hvp_equivalents", "HVP-eq", ".1f"),
                Column("forward", "forward passes"),
                Column("seconds", "wall s", ".1f"),
                Column("cpu_s", "CPU s", ".1f"),
            ],
        ),
        "projected overhead per 50,000-image epoch (CPU seconds)": (
            projection,
            [
                Column("case", "case"),
                Column("measure_s", "measures s", ".1f"),
                Column("epoch_s", "epoch s", ".0f"),
                Column("overhead", "overhead", ".2%"),
                Column("target", "target", ".0%"),
            ],
        ),
    }
    payload = {
        "environment": environment(),
        "settings": vars(args),
        "throughput": rows,
        "versus_reference": ref,
        "measures": m,
        "warm_over_cold_hvps": ratio,
        "projection": projection,
    }
    report("bench_train", tables, payload, markdown=args.markdown)


def _cost(cost: dict[str, Any]) -> dict[str, Any]:
    keys = ("hvps", "gradients", "hvp_equivalents", "seconds")
    return {k: cost[k] for k in keys if k in cost and not math.isnan(float(cost[k]))}


if __name__ == "__main__":
    main()
