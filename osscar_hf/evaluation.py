"""Evaluation helpers: corpus perplexity, generation throughput and parameter counts.

Perplexity protocol (the one pruning papers report, e.g. for WikiText-2):

* the texts are joined with ``"\\n\\n"`` and tokenised **once**, with ``add_special_tokens=False``;
* the token stream is cut into windows of ``seq_len`` tokens (default: the model's context,
  ``config.max_position_embeddings`` capped at 2048);
* every window is scored independently, with no BOS token prepended: the first token of a window has no
  context and is not scored, every other token is scored given the tokens before it in the window;
* ``perplexity = exp(mean token NLL)`` over all scored tokens of all windows (corpus perplexity, not the
  mean of per-window perplexities).

BOS choice: no BOS is added, neither to the stream nor to the windows. A window starts in the middle of the
text, where a BOS would be a token the model never sees there at inference, and the published protocol
(GPTQ, SparseGPT, OSSCAR) slices raw token windows. Tokenizers differ on whether they add a BOS by default
(Llama's do, SmolLM2's does not), so turning special tokens off makes the number depend on the text and the
model only. Because of this choice a model's number here may differ slightly from one measured with a BOS.

Without ``stride`` the windows do not overlap and a tail shorter than ``seq_len`` at the end of the stream
is dropped (so every scored token has the same maximum context budget). With ``stride`` the standard
sliding-window protocol is used: windows of at most ``seq_len`` tokens start every ``stride`` tokens and
each scores only the tokens that no earlier window scored, so every token after the first is scored
exactly once with at least ``seq_len - stride`` tokens of context (less near the start); the last window
is shortened to end at the end of the stream rather than dropped.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MAX_DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class PerplexityResult:
    """Corpus perplexity and how it was measured."""

    perplexity: float
    """``exp(nll)``."""
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    num_tokens: int
    """Number of scored tokens."""
    num_windows: int
    """Number of windows evaluated."""
    seq_len: int
    """Window length in tokens."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Window:
    begin: int
    end: int
    first_target: int  # absolute position of the first token scored in this window (> begin)


def context_length(config: Any) -> int | None:
    """A model config's context length (``max_position_embeddings``, ``n_positions`` or ``max_sequence_length``; a
    multimodal model's from its decoder config), or None when it gives none."""
    text = getattr(config, "get_text_config", None)
    config = text() if callable(text) else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seq_len(model: torch.nn.Module) -> int:
    """The model's context length (:func:`context_length`) capped at 2048."""
    context = context_length(getattr(model, "config", None))
    if context is None:
        logger.warning("The model config gives no context length; using %d tokens.", MAX_DEFAULT_SEQ_LEN)
        return MAX_DEFAULT_SEQ_LEN
    return min(context, MAX_DEFAULT_SEQ_LEN)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device inputs should be placed on: the first device of a dispatched model, else the device of
    the first parameter (CPU for a model without parameters)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        if first not in ("cpu", "disk", "meta"):
            return torch.device(first)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _resolve_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """Where to run: ``device`` if given (the model is moved there unless it is dispatched over several
    devices by accelerate), else the model's own device."""
    if device is None:
        return model_device(model)
    target = torch.device(device)
    if getattr(model, "hf_device_map", None):
        logger.info("The model is dispatched with a device map; placing inputs on %s without moving it.", target)
    else:
        model.to(target)
    return target


def _join_texts(texts: str | Sequence[str]) -> str:
    if isinstance(texts, str):
        return texts
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a str or a sequence of str")
    return "\n\n".join(texts)


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = encoded["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _plan_windows(num_tokens: int, seq_len: int, stride: int | None) -> list[_Window]:
    if num_tokens < seq_len:
        raise ValueError(
            f"the text has {num_tokens} tokens, fewer than one evaluation window of seq_len={seq_len} "
            "tokens; give more text or a smaller seq_len"
        )
    if stride is None:
        count = num_tokens // seq_len
        return [_Window(i * seq_len, (i + 1) * seq_len, i * seq_len + 1) for i in range(count)]
    windows = []
    prev_end = 0
    begin = 0
    while prev_end < num_tokens:
        end = min(begin + seq_len, num_tokens)
        first_target = max(prev_end, begin + 1)
        if first_target < end:  # (a 1-token tail window when stride == seq_len scores nothing)
            windows.append(_Window(begin, end, first_target))
        prev_end = end
        begin += stride
    return windows


def _batches(windows: list[_Window], batch_size: int) -> list[list[_Window]]:
    """Group consecutive windows of equal length into batches of at most ``batch_size``."""
    batches: list[list[_Window]] = []
    for window in windows:
        last = batches[-1] if batches else None
        if (
            last is not None
            and len(last) < batch_size
            and (last[0].end - last[0].begin) == (window.end - window.begin)
        ):
            last.append(window)
        else:
            batches.append([window])
    return batches


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str],
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Corpus perplexity of ``model`` on ``texts`` (see the module docstring for the exact protocol).

    Args:
        model: a causal LM returning ``.logits``.
        tokenizer: a Hugging Face tokenizer (called once on the joined text, without special tokens).
        texts: one string, or a sequence of strings joined with ``"\\n\\n"``.
        seq_len: window length; default the model's context capped at 2048.
        stride: ``None`` for non-overlapping windows (the tail shorter than a window is dropped); else the
            step of the sliding window, ``1 <= stride <= seq_len``.
        max_windows: evaluate only the first this many windows.
        batch_size: windows per forward pass.
        device: run on this device (the model is moved there); default the model's device.

    Raises:
        ValueError: bad arguments, or a text with fewer tokens than one window.
    """
    if seq_len is None:
        seq_len = default_seq_len(model)
    _check_protocol(seq_len, stride, max_windows, batch_size)
    ids = _tokenize(tokenizer, _join_texts(texts))
    windows = _plan_windows(ids.numel(), seq_len, stride)
    if max_windows is not None:
        windows = windows[:max_windows]
    run_device = _resolve_device(model, device)
    logger.info(
        "Perplexity: %d tokens, %d windows of %d%s, batch %d, on %s",
        ids.numel(),
        len(windows),
        seq_len,
        "" if stride is None else f" (stride {stride})",
        batch_size,
        run_device,
    )
    was_training = model.training
    model.eval()
    try:
        total_nll, total_tokens = _sum_nll(model, ids, windows, batch_size, run_device)
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    result = PerplexityResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        num_tokens=total_tokens,
        num_windows=len(windows),
        seq_len=seq_len,
    )
    logger.info("Perplexity %.4f (mean NLL %.5f over %d tokens)", result.perplexity, mean_nll, total_tokens)
    return result


def _check_protocol(seq_len: Any, stride: Any, max_windows: Any, batch_size: Any) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if stride is not None and (not isinstance(stride, int) or not 1 <= stride <= seq_len):
        raise ValueError(f"stride must be an integer in [1, seq_len={seq_len}], got {stride!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer, got {max_windows!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _sum_nll(model: torch.nn.Module, ids: torch.Tensor, windows: list[_Window], batch_size: int,
             device: torch.device) -> tuple[float, int]:
    """Summed next-token NLL over the scored positions of ``windows``, and the number of those tokens."""
    total_nll = 0.0
    total_tokens = 0
    with torch.inference_mode():
        for batch in tqdm(_batches(windows, batch_size), desc="perplexity", unit="batch", leave=False):
            input_ids = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
            logits = model(input_ids=input_ids, use_cache=False).logits
            for row, window in enumerate(batch):
                # logits at position p predict token p + 1 (positions relative to the window).
                start = window.first_target - window.begin
                pred = logits[row, start - 1 : -1].float()
                target = input_ids[row, start:]
                total_nll += float(F.cross_entropy(pred, target, reduction="sum"))
                total_tokens += target.numel()
            del logits
    return total_nll, total_tokens


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (``parameters()`` yields tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def _generation_timer(
    model: torch.nn.Module,
    *,
    batch_size: int,
    prompt_len: int,
    new_tokens: int,
    device: str | torch.device | None,
    seed: int,
) -> Callable[[], float]:
    """A function that runs one greedy generation of ``model`` and returns its generated tokens per second."""
    from transformers import GenerationConfig

    for name, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    run_device = _resolve_device(model, device)
    config = model.config
    vocab_size = int(getattr(config, "vocab_size", 0) or 0)
    if vocab_size < 2:
        raise ValueError("the model config has no usable vocab_size to draw random prompts from")
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_len), generator=generator).to(run_device)
    attention_mask = torch.ones_like(prompt)
    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(config, "eos_token_id", None)
    if isinstance(pad_id, list):
        pad_id = pad_id[0] if pad_id else None
    gen_config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id if pad_id is not None else 0,
    )

    def once() -> float:
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                if run_device.type == "cuda":
                    torch.cuda.synchronize(run_device)
                start = time.perf_counter()
                out = model.generate(input_ids=prompt, attention_mask=attention_mask, generation_config=gen_config)
                if run_device.type == "cuda":
                    torch.cuda.synchronize(run_device)
                elapsed = time.perf_counter() - start
        finally:
            model.train(was_training)
        return (out.shape[-1] - prompt_len) * batch_size / elapsed

    return once


def measure_throughput(
    model: torch.nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 64,
    repeats: int = 3,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> float:
    """Greedy generation speed in generated tokens per second (median of ``repeats`` timed runs after one
    untimed warm-up run).

    Prompts are random token ids (seeded), and exactly ``new_tokens`` tokens are generated per sequence
    (EOS is ignored), so the figure depends only on the model's shapes and the hardware.
    """
    return compare_throughput({"model": model}, batch_size=batch_size, prompt_len=prompt_len,
                              new_tokens=new_tokens, repeats=repeats, device=device, seed=seed)["model"]


def compare_throughput(
    models: dict[str, torch.nn.Module],
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 64,
    repeats: int = 5,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = False,
    max_seconds: float | None = None,
) -> dict[str, float]:
    """Generation tokens/s of several models, timed in interleaved rounds (one run of each model per
    round, after one warm-up run each) so that a noisy machine slows them alike; medians per model.
    ``progress`` shows a bar of the rounds; ``max_seconds`` stops after the first timed round that ends past it
    (the medians then cover the rounds done)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    timers = {
        name: _generation_timer(model, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
                                device=device, seed=seed)
        for name, model in models.items()
    }
    started = time.perf_counter()
    rates: dict[str, list[float]] = {name: [] for name in timers}
    with tqdm(total=repeats + 1, desc="generation speed", unit="round", disable=not progress, leave=False) as bar:
        for once in timers.values():
            once()  # warm-up
        bar.update(1)
        for _ in range(repeats):
            for name, once in timers.items():
                rates[name].append(once())
            bar.update(1)
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                break
    result = {name: statistics.median(values) for name, values in rates.items()}
    for name, rate in result.items():
        logger.info("Throughput of %s: %.1f tokens/s (batch %d, prompt %d, %d new tokens, median of %d)", name,
                    rate, batch_size, prompt_len, new_tokens, len(rates[name]))
    return result
