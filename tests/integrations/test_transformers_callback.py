"""FlatnessCallback: flatness measured during Hugging Face training, into ``log_history``.

A tiny GPT-2 trains 10 steps; the callback's λ_max lands in ``trainer.state.log_history``
and equals a cold ``hessian_eigenvalues`` of the token-weighted objective on the same subset
(the mean next-token cross-entropy over every non-padding token); the training takes the
same steps as without the callback.
"""

from __future__ import annotations

import pytest
import torch
from helpers import import_model_library

from flatlens import Objective, hessian_eigenvalues
from flatlens.core import causal_lm_loss, token_count

transformers = import_model_library("transformers")
from flatlens.integrations.transformers import FlatnessCallback  # noqa: E402

STEPS, BATCH, T, VOCAB = 10, 4, 8, 48


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2
    )
    return transformers.GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.Dataset):
    """Sequences with padding: the last tokens of every other example are -100 labels."""

    def __init__(self, n):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, T), generator=gen)
        self.labels = self.ids.clone()
        self.labels[::2, -3:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _train(tmp_path, callbacks=()):
    model = _model()
    data = _Tokens(STEPS * BATCH)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=5e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=list(callbacks)
    )
    trainer.train()
    return trainer, data


def test_lambda_max_lands_in_log_history_token_weighted(tmp_path):
    data = _Tokens(STEPS * BATCH)
    callback = FlatnessCallback(
        data, measure_every_steps=5, measure_samples=12, batch_size=5, critical_every_steps=5
    )
    trainer, _ = _train(tmp_path / "a", [callback])
    entries = [e for e in trainer.state.log_history if "flatness/lambda_max" in e]
    assert [e["step"] for e in entries] == [5, 10]
    crit = [e for e in trainer.state.log_history if "flatness/lambda_c" in e]
    assert [e["step"] for e in crit] == [5, 10]

    # The reference: the mean over every counted token of the 12 examples, in batches of 5
    # (the uneven last batch and the padding weighted exactly), cold start, tight tolerance.
    model = trainer.model
    ids, labels = data.ids[:12], data.labels[:12]
    batches = [({"input_ids": ids[i : i + 5]}, labels[i : i + 5]) for i in range(0, 12, 5)]

    def loss(out, y):
        return causal_lm_loss(out, y)

    obj = Objective(model, loss, batches, batch_weight=token_count(shift=True))
    reference = hessian_eigenvalues(obj, k=1, tol=1e-6).value
    assert abs(entries[-1]["flatness/lambda_max"] - reference) <= 1e-4 * abs(reference)
    # Weighting by batch size instead would be another number (the test can fail).
    unweighted = Objective(model, loss, batches)
    assert abs(hessian_eigenvalues(unweighted, k=1, tol=1e-6).value - reference) > 1e-4 * reference

    costs = [h["cost"]["lambda_max"] for h in callback.history if "lambda_max" in h["cost"]]
    assert [c["start"] for c in costs] == ["gradient", "given"]
    assert all(0 < c["hvps"] <= 40 for c in costs)


def test_the_training_is_untouched(tmp_path):
    data = _Tokens(STEPS * BATCH)
    watched, _ = _train(tmp_path / "a", [FlatnessCallback(data, measure_every_steps=3)])
    plain, _ = _train(tmp_path / "b")
    for a, b in zip(
        watched.model.state_dict().values(), plain.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert watched.model.training == plain.model.training


def test_a_mapping_without_labels_is_named():
    with pytest.raises(ValueError, match="'labels'"):
        FlatnessCallback({"input_ids": torch.zeros(2, 3)}).core.tracker_for(_model())
