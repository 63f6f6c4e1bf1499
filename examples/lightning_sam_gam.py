"""SAM and GAM under PyTorch Lightning, then a diagnosis of the Lightning checkpoint.

A small CNN trains on the digits with SAM (or GAM) returned from ``configure_optimizers``,
a cosine schedule built on the SAM/GAM instance itself, gradient accumulation over two
micro-batches (made exact by ``SharpnessAwareMixin``) and bf16 mixed precision; the
``.ckpt`` Lightning writes is then measured with ``flatlens bound``, which finds the
module prefix (``net.``) on its own. Needs ``pip install 'flatlens[lightning]'``.

Run: ``python examples/lightning_sam_gam.py`` (about 30 s) or ``--fast``; ``--optimizer gam``.
"""

# requires: lightning

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from flatlens import GAM, SAM
from flatlens._compat import import_module
from flatlens.data import load_digits
from flatlens.integrations.lightning import SharpnessAwareMixin
from flatlens.zoo import cnn

pl = import_module("lightning.pytorch", purpose="this example")


class DigitsClassifier(SharpnessAwareMixin, pl.LightningModule):
    """A CNN trained with SAM or GAM; the mixin makes gradient accumulation exact."""

    def __init__(self, optimizer: str = "sam", epochs: int = 5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = cnn(1, 8, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        if self.hparams.optimizer == "gam":
            opt = GAM(self.parameters(), base, model=self)
        else:
            opt = SAM(self.parameters(), base, rho=0.05, model=self)
        # The scheduler is built on SAM/GAM itself (its param_groups are the base's).
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.epochs)
        return {"optimizer": opt, "lr_scheduler": schedule}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=["sam", "gam"], default="sam")
    parser.add_argument("--fast", action="store_true", help="1 epoch on 256 images")
    parser.add_argument("--out", default="lightning_out")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    epochs = 1 if args.fast else 5
    data = load_digits(image=True)
    n = 256 if args.fast else len(data.y_train)
    train = torch.utils.data.TensorDataset(data.x_train[:n], data.y_train[:n])
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsClassifier(args.optimizer, epochs), loader)
    ckpt = Path(args.out) / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    print(f"checkpoint: {ckpt}")
    # The .ckpt as it comes: weights_only load, the prefix 'net.' found automatically.
    command = [sys.executable, "-m", "flatlens", "bound", "--model", "cnn"]
    command += ["--model-kwargs", '{"channels": 8}', "--checkpoint", str(ckpt)]
    command += ["--out", str(Path(args.out) / "bound"), "--overwrite"]
    command += ["--samples", "32", "--steps", "2", "--quiet"] if args.fast else ["--samples", "256"]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
