"""Run by tests/integrations/test_lightning_monitor.py: FlatnessMonitor under
``strategy="ddp"`` with two CPU processes. Lightning starts the second process by running
this script again. Writes ``OUT/model.pt`` (the final weights) and the CSV logs under
``OUT/logs``."""

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from flatlens._compat import import_module
from flatlens.integrations.lightning import FlatnessMonitor
from flatlens.zoo import cnn

pl = import_module("lightning.pytorch")  # with the torchvision fix
torch.set_num_threads(1)
OUT = Path(sys.argv[1])
N, BATCH, EPOCHS = 64, 16, 2


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = cnn(1, 4, 10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, 1, 8, 8, generator=gen), torch.randint(0, 10, (N,), generator=gen)


if __name__ == "__main__":
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    module = Module()
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=pl.loggers.CSVLogger(OUT / "logs", name="run", version=0),
        callbacks=[FlatnessMonitor((x, y), measures=["lambda_max"], measure_samples=None)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    if trainer.is_global_zero:
        torch.save(module.net.state_dict(), OUT / "model.pt")
