"""Query-head pruning inside KV groups (``attention_structure="query_heads"``) on tiny random models of every GQA
layout (separate projections with q/k norms, a fused ``qkv_proj``): the same number of query heads kept in every
KV group, pruned logits equal to the masked dense model's (with and without a KV cache), every format reloading
bit-exactly (stock where the config expresses the shapes), streamed equal to in-memory, per-block shapes, global
budgets, the score methods, and the clear error for a model without grouped-query attention."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from osscar_hf import OsscarConfig, OsscarPruner, save_pruned
from osscar_hf.arch import get_spec
from osscar_hf.budgets import block_geometries
from osscar_hf.errors import OsscarConfigError
from osscar_hf.io import read_block_shapes, update_model_config
from osscar_hf.surgery import prune_attention
from tests.conftest import make_model
from tests.equivalence import SMALL, assert_reloads_bit_exactly, generate, load, logits, masked_dense

# (kind, overrides): three query heads per KV head where the family's config allows it (Phi-3 derives head_dim from
# the head count, so it keeps its two).
THREE_PER_GROUP = {"num_attention_heads": 6, "hidden_size": 48}
KINDS = {"llama-gqa": THREE_PER_GROUP, "qwen3": THREE_PER_GROUP, "gemma3-text": THREE_PER_GROUP, "phi3": {}}


@pytest.fixture(scope="module", params=list(KINDS))
def runs(request, tmp_path_factory, tokenizer, calibration_texts):
    """The dense model, the same with a third of each KV group's query heads and half the neurons pruned in memory,
    and by a streamed run."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    make_model(kind, **KINDS[kind]).save_pretrained(root / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(root / "dense")
    config = dict(attention_sparsity=0.34, mlp_sparsity=0.5, attention_structure="query_heads",
                  dataset=calibration_texts, **SMALL)
    dense = load(root / "dense")
    pruner = OsscarPruner(OsscarConfig(**config))
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    streamed = OsscarPruner(OsscarConfig(**config)).prune_checkpoint(root / "dense", root / "streamed", progress=False)
    return kind, dense, model, pruner.report, streamed


def test_every_kv_group_keeps_the_same_query_heads_and_logits_are_the_masked_dense_models(runs):
    kind, dense, model, report, _ = runs
    spec = get_spec(model)
    kv, n_rep, _ = spec.group_geometry(dense.config)
    keep = n_rep - round(n_rep * 0.34)
    assert read_block_shapes(model) == [{"num_key_value_heads": kv, "num_attention_heads": kv * keep,
                                         "ffn_dim": spec.ffn_dim(dense.config) // 2}] * 2
    for block in report.blocks:
        assert block.attention.structures == kv * n_rep
        assert [sum(1 for h in block.attention.kept_indices if h // n_rep == g) for g in range(kv)] == [keep] * kv
    assert model.get_submodule(spec.blocks)[0].get_submodule(spec.attention).num_key_value_groups == keep
    masked = masked_dense(dense, model, report)
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)
    out, reference = generate(model), generate(masked)  # with a KV cache
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)


def test_streamed_equals_in_memory_and_every_format_reloads_bit_exactly(runs, tmp_path, tokenizer):
    kind, dense, model, _, streamed = runs
    assert_reloads_bit_exactly(model, load(streamed, model))
    saved = save_pruned(model, tmp_path / "auto", tokenizer=tokenizer)
    assert json.loads((saved / "config.json").read_text()) == json.loads((streamed / "config.json").read_text())
    data = json.loads((saved / "config.json").read_text())
    if kind == "phi3":  # no head_dim field: the head count travels in the osscar record
        assert data["quantization_config"]["block_shapes"][0]["num_attention_heads"] == 2
    else:  # the stock GQA shape: fewer query heads per KV head, head_dim explicit
        assert "quantization_config" not in data
        assert (data["num_attention_heads"], data["num_key_value_heads"]) == (4, 2)
        assert data["head_dim"] == get_spec(dense).head_dim(dense.config)
    assert_reloads_bit_exactly(model, load(saved, model))
    assert "attention query heads (the same number in every KV group)" in (saved / "README.md").read_text()
    for fmt, kwargs in (("osscar", {}), ("remote_code", {"trust_remote_code": True})):
        assert_reloads_bit_exactly(model, load(save_pruned(model, tmp_path / fmt, format=fmt), model, **kwargs))


@pytest.mark.parametrize("kind", ["llama-gqa", "phi3"])
def test_per_block_query_head_counts_and_a_block_without_heads(kind, tmp_path):
    model = make_model(kind, **KINDS[kind])
    spec = get_spec(model)
    kv, n_rep, head_dim = spec.group_geometry(model.config)
    blocks = model.get_submodule(spec.blocks)
    prune_attention(blocks[0], spec, torch.arange(kv), n_rep=n_rep, head_dim=head_dim, num_groups=kv,
                    kept_heads=torch.arange(kv) * n_rep + n_rep - 1)  # the last head of every group
    prune_attention(blocks[1], spec, torch.tensor([], dtype=torch.long), n_rep=n_rep, head_dim=head_dim,
                    num_groups=kv, kept_heads=torch.tensor([], dtype=torch.long))
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim)
    assert read_block_shapes(model)[0]["num_attention_heads"] == kv
    for fmt, kwargs in (("osscar", {}), ("remote_code", {"trust_remote_code": True})):
        assert_reloads_bit_exactly(model, load(save_pruned(model, tmp_path / fmt, format=fmt), model, **kwargs))


def test_unbalanced_query_heads_are_refused_before_any_change():
    from osscar_hf.errors import SurgeryError

    model = make_model("llama-gqa", **KINDS["llama-gqa"])
    spec = get_spec(model)
    block = model.get_submodule(spec.blocks)[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(SurgeryError, match="same number"):
        prune_attention(block, spec, torch.tensor([0, 1]), n_rep=3, head_dim=8, num_groups=2,
                        kept_heads=torch.tensor([0, 1, 3]))
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())


@pytest.mark.parametrize("method", ["osscar", "flap"])
def test_global_budgets_spend_query_heads_within_one_structure_of_the_target(method, tokenizer, calibration_texts):
    dense = make_model("llama-gqa", **KINDS["llama-gqa"])
    spec = get_spec(dense)
    config = OsscarConfig(sparsity=0.6, attention_structure="query_heads", min_part_keep=0.2, method=method,
                          allocation_samples=2, dataset=calibration_texts, **SMALL)
    geometries = block_geometries(dense, spec, seq_len=32, attention_structure="query_heads",
                                  with_biases=method == "flap")
    before = sum(g.params(g.attention_structures, g.mlp_structures) for g in geometries)
    pruner = OsscarPruner(config)
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    blocks = model.get_submodule(spec.blocks)
    after = sum(p.numel() for block in blocks for p in block.parameters())
    largest = max(max(g.attention_params + g.attention_base_params, g.mlp_params) for g in geometries)
    assert abs(after - 0.4 * before) <= largest
    assert (pruner.report.budget["block_params_before"], pruner.report.budget["block_params_after"]) == (before, after)
    kept = []
    for shape, block, g in zip(read_block_shapes(model), blocks, geometries):
        per_group = shape["num_attention_heads"] // 2
        assert shape["num_key_value_heads"] == (2 if per_group else 0)
        assert g.params(per_group, shape["ffn_dim"]) == sum(p.numel() for p in block.parameters())
        kept.append(per_group)
    assert kept != [3, 3]  # the budget reached the attention
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda_sp", "flap", "obs_greedy"])
def test_every_method_keeps_the_same_query_heads_in_every_group(method, tokenizer, calibration_texts):
    dense = make_model("llama-gqa", **KINDS["llama-gqa"])  # a family FLAP's compensating biases fit
    pruner = OsscarPruner(OsscarConfig(attention_sparsity=0.34, mlp_sparsity=0.25, method=method,
                                       attention_structure="query_heads", dataset=calibration_texts, **SMALL))
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    for block in pruner.report.blocks:
        assert [sum(1 for h in block.attention.kept_indices if h // 3 == g) for g in range(2)] == [2, 2]
    torch.testing.assert_close(logits(model), logits(masked_dense(dense, model, pruner.report)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["opt", "llama-mha", "gpt_neox"])
def test_a_model_without_grouped_query_attention_is_refused_with_the_alternative(kind, tokenizer):
    config = OsscarConfig(attention_sparsity=0.5, attention_structure="query_heads", dataset=["never read"], **SMALL)
    with pytest.raises(OsscarConfigError, match="one query head per KV head.*attention_structure='kv_groups'"):
        OsscarPruner(config).prune(make_model(kind), tokenizer, progress=False)
