"""Peak memory of a measure, and the saved-bytes estimate behind graph caching."""

import torch
import torch.nn.functional as F
from helpers import classification_data, tiny_mlp, uneven_batches

from flatlens import (
    Objective,
    first_order_flatness,
    hessian_eigenvalues,
    hessian_trace,
    zeroth_order_sharpness,
)
from flatlens import landscape as fl
from flatlens.core import PeakMemory
from flatlens.core._memory import _status, saved_bytes


def test_peak_memory_sees_a_large_temporary_allocation():
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        inside = _status("VmRSS")
        del block
    after = _status("VmRSS")
    assert peak.kind in ("cpu_peak_rss", "cpu_process_peak_rss")
    assert peak.bytes >= inside - (1 << 20) and inside >= 64 << 20  # RSS counters lag a little
    if peak.kind == "cpu_peak_rss" and after is not None:
        # The peak was reset on entry, so it reflects this block, not an earlier one.
        assert peak.bytes <= max(inside, after) + (64 << 20)


def test_saved_bytes_counts_what_autograd_keeps():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(512, 256)
    _, saved = saved_bytes(lambda: torch.tanh(x @ w).sum())
    # x is saved for the matmul's backward and tanh's output for its own: 2 * 512 * 256 * 4.
    assert 2 * 512 * 256 * 4 <= saved <= 4 * 512 * 256 * 4


def test_measures_report_their_peak_memory():
    model = tiny_mlp()
    obj = Objective(model, F.cross_entropy, classification_data())
    direction = fl.random_direction(obj, seed=0)
    for res in (
        zeroth_order_sharpness(obj, 0.05, steps=2),
        first_order_flatness(obj, 0.05, steps=2),
        hessian_eigenvalues(obj, 1, tol=1e-2),
        hessian_trace(obj, num_probes=3),
        fl.line(obj, direction, num_points=5),
        fl.plane(obj, direction, fl.random_direction(obj, seed=1), num_points=3),
    ):
        assert res.peak_memory_bytes > 0 and res.peak_memory_kind
        assert res.to_dict()["peak_memory_bytes"] == res.peak_memory_bytes


def test_a_stored_landscape_keeps_its_peak_memory(tmp_path):
    obj = Objective(tiny_mlp(), F.cross_entropy, classification_data())
    res = fl.line(obj, fl.random_direction(obj, seed=0), num_points=5, store=tmp_path / "line")
    loaded = fl.load(tmp_path / "line")
    assert 0 < loaded.peak_memory_bytes <= res.peak_memory_bytes  # saved just before return
    assert loaded.peak_memory_kind == res.peak_memory_kind != ""
    assert loaded.equals(res, timing=False)


def test_cache_graph_follows_the_memory_budget():
    model = tiny_mlp()
    x, y = classification_data()
    data = uneven_batches(x, y, [len(y) // 3, len(y) - len(y) // 3])
    roomy = Objective(model, F.cross_entropy, data)
    tight = Objective(model, F.cross_entropy, data, memory_budget=1)
    v = roomy.zeros() + 1
    a, b = roomy.hvp(v), tight.hvp(v)
    assert roomy.cache_graph is True and tight.cache_graph is False
    assert tight.estimated_graph_bytes > 1
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.equal(tight.hvp(v), b)  # streams from now on, same answer
