"""Shared fixtures: tiny random models of every supported family and a tiny offline tokenizer."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 96
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

_WORDS = (
    "the a of to and in is was for on that with as by at from it his an were are which this be has had "
    "not or but its new first one two three after also who they their more other been year time state "
    "people nation world peace war government congress program work economy free"
).split()


def _config(kind: str, **overrides) -> object:
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, max_position_embeddings=128,
                  pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if kind == "opt":
        cfg = OPTConfig(**common, num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32, enable_bias=True,
                        dropout=0.0, attention_dropout=0.0)
    elif kind == "llama-mha":
        cfg = LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48)
    elif kind == "llama-gqa":
        cfg = LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
    elif kind == "mistral":
        cfg = MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                            sliding_window=64)
    elif kind == "qwen3":  # an explicit head_dim that is not hidden_size // heads
        cfg = Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, head_dim=16)
    elif kind == "gemma":
        cfg = GemmaConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, head_dim=8)
    elif kind == "gemma2":  # both soft caps on, low enough to bite; a sliding window shorter than the test inputs
        cfg = Gemma2Config(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, head_dim=8,
                           query_pre_attn_scalar=12, attn_logit_softcapping=0.05, final_logit_softcapping=0.2,
                           sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    elif kind == "gemma3-text":  # q/k norms, tied embeddings, a sliding and a full-attention layer
        cfg = Gemma3TextConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                               head_dim=8, query_pre_attn_scalar=12, sliding_window=6,
                               layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    elif kind == "gemma3":  # the multimodal Gemma 3: a vision tower, the text blocks under model.language_model
        text = dict(common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, head_dim=8,
                    query_pre_attn_scalar=12, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
        cfg = Gemma3Config(text_config=text, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                           vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14))
    elif kind == "phi3":  # fused qkv_proj and gate_up_proj; GQA; half the head dims rotated (partial rotary)
        cfg = Phi3Config(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    elif kind == "gpt_neox":  # interleaved query_key_value, parallel residual, a quarter of the head dims rotated
        cfg = GPTNeoXConfig(**common, num_attention_heads=4, intermediate_size=48, rotary_pct=0.25,
                            use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0)
    elif kind == "mixtral":  # 4 experts of 32 neurons, 2 per token; GQA
        cfg = MixtralConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=32,
                            num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    elif kind == "qwen3_moe":  # q/k norms; every layer sparse; a dense intermediate_size that is never used
        cfg = Qwen3MoeConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=40,
                             moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    elif kind == "qwen2_moe":  # q/k/v biases; a shared expert of 48 neurons beside the 4 experts of 32, gated
        cfg = Qwen2MoeConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                             moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                             num_experts_per_tok=2, qkv_bias=True)
    elif kind == "olmoe":  # q/k norms over the whole projections (its attention cannot be pruned); GQA
        cfg = OlmoeConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, num_experts=4,
                          num_experts_per_tok=2)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and "layer_types" not in overrides and len(layer_types) != cfg.num_hidden_layers:
        cfg.layer_types = [layer_types[i % len(layer_types)] for i in range(cfg.num_hidden_layers)]  # the pattern
    return cfg


MODEL_KINDS = ("opt", "llama-mha", "llama-gqa", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3-text")
# Families with fused projections, proved in a file of their own (tests/integration/test_fused.py), not in every
# MODEL_KINDS-wide test.
FUSED_KINDS = ("phi3", "gpt_neox")
# Mixtures of experts, proved in tests/integration/test_moe.py.
MOE_KINDS = ("mixtral", "qwen3_moe", "qwen2_moe")
# Kinds whose norm weights are randomised too (the q/k norms over head_dim must survive the slicing of heads).
RANDOM_NORM_KINDS = ("qwen3", "gemma", "gemma2", "gemma3-text", "qwen3_moe", "olmoe")


def make_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model; biases (and the norms of RANDOM_NORM_KINDS) are randomised too so their handling is
    exercised."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind, **overrides), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif kind in RANDOM_NORM_KINDS and "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def interrupt_at(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, block: int,
                 calls: list[int] | None = None) -> Callable:
    """Make ``owner.name(self, index, ...)`` (a block loop's step) stop the run as Ctrl-C does when ``index ==
    block``, recording the other indices in ``calls``; return the real method (the one under any earlier
    interruption), to put back."""
    real = getattr(owner, name)
    real = getattr(real, "uninterrupted", real)

    def stop(self: object, index: int, *args: object, **kwargs: object) -> object:
        if index == block:
            raise KeyboardInterrupt
        if calls is not None:
            calls.append(index)
        return real(self, index, *args, **kwargs)

    stop.uninterrupted = real  # type: ignore[attr-defined]
    monkeypatch.setattr(owner, name, stop)
    return real


def make_text(num_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    # A little structure (bigram preferences) so activations are not pure noise.
    words = [rng.choice(_WORDS)]
    for _ in range(num_words - 1):
        prev = _WORDS.index(words[-1])
        words.append(_WORDS[(prev * 7 + rng.randrange(5)) % len(_WORDS)] if rng.random() < 0.6 else rng.choice(_WORDS))
    return " ".join(words)


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture
def tiny_model() -> Callable[..., torch.nn.Module]:
    return make_model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def calibration_texts() -> list[str]:
    text = make_text()
    words = text.split()
    return [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
