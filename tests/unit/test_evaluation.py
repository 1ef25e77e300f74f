"""Tests of osscar_hf.evaluation on a tiny random Llama and an in-process word-level tokenizer."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from osscar_hf.metrics import load_wikitext2_test
from osscar_hf.evaluation import (
    PerplexityResult,
    count_parameters,
    evaluate_perplexity,
    compare_throughput,
    measure_throughput,
)

WORDS = [f"w{i}" for i in range(40)]
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _text(num_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def _window_nll(model: LlamaForCausalLM, window: torch.Tensor, num_scored: int) -> float:
    """Sum of the NLL of the last ``num_scored`` tokens of ``window``, computed directly."""
    with torch.no_grad():
        logits = model(window[None]).logits[0].double()
    nll = F.cross_entropy(logits[:-1], window[1:], reduction="none")
    return float(nll[-num_scored:].sum())


def test_non_overlapping_matches_direct_computation(model, tokenizer) -> None:
    text = _text(16 * 7 + 5)
    ids = _ids(tokenizer, text)
    assert ids.numel() == 16 * 7 + 5  # one token per word, no special tokens
    total, count = 0.0, 0
    for i in range(7):  # the 5-token tail is dropped
        total += _window_nll(model, ids[i * 16 : (i + 1) * 16], 15)
        count += 15
    expected = math.exp(total / count)

    result = evaluate_perplexity(model, tokenizer, text, seq_len=16)
    assert isinstance(result, PerplexityResult)
    assert result.num_windows == 7
    assert result.num_tokens == count
    assert result.seq_len == 16
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(total / count, rel=1e-5)

    batched = evaluate_perplexity(model, tokenizer, text, seq_len=16, batch_size=3)
    assert batched.perplexity == pytest.approx(expected, rel=1e-5)
    assert batched.num_tokens == count


def test_strided_matches_direct_computation(model, tokenizer) -> None:
    seq_len, stride = 16, 6
    text = _text(50, seed=1)
    ids = _ids(tokenizer, text)
    n = ids.numel()
    total, count, prev_end, begin = 0.0, 0, 0, 0
    while prev_end < n:
        end = min(begin + seq_len, n)
        scored = end - max(prev_end, begin + 1)
        total += _window_nll(model, ids[begin:end], scored)
        count += scored
        prev_end = end
        begin += stride
    assert count == n - 1  # every token after the first is scored exactly once
    expected = math.exp(total / count)

    result = evaluate_perplexity(model, tokenizer, text, seq_len=seq_len, stride=stride)
    assert result.num_tokens == n - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    batched = evaluate_perplexity(model, tokenizer, text, seq_len=seq_len, stride=stride, batch_size=4)
    assert batched.perplexity == pytest.approx(expected, rel=1e-5)


def test_list_of_texts_is_joined(model, tokenizer) -> None:
    parts = [_text(20, seed=2), _text(20, seed=3)]
    joined = evaluate_perplexity(model, tokenizer, "\n\n".join(parts), seq_len=8)
    listed = evaluate_perplexity(model, tokenizer, parts, seq_len=8)
    assert listed == joined


def test_max_windows_limits_windows(model, tokenizer) -> None:
    text = _text(16 * 6)
    ids = _ids(tokenizer, text)
    result = evaluate_perplexity(model, tokenizer, text, seq_len=16, max_windows=2)
    assert result.num_windows == 2
    assert result.num_tokens == 30
    total = _window_nll(model, ids[:16], 15) + _window_nll(model, ids[16:32], 15)
    assert result.perplexity == pytest.approx(math.exp(total / 30), rel=1e-5)


def test_default_seq_len_is_model_context(model, tokenizer) -> None:
    result = evaluate_perplexity(model, tokenizer, _text(64 * 2 + 3), max_windows=1)
    assert result.seq_len == 64
    assert result.num_windows == 1


def test_too_short_text_raises_value_error_naming_lengths(model, tokenizer) -> None:
    with pytest.raises(ValueError, match=r"10 tokens.*seq_len=16"):
        evaluate_perplexity(model, tokenizer, _text(10), seq_len=16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 1}, "seq_len"),
        ({"seq_len": 8, "stride": 9}, "stride"),
        ({"seq_len": 8, "stride": 0}, "stride"),
        ({"seq_len": 8, "max_windows": 0}, "max_windows"),
        ({"seq_len": 8, "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise(model, tokenizer, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_perplexity(model, tokenizer, _text(40), **kwargs)


def test_training_mode_is_restored(model, tokenizer) -> None:
    model.train()
    try:
        evaluate_perplexity(model, tokenizer, _text(40), seq_len=8)
        assert model.training
    finally:
        model.eval()


def test_count_parameters_counts_tied_weights_once() -> None:
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        tie_word_embeddings=True,
    )
    tied = LlamaForCausalLM(config)
    assert count_parameters(tied) == sum(p.numel() for p in tied.parameters())
    untied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert count_parameters(untied) == count_parameters(tied) + 50 * 16


def test_measure_throughput_is_positive(model) -> None:
    rate = measure_throughput(model, prompt_len=8, new_tokens=4, repeats=2)
    assert rate > 0
    assert not model.training


def test_load_wikitext2_test_from_raw_file(tmp_path) -> None:
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Body text . \n", encoding="utf-8")
    assert load_wikitext2_test(raw) == ["", " = Title = \n", "", " Body text . \n"]


@pytest.mark.shared_data
def test_shared_wikitext2_parquet_and_raw_agree() -> None:
    from osscar_hf.demo import paths, texts

    parquet, raw = paths.wikitext2_test_parquet_path(), paths.wikitext2_test_raw_path()
    if parquet is None or raw is None:
        pytest.skip("shared/data/wikitext-2-raw is not available")
    rows = load_wikitext2_test(parquet)
    assert len(rows) == 4358
    assert rows == load_wikitext2_test(raw)
    assert texts.load_wikitext2_test()[0] == rows


def test_shared_data_dir_honours_env_var(monkeypatch, tmp_path) -> None:
    from osscar_hf.demo import paths

    monkeypatch.setenv("OSSCAR_HF_SHARED_DATA", str(tmp_path))
    assert paths.shared_data_dir() == tmp_path
    assert paths.calibration_text_path() is None
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "state_union.txt").write_text("text", encoding="utf-8")
    assert paths.calibration_text_path() == tmp_path / "calibration" / "state_union.txt"


def test_compare_throughput_times_every_model(model) -> None:
    import copy

    rates = compare_throughput({"a": model, "b": copy.deepcopy(model)}, prompt_len=8, new_tokens=4, repeats=2)
    assert set(rates) == {"a", "b"}
    assert all(rate > 0 for rate in rates.values())
    with pytest.raises(ValueError, match="repeats"):
        compare_throughput({"a": model}, repeats=0)
