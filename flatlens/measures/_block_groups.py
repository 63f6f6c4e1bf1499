"""Which group a parameter of a transformer (or any network) belongs to, by module type and name.

The groups of ``block_spectra(blocks="groups")``: embedding, attention, MLP, normalisation,
head, other. A parameter's group comes from the modules on its path (types such as
``nn.LayerNorm``, ``nn.Embedding``, ``nn.MultiheadAttention``) and from the path's names in
the conventions of GPT-2, BERT, ViT (timm), Llama and T5; the first rule that matches wins
(:func:`group_of`).
"""

from __future__ import annotations

import itertools
import re

from torch import nn

__all__ = ["GROUPS", "chain", "group_of"]

GROUPS = ("embedding", "attention", "mlp", "norm", "head", "other")
"""The groups of ``blocks="groups"``, in the order they are reported."""

# ------------------------------------------------------------------------ grouping rules
_NORM_TYPES = tuple(
    getattr(nn, t)
    for t in "LayerNorm GroupNorm BatchNorm1d BatchNorm2d BatchNorm3d SyncBatchNorm "
    "InstanceNorm1d InstanceNorm2d InstanceNorm3d LocalResponseNorm RMSNorm".split()
    if hasattr(nn, t)
)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
_NORM_NAME = re.compile(r"^((ln|bn)(\d+|_\w+)?|.*norm.*)$")
_NORM_CLASS = re.compile(r"norm(ali[sz]ation)?$")
_ATTN_TOKENS = frozenset(
    "q k v o q_proj k_proj v_proj o_proj qkv qkv_proj query key value query_key_value "
    "q_lin k_lin v_lin out_lin wq wk wv to_q to_k to_v to_qk to_kv to_qkv".split()
)
_ATTN_LEAF = ("in_proj_", "q_proj_", "k_proj_", "v_proj_", "bias_k", "bias_v")
_HEAD_TOKENS = frozenset(
    "head heads lm_head classifier cls pooler score qa_outputs output_layer logits "
    "pre_logits".split()
)
_HEAD_NAME = re.compile(r"^(head\d*|\w+_head)$")
_MLP_TOKENS = frozenset(
    "mlp ffn ff feed_forward feedforward fc c_fc intermediate dense_h_to_4h dense_4h_to_h "
    "up_proj down_proj gate_proj gate_up_proj w1 w2 w3 wi wi_0 wi_1 wo densereludense "
    "lin1 lin2 linear1 linear2 experts shared_expert".split()
)
_MLP_NAME = re.compile(r"^(fc|mlp|ffn|ff)\d+$")
_MLP_CLASS = re.compile(r"mlp|feedforward|ffn")
_EMBED_TOKENS = frozenset(
    "wte wpe cls_token class_token dist_token mask_token reg_token register_tokens "
    "pos_emb tok_emb token_emb".split()
)


def group_of(name: str, chain: list[nn.Module]) -> str:
    """The group of parameter ``name``; ``chain`` holds its modules below the root, the
    owning module last (empty for a parameter of the root itself).

    First match wins: norm > embedding (by type) > attention > head > mlp > embedding (by
    name) > other.
    """
    parts = name.lower().split(".")
    tokens, leaf = parts[:-1], parts[-1]
    owner = chain[-1] if chain else None
    owner_class = type(owner).__name__.lower() if owner is not None else ""
    if owner is not None and (
        isinstance(owner, _NORM_TYPES)
        or _NORM_CLASS.search(owner_class)
        or _NORM_NAME.match(tokens[-1])
    ):
        return "norm"
    if isinstance(owner, _EMBEDDING_TYPES):
        return "embedding"
    classes = [type(m).__name__.lower() for m in chain]
    if (
        any("attn" in t or "attention" in t or t in _ATTN_TOKENS for t in tokens)
        or any(isinstance(m, nn.MultiheadAttention) for m in chain)
        or any("attention" in c or c.endswith("attn") for c in classes)
        or leaf.startswith(_ATTN_LEAF)
    ):
        return "attention"
    if any(t in _HEAD_TOKENS or _HEAD_NAME.match(t) for t in tokens):
        return "head"
    if (
        any(t in _MLP_TOKENS or _MLP_NAME.match(t) for t in tokens)
        or any(_MLP_CLASS.search(c) for c in classes)
        or any(pair == ("output", "dense") for pair in itertools.pairwise(tokens))
    ):
        return "mlp"
    if any("embed" in t or t in _EMBED_TOKENS for t in [*tokens, leaf]):
        return "embedding"
    return "other"


def chain(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules on the path to parameter ``name``, below the root, owner last."""
    chain, module = [], model
    for part in name.split(".")[:-1]:
        module = module.get_submodule(part)
        chain.append(module)
    return chain
