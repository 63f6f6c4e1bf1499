"""FlatnessMonitor: flatness measured during Lightning training, logged, training untouched.

The monitor's logged λ_max is compared with a cold, float64-free reference
(``hessian_eigenvalues`` on the final module and the same subset); its λ_c with
``critical_sharpness`` along the same step; a run with the monitor takes bit for bit the
steps of a run without it; under ``strategy="ddp"`` (two CPU processes) it logs once, the
value of the whole subset.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import import_model_library
from torch import nn

from flatlens import Objective, hessian_eigenvalues
from flatlens.optim import SAM
from flatlens.zoo import cnn

pl = import_model_library("lightning").pytorch
from flatlens.integrations.lightning import FlatnessMonitor  # noqa: E402

EPOCHS, BATCH, N = 2, 16, 64
HERE = Path(__file__).resolve().parent


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, 1, 8, 8, generator=gen), torch.randint(0, 10, (N,), generator=gen)


class _Module(pl.LightningModule):
    def __init__(self, sam=False):
        super().__init__()
        torch.manual_seed(1)
        self.net = cnn(1, 4, 10)
        self.sam = sam

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return SAM(self.parameters(), base, rho=0.05, model=self) if self.sam else base


def _fit(module, callbacks=(), logger=False):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return trainer


def _rows(path: Path, name: str) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f) if r.get(name)]


def _lambda_max(net, x, y):
    obj = Objective(net, nn.CrossEntropyLoss(), (x, y))
    return hessian_eigenvalues(obj, k=1, tol=1e-6).value


@pytest.mark.parametrize("sam", [False, True])
def test_lambda_max_per_epoch_in_the_csv_log_and_the_training_untouched(tmp_path, sam):
    x, y = _data()
    monitor = FlatnessMonitor((x, y), measures=["lambda_max", "r1"], critical_every_steps=2)
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    watched = _Module(sam)
    _fit(watched, [monitor], logger)
    plain = _Module(sam)
    _fit(plain)
    for a, b in zip(watched.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # same steps, same BatchNorm statistics, same modes
    assert watched.training == plain.training

    metrics = tmp_path / "run" / "version_0" / "metrics.csv"
    lam = _rows(metrics, "flatness/lambda_max")
    steps_per_epoch = N // BATCH
    assert [s for s, _ in lam] == [steps_per_epoch * (e + 1) for e in range(EPOCHS)]
    reference = _lambda_max(watched.net, x, y)
    assert abs(lam[-1][1] - reference) <= 1e-4 * abs(reference)
    assert len(_rows(metrics, "flatness/r1")) == EPOCHS
    assert len(_rows(metrics, "flatness/lambda_c")) == EPOCHS * steps_per_epoch // 2

    # What each call cost: the fixed subset alone (products and passes of 64 examples).
    costs = [h["cost"] for h in monitor.history if "lambda_max" in h["cost"]]
    assert len(costs) == EPOCHS
    for cost in costs:
        assert 0 < cost["lambda_max"]["hvps"] <= 40
        assert cost["r1"]["hvp_equivalents"] <= 40 + 1
    warm = [c["lambda_max"]["start"] for c in costs]
    assert warm == ["gradient"] + ["given"] * (EPOCHS - 1)
    crit = [h["cost"]["lambda_c"] for h in monitor.history if "lambda_c" in h["cost"]]
    assert all(c["forward"] <= 16 for c in crit)


def test_lambda_c_is_the_critical_sharpness_of_the_step_taken(tmp_path):
    from flatlens.measures import critical_sharpness

    x, y = _data()
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 1:
                seen.append(
                    torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
                )

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 2 and len(seen) == 1:
                seen.append(
                    torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
                )
                seen.append({k: v.clone() for k, v in module.state_dict().items()})

    monitor = FlatnessMonitor((x, y), measure_every=0, critical_every_steps=2)
    module = _Module()
    _fit(module, [Probe(), monitor])
    before, after, state = seen
    module.load_state_dict(state)
    obj = Objective(module, nn.CrossEntropyLoss(), (x, y), eval_mode=False)
    module.train()
    reference = critical_sharpness(obj, (before - after) / 0.1, at=before)
    logged = monitor.history[0]["flatness/lambda_c"]
    assert reference.lower <= logged <= reference.upper
    assert abs(logged - reference.value) <= reference.upper - reference.lower


def test_bad_settings_are_named():
    x, y = _data()
    with pytest.raises(ValueError, match="unknown measures"):
        FlatnessMonitor((x, y), measures=["sharpness"])
    with pytest.raises(ValueError, match="measure_every"):
        FlatnessMonitor((x, y), measure_every=-1)
    with pytest.raises(TypeError, match="data must be"):
        FlatnessMonitor(42, measures=["lambda_max"]).core.tracker_for(nn.Linear(2, 2))


def test_under_ddp_it_logs_once_the_value_of_the_whole_subset(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, str(HERE / "ddp_monitor_script.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lam = _rows(tmp_path / "logs" / "run" / "version_0" / "metrics.csv", "flatness/lambda_max")
    # 64 examples on 2 ranks, batches of 16: 2 steps per epoch, one row per epoch.
    assert [s for s, _ in lam] == [2, 4]
    x, y = _data()
    net = cnn(1, 4, 10)
    net.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    whole = _lambda_max(net, x, y)
    assert abs(lam[-1][1] - whole) <= 1e-4 * abs(whole)
    half = _lambda_max(net, x[: N // 2], y[: N // 2])  # one rank's shard alone differs
    assert abs(half - whole) > 1e-3 * abs(whole)
