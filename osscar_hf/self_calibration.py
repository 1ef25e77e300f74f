"""Data-free calibration: token windows sampled from the model being pruned (``OsscarConfig(dataset="self")``).

Without in-domain text, a model can calibrate on text it writes itself: every window starts from the model's
BOS token (``bos_token_id``, else ``eos_token_id``) and continues with tokens sampled from the dense model's
own next-token distribution, until the window holds ``seq_len`` tokens. No token is suppressed: an
end-of-sequence token may be drawn, and the model then continues after it as it would after the end of a
document. Generating text from the model itself for calibration without data is a published technique (for
example LLM-QAT's data-free distillation, Liu et al. 2023).

Sampler (fixed, so that the windows depend only on the model and the seed): temperature
:data:`SELF_TEMPERATURE` (1.0: the model's own distribution) restricted to the nucleus of probability
:data:`SELF_TOP_P` (0.95: the least likely tail, where a small model's noise lives, is cut), rows generated
:data:`SELF_BATCH_SIZE` at a time with the KV cache. Each batch draws from its own ``torch.Generator`` on the
CPU, seeded from ``(seed, stream, batch index)``: the calibration windows (stream ``"calibration"``) are the
same whether or not held-out windows (stream ``"held_out"``) are drawn after them, and no held-out window is
one of the calibration windows. The same model, seed and device give the same windows; another seed gives
others.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .calibration import SELF_DATASET
from .errors import CalibrationDataError

__all__ = ["SELF_BATCH_SIZE", "SELF_DATASET", "SELF_TEMPERATURE", "SELF_TOP_P", "is_self_dataset",
           "sample_token_windows", "self_sampling_provenance", "start_token_id"]

logger = logging.getLogger(__name__)

SELF_TEMPERATURE = 1.0
SELF_TOP_P = 0.95
SELF_BATCH_SIZE = 32


def is_self_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` (an ``OsscarConfig.dataset`` value) asks for windows sampled from the model."""
    return isinstance(dataset, str) and dataset == SELF_DATASET


def start_token_id(model_config: Any) -> int:
    """The token every sample starts from: the config's ``bos_token_id``, else its (first) ``eos_token_id``."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(model_config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and value >= 0:
            return value
    raise CalibrationDataError(
        "dataset='self' starts every sample from the model's BOS token, but the model config has neither "
        "bos_token_id nor eos_token_id; set model.config.bos_token_id, or give calibration text"
    )


def self_sampling_provenance(model_config: Any, *, seed: int, held_out: int = 0) -> dict[str, Any]:
    """What the report records about windows sampled from the model: where they came from and the sampler."""
    return {
        "text": "sampled from the dense model being pruned (no calibration data was read)",
        "seed": seed,
        "start_token_id": start_token_id(model_config),
        "temperature": SELF_TEMPERATURE,
        "top_p": SELF_TOP_P,
        "batch_size": SELF_BATCH_SIZE,
        "held_out_samples": held_out,
    }


def _batch_generator(seed: int, stream: str, batch: int) -> torch.Generator:
    digest = hashlib.sha256(f"osscar_hf-self:{seed}:{stream}:{batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _sample_next(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from ``logits`` (rows x vocab) under temperature and nucleus (top-p) sampling."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice)


def _check_sampler(count: int, seq_len: int, temperature: float, top_p: float, batch_size: int) -> None:
    for name, value in (("count", count), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationDataError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise CalibrationDataError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise CalibrationDataError(f"top_p must be in (0, 1], got {top_p!r}")


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type == "meta":
            raise CalibrationDataError(
                "dataset='self' samples calibration text from the model, but its weights are on the meta device "
                "(not loaded); load the model in memory, or give calibration text"
            )
        return param.device
    return torch.device("cpu")


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _sample_batch(model: nn.Module, first: torch.Tensor, seq_len: int, generator: torch.Generator,
                  temperature: float, top_p: float, bar: tqdm) -> torch.Tensor:
    from transformers import DynamicCache

    tokens = [first]
    cache = {_cache_argument(model): DynamicCache()}  # filled in place, step after step
    for _ in range(seq_len - 1):
        logits = model(input_ids=tokens[-1], use_cache=True, **cache).logits
        tokens.append(_sample_next(logits[:, -1, :], generator, temperature, top_p).to(first.device))
        bar.update(first.shape[0])  # one token per row
    return torch.cat(tokens, dim=1).cpu()


def sample_token_windows(
    model: nn.Module,
    *,
    count: int,
    seq_len: int,
    seed: int,
    stream: str = "calibration",
    temperature: float = SELF_TEMPERATURE,
    top_p: float = SELF_TOP_P,
    batch_size: int = SELF_BATCH_SIZE,
    progress: bool = True,
) -> torch.LongTensor:
    """``count`` windows of ``seq_len`` tokens sampled from ``model``, a ``(count, seq_len)`` LongTensor on the CPU.

    Each row is the start token (:func:`start_token_id`) followed by ``seq_len - 1`` sampled tokens (see the
    module docstring for the sampler). ``stream`` names an independent set of samples for the same seed
    (``"calibration"``, ``"held_out"``, or any other name, such as an evaluation set's).

    Raises:
        CalibrationDataError: bad arguments, a model without a start token, or weights not loaded.
    """
    _check_sampler(count, seq_len, temperature, top_p, batch_size)
    device = _model_device(model)
    start = start_token_id(model.config)
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    bar = tqdm(total=count * (seq_len - 1), desc=f"sampling {stream} text from the model", unit="tok",
               disable=not progress, leave=False)
    try:
        for batch, begin in enumerate(range(0, count, batch_size)):
            size = min(batch_size, count - begin)
            first = torch.full((size, 1), start, dtype=torch.long, device=device)
            generator = _batch_generator(seed, stream, batch)
            rows.append(_sample_batch(model, first, seq_len, generator, temperature, top_p, bar))
    finally:
        bar.close()
        model.train(was_training)
    windows = torch.cat(rows, dim=0)
    logger.info("%s: %d windows of %d tokens sampled from the model (seed %d, temperature %g, top_p %g)", stream,
                count, seq_len, seed, temperature, top_p)
    return windows
