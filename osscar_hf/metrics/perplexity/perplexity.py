"""Corpus perplexity of a causal language model, as pruning and quantization papers report it.

An ``evaluate`` metric script shipped inside osscar_hf; load it by path (this works offline):

    import evaluate
    from osscar_hf.metrics import PERPLEXITY_METRIC_PATH
    metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    metric.compute(predictions=texts, model_id="HuggingFaceTB/SmolLM2-135M-Instruct", seq_len=2048)

The computation is osscar_hf.evaluation.evaluate_perplexity; see its module docstring for the protocol.
"""

from __future__ import annotations

import datasets
import evaluate

from osscar_hf.evaluation import evaluate_perplexity
from osscar_hf.metrics import load_model_and_tokenizer, resolve_device

_DESCRIPTION = """\
Corpus perplexity of a causal language model on a list of texts. The texts are joined with two newlines
and tokenized once, without special tokens; the token stream is cut into windows of `seq_len` tokens (by
default the model's context, capped at 2048), non-overlapping unless `stride` is given; every token after
the first of each window is scored given the tokens before it in the window, and the perplexity is
exp(mean token negative log-likelihood) over all scored tokens. This is the WikiText-2 / C4 number of the
GPTQ, SparseGPT and OSSCAR papers, not the mean of per-text perplexities.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts, in order (e.g. the rows of the WikiText-2 test split).
    model: a loaded causal LM (a transformers PreTrainedModel); give either `model` or `model_id`.
    model_id (str): a local folder or Hub id, loaded with AutoModelForCausalLM.from_pretrained (models pruned
        and saved by osscar_hf included).
    tokenizer: a tokenizer, or a folder / id to load one from; default the model's own (`model_id`, or the
        `name_or_path` of `model`).
    trust_remote_code (bool): when loading `model_id`: run the checkpoint's own modeling code (osscar_hf's
        remote-code format); default False.
    dtype (str): when loading `model_id`: "float32" (default), "bfloat16", "float16" or "auto" (the
        checkpoint's dtype).
    device (str): "cpu", "cuda", "cuda:N" or "auto". Default: "auto" when loading `model_id`; the model's
        own device for `model` (a given device moves it there).
    batch_size (int): windows per forward pass (default 1).
    seq_len (int): window length in tokens (default the model's context capped at 2048).
    stride (int): sliding-window step in [1, seq_len]; default None (non-overlapping windows, the tail
        shorter than a window dropped).
    max_windows (int): score only the first this many windows.
Returns:
    perplexity (float): exp(nll).
    nll (float): mean negative log-likelihood per scored token, in nats.
    num_tokens (int): number of scored tokens.
Example:
    >>> metric = evaluate.load(osscar_hf.metrics.PERPLEXITY_METRIC_PATH)
    >>> metric.compute(predictions=texts, model=model, tokenizer=tokenizer, seq_len=512)
    {'perplexity': 21.3, 'nll': 3.06, 'num_tokens': 286720}
"""

_CITATION = """\
@inproceedings{meng2024osscar,
  title     = {{OSSCAR}: One-Shot Structured Pruning in Vision and Language Models with Combinatorial Optimization},
  author    = {Meng, Xiang and Ibrahim, Shibal and Behdin, Kayhan and Hazimeh, Hussein and Ponomareva, Natalia and Mazumder, Rahul},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  year      = {2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Corpus perplexity (osscar_hf.evaluation.evaluate_perplexity) as an ``evaluate`` metric."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2403.12983"],
        )

    def _compute(
        self,
        predictions,
        model=None,
        model_id=None,
        tokenizer=None,
        dtype="float32",
        device=None,
        batch_size=1,
        seq_len=None,
        stride=None,
        max_windows=None,
        trust_remote_code=False,
    ):
        if (model is None) == (model_id is None):
            raise ValueError("give exactly one of `model` (a loaded model) or `model_id` (a folder or Hub id)")
        if model_id is not None:
            model, tokenizer = load_model_and_tokenizer(model_id, dtype=dtype, device=device, tokenizer=tokenizer,
                                                        trust_remote_code=trust_remote_code)
            run_device = None
        else:
            if tokenizer is None or isinstance(tokenizer, str):
                source = tokenizer or getattr(model, "name_or_path", None)
                if not source:
                    raise ValueError("`tokenizer` is required with a `model` that has no `name_or_path`")
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(source)
            run_device = None if device is None else resolve_device(device)
        result = evaluate_perplexity(
            model,
            tokenizer,
            list(predictions),
            seq_len=seq_len,
            stride=stride,
            max_windows=max_windows,
            batch_size=batch_size,
            device=run_device,
        )
        return {"perplexity": result.perplexity, "nll": result.nll, "num_tokens": result.num_tokens}
