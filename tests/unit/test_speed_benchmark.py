"""benchmarks/speed.py's ideal costs, on a tiny Llama: counted from the shapes, as a hand count gives them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SPEED = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


def load_speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SPEED)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_ideal_costs_match_a_hand_count() -> None:
    speed = load_speed()
    model = tiny_llama()
    costs = speed.ideal_costs(model, model, prompt=8)
    linears = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 32  # q, k, v, o, gate/up/down per token
    scores = 2 * 4 * 4 * (8 + 1) / 2  # scores and weighted values over the mean causal context
    assert costs["prefill_macs_per_token"] == 2 * (linears + scores) + 64 * 16 / 8
    assert costs["decode_weight_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert costs["lm_head_bytes"] == 4 * 64 * 16
    assert costs["kv_bytes_per_context_token"] == 2 * (2 * 2 * 4 * 4)
    assert speed.block_sizes(model) == [(2, 32), (2, 32)]


def test_speed_ups_are_ratios_of_medians_against_the_ideal() -> None:
    speed = load_speed()
    shapes = (("dense", 200.0, 400), ("p", 100.0, 200))
    models = {name: {"prefill_macs_per_token": {"8": macs}, "decode_weight_bytes": size,
                     "kv_bytes_per_context_token": 0} for name, macs, size in shapes}
    row = {"batch": 1, "prompt": 8, "new_tokens": 4, "timings": {
        "dense": {"prefill": [10.0, 12.0, 11.0], "decode": [1.0, 1.0, 1.0]},
        "p": {"prefill": [16.0, 18.0, 22.0], "decode": [1.5, 1.5, 1.5]}}}
    d = speed.derived(row, models, "p")
    assert d["prefill_speedup"] == 18.0 / 11.0 and d["prefill_ideal"] == 2.0
    assert d["prefill_of_ideal"] == d["prefill_speedup"] / 2.0
    assert d["decode_speedup"] == 1.5 and d["decode_of_ideal"] == 0.75
    assert (d["prefill_speedup_min"], d["prefill_speedup_max"]) == (1.5, 2.0)
