"""The tensors of a Llama-family model under llama.cpp's GGUF names, and their encoding in the file's dtype.

:func:`read_layer_shapes` reads every decoder layer's query heads, KV heads and FFN width from the weights (query
and KV heads independently: ``q_proj`` rows / head_dim and ``k_proj`` rows / head_dim). :func:`gguf_tensors`
yields ``(name, float32 array)`` in the order they are written, following a :class:`~.gguf_layout.Layout`.
:func:`encode` turns one array into what the file stores for the asked dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import GGUFExportError
from .gguf_layout import DTYPES, LayerShape, Layout, interleave_halves

logger = logging.getLogger(__name__)

__all__ = ["BLOCK_TENSORS", "DTYPES", "EXPERT_TENSORS", "FAMILY_TENSORS", "GEMMA3_BLOCK_TENSORS", "LlamaParts",
           "MOE_BLOCK_TENSORS", "NEOX_BLOCK_TENSORS", "PHI3_BLOCK_TENSORS", "neox_qkv_rows", "encode", "file_type", "gguf_tensors", "llama_parts",
           "read_layer_shapes"]

#: Hugging Face parameter name inside a decoder block (without ``.weight``/``.bias``) -> GGUF tensor name.
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
#: Gemma 2's and 3's block (Gemma 1's is Llama's): the same projections (and q/k norms in Gemma 3), a norm after the
#: attention and after the FFN; ``post_attention_layernorm`` is that post-norm (the FFN's input norm is
#: ``pre_feedforward_layernorm``).
GEMMA3_BLOCK_TENSORS = {
    **{k: v for k, v in BLOCK_TENSORS.items() if k != "post_attention_layernorm"},
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
#: A mixture of experts' block (transformers 5's fused experts): the router, the shared expert (Qwen2-MoE) and its
#: gate; the experts' 3-D tensors are :data:`EXPERT_TENSORS`.
MOE_BLOCK_TENSORS = {
    **{k: v for k, v in BLOCK_TENSORS.items() if not k.startswith("mlp.")},
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
#: The experts' parameters (experts x rows x columns, no ``.weight`` suffix) -> the GGUF tensors their row blocks
#: become, in order: ``gate_up_proj`` holds every expert's [gate | up] rows.
EXPERT_TENSORS = {"mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "mlp.experts.down_proj": ("ffn_down_exps",)}
#: Phi-3's block: fused q/k/v rows ([q heads | k heads | v heads], as llama.cpp's ``attn_qkv`` takes them) and fused
#: [gate | up] rows (llama.cpp's ``ffn_up`` of twice the width, split the same way by its SwiGLU).
PHI3_BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
#: GPT-NeoX's block: LayerNorms with biases, the per-head interleaved ``query_key_value`` (written kind-major, as
#: llama.cpp's ``attn_qkv`` takes it: :func:`neox_qkv_rows`), biases on every linear, an ungated FFN.
NEOX_BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "attention.query_key_value": "attn_qkv",
    "attention.dense": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.dense_h_to_4h": "ffn_up",
    "mlp.dense_4h_to_h": "ffn_down",
}
#: model_type -> its block's tensor names (Llama's when absent).
FAMILY_TENSORS = {"gemma2": GEMMA3_BLOCK_TENSORS, "gemma3_text": GEMMA3_BLOCK_TENSORS, "gemma3": GEMMA3_BLOCK_TENSORS,
                  "phi3": PHI3_BLOCK_TENSORS, "gpt_neox": NEOX_BLOCK_TENSORS,
                  **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
                                                                      MOE_BLOCK_TENSORS)}
#: model_type -> where its decoder lives when not under ``model.`` (Gemma 3 with its vision tower), and the
#: parameters llama.cpp's text architecture has no place for, which are left out (logged): the vision tower and its
#: projector, which llama.cpp reads from a separate "mmproj" file.
DECODER_PREFIX = {"gemma3": "model.language_model.", "gpt_neox": "gpt_neox."}
#: model_type -> the final norm's module name under the decoder prefix (``norm`` when absent).
FINAL_NORM = {"gpt_neox": "final_layer_norm"}
#: model_type -> how its FFN's up rows come: ``"fused"`` [gate | up] (Phi-3), ``"plain"`` (no gate: GPT-NeoX); else
#: separate gate and up projections.
FFN_ROWS = {"phi3": "fused", "gpt_neox": "plain"}
NOT_WRITTEN = {"gemma3": ("model.vision_tower.", "model.multi_modal_projector.")}
#: model_type -> what llama.cpp's norms need added to the stored weights (Gemma's RMSNorm scales by 1 + weight).
NORM_SHIFT = {"gemma": 1.0, "gemma2": 1.0, "gemma3_text": 1.0, "gemma3": 1.0}
_ATTENTION = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "attn_q_norm", "attn_k_norm",
              "post_attention_norm")
_FFN = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm", "ffn_gate_inp", "ffn_gate_exps",
        "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp")


class LlamaParts:
    """The embedding, final norm, output head and per-block parameters of a Llama-family causal LM."""

    def __init__(self, embed: torch.Tensor, norm: torch.Tensor, output: torch.Tensor | None,
                 blocks: list[dict[str, torch.Tensor]], norm_shift: float = 0.0, norm_bias: torch.Tensor | None = None,
                 ffn_rows: str = "separate") -> None:
        self.embed, self.norm, self.output, self.blocks = embed, norm, output, blocks
        self.norm_shift = norm_shift  # added to every norm weight as written (Gemma's 1 + weight)
        self.norm_bias = norm_bias  # the final norm's bias (a LayerNorm's), or None
        self.ffn_rows = ffn_rows  # "separate" gate and up, "fused" [gate | up], "plain" (no gate)

    def has_bias(self, gguf_name: str) -> bool:
        return any(f"{gguf_name}.bias" in block for block in self.blocks)


def llama_parts(model: nn.Module, model_type: str = "llama") -> LlamaParts:
    """Split ``model`` (a ``*ForCausalLM`` of the Llama family or Gemma 3, stock, osscar or remote-code) into its
    parts, with block parameters keyed by GGUF name (``attn_q.weight``...; the family's names, ``FAMILY_TENSORS``). A
    parameter the GGUF layout has no place for raises ``GGUFExportError`` (nothing is dropped silently). ``output``
    is ``None`` when the head is tied to the embedding (llama.cpp then reuses ``token_embd``)."""
    names = FAMILY_TENSORS.get(model_type, BLOCK_TENSORS)
    prefix, left_out = DECODER_PREFIX.get(model_type, "model."), NOT_WRITTEN.get(model_type, ())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    norm = output = norm_bias = None
    skipped = 0
    final_norm = f"{prefix}{FINAL_NORM.get(model_type, 'norm')}"
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is embed or (tied and param is head.weight):
            continue
        if name == f"{final_norm}.weight":
            norm = param
        elif name == f"{final_norm}.bias":
            norm_bias = param
        elif head is not None and param is head.weight:
            output = param
        elif name.startswith(f"{prefix}layers."):
            index, _, rest = name[len(f"{prefix}layers."):].partition(".")
            blocks.setdefault(int(index), {}).update(_block_tensors(name, rest, param, names, model_type))
        elif name.startswith(left_out):
            skipped += param.numel()
        else:
            raise GGUFExportError(f"{name}: llama.cpp's {model_type} layout has no tensor for this parameter")
    if norm is None or (output is None and not tied):
        raise GGUFExportError(f"the model has no {final_norm}.weight or no output head: not a causal LM of "
                              f"model_type {model_type!r} as transformers builds it")
    if skipped:
        logger.info("%s: the vision tower and projector (%d parameters) are not written: llama.cpp reads them from "
                    "a separate mmproj file (its own converter's --mmproj)", model_type, skipped)
    return LlamaParts(embed, norm, output, [blocks.get(i, {}) for i in range(len(blocks))],
                      NORM_SHIFT.get(model_type, 0.0), norm_bias, FFN_ROWS.get(model_type, "separate"))


def _block_tensors(name: str, rest: str, param: torch.Tensor, names: dict[str, str],
                   model_type: str) -> dict[str, torch.Tensor]:
    """The GGUF tensors (keyed ``gguf_name.weight``/``.bias``) of one block parameter ``rest``: an expert tensor
    split into its row blocks, a shared expert's gate (1 x hidden) as the vector llama.cpp reads, others as they
    are."""
    if names is MOE_BLOCK_TENSORS and rest in EXPERT_TENSORS:
        targets = EXPERT_TENSORS[rest]
        return {f"{t}.weight": piece for t, piece in zip(targets, param.chunk(len(targets), dim=1))}
    stem, _, kind = rest.rpartition(".")
    if stem not in names:
        raise GGUFExportError(f"{name}: llama.cpp's {model_type} layout has no tensor for {stem!r} "
                              f"(known: {', '.join([*names, *(EXPERT_TENSORS if names is MOE_BLOCK_TENSORS else ())])})")
    return {f"{names[stem]}.{kind}": param.reshape(-1) if names[stem] == "ffn_gate_inp_shexp" else param}


def read_layer_shapes(parts: LlamaParts, head_dim: int) -> list[LayerShape]:
    """Every block's query heads (``q`` rows / head_dim), KV heads (``k`` rows / head_dim) and FFN width (``down``
    columns), checked against the other projections."""
    shapes = []
    for index, block in enumerate(parts.blocks):
        experts = "ffn_down_exps.weight" in block  # a mixture of experts: the width of one expert
        o_in = block["attn_output.weight"].shape[1]
        ffn = block["ffn_down_exps.weight"].shape[2] if experts else block["ffn_down.weight"].shape[1]
        if "attn_qkv.weight" in block:  # fused [q | k | v] (Phi-3): the query rows are the output projection's inputs
            k = v = (block["attn_qkv.weight"].shape[0] - o_in) // 2
            q = o_in
        else:
            q, k, v = (block[f"attn_{x}.weight"].shape[0] for x in "qkv")
        problems = [f"{what} has {rows} rows, not a multiple of head_dim {head_dim}"
                    for what, rows in (("q_proj", q), ("k_proj", k)) if rows % head_dim]
        if v != k or o_in != q:
            problems.append(f"q/k/v/o sizes disagree (q {q}, k {k}, v {v}, o inputs {o_in})")
        if parts.ffn_rows != "separate" and not experts:  # fused [gate | up] (Phi-3) or no gate (GPT-NeoX)
            width = 2 * ffn if parts.ffn_rows == "fused" else ffn
            if block["ffn_up.weight"].shape[0] != width:
                problems.append(f"the up projection has {block['ffn_up.weight'].shape[0]} rows, not {width}")
        elif any(block[f"ffn_{x}{'_exps' if experts else ''}.weight"].shape[-2] != ffn for x in ("gate", "up")):
            problems.append(f"gate/up rows differ from down_proj's {ffn} inputs")
        if problems:
            raise GGUFExportError(f"layer {index}: " + "; ".join(problems))
        shapes.append(LayerShape(heads=q // head_dim, kv_heads=k // head_dim, ffn=ffn))
    return shapes


def _array(tensor: torch.Tensor, shift: float = 0.0) -> np.ndarray:
    array = tensor.detach().to("cpu", torch.float32).numpy()
    return array + np.float32(shift) if shift else array


def _layer_tensors(block: dict[str, torch.Tensor], layout: Layout, index: int,
                   head_dim: int, norm_shift: float) -> Iterator[tuple[str, np.ndarray]]:
    written = layout.layers[index]
    for key, tensor in block.items():
        stem = key.split(".")[0]
        if (stem in _ATTENTION and written.heads == 0) or (stem in _FFN and written.ffn == 0):
            continue
        padded = (stem in _ATTENTION and layout.padded_attention(index)) or (stem in _FFN and layout.padded_ffn(index))
        array = _array(tensor, norm_shift if key.endswith("norm.weight") else 0.0)
        if padded and array.size == 0:
            array = _zero_padding(stem, key, array, written, head_dim)
            if array is None:
                continue
        elif layout.interleave_qk and stem in ("attn_q", "attn_k"):
            array = interleave_halves(array, written.heads if stem == "attn_q" else written.kv_heads)
        elif layout.arch == "gptneox" and stem == "attn_qkv":
            array = neox_qkv_rows(array, written.heads)
        yield f"blk.{index}.{key}", array


def neox_qkv_rows(rows: np.ndarray, head_count: int) -> np.ndarray:
    """GPT-NeoX's ``query_key_value`` rows (or bias), per head [q | k | v], as llama.cpp's ``attn_qkv`` reads them:
    every head's q rows, then every head's k rows, then v."""
    shape = rows.shape
    return rows.reshape(head_count, 3, shape[0] // (3 * head_count), *shape[1:]).swapaxes(0, 1).reshape(shape)


def _zero_padding(stem: str, key: str, array: np.ndarray, written: LayerShape, head_dim: int) -> np.ndarray | None:
    """Zeros of the written (padded) size for an empty weight; ``None`` for an empty bias (not written)."""
    if key.endswith(".bias"):
        return None
    width = written.ffn if stem in _FFN else written.heads * head_dim
    shape = (array.shape[0], width) if stem in ("attn_output", "ffn_down") else (width, array.shape[1])
    return np.zeros(shape, dtype=np.float32)


def gguf_tensors(parts: LlamaParts, layout: Layout, head_dim: int,
                 rope_factors: np.ndarray | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(GGUF name, float32 array)`` for every tensor of the file, in writing order."""
    yield "token_embd.weight", _array(parts.embed)
    if rope_factors is not None:
        yield "rope_freqs.weight", rope_factors.astype(np.float32)
    for index, block in enumerate(parts.blocks):
        yield from _layer_tensors(block, layout, index, head_dim, parts.norm_shift)
    yield "output_norm.weight", _array(parts.norm, parts.norm_shift)
    if parts.norm_bias is not None:
        yield "output_norm.bias", _array(parts.norm_bias)
    if parts.output is not None:
        yield "output.weight", _array(parts.output)


def file_type(dtype: str) -> Any:
    """The ``general.file_type`` of a file written in ``dtype``."""
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def encode(name: str, array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """``(data, raw_dtype)`` for ``GGUFWriter.add_tensor``: vectors (norms, biases, rope factors) stay float32;
    matrices are float32, float16, bfloat16 or Q8_0. Q8_0 needs rows whose length is a multiple of its block size
    (32): other matrices (a pruned FFN of odd width) are written as float16, logged."""
    import gguf

    if array.ndim < 2 or dtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if dtype == "f16":
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if array.shape[-1] % block:
        logger.info("%s: rows of %d values are not a multiple of %d, written as f16", name, array.shape[-1], block)
        return array.astype(np.float16), None
    return gguf.quants.quantize(np.ascontiguousarray(array), kind), kind
