"""SAM and GAM in the Hugging Face ``Trainer`` equal a plain ``optimizer.step(closure)`` loop.

A tiny GPT-2 (2 layers, width 32, no dropout) trains 10 optimizer steps on the CPU with
``SharpnessAwareTrainer``; the reference loop starts from the same weights, sees the same
batches and computes, at every pass, the gradient of the window's loss as the Trainer defines
it: the next-token cross-entropy summed over the window's micro-batches and divided by the
window's count of predicted tokens (``num_items_in_batch``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import import_model_library

from flatlens.core import causal_lm_loss
from flatlens.optim import GAM, SAM

transformers = import_model_library("transformers")
from flatlens.integrations.transformers import SharpnessAwareTrainer  # noqa: E402

STEPS, BATCH, T, VOCAB = 10, 4, 8, 48


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, T), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": _labels(self.ids[i])}


def _labels(ids):
    """Labels with position 0 ignored: it is never predicted, and the Trainer's count of
    ``num_items_in_batch`` (shifted or not, by model and version) is then the same."""
    labels = ids.clone()
    labels[..., 0] = -100
    return labels


class _InOrder(SharpnessAwareTrainer):
    """The examples in their order (the Trainer shuffles by default)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _optimizer(kind, model):
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if kind == "sam":
        return SAM(params, base, rho=0.05, model=model)
    return GAM(params, base, model=model)


def _train(kind, accumulate, tmp_path, *, clip=0.0):
    model = _model()
    data = _Tokens(STEPS * BATCH * accumulate)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulate,
        max_steps=STEPS,
        lr_scheduler_type="constant",
        max_grad_norm=clip,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = _InOrder(
        model=model, args=args, train_dataset=data, optimizers=(_optimizer(kind, model), None)
    )
    trainer.train()
    return model, data


def _plain(kind, accumulate, data, *, clip=0.0):
    model = _model()
    model.train()
    opt = _optimizer(kind, model)
    ids = data.ids
    for step in range(STEPS):
        window = [
            ids[(step * accumulate + j) * BATCH : (step * accumulate + j + 1) * BATCH]
            for j in range(accumulate)
        ]
        count = sum((_labels(w) != -100).sum() for w in window)

        def closure(window=window, count=count):
            opt.zero_grad()
            total = 0.0
            for w in window:
                labels = _labels(w)
                out = model(input_ids=w)
                loss = causal_lm_loss(out, labels) * (labels != -100).sum() / count
                loss.backward()
                total += loss.detach()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            return total

        opt.step(closure)
    return model


def _worst(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.mark.parametrize("kind", ["sam", "gam"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_equals_plain_loop(kind, accumulate, tmp_path):
    trained, data = _train(kind, accumulate, tmp_path)
    reference = _plain(kind, accumulate, data)
    assert _worst(trained, reference) <= 1e-5
    assert _worst(trained, _model()) > 1e-3  # it trained


def test_clipping_applies_to_every_pass(tmp_path):
    trained, data = _train("sam", 2, tmp_path, clip=0.05)
    assert _worst(trained, _plain("sam", 2, data, clip=0.05)) <= 1e-5
    assert _worst(trained, _plain("sam", 2, data)) > 1e-4  # the clipping mattered


def test_exact_mode_is_refused_with_the_reason(tmp_path):
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = GAM(model.parameters(), base, mode="exact")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to="none", save_strategy="no"
    )
    trainer = SharpnessAwareTrainer(
        model=model, args=args, train_dataset=_Tokens(8), optimizers=(opt, None)
    )
    with pytest.raises(ValueError, match="create_graph"):
        trainer.train()
