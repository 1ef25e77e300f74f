"""Pruned checkpoints of every save format evaluate with lm-evaluation-harness (``lm_eval``), offline.

A tiny Llama (GQA) is pruned with the real pruner, saved as ``stock``, ``osscar`` and ``remote_code``, and scored
by lm-eval's ``hf`` model on a perplexity task written here (``loglikelihood_rolling`` over a local JSON-lines
file). The three formats hold the same weights, so every document must get the same log-likelihood; and that
log-likelihood must be osscar_hf's own (``evaluate_perplexity``) where the two protocols score the same tokens.
The stock and remote-code formats are evaluated in a fresh interpreter that never imports osscar_hf; the osscar
format there must fail (it needs ``import osscar_hf``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

lm_eval = pytest.importorskip("lm_eval")
# lm-eval re-reads an osscar checkpoint's quantization_config and passes it back to from_pretrained, which then
# warns that the checkpoint's own is used: it is the same config.
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

from lm_eval.tasks import TaskManager  # noqa: E402

import osscar_hf  # noqa: E402
from osscar_hf import OsscarConfig, OsscarPruner, evaluate_perplexity  # noqa: E402
from osscar_hf.integrations.lm_eval_task import write_perplexity_task  # noqa: E402
from tests.conftest import make_model, make_text, make_tokenizer  # noqa: E402

TASK = "osscar_tiny_ppl"
SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu")
DOC_WORDS = 64  # every word is one token of the tiny tokenizer: 64 tokens a document
WINDOW = 16  # lm-eval's max_length for the rolling-window comparison (64 = 4 windows of 16)
PREFIX = "[EOS]"  # the tiny tokenizer has no BOS: lm-eval conditions a document's first token on EOS (id 2)

# Run in a fresh interpreter: stock and remote-code checkpoints evaluate with lm-eval alone.
WITHOUT_OSSCAR_HF = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

root, task = sys.argv[1], sys.argv[2]
manager = TaskManager(include_path=root + "/tasks", include_defaults=False)

def lls(args):
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[task], task_manager=manager,
                                  log_samples=True, batch_size=1, device="cpu")
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples]

result = {"stock": lls(f"pretrained={root}/stock,dtype=float32"),
          "remote_code": lls(f"pretrained={root}/remote_code,dtype=float32,trust_remote_code=True")}
try:
    lls(f"pretrained={root}/osscar,dtype=float32")
    result["osscar_error"] = None
except Exception as error:  # the checkpoint needs `import osscar_hf`
    result["osscar_error"] = repr(error)
result["osscar_hf_imported"] = any(name.split(".")[0] == "osscar_hf" for name in sys.modules)
print("RESULT " + json.dumps(result))
"""


def _documents() -> list[str]:
    return [make_text(DOC_WORDS, seed=seed) for seed in (11, 12, 13)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    """Uniformly and per-block pruned models, their checkpoints, the documents and the local task."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = make_tokenizer()
    words = make_text().split()
    calibration = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
    uniform = OsscarPruner(OsscarConfig(0.5, 0.25, dataset=calibration, **SMALL)).prune(
        make_model("llama-gqa"), tokenizer, progress=False)
    sizes = [{"attention": 1, "mlp": 20}, {"attention": 2, "mlp": 36}]
    per_block = OsscarPruner(OsscarConfig(block_sizes=sizes, dataset=calibration, **SMALL)).prune(
        make_model("llama-gqa"), tokenizer, progress=False)
    for fmt in ("stock", "osscar", "remote_code"):
        osscar_hf.save_pruned(uniform, root / fmt, tokenizer=tokenizer, format=fmt)
    for fmt in ("osscar", "remote_code"):
        osscar_hf.save_pruned(per_block, root / f"per_block_{fmt}", tokenizer=tokenizer, format=fmt)
    documents = _documents()
    tasks = write_perplexity_task(root, documents, TASK, cache_dir=root / "cache")
    return dict(root=root, tokenizer=tokenizer, uniform=uniform, per_block=per_block, documents=documents,
                manager=TaskManager(include_path=str(tasks), include_defaults=False))


def _evaluate(setup: dict[str, Any], folder: str, extra: str = "") -> tuple[dict[str, float], list[float]]:
    """lm-eval's metrics and every document's log-likelihood for the checkpoint in ``root/folder``."""
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup['root'] / folder},dtype=float32{extra}",
                                  tasks=[TASK], task_manager=setup["manager"], log_samples=True, batch_size=1,
                                  device="cpu")
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK], [s["resps"][0][0] for s in samples]


def _osscar_hf_loglikelihood(model, tokenizer, document: str, seq_len: int, stride: int | None) -> float:
    """The total log-likelihood osscar_hf's metric gives the document behind lm-eval's prefix token."""
    text = f"{PREFIX} {document}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.eos_token_id] + tokenizer(document, add_special_tokens=False)["input_ids"]
    result = evaluate_perplexity(model, tokenizer, text, seq_len=seq_len, stride=stride)
    assert result.num_tokens == len(ids) - 1  # every token of the document is scored, as lm-eval does
    return -result.nll * result.num_tokens


def test_formats_are_what_they_say(setup):
    config = {fmt: json.loads((setup["root"] / fmt / "config.json").read_text())
              for fmt in ("stock", "osscar", "remote_code")}
    assert "quantization_config" not in config["stock"] and "auto_map" not in config["stock"]
    assert config["osscar"]["quantization_config"]["quant_method"] == "osscar"
    assert "auto_map" in config["remote_code"] and "quantization_config" not in config["remote_code"]


def test_every_format_gives_the_same_numbers(setup):
    """In this process (osscar_hf imported) all three evaluate; in a fresh one, stock and remote code do, with
    lm-eval alone, and the osscar format refuses to. Every document gets the same log-likelihood everywhere."""
    metrics, reference = _evaluate(setup, "osscar")
    assert all(math.isfinite(ll) and ll < 0 for ll in reference) and len(reference) == len(setup["documents"])
    for fmt, extra in (("stock", ""), ("remote_code", ",trust_remote_code=True")):
        other_metrics, lls = _evaluate(setup, fmt, extra)
        assert lls == pytest.approx(reference, rel=1e-6, abs=1e-5), fmt
        assert other_metrics["word_perplexity,none"] == pytest.approx(metrics["word_perplexity,none"], rel=1e-6)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(setup["root"] / "hf-home"))
    proc = subprocess.run([sys.executable, "-c", WITHOUT_OSSCAR_HF, str(setup["root"]), TASK], env=env,
                          cwd=setup["root"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert fresh["stock"] == pytest.approx(reference, rel=1e-6, abs=1e-5)
    assert fresh["remote_code"] == pytest.approx(reference, rel=1e-6, abs=1e-5)
    assert fresh["osscar_error"] is not None and "osscar" in fresh["osscar_error"].lower(), fresh["osscar_error"]
    assert not fresh["osscar_hf_imported"]


def test_word_perplexity_is_the_documents_loglikelihood(setup):
    metrics, lls = _evaluate(setup, "stock")
    words = sum(len(re.split(r"\s+", doc)) for doc in setup["documents"])
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-9)
    num_bytes = sum(len(doc.encode("utf-8")) for doc in setup["documents"])
    assert metrics["bits_per_byte,none"] == pytest.approx(-sum(lls) / num_bytes / math.log(2), rel=1e-9)


@pytest.mark.parametrize("model_key,folders", [
    ("uniform", ("stock",)),
    ("per_block", ("per_block_osscar", "per_block_remote_code")),
])
def test_loglikelihood_matches_osscar_hf_metric(setup, model_key, folders):
    """One window (a document shorter than the context), and lm-eval's rolling windows of WINDOW tokens, which
    are osscar_hf's strided windows of WINDOW + 1 tokens over the prefix token and the document."""
    model, tokenizer = setup[model_key], setup["tokenizer"]
    one_window = [_osscar_hf_loglikelihood(model, tokenizer, doc, DOC_WORDS + 1, None) for doc in setup["documents"]]
    rolling = [_osscar_hf_loglikelihood(model, tokenizer, doc, WINDOW + 1, WINDOW) for doc in setup["documents"]]
    assert rolling != pytest.approx(one_window, rel=1e-3)  # the windows do change the number
    for folder in folders:
        extra = ",trust_remote_code=True" if folder.endswith("remote_code") else ""
        _, lls = _evaluate(setup, folder, extra)
        assert lls == pytest.approx(one_window, rel=1e-5, abs=1e-4), folder
        _, lls = _evaluate(setup, folder, extra + f",max_length={WINDOW}")
        assert lls == pytest.approx(rolling, rel=1e-5, abs=1e-4), folder
