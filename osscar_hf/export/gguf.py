"""Export a (pruned) model to one GGUF file for llama.cpp (and Ollama, LM Studio, llama-cpp-python).

    from osscar_hf import export_gguf
    export_gguf("pruned/", "pruned.gguf", dtype="f16")        # a folder in any osscar_hf save format
    export_gguf(model, "pruned.gguf", tokenizer=tokenizer)    # or a model in memory

Uniform shapes are written in the family's own llama.cpp architecture (``llama`` for Llama and Mistral, ``qwen2``,
``qwen3``, ``phi3``, ``gptneox``; ``gemma``, ``gemma2``, ``gemma3`` for Gemma models, :mod:`.gguf_gemma`; ``llama``
with experts, ``qwen3moe``, ``qwen2moe`` and ``olmoe`` for mixtures of experts, :mod:`.gguf_experts`), per-block
shapes in ``deci`` (Llama, Mistral, Qwen2; see :mod:`.gguf_layout` for what llama.cpp can hold and why). The
tokenizer (byte-level BPE, or SentencePiece-style BPE with byte fallback) and its chat template go along
(:mod:`.gguf_tokenizer`). The file is written beside its final path under a temporary name and moved into place only
when complete; an existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from torch import nn

from ..errors import GGUFExportError
from ..io.load import load_model_and_tokenizer
from ..io.remote_code import base_model_type
from ..io.shapes import spec_of
from .gguf_experts import check_experts, write_expert_keys
from .gguf_gemma import GEMMA_ARCHS, check_gemma, gemma_rope_parameters, write_gemma_keys
from .gguf_layout import EXPERT_FAMILIES, FAMILY_ARCHS, Layout, choose_layout
from .gguf_tensors import DTYPES, encode, file_type, gguf_tensors, llama_parts, read_layer_shapes
from .gguf_tokenizer import TokenizerMetadata, check_tokenizer, tokenizer_metadata

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "export_gguf"]

_ROPE_TYPES = ("default", "linear", "llama3")
#: Architectures that rotate only the first channels of a head (``rope.dimension_count`` below ``head_dim``).
PARTIAL_ROPE_ARCHS = ("phi3", "gptneox")
#: Families whose sliding window llama.cpp does not apply (its ``llama``; its ``phi3`` switches it off).
WINDOW_IGNORED = ("mistral", "phi3")


def check_dtype(dtype: Any) -> str:
    """``dtype`` normalised (``"F16"`` -> ``"f16"``); ``GGUFExportError`` (a ``ValueError``) naming the accepted."""
    name = dtype.strip().lower() if isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise GGUFExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def require_gguf() -> None:
    """``GGUFExportError`` saying how to install the ``gguf`` package when it is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install 'osscar-hf[gguf]'") from None


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute output path; refuses a folder, a parent that is a file, or an existing file unless
    ``overwrite``."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise GGUFExportError(f"{str(target)!r} is a folder: give the path of the .gguf file to write")
    if any(parent.exists() and not parent.is_dir() for parent in target.parents):
        raise GGUFExportError(f"cannot write {str(target)!r}: a parent of it is a file")
    if target.exists() and not overwrite:
        raise GGUFExportError(f"refusing to overwrite {str(target)!r}: pass overwrite=True (--overwrite)")
    return target


def _folder_model_type(folder: Path, trust_remote_code: bool) -> str:
    """The family (stock ``model_type``) of a model folder, read from its ``config.json``."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise GGUFExportError(f"{str(folder)!r} is not a model folder (no config.json)")
    config = SimpleNamespace(**json.loads(config_file.read_text(encoding="utf-8")))
    model_type = base_model_type(config)
    if model_type != getattr(config, "model_type", None) and not trust_remote_code:
        raise GGUFExportError(f"{str(folder)!r} is a remote-code checkpoint ({config.model_type}): loading it runs "
                              "its modeling code; pass trust_remote_code=True (--trust-remote-code) to allow that")
    return str(model_type)


def _check_family(model_type: str) -> None:
    if model_type not in FAMILY_ARCHS:
        raise GGUFExportError(f"cannot export model_type {model_type!r} to GGUF: supported families are "
                              f"{', '.join(sorted(FAMILY_ARCHS))}")


def _rope(config: Any, arch: str) -> dict[str, Any]:
    """``theta``, ``type`` and ``factor`` of the model's rope (of its full-attention layers when the rope differs by
    layer type, as in Gemma 3: see :mod:`.gguf_gemma` for the sliding layers'); ``GGUFExportError`` for what
    llama.cpp's architectures cannot apply."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if arch in GEMMA_ARCHS:
        params = gemma_rope_parameters(config)[0]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES or (kind == "llama3" and arch not in ("llama", "deci")):
        raise GGUFExportError(f"rope type {kind!r} cannot be exported for architecture {arch!r} (supported: "
                              f"{', '.join(_ROPE_TYPES)}; llama3 only for Llama models)")
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
    if partial != 1.0 and arch not in PARTIAL_ROPE_ARCHS:
        raise GGUFExportError(f"a partial rotary factor cannot be expressed in llama.cpp's {arch!r} architecture "
                              f"(only in {', '.join(PARTIAL_ROPE_ARCHS)})")
    return {"theta": float(theta), "type": kind, "factor": params.get("factor"), "partial": partial}


def _rope_factors(model: nn.Module, head_dim: int, theta: float) -> np.ndarray:
    """llama3 rope scaling as llama.cpp's per-frequency divisors: the plain inverse frequencies over the model's."""
    inv_freq = model.get_submodule("model.rotary_emb").inv_freq.detach().double().cpu().numpy()
    plain = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return (plain / inv_freq).astype(np.float32)


def _context_length(config: Any, model_type: str) -> int:
    """``max_position_embeddings``, or a shorter sliding window, which llama.cpp's Llama-family architectures do
    not apply: the file then declares only the context over which it computes what transformers computes."""
    length = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and (model_type in WINDOW_IGNORED or getattr(config, "use_sliding_window", False)) and window < length:
        logger.warning("llama.cpp applies no sliding window to %s: the GGUF declares a context of %d tokens (the "
                       "window) instead of %d", model_type, window, length)
        return int(window)
    return length


def _shape_keys(writer: Any, layout: Layout) -> None:
    for values, add in (([s.heads for s in layout.layers], writer.add_head_count),
                        ([s.kv_heads for s in layout.layers], writer.add_head_count_kv),
                        ([s.ffn for s in layout.layers], writer.add_feed_forward_length)):
        add(values[0] if len(set(values)) == 1 else values)


def _write_metadata(writer: Any, model: nn.Module, layout: Layout, head_dim: int, dtype: str,
                    tokenizer: TokenizerMetadata, rope: dict[str, Any], model_type: str) -> None:
    import gguf

    config = spec_of(model).shape_config(model.config)  # a multimodal model's text_config
    writer.add_name(str(getattr(model.config, "name_or_path", "") or model_type).rstrip("/").split("/")[-1] or model_type)
    writer.add_file_type(file_type(dtype))
    writer.add_context_length(_context_length(config, model_type))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(layout.layers))
    _shape_keys(writer, layout)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope["partial"]))  # the rotated channels of a head
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if layout.arch == "gptneox":  # LayerNorms, and whether attention and FFN read the same input
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
        writer.add_parallel_residual(bool(config.use_parallel_residual))
    else:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if layout.arch in GEMMA_ARCHS:
        write_gemma_keys(writer, layout.arch, config)
    if model_type in EXPERT_FAMILIES:
        write_expert_keys(writer, model, layout.arch)
    writer.add_vocab_size(len(tokenizer.tokens))
    _tokenizer_keys(writer, tokenizer)


def _tokenizer_keys(writer: Any, tokenizer: TokenizerMetadata) -> None:
    writer.add_tokenizer_model(tokenizer.model)
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    if tokenizer.scores is not None:
        writer.add_token_scores(tokenizer.scores)
    writer.add_token_types(tokenizer.token_types)
    if tokenizer.merges:
        writer.add_token_merges(tokenizer.merges)
    for name, token_id in tokenizer.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.add_space_prefix is not None:
        writer.add_add_space_prefix(tokenizer.add_space_prefix)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _load(model_or_folder: Any, tokenizer: Any, trust_remote_code: bool) -> tuple[nn.Module, Any, str]:
    if isinstance(model_or_folder, nn.Module):
        if tokenizer is None:
            raise GGUFExportError("exporting a model in memory needs its tokenizer: pass tokenizer=")
        model_type = base_model_type(model_or_folder.config)
        _check_family(model_type)
        check_tokenizer(tokenizer)
        return model_or_folder, tokenizer, model_type
    folder = Path(model_or_folder).expanduser()
    if not folder.is_dir():
        raise GGUFExportError(f"{str(model_or_folder)!r} is neither a model nor a model folder")
    model_type = _folder_model_type(folder, trust_remote_code)
    _check_family(model_type)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or folder))
    check_tokenizer(tokenizer)  # before the weights load
    model, tokenizer = load_model_and_tokenizer(folder, dtype="auto", device="cpu", tokenizer=tokenizer,
                                                trust_remote_code=trust_remote_code)
    return model, tokenizer, model_type


def export_gguf(model_or_folder: nn.Module | str | os.PathLike, path: str | os.PathLike, dtype: str = "f16", *,
                tokenizer: Any = None, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write a Llama-family model (Llama, Mistral, Qwen2, Qwen3), Phi-3, GPT-NeoX, a Gemma model (1, 2, 3) or a
    mixture of experts (Mixtral, Qwen3-MoE, Qwen1.5/2-MoE, OLMoE), pruned or dense, as a GGUF file for llama.cpp.

    Args:
        model_or_folder: a ``*ForCausalLM`` in memory, or a folder saved by osscar_hf in any format (stock, osscar,
            remote_code; the last needs ``trust_remote_code=True``, as loading it runs its modeling file).
        path: the ``.gguf`` file to write (missing parent folders are created).
        dtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the matrices (norms and biases stay float32;
            Q8_0 matrices whose rows are not a multiple of 32 values are written as f16).
        tokenizer: the tokenizer (a fast byte-level or SentencePiece-style BPE one) or a folder holding it;
            needed for a model in memory, read from the folder otherwise.
        overwrite: replace an existing file at ``path``.
        trust_remote_code: allow loading a remote-code checkpoint.

    Returns:
        The path written. Every input is checked before the model is loaded or converted; a model, tokenizer or
        shape llama.cpp cannot express raises :class:`~osscar_hf.errors.GGUFExportError` before anything is
        written.
    """
    dtype = check_dtype(dtype)
    require_gguf()
    target = check_output(path, overwrite)
    model, tokenizer, model_type = _load(model_or_folder, tokenizer, trust_remote_code)
    _, _, head_dim = spec_of(model).group_geometry(model.config)
    parts = llama_parts(model, model_type)
    biases = {"qkv": parts.has_bias("attn_q"), "o": parts.has_bias("attn_output"),
              "ffn": any(parts.has_bias(f"ffn_{x}") for x in ("gate", "up", "down"))}
    config = spec_of(model).shape_config(model.config)  # the decoder's fields (a multimodal model's text_config)
    layout = choose_layout(model_type, read_layer_shapes(parts, head_dim), hidden=int(config.hidden_size),
                           head_dim=head_dim, biases=biases)
    if layout.arch in GEMMA_ARCHS:
        check_gemma(layout.arch, config, layout, head_dim, tied=parts.output is None)
    if model_type in EXPERT_FAMILIES:
        check_experts(model, model_type, layout.arch)
    if layout.arch == "gptneox" and getattr(config, "hidden_act", None) != "gelu_pytorch_tanh":
        logger.warning("llama.cpp computes %s's GELU with the tanh approximation (from a float16 table), where "
                       "transformers applies hidden_act=%r: the outputs differ slightly, as with llama.cpp's own "
                       "converter", model_type, getattr(config, "hidden_act", None))
    rope = _rope(config, layout.arch)
    factors = _rope_factors(model, head_dim, rope["theta"]) if rope["type"] == "llama3" else None
    meta = tokenizer_metadata(tokenizer, vocab_size=int(parts.embed.shape[0]), warn=False)  # _load warned
    logger.info("writing %s as llama.cpp architecture %r (%s layer shapes), %s", model_type, layout.arch,
                "uniform" if layout.uniform else "per-block", dtype)
    _write_file(target, model, layout, head_dim, dtype, meta, rope, model_type,
                gguf_tensors(parts, layout, head_dim, factors), overwrite)
    return target


def _write_file(target: Path, model: nn.Module, layout: Layout, head_dim: int, dtype: str, meta: TokenizerMetadata,
                rope: dict[str, Any], model_type: str, tensors: Any, overwrite: bool) -> None:
    import gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.osscar-tmp-{secrets.token_hex(6)}"
    try:
        writer = gguf.GGUFWriter(tmp, layout.arch)
        _write_metadata(writer, model, layout, head_dim, dtype, meta, rope, model_type)
        for name, array in tensors:
            data, raw_dtype = encode(name, array, dtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _move_into_place(tmp, target, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s", target)


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails if a file appeared at target meanwhile: never replaces one
    except FileExistsError:
        raise GGUFExportError(f"refusing to overwrite {str(target)!r}: it appeared while the GGUF file was being "
                              "written; pass overwrite=True (--overwrite)") from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race instead of none)
        if target.exists():
            raise GGUFExportError(f"refusing to overwrite {str(target)!r}: it appeared while the GGUF file was "
                                  "being written; pass overwrite=True (--overwrite)") from None
        os.replace(tmp, target)
