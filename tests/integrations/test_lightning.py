"""SAM and GAM under Lightning equal a plain ``optimizer.step(closure)`` loop.

A small BatchNorm CNN trains 2 epochs of 4 batches on the CPU; the Lightning run and the
plain loop start from the same weights and see the same batches, and their final weights
and BatchNorm statistics agree to 1e-6 (in practice bit for bit). With
``accumulate_grad_batches=2`` the reference loop's closure runs both micro-batches of a
window, each loss divided by 2: the gradient of the two-batch mean at every pass.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import import_model_library
from torch import nn

from flatlens.optim import GAM, SAM
from flatlens.zoo import cnn

pl = import_model_library("lightning").pytorch
from flatlens.integrations.lightning import SharpnessAwareMixin  # noqa: E402

EPOCHS, BATCH, N = 2, 16, 64


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (N,), generator=gen)
    return x, y


def _net():
    torch.manual_seed(1)
    return cnn(1, 4, 10)


def _optimizer(kind, params, model):
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if kind == "sam":
        return SAM(params, base, rho=0.05, model=model)
    if kind == "gam":
        return GAM(params, base, model=model)
    if kind == "gam-exact":
        return GAM(params, base, model=model, mode="exact", perturb_rho=0.02)
    raise AssertionError(kind)


class _Module(pl.LightningModule):
    def __init__(self, kind, scheduler=False):
        super().__init__()
        self.net = _net()
        self.kind = kind
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        params = list(self.parameters())
        opt = _optimizer(self.kind, params, self)
        if not self.scheduler:
            return opt
        # The documented way: the scheduler is built on SAM/GAM itself.
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": sched}


class _Mixed(SharpnessAwareMixin, _Module):
    pass


def _fit(module, *, precision="32-true", accumulate=1, clip=None):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        precision=precision,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return module.net


def _plain(kind, *, bf16=False, accumulate=1, scheduler=False):
    """The reference: a plain loop, one optimizer.step(closure) per window."""
    net = _net()
    net.train()
    params = list(net.parameters())
    opt = _optimizer(kind, params, net)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5) if scheduler else None
    x, y = _data()
    micro = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    windows = [micro[i : i + accumulate] for i in range(0, len(micro), accumulate)]
    for _ in range(EPOCHS):
        for window in windows:

            def closure(create_graph=False, window=window):
                opt.zero_grad()
                total = 0.0
                for xb, yb in window:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = nn.functional.cross_entropy(net(xb), yb)
                    (loss / accumulate).backward(create_graph=create_graph)
                    total += loss.detach()
                return total

            opt.step(closure)
        if sched is not None:
            sched.step()
    return net


def _assert_same(a, b, tol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)
    assert worst <= tol, worst
    # Training moved the weights (the comparison is not of two untouched networks).
    start = _net().state_dict()
    assert max(float((sa[k] - start[k]).abs().max()) for k in sa) > 1e-3


@pytest.mark.parametrize("kind", ["sam", "gam"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_equals_plain_loop(kind, precision):
    net = _fit(_Module(kind), precision=precision)
    _assert_same(net, _plain(kind, bf16=precision == "bf16-mixed"))


@pytest.mark.parametrize("kind", ["sam", "gam"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_mixin_accumulation_equals_two_batch_mean(kind, precision):
    net = _fit(_Mixed(kind), precision=precision, accumulate=2)
    _assert_same(net, _plain(kind, bf16=precision == "bf16-mixed", accumulate=2))


def test_mixin_changes_nothing_without_accumulation():
    _assert_same(_fit(_Mixed("sam")), _plain("sam"))


@pytest.mark.parametrize("kind", ["sam", "gam"])
def test_accumulation_without_mixin_stops_with_the_documented_error(kind):
    with pytest.raises(RuntimeError, match="SharpnessAwareMixin") as info:
        _fit(_Module(kind), accumulate=2)
    assert "accumulate_grad_batches=2" in str(info.value)


def test_scheduler_on_sam_itself_equals_plain_loop():
    module = _Module("sam", scheduler=True)
    net = _fit(module)
    _assert_same(net, _plain("sam", scheduler=True))
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**EPOCHS)


def test_gam_exact_mode_with_the_mixin_equals_plain_loop():
    _assert_same(_fit(_Mixed("gam-exact")), _plain("gam-exact"))


def test_gam_exact_mode_without_the_mixin_is_refused_with_the_reason():
    with pytest.raises(TypeError, match=r"create_graph=True.*SharpnessAwareMixin"):
        _fit(_Module("gam-exact"))


def test_gam_exact_mode_with_clipping_is_refused():
    with pytest.raises(RuntimeError, match="clipping"):
        _fit(_Mixed("gam-exact"), clip=1.0)


def test_clipping_equals_plain_loop_that_clips_each_pass():
    """Lightning clips after every closure call, i.e. every SAM pass's gradient."""
    net = _fit(_Module("sam"), clip=0.5)
    ref = _net()
    ref.train()
    opt = _optimizer("sam", list(ref.parameters()), ref)
    x, y = _data()
    for _ in range(EPOCHS):
        for i in range(0, N, BATCH):

            def closure(xb=x[i : i + BATCH], yb=y[i : i + BATCH]):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(ref(xb), yb)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
                return loss

            opt.step(closure)
    _assert_same(net, ref)
