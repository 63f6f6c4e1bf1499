"""Benchmark: the four CPU speed-ups of commit 8b04aeb that issue 13 removed/kept.

Measures, on the code of commit 8b04aeb (the tree before issue 13's restructuring), what
each of its CPU speed-ups is worth, by turning each off alone and all off together:

* ``ce``     -- cross-entropy rewrite (``Objective.criterion = fast_cross_entropy(loss_fn)``);
               off: ``obj.criterion = obj.loss_fn``.
* ``fold``   -- conv -> BatchNorm fold via torch.fx (``fold_conv_batchnorm``, in the
               Objective and in the landscape ``SerialEvaluator``'s own copy); off: both
               imports patched to return ``None``.
* ``cl``     -- channels-last convolutions inside the fold (no-grad CPU float32 only);
               off: ``flatlens.fold_batchnorm._inference_on_cpu`` patched to return False.
* ``affine`` -- ``AffineEvalBatchNorm`` around second-order forwards; off:
               ``flatlens.objective.AffineEvalBatchNorm`` patched to a no-op context.

Configurations: ``all_on`` (the default), ``no_<x>`` for each speed-up, ``all_off`` (plain
PyTorch). Models (float32, eval mode, ``nn.CrossEntropyLoss``): the digits MLP on the full
train split as one batch, the digits BatchNorm CNN on 1024 digits images, and the CIFAR
ResNet-18 (``zoo.resnet18``) on 32 random 3x32x32 images with BatchNorm running statistics
set by three train-mode forwards. Operations: ``loss()``, ``gradient()`` (uncached
objective), one HVP through the cached graph (graph built first, second call timed), one
HVP without the cache, and ``landscape.line`` cost per point. Timings are CPU seconds
(``time.process_time``, one thread), the median of interleaved repeats (all configurations
in turn within each repeat). Value differences: max |a - b| / max |b| against ``all_off``.

Reproduce (from the repository root)::

    git worktree add /tmp/flatlens_old 8b04aeb
    PYTHONPATH=/tmp/flatlens_old .venv/bin/python benchmarks/bench_speedups_old.py \
        --tree /tmp/flatlens_old

Results: a markdown table on stdout and ``benchmarks/results/bench_speedups_old.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

OUT = Path(__file__).resolve().parent / "results" / "bench_speedups_old.json"
CONFIGS = ["all_on", "no_ce", "no_fold", "no_cl", "no_affine", "all_off"]
SPEEDUPS = {"ce", "fold", "cl", "affine"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="/tmp/flatlens_old", help="checkout of 8b04aeb")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18"])
    parser.add_argument("--repeats", type=int, default=7, help="repeats for digits models")
    parser.add_argument("--resnet-repeats", type=int, default=3)
    parser.add_argument("--resnet-line-steps", type=int, default=5, help="0 to skip")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.tree).resolve()))

    import flatlens.fold_batchnorm
    import flatlens.landscape.engines
    import flatlens.objective
    import torch
    from torch import nn

    import flatlens
    from flatlens import Objective, zoo
    from flatlens.data import load_digits
    from flatlens.landscape import line

    torch.set_num_threads(1)
    print(f"flatlens from {flatlens.__file__}, torch {torch.__version__}", flush=True)

    def patches(config: str) -> contextlib.ExitStack:
        off = (
            SPEEDUPS
            if config == "all_off"
            else ({config[3:]} if config.startswith("no_") else set())
        )
        stack = contextlib.ExitStack()
        if "fold" in off:
            for where in ("flatlens.objective", "flatlens.landscape.engines"):
                stack.enter_context(mock.patch(f"{where}.fold_conv_batchnorm", lambda m: None))
        if "cl" in off:
            stack.enter_context(
                mock.patch("flatlens.fold_batchnorm._inference_on_cpu", lambda x, w: False)
            )
        if "affine" in off:
            stack.enter_context(
                mock.patch("flatlens.objective.AffineEvalBatchNorm", contextlib.nullcontext)
            )
        stack.off = off  # type: ignore[attr-defined]
        return stack

    def make_case(name: str):
        torch.manual_seed(0)
        if name == "mlp":
            d = load_digits()
            return zoo.mlp(), d.train()
        if name == "cnn":
            d = load_digits(image=True)
            x = torch.cat([d.x_train, d.x_test])[:1024]
            y = torch.cat([d.y_train, d.y_test])[:1024]
            model = zoo.cnn()
            model.train()
            with torch.no_grad():
                for _ in range(3):
                    model(x + 0.3 * torch.randn_like(x))
            return model, (x, y)
        model = zoo.resnet18()
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(32, 3, 32, 32) * 1.5 + 0.2)
        x = torch.randn(32, 3, 32, 32)
        y = torch.randint(0, 10, (32,))
        return model, (x, y)

    def objective(model, data, config: str, cache: bool) -> Objective:
        with patches(config) as p:
            obj = Objective(
                model, nn.CrossEntropyLoss(), data, cache_graph=cache, check_determinism=False
            )
            if "ce" in p.off:
                obj.criterion = obj.loss_fn
            obj._evaluation_module()  # fold (or not) under this configuration's patches
        return obj

    results: dict = {
        "commit": "8b04aeb",
        "tree": str(Path(args.tree).resolve()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "timer": "time.process_time",
        "models": {},
    }

    for name in args.models:
        big = name == "resnet18"
        repeats = args.resnet_repeats if big else args.repeats
        model, data = make_case(name)
        model.eval()
        nparams = sum(p.numel() for p in model.parameters())
        print(f"\n## {name} ({nparams} params), {repeats} repeats", flush=True)
        objs = {c: objective(model, data, c, cache=False) for c in CONFIGS}
        cached = {c: objective(model, data, c, cache=True) for c in CONFIGS}
        theta = objs["all_on"].theta
        v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1))
        direction = torch.randn(theta.shape, generator=torch.Generator().manual_seed(2))
        direction *= 0.1 * theta.norm() / direction.norm()
        line_steps = args.resnet_line_steps if big else 51

        def ops(
            c: str,
            objs=objs,
            cached=cached,
            v=v,
            direction=direction,
            line_steps=line_steps,
        ) -> dict:
            o, oc = objs[c], cached[c]

            def hvp_cached():
                for other in cached.values():
                    other._graph = None  # one cached graph alive at a time
                with patches(c):
                    oc.hvp(v)  # builds the graph (untimed)
                return lambda: oc.hvp(v)

            table = {
                "loss": (lambda: o.loss(), None),
                "gradient": (lambda: o.gradient(), None),
                "hvp_cached": (None, hvp_cached),
                "hvp_uncached": (lambda: o.hvp(v), None),
            }
            if line_steps:
                table["line_per_point"] = (
                    lambda: line(o, direction, steps=line_steps, metrics=["loss"]),
                    None,
                )
            return table

        inner = {
            "loss": 1 if big else (100 if name == "mlp" else 20),
            "gradient": 1 if big else (50 if name == "mlp" else 10),
            "hvp_cached": 1 if big else (50 if name == "mlp" else 10),
            "hvp_uncached": 1 if big else (30 if name == "mlp" else 5),
            "line_per_point": 1 if big else (5 if name == "mlp" else 1),
        }
        per_op = {"line_per_point": line_steps}

        # Values (and warm-up): each configuration against all_off.
        values = {}
        for c in CONFIGS:
            with patches(c):
                values[c] = {
                    "loss": torch.tensor([objs[c].loss()]),
                    "gradient": objs[c].gradient(),
                    "hvp_uncached": objs[c].hvp(v),
                    "hvp_cached": cached[c].hvp(v),
                }
                if line_steps and not big:
                    values[c]["line"] = torch.tensor(
                        line(objs[c], direction, steps=line_steps, metrics=["loss"]).values["loss"]
                    )
        for other in cached.values():
            other._graph = None
        diffs = {
            c: {
                k: float(
                    (values[c][k] - values["all_off"][k]).abs().max()
                    / values["all_off"][k].abs().max()
                )
                for k in values[c]
            }
            for c in CONFIGS
        }

        times: dict = {c: {} for c in CONFIGS}
        op_names = list(ops("all_on"))
        for r in range(repeats):
            for op in op_names:
                for c in CONFIGS:
                    fn, setup = ops(c)[op]
                    if setup is not None:
                        fn = setup()
                    k = inner[op]
                    with patches(c):
                        t0 = time.process_time()
                        for _ in range(k):
                            fn()
                        dt = (time.process_time() - t0) / k / per_op.get(op, 1)
                    times[c].setdefault(op, []).append(dt)
            print(f"  repeat {r + 1}/{repeats} done", flush=True)

        med = {c: {op: statistics.median(ts) for op, ts in times[c].items()} for c in CONFIGS}
        ratios = {c: {op: med[c][op] / med["all_on"][op] for op in op_names} for c in CONFIGS}
        results["models"][name] = {
            "params": nparams,
            "repeats": repeats,
            "inner_calls": inner,
            "line_steps": line_steps,
            "median_cpu_s": med,
            "cpu_s": times,
            "ratio_to_all_on": ratios,
            "max_rel_diff_to_all_off": diffs,
        }
        print(f"\n### {name}: CPU time / all_on (all_on median CPU s in header)\n")
        print(
            "| config | " + " | ".join(f"{op} ({med['all_on'][op]:.3g}s)" for op in op_names) + " |"
        )
        print("|---" * (len(op_names) + 1) + "|")
        for c in CONFIGS:
            print(f"| {c} | " + " | ".join(f"{ratios[c][op]:.3f}" for op in op_names) + " |")
        print(f"\n### {name}: max relative difference to all_off\n")
        keys = list(diffs["all_on"])
        print("| config | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for c in CONFIGS:
            print(f"| {c} | " + " | ".join(f"{diffs[c][k]:.1e}" for k in keys) + " |")
        sys.stdout.flush()
        del objs, cached, values

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
