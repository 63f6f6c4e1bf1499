"""Batches as users have them (tuples, mappings, padded token batches) and fused attention.

References are one concatenated float64 pass through ``torch.func``; the language-model
case is exact only when each batch counts with its number of non-padding tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import import_model_library
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatlens import Objective, causal_lm_loss, hessian_eigenvalues, token_count

VOCAB, T = 11, 7


class TinyCausalLM(nn.Module):
    """Embedding, one causal self-attention layer (fused SDPA), a linear head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return {"logits": self.head(torch.tanh(h + a))}


def padded_lm_batches(sizes, seed=0):
    """Right-padded token batches of uneven size and uneven padding, as HF-style mappings."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        ids = torch.randint(0, VOCAB, (n, T), generator=gen)
        lengths = torch.randint(2, T + 1, (n,), generator=gen)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        labels = ids.masked_fill(~mask, -100)
        batches.append({"input_ids": ids, "attention_mask": mask.long(), "labels": labels})
    return batches


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def concatenated_loss(model, batches):
    """theta -> causal LM loss over all batches at once (the mean over every real token)."""
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    shapes = [(n, p.shape) for n, p in model.named_parameters()]

    def loss(theta):
        values, i = {}, 0
        for name, shape in shapes:
            k = shape.numel()
            values[name] = theta[i : i + k].view(shape)
            i += k
        return causal_lm_loss(functional_call(model, values, (ids,)), labels)

    return loss


def test_padded_uneven_lm_batches_weighted_by_tokens_equal_one_concatenated_pass():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    batches = padded_lm_batches([3, 5, 2])
    obj = Objective(model, causal_lm_loss, batches, batch_weight=token_count(shift=True))
    ref = concatenated_loss(model, batches)
    theta = flat_params(model)
    v = torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernel has no forward-mode derivative
        ref_hv = jvp(grad(ref), (theta,), (v,))[1]
    assert abs(obj.loss() - float(ref(theta))) <= 1e-10 * abs(float(ref(theta)))
    torch.testing.assert_close(obj.gradient(), grad(ref)(theta), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(obj.hvp(v), ref_hv, rtol=1e-10, atol=1e-12)
    # Weighting by batch length instead is a different (wrong) L for a token-mean loss.
    by_length = Objective(model, causal_lm_loss, batches)
    assert abs(by_length.loss() - float(ref(theta))) > 1e-6
    assert obj.num_samples == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_inputs_reach_the_model_as_positional_or_keyword_arguments():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, z, scale=1.0):
            return scale * (self.a(x) + self.b(z))

    torch.manual_seed(0)
    model = TwoInputs().double()
    x, z = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    expected = F.cross_entropy(model(x, z, scale=2.0), y).item()
    as_tuple = Objective(model, F.cross_entropy, ((x, z, 2.0), y))
    as_mapping = Objective(model, F.cross_entropy, ({"x": x, "z": z, "scale": 2.0}, y))
    hf_style = Objective(model, F.cross_entropy, [{"x": x, "z": z, "scale": 2.0, "labels": y}])
    for obj in (as_tuple, as_mapping, hf_style):
        assert abs(obj.loss() - expected) <= 1e-14
    torch.testing.assert_close(as_tuple.hvp(as_tuple.theta), hf_style.hvp(hf_style.theta))


def test_a_dataloader_of_dicts_works():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    batches = padded_lm_batches([4, 4, 4])
    rows = [{k: b[k][i] for k in b} for b in batches for i in range(4)]
    loader = torch.utils.data.DataLoader(rows, batch_size=5)  # uneven: 5, 5, 2
    weight = token_count(shift=True)
    obj = Objective(model, causal_lm_loss, loader, batch_weight=weight)
    ref = concatenated_loss(model, batches)(flat_params(model))
    assert abs(obj.loss() - float(ref)) <= 1e-10 * float(ref)


def test_bad_batch_weights_and_mappings_without_targets_are_refused():
    model = TinyCausalLM().double()
    batches = padded_lm_batches([2])
    with pytest.raises(ValueError, match="without the targets entry 'labels'"):
        Objective(model, causal_lm_loss, [{"input_ids": batches[0]["input_ids"]}])
    with pytest.raises(ValueError, match="batch_weight must return a finite number >= 0"):
        Objective(model, causal_lm_loss, batches, batch_weight=lambda x, y: -1)
    with pytest.raises(TypeError, match="batch_weight must be callable"):
        Objective(model, causal_lm_loss, batches, batch_weight=3)


# ------------------------------------------------------------------------- fused attention
def math_hvp(model, loss_fn, batch, v):
    """Double backward under the math attention backend, written out by hand."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    with sdpa_kernel([SDPBackend.MATH]):
        args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
        loss = loss_fn(model(*args, **kwargs), y)
        gs = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in gs])
        hv = torch.autograd.grad(flat, params, grad_outputs=v)
    return torch.cat([h.reshape(-1) for h in hv])


def check_fused_attention_hvp(model, loss_fn, batch, rtol):
    model.eval()
    obj = Objective(model, loss_fn, batch)
    v = torch.randn(obj.num_params, dtype=obj.dtype, generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="not implemented"):  # what users hit before
        x, y = batch
        args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
        loss = loss_fn(model(*args, **kwargs), y)
        params = [p for p in model.parameters() if p.requires_grad]
        gs = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(torch.cat([g.reshape(-1) for g in gs]), params, grad_outputs=v)
    hv = obj.hvp(v)
    atol = rtol * float(hv.abs().max())
    torch.testing.assert_close(hv, math_hvp(model, loss_fn, batch, v), rtol=rtol, atol=atol)
    fwd_rev = Objective(model, loss_fn, batch, hvp_method="forward_over_reverse")
    torch.testing.assert_close(fwd_rev.hvp(v), hv, rtol=rtol, atol=atol)
    top = hessian_eigenvalues(obj, k=1, tol=1e-3)
    assert bool(top.converged.all())


def test_fused_attention_hvps_work_and_equal_the_math_backend():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    (batch,) = padded_lm_batches([3])
    labels = batch.pop("labels")
    check_fused_attention_hvp(model, causal_lm_loss, (batch, labels), rtol=1e-10)


def test_hugging_face_gpt2_and_bert_from_configs():
    transformers = import_model_library("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=16,
            vocab_size=VOCAB,
            n_positions=T,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).double()
    batches = padded_lm_batches([3, 2])
    obj = Objective(gpt2, causal_lm_loss, batches, batch_weight=token_count(shift=True))
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    ref = causal_lm_loss(gpt2.eval()(input_ids=ids, attention_mask=mask), labels).detach()
    assert abs(obj.loss() - float(ref)) <= 1e-10 * float(ref)
    (one,) = padded_lm_batches([3], seed=1)
    labels = one.pop("labels")
    check_fused_attention_hvp(gpt2, causal_lm_loss, (one, labels), rtol=1e-8)

    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=VOCAB,
            max_position_embeddings=T,
            num_labels=3,
        )
    ).double()
    ids = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 1])

    def classify(outputs, targets):
        return F.cross_entropy(outputs.logits, targets)

    check_fused_attention_hvp(bert, classify, ({"input_ids": ids}, y), rtol=1e-8)


def test_timm_vision_transformer_from_a_config():
    timm = import_model_library("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
    ).double()
    assert any(getattr(m, "fused_attn", False) for m in vit.modules())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2, 0])
    check_fused_attention_hvp(vit, F.cross_entropy, (x, y), rtol=1e-8)
