"""What the family tests compare a pruned model with: its logits and greedy generation on fixed ids, a reload's
tensors, and the masked dense model (the dense model with the pruned structures' consumer columns zeroed and the kept
ones taken from the pruned model), for KV groups, query heads and experts alike."""

from __future__ import annotations

import copy

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.arch import get_spec
from osscar_hf.arch.experts import expert_parameter
from osscar_hf.surgery import add_part_biases, group_channels
from tests.conftest import VOCAB, make_model

__all__ = ["IDS", "SMALL", "assert_reloads_bit_exactly", "generate", "load", "logits", "masked_dense", "tensor_names"]

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")
IDS = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def generate(model: torch.nn.Module):
    return model.generate(IDS[:, :8], max_new_tokens=6, do_sample=False, pad_token_id=1, output_scores=True,
                          return_dict_in_generate=True)


def load(folder, like: torch.nn.Module | None = None, **kwargs) -> torch.nn.Module:
    """``folder`` loaded with the attention implementation of ``like`` (bit-exact comparisons need the same)."""
    if like is not None:
        kwargs["attn_implementation"] = like.config._attn_implementation
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def pruned_both_ways(kind: str, root, tokenizer, calibration_texts) -> tuple:
    """A tiny ``kind`` model saved in small shards under ``root/dense``, loaded back (the attention implementation a
    streamed run's skeleton gets too), pruned in memory (half the attention structures and neurons) and by a streamed
    run into ``root/streamed``: (dense, pruned, report, streamed folder)."""
    make_model(kind).save_pretrained(root / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(root / "dense")
    config = dict(attention_sparsity=0.5, mlp_sparsity=0.5, dataset=calibration_texts, **SMALL)
    dense = load(root / "dense")
    pruner = OsscarPruner(OsscarConfig(**config))
    model = pruner.prune(copy.deepcopy(dense), tokenizer, progress=False)
    streamed = OsscarPruner(OsscarConfig(**config)).prune_checkpoint(root / "dense", root / "streamed", progress=False)
    return dense, model, pruner.report, streamed


def tensor_names(folder) -> set[str]:
    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names |= set(handle.keys())
    return names


def assert_reloads_bit_exactly(model: torch.nn.Module, loaded: torch.nn.Module) -> None:
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(generate(loaded).sequences, generate(model).sequences)


def _mask_columns(source: torch.Tensor, target: torch.Tensor, kept: torch.Tensor) -> None:
    """``target`` (out x in) zero but for the columns ``kept``, which take ``source`` (out x len(kept))."""
    full = torch.zeros_like(target)
    full[:, kept] = source.detach()
    with torch.no_grad():
        target.copy_(full)


def _mask_consumer(source: torch.nn.Linear, target: torch.nn.Linear, kept: torch.Tensor) -> None:
    _mask_columns(source.weight, target.weight, kept)
    with torch.no_grad():  # bias compensation changes the consumer's bias
        target.bias.copy_(source.bias if source.bias is not None else torch.zeros_like(target.bias))


def masked_dense(dense: torch.nn.Module, model: torch.nn.Module, report) -> torch.nn.Module:
    """The dense model with the structures ``report`` pruned zeroed in the consumers: the attention's kept structures
    (KV groups or query heads: the report's kept indices, each ``in_features / structures`` columns wide), the MLP's
    kept neurons, each expert's own, and a shared expert's. The consumers' biases are the pruned model's."""
    spec = get_spec(model)
    masked = copy.deepcopy(dense)
    o_path = f"{spec.attention}.{spec.o_proj}"
    for entry, block, mblock in zip(report.blocks, model.get_submodule(spec.blocks), masked.get_submodule(spec.blocks)):
        add_part_biases(mblock, spec)
        width = mblock.get_submodule(o_path).in_features // entry.attention.structures
        heads = group_channels(torch.tensor(entry.attention.kept_indices, dtype=torch.long), width)
        _mask_consumer(block.get_submodule(o_path), mblock.get_submodule(o_path), heads)
        if spec.experts is None:
            neurons = torch.tensor(entry.mlp.kept_indices, dtype=torch.long)
            _mask_consumer(block.get_submodule(spec.mlp_consumer), mblock.get_submodule(spec.mlp_consumer), neurons)
            continue
        source = expert_parameter(block, spec.experts, spec.mlp_consumer)
        target = expert_parameter(mblock, spec.experts, spec.mlp_consumer)
        kept = torch.tensor(entry.mlp.kept_indices).reshape(target.shape[0], -1) % target.shape[2]
        for e in range(target.shape[0]):
            _mask_columns(source[e], target[e], kept[e])
        shared = spec.shared_expert_spec()
        if shared is not None:  # a dense MLP of its own
            neurons = torch.tensor(entry.shared_expert.kept_indices, dtype=torch.long)
            _mask_columns(block.get_submodule(shared.mlp_consumer).weight,
                          mblock.get_submodule(shared.mlp_consumer).weight, neurons)
    return masked
