"""Which llama.cpp architecture holds a (pruned) Llama-family model, and every layer's shape as written.

Facts about llama.cpp this module relies on (read in the llama.cpp sources vendored by llama-cpp-python 0.3.36):

- ``llama``, ``qwen2`` and ``qwen3`` build every layer from one global head count, KV-head count and FFN width
  (the scalars of layer 0); ``qwen2`` also sizes the query and output projections ``hidden x hidden``, so it
  cannot hold a model whose query heads were pruned. ``qwen2`` and ``qwen3`` load no output-projection or FFN
  biases; ``llama`` and ``deci`` load optional q/k/v/o and FFN biases.
- ``deci`` builds layer ``i`` from per-layer arrays of ``head_count``, ``head_count_kv`` and
  ``feed_forward_length``. A layer with 0 heads has no attention (and no attention norm) and ignores an output
  bias; a layer with 0 FFN width skips its FFN *and drops the attention output it just computed*. The head size
  and rotary size come from layer 0's head count: with 0 heads there, every layer's head size is 0.
- ``llama`` and ``deci`` rotate consecutive pairs of a head's channels ("normal" rope); Hugging Face's Llama
  rotates the two halves of a head (``rotate_half``, what llama.cpp calls "neox"), as ``qwen2``/``qwen3`` do.
  Writing a Hugging Face q/k projection for ``llama``/``deci`` therefore interleaves the two halves of every
  head's rows (:func:`interleave_halves`); for ``qwen2``/``qwen3`` the rows are written as they are.
- Query head ``h`` of a layer with ``n`` query and ``m`` KV heads uses KV head ``h // (n / m)`` (ggml broadcasts
  the KV heads), as ``repeat_kv`` does in transformers; ``n`` must be a multiple of ``m``.

So that ``deci`` computes what the model computes, two shapes are padded with exact zeros: a layer with no FFN
gets one neuron whose down-projection column is zero (output: exactly the down bias, or zero), and a layer without
heads that is layer 0 or has an output bias gets one head whose output-projection columns are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GGUFExportError

__all__ = [
    "DTYPES",
    "EXPERT_FAMILIES",
    "FAMILY_ARCHS",
    "LayerShape",
    "Layout",
    "choose_layout",
    "interleave_halves",
]

#: Accepted ``dtype`` values of the export (the storage type of the matrices).
DTYPES = ("f32", "f16", "bf16", "q8_0")
#: model_type -> the family's own llama.cpp architecture (uniform shapes).
FAMILY_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3", "gpt_neox": "gptneox",
                "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
#: Mixtures of experts: one shape for every layer in llama.cpp (its ``deci`` has no experts).
EXPERT_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
#: Architectures that size the query projection (and OLMoE's key norm) hidden x hidden.
_HIDDEN_SIZED_QUERIES = ("qwen2moe", "olmoe", "phi3")
#: Architectures whose rope rotates consecutive channel pairs (q/k rows must be interleaved).
NORM_ROPE_ARCHS = ("llama", "deci")


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's query heads, KV heads and FFN width."""

    heads: int
    kv_heads: int
    ffn: int


@dataclass(frozen=True)
class Layout:
    """How a model is written: the llama.cpp architecture and every layer's shape in the file.

    ``model_layers`` are the shapes read from the weights, ``layers`` those written (equal except for the zero
    padding described in the module docstring); ``interleave_qk`` says whether q/k rows are reordered for a
    "normal"-rope architecture.
    """

    arch: str
    model_layers: tuple[LayerShape, ...]
    layers: tuple[LayerShape, ...]
    interleave_qk: bool

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) == 1

    def padded_attention(self, index: int) -> bool:
        return self.model_layers[index].heads == 0 and self.layers[index].heads > 0

    def padded_ffn(self, index: int) -> bool:
        return self.model_layers[index].ffn == 0 and self.layers[index].ffn > 0


def check_layer(index: int, shape: LayerShape) -> None:
    """Refuse a layer llama.cpp cannot run: query heads without KV heads, or not a whole number per KV head."""
    if shape.kv_heads == 0 and shape.heads == 0:
        return
    if shape.kv_heads == 0 or shape.heads % shape.kv_heads:
        raise GGUFExportError(
            f"layer {index} has {shape.heads} query heads and {shape.kv_heads} KV heads: llama.cpp needs a whole "
            "number of query heads per KV head (query head h uses KV head h // (heads / kv_heads))"
        )


def choose_layout(model_type: str, shapes: list[LayerShape], *, hidden: int, head_dim: int,
                  biases: dict[str, bool]) -> Layout:
    """The llama.cpp architecture for a ``model_type`` model with these layer shapes.

    ``biases`` says which linears have biases anywhere (keys ``"qkv"``, ``"o"``, ``"ffn"``). The family's own
    architecture when it can hold the model (every layer the same shape with heads and neurons, and what the
    architecture's tensors allow); else ``llama`` for uniform shapes the family architecture cannot hold (Qwen2 with
    pruned query heads or added biases), else ``deci``. Qwen3 (q/k norms, which only ``qwen3`` loads) with per-block
    shapes or output/FFN biases raises ``GGUFExportError``, as does a family that has no llama.cpp architecture.
    """
    if model_type not in FAMILY_ARCHS:
        raise GGUFExportError(f"cannot export model_type {model_type!r} to GGUF: supported families are "
                              f"{', '.join(sorted(FAMILY_ARCHS))}")
    for index, shape in enumerate(shapes):
        check_layer(index, shape)
    family = FAMILY_ARCHS[model_type]
    uniform = len(set(shapes)) == 1 and shapes[0].heads > 0 and shapes[0].ffn > 0
    if model_type in EXPERT_FAMILIES:
        _check_experts_layout(model_type, family, shapes, uniform, hidden, head_dim, biases)
        return Layout(arch=family, model_layers=tuple(shapes), layers=tuple(shapes),
                      interleave_qk=family in NORM_ROPE_ARCHS)
    if family == "qwen3":
        if not uniform or biases.get("o") or biases.get("ffn"):
            what = "per-block shapes (or a block with no head or no neuron)" if not uniform else "output/FFN biases"
            raise GGUFExportError(
                f"a Qwen3 model with {what} cannot be written for llama.cpp: only its 'qwen3' architecture loads the "
                "q/k norms, and it holds one shape for every layer and no output or FFN biases"
            )
        arch = "qwen3"
    elif family in ("phi3", "gptneox"):
        biased = family == "phi3" and any(biases.values())  # GPT-NeoX has its biases, which llama.cpp loads
        if not uniform or biased or shapes[0].heads * head_dim != hidden:
            what = ("per-block shapes (or a block with no head or no neuron)" if not uniform else "biases"
                    if biased else f"{shapes[0].heads} query heads of {head_dim}")
            raise GGUFExportError(
                f"a {model_type} model with {what} cannot be written for llama.cpp: its {family!r} architecture (a "
                f"fused qkv projection) holds one FFN width for every layer and sizes the query and output "
                f"projections {hidden} x {hidden}; prune its MLP only, with uniform sizes"
            )
        arch = family
    elif family in ("gemma", "gemma2", "gemma3"):
        if not uniform or any(biases.values()):
            what = "per-block shapes (or a block with no head or no neuron)" if not uniform else "biases"
            raise GGUFExportError(
                f"a {model_type} model with {what} cannot be written for llama.cpp: its {family!r} architecture (the "
                "only one with that Gemma layer) holds one shape for every layer and no biases; prune it with uniform "
                "sizes (attention_sparsity/mlp_sparsity, or sparsity= with allocation='uniform')"
            )
        arch = family
    elif family == "qwen2" and uniform and not (biases.get("o") or biases.get("ffn")) \
            and shapes[0].heads * head_dim == hidden:
        arch = "qwen2"
    else:
        arch = "llama" if uniform else "deci"
    layers = tuple(shapes) if arch != "deci" else tuple(_deci_layers(shapes, biases))
    return Layout(arch=arch, model_layers=tuple(shapes), layers=layers, interleave_qk=arch in NORM_ROPE_ARCHS)


def _check_experts_layout(model_type: str, arch: str, shapes: list[LayerShape], uniform: bool, hidden: int,
                          head_dim: int, biases: dict[str, bool]) -> None:
    """Refuse a mixture of experts llama.cpp's architecture for it cannot hold: per-block shapes, output/FFN biases,
    pruned query heads where the query projection is sized hidden x hidden (``qwen2moe``, ``olmoe``), GQA in OLMoE
    (its key norm spans hidden channels)."""
    problems = []
    if not uniform:
        problems.append("per-block shapes (or a block with no head or no neuron): llama.cpp's mixture-of-experts "
                        "architectures hold one shape for every layer, and 'deci' has no experts; prune it with uniform "
                        "sizes")
    if biases.get("o") or biases.get("ffn"):
        problems.append("output or FFN biases")
    if arch in _HIDDEN_SIZED_QUERIES and uniform and shapes[0].heads * head_dim != hidden:
        problems.append(f"{shapes[0].heads} query heads of {head_dim} (llama.cpp's {arch!r} sizes the query and "
                        f"output projections {hidden} x {hidden}: prune its MLP only)")
    if arch == "olmoe" and uniform and shapes[0].kv_heads * head_dim != hidden:
        problems.append(f"{shapes[0].kv_heads} KV heads of {head_dim} (llama.cpp's 'olmoe' normalises keys over "
                        f"{hidden} channels)")
    if problems:
        raise GGUFExportError(f"a {model_type} model with " + "; ".join(problems) + " cannot be written for llama.cpp")


def _deci_layers(shapes: list[LayerShape], biases: dict[str, bool]) -> list[LayerShape]:
    out = []
    for index, shape in enumerate(shapes):
        heads, kv = shape.heads, shape.kv_heads
        if heads == 0 and (index == 0 or biases.get("o")):
            heads, kv = 1, 1
        out.append(LayerShape(heads=heads, kv_heads=kv, ffn=max(shape.ffn, 1)))
    return out


def interleave_halves(rows, head_count: int):
    """Reorder the rows of a q/k projection weight (``heads*head_dim x in``) or bias (``heads*head_dim``) from
    Hugging Face's half-split rope layout to llama.cpp's pairwise one: in every head, row ``i`` of the first half
    goes to ``2i`` and row ``i`` of the second half to ``2i + 1``. Works on numpy arrays and torch tensors."""
    if head_count == 0:
        return rows
    shape = tuple(rows.shape)
    head_dim = shape[0] // head_count
    split = rows.reshape(head_count, 2, head_dim // 2, *shape[1:])
    return split.swapaxes(1, 2).reshape(shape)
