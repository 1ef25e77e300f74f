"""Families whose producers are fused linears (Phi-3: ``qkv_proj`` = [q heads | k heads | v heads], ``gate_up_proj``
= [gate | up]), the family's proof on a tiny random model: pruned logits equal the masked dense model's (with and
without a KV cache), every format reloads bit-exactly (stock where the config expresses the shapes, osscar,
remote code; also with per-block shapes and a block without heads), and a streamed run writes the in-memory
result."""

from __future__ import annotations

import ast
import copy
import json

import pytest
import torch

import osscar_hf  # noqa: F401 - registers the osscar quantizer
from osscar_hf import OsscarConfig, OsscarPruner, save_pruned
from osscar_hf.arch import get_spec
from osscar_hf.io import SaveError, read_block_shapes, update_model_config
from osscar_hf.io.remote_code import remote_code_names, render_remote_code
from osscar_hf.surgery import prune_attention, prune_mlp
from tests.conftest import FUSED_KINDS, make_model
from tests.equivalence import (IDS, SMALL, assert_reloads_bit_exactly, generate, load, logits, masked_dense,
                             pruned_both_ways, tensor_names)

@pytest.fixture(scope="module", params=FUSED_KINDS)
def runs(request, tmp_path_factory, tokenizer, calibration_texts):
    """The dense model, the same pruned in memory (half the KV groups and neurons) and by a streamed run."""
    kind = request.param
    return kind, *pruned_both_ways(kind, tmp_path_factory.mktemp(kind), tokenizer, calibration_texts)


def test_pruned_logits_are_the_masked_dense_models(runs):
    kind, dense, model, report, _ = runs
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(dense.config)
    assert read_block_shapes(model) == [{"num_key_value_heads": m // 2, "num_attention_heads": m // 2 * n_rep,
                                         "ffn_dim": spec.ffn_dim(dense.config) // 2}] * 2
    masked = masked_dense(dense, model, report)
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)
    out, reference = generate(model), generate(masked)  # with a KV cache
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)


def test_streamed_equals_in_memory_and_every_format_reloads_bit_exactly(runs, tmp_path, tokenizer):
    kind, _, model, _, streamed = runs
    assert_reloads_bit_exactly(model, load(streamed, model))
    saved = save_pruned(model, tmp_path / "auto", tokenizer=tokenizer)
    assert json.loads((saved / "config.json").read_text()) == json.loads((streamed / "config.json").read_text())
    assert tensor_names(streamed) == tensor_names(saved)  # the checkpoint's names (GPT-NeoX: embed_out)
    assert_reloads_bit_exactly(model, load(saved, model))
    with pytest.raises(SaveError, match="stock"):  # the head count is not a stock Phi-3 config field
        save_pruned(model, tmp_path / "stock", format="stock")
    remote = load(save_pruned(model, tmp_path / "remote", format="remote_code"), model, trust_remote_code=True)
    assert type(remote).__name__ == f"Osscar{type(model).__name__}"
    assert_reloads_bit_exactly(model, remote)


def test_a_pruned_ffn_alone_is_a_stock_checkpoint(tmp_path, tokenizer, calibration_texts):
    for kind in FUSED_KINDS:
        model = OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dataset=calibration_texts, **SMALL)).prune(
            make_model(kind), tokenizer, progress=False)
        folder = save_pruned(model, tmp_path / kind, format="stock")
        data = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in data and data["intermediate_size"] == 24
        assert_reloads_bit_exactly(model, load(folder, model))


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_per_block_shapes_and_a_block_without_heads_in_osscar_and_remote_code(kind, tmp_path):
    model = make_model(kind)
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    for block, groups, kept in zip(model.get_submodule(spec.blocks), ([m - 1], []), (range(0, 20, 2), range(24))):
        prune_attention(block, spec, torch.tensor(groups, dtype=torch.long), n_rep=n_rep, head_dim=head_dim,
                        num_groups=m)
        prune_mlp(block, spec, torch.tensor(list(kept), dtype=torch.long))
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim)
    assert model.config.num_attention_heads == m * n_rep  # the dense count: each block reads its own
    for fmt, kwargs, empty in (("osscar", {}, "EmptyAttention"),
                               ("remote_code", {"trust_remote_code": True}, "OsscarEmptyAttention")):
        loaded = load(save_pruned(model, tmp_path / fmt, format=fmt), model, **kwargs)
        assert type(loaded.get_submodule(spec.blocks)[1].get_submodule(spec.attention)).__name__ == empty
        assert_reloads_bit_exactly(model, loaded)


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_the_remote_code_files_import_only_torch_and_transformers(kind):
    base = get_spec(make_model(kind)).model_types[0]
    for file_name, source in render_remote_code(remote_code_names(base)).items():
        tree = ast.parse(source)
        imported = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        imported |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert imported <= {"__future__", "typing", "torch", "transformers"}, file_name


def _assert_cached_step_is(model: torch.nn.Module, expected: torch.Tensor) -> None:
    """A step with the cache alone (positions and mask come from the cache's length) gives ``expected``."""
    with torch.no_grad():
        cache = model(IDS[:, :-1], use_cache=True).cache
        step = model(IDS[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    assert cache.get_seq_length() == IDS.shape[1]
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_a_first_block_without_heads_generates_as_the_masked_dense_model(kind, tmp_path):
    """The empty attention takes the family's cache argument (GPT-NeoX: ``layer_past``) and keeps the cache's length
    (read from the first block) right, so generation with a KV cache follows the masked dense model."""
    dense = make_model(kind)
    model, masked = copy.deepcopy(dense), copy.deepcopy(dense)
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    prune_attention(model.get_submodule(spec.blocks)[0], spec, torch.tensor([], dtype=torch.long), n_rep=n_rep,
                    head_dim=head_dim, num_groups=m)
    with torch.no_grad():
        masked.get_submodule(spec.blocks)[0].get_submodule(f"{spec.attention}.{spec.o_proj}").weight.zero_()
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)
    out, reference = generate(model), generate(masked)
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)
    _assert_cached_step_is(model, logits(masked)[:, -1])
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim)
    remote = load(save_pruned(model, tmp_path / "remote", format="remote_code"), model, trust_remote_code=True)
    _assert_cached_step_is(remote, logits(masked)[:, -1])


@pytest.mark.parametrize("attention_bias", [True, False])
def test_flap_on_gpt_neox_gives_the_masked_dense_model_and_reloads(attention_bias, tmp_path, tokenizer,
                                                                   calibration_texts):
    """GPT-NeoX's consumers have biases (the attention's when ``attention_bias``, which FLAP switches on when not)."""
    dense = make_model("gpt_neox", attention_bias=attention_bias)
    pruner = OsscarPruner(OsscarConfig(attention_sparsity=0.5, mlp_sparsity=0.5, method="flap",
                                       dataset=calibration_texts, **SMALL))
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    assert model.config.attention_bias
    torch.testing.assert_close(logits(model), logits(masked_dense(dense, model, pruner.report)), rtol=1e-5, atol=1e-5)
    assert_reloads_bit_exactly(model, load(save_pruned(model, tmp_path / "out"), model))
