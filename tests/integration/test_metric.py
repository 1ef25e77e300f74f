"""The packaged ``evaluate`` perplexity metric: loaded by path (offline), equal to evaluate_perplexity and to
a direct computation, for a model object and for a saved model folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from osscar_hf.evaluation import evaluate_perplexity
from osscar_hf.metrics import (
    PERPLEXITY_METRIC_PATH,
    is_wikitext2,
    load_eval_texts,
    load_perplexity_metric,
    resolve_device,
    resolve_dtype,
)
from tests.conftest import make_model, make_text, make_tokenizer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def metric():
    return load_perplexity_metric(keep_in_memory=True)


@pytest.fixture(scope="module")
def model():
    return make_model("llama-gqa", seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    words = make_text(700, seed=5).split()
    return [" ".join(words[i : i + 70]) for i in range(0, len(words), 70)]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def direct_perplexity(model, tokenizer, texts: list[str], seq_len: int) -> tuple[float, int]:
    """Corpus perplexity computed here from scratch: join, tokenize once, non-overlapping windows."""
    ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    total, count = 0.0, 0
    for begin in range(0, ids.numel() - seq_len + 1, seq_len):
        window = ids[begin : begin + seq_len]
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        total += float(F.cross_entropy(logits[:-1], window[1:], reduction="sum"))
        count += seq_len - 1
    return math.exp(total / count), count


def test_metric_path_is_a_metric_folder() -> None:
    path = Path(PERPLEXITY_METRIC_PATH)
    assert path.is_dir()
    assert (path / "perplexity.py").is_file()
    assert path.parent == Path(__file__).resolve().parents[2] / "osscar_hf" / "metrics"


def test_model_object_matches_evaluate_perplexity_and_direct(metric, model, tokenizer, texts) -> None:
    result = metric.compute(predictions=texts, model=model, tokenizer=tokenizer, seq_len=SEQ_LEN)
    assert set(result) == {"perplexity", "nll", "num_tokens"}
    reference = evaluate_perplexity(model, tokenizer, texts, seq_len=SEQ_LEN)
    assert result["perplexity"] == reference.perplexity
    assert result["nll"] == reference.nll
    assert result["num_tokens"] == reference.num_tokens
    expected, count = direct_perplexity(model, tokenizer, texts, SEQ_LEN)
    assert result["num_tokens"] == count
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(expected), rel=1e-5)


def test_saved_model_path_matches(metric, model, tokenizer, texts, saved_model) -> None:
    result = metric.compute(predictions=texts, model_id=str(saved_model), seq_len=SEQ_LEN, device="cpu")
    reference = evaluate_perplexity(model, tokenizer, texts, seq_len=SEQ_LEN)
    assert result["num_tokens"] == reference.num_tokens
    assert result["perplexity"] == pytest.approx(reference.perplexity, rel=1e-6)
    expected, _ = direct_perplexity(model, tokenizer, texts, SEQ_LEN)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_pruned_checkpoint_path_matches(metric, tokenizer, texts, tmp_path) -> None:
    """An OPT with heads removed is saved in the osscar format and loads through the osscar quantizer."""
    from osscar_hf import OsscarConfig, OsscarPruner
    from osscar_hf.io import save_pruned

    config = OsscarConfig(0.5, 0.5, dataset=texts, num_samples=4, seq_len=SEQ_LEN, device="cpu")
    pruned = OsscarPruner(config).prune(make_model("opt", seed=4), tokenizer, progress=False)
    folder = save_pruned(pruned, tmp_path / "pruned-opt", tokenizer=tokenizer)
    assert "quantization_config" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    result = metric.compute(predictions=texts, model_id=str(folder), seq_len=SEQ_LEN, device="cpu")
    reference = evaluate_perplexity(pruned, tokenizer, texts, seq_len=SEQ_LEN)
    assert result["num_tokens"] == reference.num_tokens
    assert result["perplexity"] == pytest.approx(reference.perplexity, rel=1e-6)


def test_options_are_passed_through(metric, model, tokenizer, texts) -> None:
    kwargs = dict(seq_len=SEQ_LEN, stride=12, max_windows=5, batch_size=2)
    result = metric.compute(predictions=texts, model=model, tokenizer=tokenizer, device="cpu", **kwargs)
    reference = evaluate_perplexity(model, tokenizer, texts, **kwargs)
    assert result["perplexity"] == pytest.approx(reference.perplexity, rel=1e-6)
    assert result["num_tokens"] == reference.num_tokens
    unstrided = evaluate_perplexity(model, tokenizer, texts, seq_len=SEQ_LEN, max_windows=5)
    assert result["num_tokens"] != unstrided.num_tokens


def test_dtype_option_loads_in_that_dtype(metric, tokenizer, texts, saved_model) -> None:
    from transformers import AutoModelForCausalLM

    result = metric.compute(predictions=texts, model_id=str(saved_model), seq_len=SEQ_LEN, device="cpu",
                            dtype="bfloat16", max_windows=2)
    bf16 = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    reference = evaluate_perplexity(bf16, tokenizer, texts, seq_len=SEQ_LEN, max_windows=2)
    assert result["perplexity"] == reference.perplexity
    fp32 = metric.compute(predictions=texts, model_id=str(saved_model), seq_len=SEQ_LEN, device="cpu",
                          max_windows=2)
    assert fp32["perplexity"] != result["perplexity"]


def test_tokenizer_defaults_to_the_models_own(metric, tokenizer, texts, saved_model) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(saved_model)
    with_default = metric.compute(predictions=texts, model=loaded, seq_len=SEQ_LEN)
    explicit = metric.compute(predictions=texts, model=loaded, tokenizer=tokenizer, seq_len=SEQ_LEN)
    assert with_default == explicit


@pytest.mark.parametrize("kwargs", [{}, {"model": "x", "model_id": "y"}])
def test_exactly_one_model_source(metric, texts, kwargs) -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        metric.compute(predictions=texts, **kwargs)


def test_bad_dtype_and_device_are_rejected() -> None:
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype(None) == "auto"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int4")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")


def test_offline_load_with_empty_cache(tmp_path, saved_model, model, tokenizer, texts) -> None:
    """In a fresh interpreter with HF_HUB_OFFLINE=1 and an empty HF_HOME, evaluate.load(path) works."""
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    script = textwrap.dedent(
        f"""
        import json, evaluate
        from osscar_hf.metrics import PERPLEXITY_METRIC_PATH
        metric = evaluate.load(PERPLEXITY_METRIC_PATH)
        texts = json.load(open({str(texts_file)!r}, encoding="utf-8"))
        print(json.dumps(metric.compute(predictions=texts, model_id={str(saved_model)!r}, seq_len={SEQ_LEN},
                                        device="cpu")))
        """
    )
    home = tmp_path / "hf_home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_ENDPOINT": "http://127.0.0.1:9"}
    for var in ("HF_MODULES_CACHE", "HF_EVALUATE_CACHE", "HF_METRICS_CACHE", "HF_DATASETS_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"):
        env.pop(var, None)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                               timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    reference = evaluate_perplexity(model, tokenizer, texts, seq_len=SEQ_LEN)
    assert result["num_tokens"] == reference.num_tokens
    assert result["perplexity"] == pytest.approx(reference.perplexity, rel=1e-6)
    assert home.is_dir()  # the metric's module and cache went to the empty HF_HOME


def test_load_eval_texts(tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("one two\n\nthree", encoding="utf-8")
    assert load_eval_texts(txt) == ["one two\n\nthree"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "x y"}\n\n{"text": "z"}\n', encoding="utf-8")
    assert load_eval_texts(jsonl) == ["x y", "z"]
    with pytest.raises(ValueError, match="'body'"):
        load_eval_texts(jsonl, text_column="body")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_texts(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_eval_texts(tmp_path / "blank.txt")
    assert is_wikitext2("wikitext2") and is_wikitext2("WikiText-2") and not is_wikitext2("a.txt")
