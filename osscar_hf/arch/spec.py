"""What osscar_hf needs to know about one architecture family, as data."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from ..errors import UnsupportedModelError
from ..remote_code.configuration_osscar import ROW_KINDS, count_owner
from .experts import Experts, dense_layers_problem, expert_block_problems


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` that also accepts an empty path (the root itself)."""
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (which must exist) by ``module``."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


_COUNT_KINDS = ("heads", "kv_heads", "n_rep", "ffn")


@dataclass(frozen=True)
class Producer:
    """A linear whose output rows make structures, and which rows belong to which structure.

    ``path``: from the attention module (an attention producer: a direct child of it) or from the block (an MLP
    producer). ``segments``: the row blocks in order, each a kind: ``"q"`` (a KV group's ``n_rep`` query heads),
    ``"k"`` / ``"v"`` (its key / value head), ``"neurons"`` (one row per FFN neuron). ``interleaved=False``
    (kind-major): every structure's rows of the first segment, then of the next (Phi-3's ``qkv_proj`` is
    ``("q", "k", "v")``, its ``gate_up_proj`` ``("neurons", "neurons")``); ``True`` (structure-major): each
    structure's rows of every segment together (GPT-NeoX's ``query_key_value``: per head ``[q | k | v]``). The
    rows kept for given structures are :func:`osscar_hf.remote_code.configuration_osscar.kept_rows` of this.
    """

    path: str
    segments: tuple[str, ...]
    interleaved: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "segments": list(self.segments), "interleaved": self.interleaved}


def _producer_problems(name: str, part: str, producers: Any) -> list[str]:
    kinds = [k for k, p in ROW_KINDS.items() if p == part]
    if not isinstance(producers, tuple) or not producers or not all(
            (isinstance(p, str) and p and part == "mlp")
            or (isinstance(p, Producer) and isinstance(p.path, str) and p.path and isinstance(p.segments, tuple)
                and p.segments and all(k in kinds for k in p.segments) and isinstance(p.interleaved, bool))
            for p in producers):
        what = "non-empty str or Producer" if part == "mlp" else "Producer"
        return [f"{name} must be a non-empty tuple of {what} (segments of {kinds}), got {producers!r}"]
    if part == "attention":
        segments = sorted(k for p in producers for k in p.segments)
        if segments != ["k", "q", "v"]:
            return [f"{name} must hold each of the segments 'q', 'k', 'v' once, got {producers!r}"]
    return []


@dataclass(frozen=True)
class ArchSpec:
    """Where a decoder-only family keeps its blocks and which linears consume/produce each structure.

    Paths are dotted module paths: ``blocks`` from the ``*ForCausalLM`` model, every other path from one
    decoder block. A structure of the attention is one KV group: the ``n_rep`` query heads that share one
    key/value head (a single head when the model has as many KV heads as query heads). A structure of the
    MLP is one neuron.

    The producers of a part are the linears whose output rows make its structures; its consumer (``o_proj``,
    ``mlp_consumer``) takes them as input columns. Separate projections are named by ``q_proj``, ``k_proj``,
    ``v_proj`` and ``mlp_producers`` paths; any other row layout (fused, interleaved) by :class:`Producer` entries
    in ``attention_producers`` (instead of ``q_proj``/``k_proj``/``v_proj``) and ``mlp_producers``.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    attention: str
    o_proj: str
    mlp_producers: tuple[str | Producer, ...]
    mlp_consumer: str
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    attention_producers: tuple[Producer, ...] = ()
    # Module attributes that hold a count, updated after slicing: {path from block: kind}, kind in {"heads" (query
    # heads), "kv_heads", "n_rep" (query heads per KV head, which query-head pruning lowers), "ffn"}.
    module_count_attrs: dict[str, str] = field(default_factory=dict)
    # Config fields: query heads, KV heads (None: MHA, same as heads), FFN width.
    config_heads: str = "num_attention_heads"
    config_kv_heads: str | None = "num_key_value_heads"
    config_ffn: str = "intermediate_size"
    # Whether a uniform head count can be written to the stock config. Needs an explicit ``head_dim`` field;
    # OPT derives head_dim from hidden_size // heads, so a removed head cannot be expressed there.
    config_has_head_dim: bool = True
    # Config fields that switch on the biases of every linear of a block part, {"attention": field, "mlp": field}:
    # what a method that gives the consumers an output bias (FLAP's compensation) sets. A part whose consumer
    # already has a bias needs none; a family without the field cannot take such a method.
    bias_switches: dict[str, str] = field(default_factory=dict)
    # Modules from the *ForCausalLM model that turn the last block's output into logits, in order (final norm,
    # projections, LM head); a path whose module is absent or None in a given model is skipped.
    final_modules: tuple[str, ...] = ("lm_head",)
    # Config field of a soft cap the ``*ForCausalLM`` applies to the logits after ``final_modules``
    # (``cap * tanh(logits / cap)``; Gemma 2), or None; a config whose field is None or absent has no cap.
    config_final_logit_softcap: str | None = None
    # The sub-config that holds the decoder's fields (heads, KV heads, FFN width, head_dim, bias switches, the logit
    # soft cap, the context length), or None when they are the model config's own: a multimodal model's
    # ``text_config`` (Gemma 3's). Read through :meth:`shape_config`.
    config_path: str | None = None
    # Checkpoints whose tensor names differ from the ``*ForCausalLM``'s parameter names, as {prefix in the
    # checkpoint: prefix in the model} (GPT-NeoX: ``{"embed_out.": "lm_head."}``, which transformers renames on load
    # for the stock class only): what a streamed run (reading tensors by name) renames on read and back on write,
    # and what the remote-code class registers as its checkpoint conversion.
    checkpoint_renames: dict[str, str] = field(default_factory=dict)
    # Mixture of experts (:class:`~osscar_hf.arch.experts.Experts`): the MLP is one module of 3-D per-expert tensors,
    # ``mlp_producers`` and ``mlp_consumer`` its parameters; None: a dense MLP of linears.
    experts: Experts | None = None
    # Why the attention cannot be pruned in this family (its outputs would change in a way no slicing reproduces), or
    # None: with a reason, only the MLP is pruned and a config that asks for attention pruning is refused with it.
    attention_fixed: str | None = None

    # -- checks ----------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What is malformed in the spec itself (wrong types, empty paths, unknown kinds); empty when it is sound."""
        found = []
        value = self.model_types
        if not isinstance(value, tuple) or not value or not all(isinstance(v, str) and v for v in value):
            found.append(f"model_types must be a non-empty tuple of non-empty str, got {value!r}")
        found += _producer_problems("mlp_producers", "mlp", self.mlp_producers)
        separate = (self.q_proj, self.k_proj, self.v_proj)
        if self.attention_producers or any(v is not None for v in separate):
            if self.attention_producers and any(v is not None for v in separate):
                found.append("give the attention's producers either as q_proj/k_proj/v_proj or as "
                             "attention_producers, not both")
            elif self.attention_producers:
                found += _producer_problems("attention_producers", "attention", self.attention_producers)
        else:
            found.append("the attention needs q_proj, k_proj and v_proj, or attention_producers")
        if not isinstance(self.final_modules, tuple) or not all(isinstance(v, str) and v for v in self.final_modules):
            found.append(f"final_modules must be a tuple of non-empty str, got {self.final_modules!r}")
        names = ("q_proj", "k_proj", "v_proj") if not self.attention_producers else ()
        for name in ("name", "blocks", "attention", *names, "o_proj", "mlp_consumer", "config_heads", "config_ffn"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                found.append(f"{name} must be a non-empty str, got {value!r}")
        for name in ("config_kv_heads", "config_final_logit_softcap", "config_path", "attention_fixed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                found.append(f"{name} must be None or a non-empty str, got {value!r}")
        counts = self.module_count_attrs
        if not isinstance(counts, dict) or not all(
                isinstance(k, str) and k and v in _COUNT_KINDS for k, v in counts.items()):
            found.append(f"module_count_attrs must map attribute paths to one of {list(_COUNT_KINDS)}, "
                         f"got {counts!r}")
        switches = self.bias_switches
        if not isinstance(switches, dict) or not all(
                k in ("attention", "mlp") and isinstance(v, str) and v for k, v in switches.items()):
            found.append(f"bias_switches must map 'attention'/'mlp' to config field names, got {switches!r}")
        renames = self.checkpoint_renames
        if not isinstance(renames, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in renames.items()):
            found.append(f"checkpoint_renames must map non-empty str prefixes to non-empty str, got {renames!r}")
        if self.experts is not None:
            found += (self.experts.problems() if isinstance(self.experts, Experts)
                      else [f"experts must be None or an Experts, got {self.experts!r}"])
        return found

    def model_name(self, stored: str) -> str:
        """The model's parameter name of the checkpoint's tensor ``stored`` (:attr:`checkpoint_renames`)."""
        for old, new in self.checkpoint_renames.items():
            if stored.startswith(old):
                return new + stored[len(old):]
        return stored

    def stored_name(self, name: str) -> str:
        """The checkpoint's tensor name of the model's parameter ``name`` (the inverse of :meth:`model_name`)."""
        for old, new in self.checkpoint_renames.items():
            if name.startswith(new):
                return old + name[len(new):]
        return name

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~osscar_hf.errors.UnsupportedModelError` unless every config field, module path and module
        count attribute the spec names exists in ``model`` (each linear an ``nn.Linear``): checked before any work,
        so a spec that does not describe the model never leaves it half pruned."""
        config = getattr(model, "config", None)
        if self.config_path is not None and getattr(config, self.config_path, None) is None:
            raise UnsupportedModelError(
                f"architecture spec {self.name!r} reads the decoder's fields from config.{self.config_path}, which "
                f"this {type(model).__name__}'s config lacks")
        fields = self.shape_config(config)
        missing = [f"config field {name!r}" for name in (self.config_heads, self.config_kv_heads, self.config_ffn)
                   if name is not None and not hasattr(fields, name)]
        try:
            blocks = list(get_submodule(model, self.blocks))
        except (AttributeError, TypeError):
            blocks = []
            missing.append(f"a list of blocks at {self.blocks!r}")
        linears = [f"{self.attention}.{p.path}" for p in self.producers("attention")]
        linears.append(f"{self.attention}.{self.o_proj}")
        if self.experts is None:
            linears += [*(p.path for p in self.producers("mlp")), self.mlp_consumer]
        else:
            missing += self._expert_problems(config, blocks)
            shared = self.experts.shared
            if shared is not None:
                linears += shared.linears()
                missing += [f"config field {shared.config_ffn!r}"] if not hasattr(fields, shared.config_ffn) else []
        shared_spec = self.shared_expert_spec()
        counts = {**self.module_count_attrs, **(shared_spec.module_count_attrs if shared_spec is not None else {})}
        for i, block in enumerate(blocks):
            for path in linears:
                try:
                    module = get_submodule(block, path)
                except AttributeError:
                    module = None
                if not isinstance(module, nn.Linear):
                    missing.append(f"an nn.Linear at {self.blocks}.{i}.{path}")
            for path in counts:
                try:
                    module, holder, attr = count_owner(block, path)
                    found = hasattr(module if holder is None else getattr(module, holder), attr)
                except AttributeError:
                    found = False
                if not found:
                    missing.append(f"a count attribute {self.blocks}.{i}.{path}")
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise UnsupportedModelError(
                f"architecture spec {self.name!r} (for model_type {getattr(config, 'model_type', None)!r}) does not "
                f"describe this {type(model).__name__}, which lacks {'; '.join(missing[:3])}{more}")

    def _expert_problems(self, config: Any, blocks: list[nn.Module]) -> list[str]:
        assert self.experts is not None
        dense = dense_layers_problem(config, self.experts)
        if dense is not None:
            return [f"experts in every block: {dense}"]
        producers = [(p.path, len(p.segments)) for p in self.producers("mlp")]
        return [problem for i, block in enumerate(blocks) for problem in expert_block_problems(
            block, self.experts, producers, self.mlp_consumer, f"{self.blocks}.{i}")]

    def shared_expert_spec(self) -> ArchSpec | None:
        """A mixture of experts' shared expert (:class:`~osscar_hf.arch.experts.SharedExpert`) as the MLP of a dense
        spec (its linears, its width's config field and count attribute), which the dense MLP's surgery and
        statistics take as they are; None when there is none."""
        shared = self.experts.shared if self.experts is not None else None
        if shared is None:
            return None
        return replace(self, mlp_producers=tuple(f"{shared.path}.{p}" for p in shared.producers),
                       mlp_consumer=f"{shared.path}.{shared.consumer}", config_ffn=shared.config_ffn, experts=None,
                       module_count_attrs={f"{shared.path}.{shared.count_attr}": "ffn"}, bias_switches={})

    def producers(self, part: str) -> tuple[Producer, ...]:
        """The producers of ``part`` (``"attention"``: paths from the attention; ``"mlp"``: from the block), with
        the separate projections' shorthand spelled out as one-segment :class:`Producer` entries."""
        if part == "attention":
            if self.attention_producers:
                return self.attention_producers
            return tuple(Producer(path, (kind,)) for path, kind in ((self.q_proj, "q"), (self.k_proj, "k"),
                                                                     (self.v_proj, "v")))
        return tuple(p if isinstance(p, Producer) else Producer(p, ("neurons",)) for p in self.mlp_producers)

    # -- shapes read from a config --------------------------------------------------------------------
    def shape_config(self, config: Any) -> Any:
        """The config that holds the decoder's fields: ``config`` itself, or its :attr:`config_path` sub-config
        (a config that already is that sub-config is returned as it is)."""
        if self.config_path is None:
            return config
        return getattr(config, self.config_path, None) or config

    def num_heads(self, config: Any) -> int:
        return int(getattr(self.shape_config(config), self.config_heads))

    def num_kv_heads(self, config: Any) -> int:
        if self.config_kv_heads is None:
            return self.num_heads(config)
        value = getattr(self.shape_config(config), self.config_kv_heads, None)
        return self.num_heads(config) if value is None else int(value)

    def head_dim(self, config: Any) -> int:
        fields = self.shape_config(config)
        explicit = getattr(fields, "head_dim", None) if self.config_has_head_dim else None
        return int(explicit) if explicit else int(fields.hidden_size) // self.num_heads(config)

    def ffn_dim(self, config: Any) -> int:
        return int(getattr(self.shape_config(config), self.config_ffn))

    def final_logit_softcap(self, config: Any) -> float | None:
        """The soft cap of the logits (``config_final_logit_softcap``'s value), or None when there is none."""
        fields = self.shape_config(config)
        value = getattr(fields, self.config_final_logit_softcap, None) if self.config_final_logit_softcap else None
        return float(value) if value else None

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules of ``final_modules`` that ``model`` has (absent or None ones skipped), in order."""
        modules = []
        for path in self.final_modules:
            try:
                module = get_submodule(model, path)
            except AttributeError:
                continue
            if isinstance(module, nn.Module):
                modules.append(module)
        return modules

    def head_logits(self, config: Any, modules: list[nn.Module], hidden: torch.Tensor) -> torch.Tensor:
        """The logits the ``*ForCausalLM`` computes from the last block's output ``hidden``: ``modules``
        (:meth:`head_modules`) in order, then the soft cap of the logits when the config sets one."""
        logits = hidden
        for module in modules:
            logits = module(logits)
        cap = self.final_logit_softcap(config)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def group_geometry(self, config: Any) -> tuple[int, int, int]:
        """(number of attention structures m, query heads per structure n_rep, head_dim)."""
        heads, kv = self.num_heads(config), self.num_kv_heads(config)
        if kv <= 0 or heads % kv != 0:
            raise ValueError(f"{self.config_heads}={heads} is not a multiple of the KV head count {kv}")
        return kv, heads // kv, self.head_dim(config)
