"""Gemma 3 with its vision tower (``model_type`` ``gemma3``): the text blocks under ``model.language_model`` are
pruned, their fields read from and written to ``config.text_config``, the vision tower kept. On a tiny random
model: pruned logits equal the masked dense model's (text alone, with a KV cache, and with an image), every format
reloads bit-exactly under the checkpoint names of the original release, a streamed run writes the in-memory result,
and the global allocation (whose loss goes through ``model.language_model.norm`` and the LM head) runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from osscar_hf import OsscarConfig, OsscarPruner, save_pruned
from osscar_hf.io import read_block_shapes
from tests.conftest import VOCAB, make_model
from tests.equivalence import (SMALL, assert_reloads_bit_exactly, generate, load, logits, masked_dense,
                             pruned_both_ways, tensor_names)

IMAGE_TOKEN = VOCAB - 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer, calibration_texts):
    root = tmp_path_factory.mktemp("gemma3")
    return root, *pruned_both_ways("gemma3", root, tokenizer, calibration_texts)


def _with_image(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 6, *[IMAGE_TOKEN] * 4, 7, 8, 9]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == IMAGE_TOKEN).long()).logits


def test_pruned_text_blocks_give_the_masked_dense_models_logits_with_text_and_images(runs):
    _, dense, model, report, _ = runs
    text = model.config.text_config
    assert read_block_shapes(model) == [{"num_key_value_heads": 1, "num_attention_heads": 2, "ffn_dim": 24}] * 2
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (2, 1, 24)
    masked = masked_dense(dense, model, report)
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_with_image(model), _with_image(masked), rtol=1e-5, atol=1e-5)
    out, reference = generate(model), generate(masked)  # with a KV cache
    assert torch.equal(out.sequences, reference.sequences)
    vision = {k: v for k, v in dense.state_dict().items() if "vision_tower" in k or "multi_modal" in k}
    assert vision and all(torch.equal(model.state_dict()[k], v) for k, v in vision.items())


def test_streamed_equals_in_memory_and_every_format_reloads_bit_exactly(runs, tmp_path, tokenizer):
    root, _, model, _, streamed = runs
    assert_reloads_bit_exactly(model, load(streamed, model))
    saved = save_pruned(model, tmp_path / "auto", tokenizer=tokenizer)
    data = json.loads((saved / "config.json").read_text())
    assert "quantization_config" not in data and data["text_config"]["num_attention_heads"] == 2  # stock
    assert data == json.loads((streamed / "config.json").read_text())
    assert tensor_names(saved) == tensor_names(streamed)
    assert any(name.startswith("language_model.model.layers.") for name in tensor_names(saved))
    assert_reloads_bit_exactly(model, load(saved, model))
    for fmt, kwargs in (("osscar", {}), ("remote_code", {"trust_remote_code": True})):
        loaded = load(save_pruned(model, tmp_path / fmt, format=fmt), model, **kwargs)
        assert_reloads_bit_exactly(model, loaded)
        torch.testing.assert_close(_with_image(loaded), _with_image(model), rtol=0, atol=0)


def test_a_global_budget_and_query_heads_prune_the_text_blocks(tokenizer, calibration_texts):
    dense = make_model("gemma3")
    pruner = OsscarPruner(OsscarConfig(sparsity=0.3, attention_structure="query_heads", allocation_samples=2,
                                       dataset=calibration_texts, **SMALL))
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    budget = pruner.report.budget
    assert budget["allocation"] == "osscar" and budget["block_params_after"] < 0.75 * budget["block_params_before"]
    assert all(shape["num_key_value_heads"] in (0, 2) for shape in read_block_shapes(model))
    torch.testing.assert_close(logits(model), logits(masked_dense(dense, model, pruner.report)), rtol=1e-5,
                               atol=1e-5)


