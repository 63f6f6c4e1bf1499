"""SAM in the Hugging Face ``Trainer``, then a diagnosis of the ``save_pretrained`` folder.

A tiny GPT-2 (built from a config, random weights: nothing is downloaded) learns a synthetic
next-token task with ``SharpnessAwareTrainer`` (SAM around AdamW, gradient accumulation over
two micro-batches); the folder ``save_pretrained`` writes and the tokenized data saved with
``datasets``' ``save_to_disk`` are then measured with ``flatlens bound --model hf:DIR --data
hf:DIR`` (token-weighted). Needs ``pip install 'flatlens[transformers]'``.

Run: ``python examples/hf_trainer_sam.py`` (about a minute) or ``--fast``.
"""

# requires: transformers, datasets, accelerate

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from flatlens import SAM
from flatlens._compat import import_module

transformers = import_module("transformers", purpose="this example")
datasets = import_module("datasets", purpose="this example")
from flatlens.integrations.transformers import SharpnessAwareTrainer  # noqa: E402

VOCAB, LENGTH = 32, 16


def token_data(n: int, seed: int) -> datasets.Dataset:
    """Sequences that count up modulo VOCAB from a random start: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    ids = (start + torch.arange(LENGTH)) % VOCAB
    columns = {
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones_like(ids).tolist(),
        "labels": ids.tolist(),
    }
    return datasets.Dataset.from_dict(columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="20 steps")
    parser.add_argument("--out", default="hf_out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(0)
    width, layers = (16, 1) if args.fast else (32, 2)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=width, n_layer=layers, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    train = token_data(256, seed=0)
    base = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sam = SAM(model.parameters(), base, rho=0.05, model=model)
    training = transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        max_steps=20 if args.fast else 120,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
    )
    trainer = SharpnessAwareTrainer(
        model=model, args=training, train_dataset=train, optimizers=(sam, None)
    )
    trainer.train()
    model.save_pretrained(out / "model")
    datasets.DatasetDict({"train": train, "test": token_data(64, seed=1)}).save_to_disk(
        str(out / "data")
    )
    command = [sys.executable, "-m", "flatlens", "bound", "--model", f"hf:{out / 'model'}"]
    command += ["--data", f"hf:{out / 'data'}", "--out", str(out / "bound"), "--overwrite"]
    command += ["--samples", "16", "--steps", "2", "--quiet"] if args.fast else ["--samples", "128"]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
