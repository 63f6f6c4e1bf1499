"""flatlens.measures._blocks: per-block Hessian spectra against dense float64 diagonal blocks."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from helpers import (
    ModelSnapshot,
    bn_cnn,
    classification_data,
    dense_reference,
    image_data,
    tiny_mlp,
    uneven_batches,
)
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatlens import Objective
from flatlens.measures import (
    BlockSpectraResult,
    DensityResult,
    block_spectra,
    parameter_blocks,
)
from flatlens.report._figures import plot_block_spectra

# ---------------------------------------------------------------------------------- models


class TinyAttention(nn.Module):
    """Single-head softmax self-attention with separate q/k/v/o projections."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h.shape[-1]), dim=-1)
        return self.o_proj(a @ v)


class TinyMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(h)))


class TinyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), TinyAttention(d)
        self.ln2, self.mlp = nn.LayerNorm(d), TinyMLP(d)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class TinyTransformer(nn.Module):
    """Embedding + positional embedding, one pre-norm block, final norm, linear head, a
    scalar logit scale, and a frozen parameter (which every scheme must skip)."""

    def __init__(self, vocab: int = 6, d: int = 4, length: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(length, d))
        self.blocks = nn.ModuleList([TinyBlock(d)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.logit_scale = nn.Parameter(torch.tensor(1.3))
        self.frozen = nn.Parameter(torch.full((classes,), 0.2), requires_grad=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.logit_scale * self.head(self.norm(h).mean(dim=1)) + self.frozen


EXPECTED_GROUPS = {
    "embedding": ["pos_embed", "embed.weight"],  # a module's own parameters come first
    "attention": [
        f"blocks.0.attn.{p}_proj.{w}" for p in ("q", "k", "v", "o") for w in ("weight", "bias")
    ],
    "mlp": [f"blocks.0.mlp.{f}.{w}" for f in ("fc1", "fc2") for w in ("weight", "bias")],
    "norm": [
        f"{m}.{w}" for m in ("blocks.0.ln1", "blocks.0.ln2", "norm") for w in ("weight", "bias")
    ],
    "head": ["head.weight", "head.bias"],
    "other": ["logit_scale"],
}


@functools.cache
def transformer_case() -> tuple[TinyTransformer, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = TinyTransformer().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 6, (11, 3), generator=gen)
    y = torch.randint(0, 3, (11,), generator=gen)
    return model, (x, y)


@functools.cache
def mlp_case():
    model = tiny_mlp()
    x, y = classification_data()
    return model, (x, y), dense_reference(model, F.cross_entropy, (x, y)).hessian


@functools.cache
def transformer_hessian() -> Tensor:
    """Dense float64 Hessian of the tiny transformer's risk by plain double backward.

    Not ``torch.func.hessian``: in torch 2.13 it (and ``jacrev(jacrev(.))``) gets the cross
    terms between two LayerNorms in sequence wrong (off by 3e-2 here, against central
    differences of the gradient), while ``torch.autograd.functional.hessian`` agrees with
    those differences to 1e-10 (checked in the test below).
    """
    model, (x, y) = transformer_case()
    _, risk, theta = _transformer_risk(model, x, y)
    return torch.autograd.functional.hessian(risk, theta).detach()


def _transformer_risk(model: nn.Module, x: Tensor, y: Tensor):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    numels = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def risk(flat: Tensor) -> Tensor:
        chunks = [c.view(s) for c, s in zip(flat.split(numels), shapes, strict=True)]
        values = dict(zip(names, chunks, strict=True))
        return F.cross_entropy(functional_call(model, values, (x,), strict=False), y)

    return names, risk, theta


def block_reference(objective: Objective, hessian: Tensor, names: list[str]) -> Tensor:
    """Descending eigenvalues of the principal submatrix of ``hessian`` (over the objective's
    flat space) on the parameters ``names``."""
    idx = torch.cat(
        [torch.arange(s.start, s.stop) for n, s, _ in objective.space.segments() if n in names]
    )
    block = hessian[idx][:, idx]
    return torch.linalg.eigvalsh((block + block.T) / 2).flip(0)


def assert_matches(result: BlockSpectraResult, objective: Objective, hessian: Tensor) -> None:
    for block in result.blocks:
        ref = block_reference(objective, hessian, block.params)
        assert block.num_params == ref.numel()
        got = block.eigenvalues
        want = ref[: got.numel()]
        # Within the certified bound, and tight in absolute terms.
        assert torch.all((got - want).abs() <= block.error_bounds + 1e-9), block.name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        assert bool(block.converged.all()), block.name


# ---------------------------------------------------------------------------------- values


@pytest.mark.parametrize("data_kind", ["one", "uneven", "loader"])
def test_layer_blocks_equal_dense_diagonal_blocks(data_kind):
    model, (x, y), hessian = mlp_case()
    if data_kind == "one":
        data = (x, y)
    elif data_kind == "uneven":
        data = uneven_batches(x, y, [5, 5, 5, 5, 3])
    else:
        data = DataLoader(TensorDataset(x, y), batch_size=6)
    objective = Objective(model, F.cross_entropy, data)
    result = block_spectra(objective, "layers", k=3, tol=1e-8)
    assert result.names == ["0", "2"]
    assert [b.params for b in result.blocks] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert_matches(result, objective, hessian)
    assert result.num_params == 43 and sum(b.num_params for b in result.blocks) == 43
    assert result.num_hvps == sum(b.num_hvps for b in result.blocks) > 0
    assert result.loss == pytest.approx(dense_reference(model, F.cross_entropy, (x, y)).loss)


def test_param_blocks_and_blocks_smaller_than_k():
    model, data, hessian = mlp_case()
    objective = Objective(model, F.cross_entropy, data)
    before = objective.counts["hvp"]
    result = block_spectra(objective, "params", k=5, tol=1e-8)
    assert result.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert_matches(result, objective, hessian)
    small = result["2.bias"]  # n_b = 3 <= k: the whole block, diagonalized densely
    assert small.method == "dense" and small.eigenvalues.numel() == 3 and small.num_hvps == 3
    assert result["0.weight"].method == "lanczos" and result["0.weight"].eigenvalues.numel() == 5
    assert objective.counts["hvp"] - before == result.num_hvps


def test_groups_of_a_tiny_transformer():
    model, _ = transformer_case()
    assert parameter_blocks(model, "groups") == EXPECTED_GROUPS


def test_group_spectra_equal_dense_blocks_of_a_tiny_transformer():
    model, data = transformer_case()
    objective = Objective(model, F.cross_entropy, data)
    result = block_spectra(objective, "groups", k=2, tol=1e-8)
    assert result.scheme == "groups" and result.names == list(EXPECTED_GROUPS)
    assert {b.name: b.params for b in result.blocks} == EXPECTED_GROUPS
    hessian = transformer_hessian()
    assert_matches(result, objective, hessian)  # the norm block is not contiguous
    # The reference itself, on the norm block: central differences of the gradient.
    model, (x, y) = transformer_case()
    _, risk, theta = _transformer_risk(model, x, y)
    idx = [
        i
        for n, s, _ in objective.space.segments()
        if n in result["norm"].params
        for i in range(s.start, s.stop)
    ]
    eps = 1e-6
    cols = []
    for i in idx:
        step = torch.zeros_like(theta)
        step[i] = eps
        cols.append(torch.func.grad(risk)(theta + step) - torch.func.grad(risk)(theta - step))
    diff = torch.stack(cols, dim=1)[idx] / (2 * eps)
    torch.testing.assert_close(hessian[idx][:, idx], diff, rtol=0, atol=1e-8)
    assert result["other"].method == "dense" and result["other"].num_params == 1


def test_layers_of_a_tiny_transformer_skip_frozen_parameters():
    model, _ = transformer_case()
    blocks = parameter_blocks(model, "layers")
    assert blocks["<root>"] == ["pos_embed", "logit_scale"]
    assert blocks["blocks.0.attn.q_proj"] == [
        "blocks.0.attn.q_proj.weight",
        "blocks.0.attn.q_proj.bias",
    ]
    assert "frozen" not in [n for names in blocks.values() for n in names]
    assert (
        len(blocks) == 1 + 1 + 2 + 4 + 2 + 1 + 1
    )  # root, embed, ln1/2, q/k/v/o, fc1/2, norm, head


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("transformer.h.0.attn.c_attn.weight", "attention"),
        ("transformer.h.0.attn.c_proj.weight", "attention"),
        ("transformer.h.0.mlp.c_proj.weight", "mlp"),
        ("transformer.h.0.mlp.c_fc.bias", "mlp"),
        ("transformer.h.0.ln_1.weight", "norm"),
        ("transformer.wpe.weight", "embedding"),
        ("bert.encoder.layer.0.attention.output.dense.weight", "attention"),
        ("bert.encoder.layer.0.attention.output.LayerNorm.weight", "norm"),
        ("bert.encoder.layer.0.output.dense.weight", "mlp"),
        ("bert.encoder.layer.0.intermediate.dense.weight", "mlp"),
        ("bert.pooler.dense.weight", "head"),
        ("model.layers.0.self_attn.o_proj.weight", "attention"),
        ("model.layers.0.mlp.down_proj.weight", "mlp"),
        ("model.layers.0.post_attention_layernorm.weight", "norm"),
        ("patch_embed.proj.weight", "embedding"),
        ("cls_token", "embedding"),
        ("lm_head.weight", "head"),
        ("temperature", "other"),
    ],
)
def test_group_rules_on_common_names(name, group):
    root = nn.Module()
    module = root
    for part in name.split(".")[:-1]:
        module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_parameter(name.split(".")[-1], nn.Parameter(torch.zeros(2)))
    assert parameter_blocks(root, "groups") == {group: [name]}


def test_groups_of_torch_transformer_layer():
    layer = nn.TransformerEncoderLayer(4, 2, 8)
    groups = parameter_blocks(layer, "groups")
    assert set(groups) == {"attention", "mlp", "norm"}
    assert groups["attention"][0] == "self_attn.in_proj_weight"
    assert groups["mlp"] == ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]


def test_mapping_blocks_by_name_module_and_tensor():
    model, data, hessian = mlp_case()
    objective = Objective(model, F.cross_entropy, data)
    blocks = {
        "weights": ["0.weight", model[2].weight],
        "second": model[2],
        "first_bias": "0.bias",
    }
    result = block_spectra(objective, blocks, k=2, tol=1e-8)
    assert result.scheme == "mapping" and result.names == ["weights", "second", "first_bias"]
    assert result["weights"].params == ["0.weight", "2.weight"]
    assert result["second"].params == ["2.weight", "2.bias"]  # blocks may overlap
    assert_matches(result, objective, hessian)


def test_only_the_objectives_parameters_are_split():
    model, data, hessian = mlp_case()
    objective = Objective(model, F.cross_entropy, data, params=["2"])
    result = block_spectra(objective, "params", k=1, tol=1e-8)
    assert result.names == ["2.weight", "2.bias"] and result.num_params == 18
    idx = list(range(25, 43))
    sub = hessian[idx][:, idx]
    for block, lo, hi in ((result.blocks[0], 0, 15), (result.blocks[1], 15, 18)):
        top = torch.linalg.eigvalsh(sub[lo:hi, lo:hi])[-1]
        torch.testing.assert_close(block.eigenvalues[0], top, rtol=1e-6, atol=1e-9)


def test_the_objectives_settings_reach_every_block():
    model, (x, y), _ = mlp_case()
    batches = uneven_batches(x, y, [5, 5, 5, 5, 3])
    mean = block_spectra(Objective(model, F.cross_entropy, batches), "layers", tol=1e-8)
    total = Objective(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    summed = block_spectra(total, "layers", tol=1e-8)
    for a, b in zip(mean.blocks, summed.blocks, strict=True):
        torch.testing.assert_close(b.eigenvalues, len(y) * a.eigenvalues, rtol=1e-7, atol=0)


# ---------------------------------------------------------------------------------- density, result


def test_densities_json_table_and_figure(tmp_path):
    model, data, _ = mlp_case()
    objective = Objective(model, F.cross_entropy, data)
    result = block_spectra(
        objective,
        "layers",
        k=2,
        density=True,
        density_kwargs={"num_runs": 2, "lanczos_steps": 12, "num_points": 200},
    )
    for block in result.blocks:
        assert isinstance(block.density, DensityResult)
        assert np.trapezoid(block.density.density, block.density.grid) == pytest.approx(1.0)
        # The SLQ nodes are Ritz values of H_bb: the top one is at most lambda_max(H_bb),
        # which lies within the certified bound of the returned value.
        top = float(block.eigenvalues[0] + block.error_bounds[0])
        assert max(v.max() for v in block.density.nodes) <= top + 1e-8
        assert block.num_hvps >= block.density.num_hvps == 2 * 12
    out = result.to_dict()
    text = json.dumps(out, allow_nan=False)
    assert out["kind"] == "BlockSpectraResult" and "eigenvectors" not in text
    assert out["blocks"][0]["density"]["kind"] == "DensityResult"
    table = result.table()
    assert "lambda_2" in table and "43 parameters" in table and str(result) == table
    assert set(result.top) == {"0", "2"} and result.converged
    assert plot_block_spectra(result, tmp_path / "blocks.png").stat().st_size > 0
    assert plot_block_spectra(json.loads(text), tmp_path / "from_dict.svg").stat().st_size > 0


def test_figure_without_density_and_with_negative_eigenvalues(tmp_path):
    result = {
        "blocks": [
            {"name": "a", "eigenvalues": [2.0, -0.5], "density": None},
            {"name": "b", "eigenvalues": [1e-3], "density": None},
        ]
    }
    assert plot_block_spectra(result, tmp_path / "neg.png").stat().st_size > 0


def test_same_seed_same_result_and_model_unchanged():
    model = bn_cnn()
    model.train()  # the measure evaluates in eval mode and must restore the flags
    x, y = image_data()
    model[4].weight.grad = torch.ones_like(model[4].weight)
    snap = ModelSnapshot.take(model)
    runs = []
    for _ in range(2):
        objective = Objective(model, F.cross_entropy, (x, y))
        runs.append(
            block_spectra(
                objective,
                "layers",
                k=2,
                density=True,
                density_kwargs={"num_runs": 1, "lanczos_steps": 8, "num_points": 50},
            )
        )
        snap.assert_unchanged(model)
    assert runs[0].names == ["0", "1", "4"]  # conv, BatchNorm, linear
    for a, b in zip(runs[0].blocks, runs[1].blocks, strict=True):
        assert torch.equal(a.eigenvalues, b.eigenvalues)
        assert np.array_equal(a.density.density, b.density.density)


# ---------------------------------------------------------------------------------- errors


def test_bad_input_gives_clear_errors():
    model, data, _ = mlp_case()
    objective = Objective(model, F.cross_entropy, data)
    with pytest.raises(ValueError, match="blocks must be 'layers', 'groups'"):
        block_spectra(objective, "heads")
    with pytest.raises(TypeError, match="blocks must be"):
        block_spectra(objective, 3)
    with pytest.raises(ValueError, match="empty mapping"):
        block_spectra(objective, {})
    with pytest.raises(ValueError, match="block 'x': no parameter named 'nope'"):
        block_spectra(objective, {"x": "nope"})
    with pytest.raises(TypeError, match="block 'x'"):
        block_spectra(objective, {"x": [1.5]})
    with pytest.raises(ValueError, match="block 'x': module Linear has no parameters"):
        block_spectra(objective, {"x": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="takes an Objective"):
        block_spectra(model, "layers")
    with pytest.raises(ValueError, match="k must be"):
        block_spectra(objective, "layers", k=0)
    with pytest.raises(ValueError, match="tol must be"):
        block_spectra(objective, "layers", tol=0)
    # A block whose parameters are all outside the objective's space (or frozen).
    first = Objective(model, F.cross_entropy, data, params=["0"])
    with pytest.raises(ValueError, match="block 'last' has no parameters to measure"):
        block_spectra(first, {"last": "2"})
    tmodel, tdata = transformer_case()
    tobjective = Objective(tmodel, F.cross_entropy, tdata)
    with pytest.raises(ValueError, match="block 'f' has no parameters to measure"):
        block_spectra(tobjective, {"f": "frozen"})
    with pytest.raises(ValueError, match="no blocks"):
        plot_block_spectra({"blocks": []}, "unused.png")
