"""The remote-code format: a pruned checkpoint that carries its own modeling code.

``save_pruned(model, folder, format="remote_code")`` writes the weights with two Python files beside them,
``configuration_osscar.py`` and ``modeling_osscar.py``, which import only torch and transformers. Then

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

rebuilds every block at its own shape without osscar_hf installed. ``config.json`` gets:

- ``model_type: "osscar_<base>"`` (``osscar_llama``, ``osscar_opt``, ...): transformers has no such type, so
  without ``trust_remote_code=True`` it refuses the checkpoint with its "contains custom code ...
  trust_remote_code=True" error instead of failing later with a size mismatch;
- ``auto_map`` (``AutoConfig`` and ``AutoModelForCausalLM``) naming the classes in the two files, and
  ``architectures``;
- ``osscar_format_version``, ``osscar_base_model_type``, ``osscar_block_shapes`` (every block's
  ``num_attention_heads``, ``num_key_value_heads``, ``ffn_dim``) and ``osscar_layout`` (module paths of the
  blocks and the attention; the attention's and the MLP's producers, each with its row layout (a
  :class:`~osscar_hf.arch.Producer` as a dict, or a bare path for an MLP producer whose rows are the neurons in
  order), and consumers; module attributes holding a count; ``n_rep``; ``head_dim``; the family's
  ``checkpoint_renames`` where it has any, which the model class registers with transformers) as plain config
  fields;
- ``osscar_pruning``: the pruning settings (an ``OsscarConfig`` dict without ``quant_method`` and
  ``block_shapes``), for provenance only, or ``null`` for a model osscar_hf did not prune. There is no
  ``quantization_config``, so osscar_hf's quantizer never acts on such a checkpoint.

The stock fields stay those of the model as it is in memory (the dense shapes, or the pruned ones where
the stock config expresses them): the model is built from them and then shrunk block by block.

The two files are rendered from templates shipped in ``osscar_hf/remote_code/`` (valid Python written for
the Llama family): the family's class names and ``model_type`` are substituted, nothing else.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..arch import ArchSpec
from ..errors import RemoteCodeError

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "MODELING_FILE",
    "REMOTE_CODE_FILES",
    "RemoteCodeError",
    "RemoteCodeNames",
    "base_model_type",
    "remote_code_config",
    "remote_code_names",
    "remote_model_type",
    "render_remote_code",
    "strip_remote_code",
    "write_remote_code_files",
]

CONFIG_FILE = "configuration_osscar.py"
MODELING_FILE = "modeling_osscar.py"
REMOTE_CODE_FILES = (CONFIG_FILE, MODELING_FILE)
FORMAT_VERSION = 1
MODEL_TYPE_PREFIX = "osscar_"
OSSCAR_FIELDS = ("osscar_format_version", "osscar_base_model_type", "osscar_block_shapes", "osscar_layout",
                 "osscar_pruning")
_TEMPLATE_FAMILY = "llama"


@dataclass(frozen=True)
class RemoteCodeNames:
    """The names the remote-code files use for one family (e.g. ``llama`` -> ``OsscarLlamaForCausalLM``)."""

    base_model_type: str
    base_config_class: str
    base_model_class: str

    @property
    def prefix(self) -> str:
        return self.base_model_class.removesuffix("ForCausalLM").removesuffix("ForConditionalGeneration")

    @property
    def model_type(self) -> str:
        return remote_model_type(self.base_model_type)

    @property
    def config_class(self) -> str:
        return f"Osscar{self.prefix}Config"

    @property
    def model_class(self) -> str:
        return f"Osscar{self.base_model_class}"

    @property
    def auto_map(self) -> dict[str, str]:
        return {
            "AutoConfig": f"{Path(CONFIG_FILE).stem}.{self.config_class}",
            "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{self.model_class}",
        }


def remote_model_type(base: str) -> str:
    """The ``model_type`` of a remote-code checkpoint of the family ``base`` (``"llama"`` -> ``"osscar_llama"``)."""
    return MODEL_TYPE_PREFIX + base


def base_model_type(config: Any) -> str:
    """The stock ``model_type`` of ``config``'s family, also for a config loaded from a remote-code checkpoint."""
    model_type = getattr(config, "model_type", None)
    base = getattr(config, "osscar_base_model_type", None)
    if isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX) and isinstance(base, str):
        return base
    return model_type


def remote_code_names(base: str) -> RemoteCodeNames:
    """The class names for family ``base``, checked against the classes transformers has."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_class = CONFIG_MAPPING_NAMES.get(base)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(base)
    # A causal LM, or a multimodal model whose causal-LM class is its *ForConditionalGeneration (Gemma 3).
    if not config_class or not isinstance(model_class, str) or not model_class.endswith(
            ("ForCausalLM", "ForConditionalGeneration")):
        raise RemoteCodeError(
            f"transformers {transformers.__version__} has no config and causal-LM class for model_type {base!r}: "
            "the remote-code format cannot be written for it"
        )
    missing = [name for name in (config_class, model_class) if not hasattr(transformers, name)]
    if missing:
        raise RemoteCodeError(
            f"`from transformers import {', '.join(missing)}` fails: cannot write remote code for {base!r}"
        )
    return RemoteCodeNames(base_model_type=base, base_config_class=config_class, base_model_class=model_class)


# --------------------------------------------------------------------------- the two files
def _template(name: str) -> str:
    resource = importlib.resources.files("osscar_hf").joinpath("remote_code", name)
    if not resource.is_file():
        raise RemoteCodeError(
            f"the remote-code template osscar_hf/remote_code/{name} is missing from this installation; reinstall "
            "osscar-hf (the templates are package data)"
        )
    return resource.read_text(encoding="utf-8")


def _substitutions(names: RemoteCodeNames) -> list[tuple[str, str]]:
    llama = RemoteCodeNames(_TEMPLATE_FAMILY, "LlamaConfig", "LlamaForCausalLM")
    # \b keeps LlamaConfig from matching inside OsscarLlamaConfig.
    return [
        (llama.config_class, names.config_class),
        (llama.model_class, names.model_class),
        (llama.base_config_class, names.base_config_class),
        (llama.base_model_class, names.base_model_class),
        (f'"{llama.model_type}"', f'"{names.model_type}"'),
        (f'"{llama.base_model_type}"', f'"{names.base_model_type}"'),
    ]


def render_remote_code(names: RemoteCodeNames) -> dict[str, str]:
    """The source of ``configuration_osscar.py`` and ``modeling_osscar.py`` for the family of ``names``."""
    sources = {}
    for file_name in REMOTE_CODE_FILES:
        text = _template(file_name)
        for old, new in _substitutions(names):
            pattern = re.escape(old) if old.startswith('"') else rf"\b{re.escape(old)}\b"
            text = re.sub(pattern, new, text)
        if names.base_model_type != _TEMPLATE_FAMILY and re.search(_TEMPLATE_FAMILY, text, re.IGNORECASE):
            raise RemoteCodeError(
                f"the template {file_name} mentions {_TEMPLATE_FAMILY!r} outside the substituted names"
            )
        compile(text, file_name, "exec")  # a broken template fails here, not when a user loads the checkpoint
        sources[file_name] = text
    return sources


def write_remote_code_files(folder: str | Path, names: RemoteCodeNames) -> list[Path]:
    """Write the two Python files for ``names``' family into ``folder``; return their paths."""
    written = []
    for file_name, text in render_remote_code(names).items():
        path = Path(folder) / file_name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# --------------------------------------------------------------------------- config.json
def block_layout(spec: ArchSpec, config: Any) -> dict[str, Any]:
    """``osscar_layout``: what ``modeling_osscar.py`` needs to shrink a block of this family."""
    _, n_rep, head_dim = spec.group_geometry(config)
    renames = {"checkpoint_renames": dict(spec.checkpoint_renames)} if spec.checkpoint_renames else {}
    if spec.experts is not None:  # the MLP's producers and consumer are this module's 3-D per-expert tensors
        renames["experts"] = spec.experts.path
    shared = spec.shared_expert_spec()
    if shared is not None:  # a dense MLP beside the experts, with a width of its own (shared_ffn_dim)
        renames["shared_expert"] = {"producers": list(shared.mlp_producers), "consumer": shared.mlp_consumer,
                                    "count_attributes": list(shared.module_count_attrs)}
    return {
        "blocks": spec.blocks,
        "attention": spec.attention,
        "attention_producers": [p.as_json() for p in spec.producers("attention")],
        "o_proj": spec.o_proj,
        "mlp_producers": [p if isinstance(p, str) else p.as_json() for p in spec.mlp_producers],
        "mlp_consumer": spec.mlp_consumer,
        "count_attributes": dict(spec.module_count_attrs),
        "n_rep": n_rep,
        "head_dim": head_dim,
        **renames,
    }


def remote_code_config(
    data: dict[str, Any], model: nn.Module, spec: ArchSpec, shapes: list[dict[str, int]], record: Any
) -> tuple[dict[str, Any], RemoteCodeNames]:
    """``config.json`` (``data``, as ``save_pretrained`` wrote it for ``model``) in the remote-code format, and
    the names of the two files' classes.

    ``spec``: the family's spec; ``shapes``: every block's shape; ``record``: the
    :class:`~osscar_hf.config.OsscarConfig` of the pruning (or ``None``), kept for provenance.
    """
    base = base_model_type(model.config)
    names = remote_code_names(base)
    data = strip_remote_code(data)
    data.pop("quantization_config", None)
    pruning = None
    if record is not None:
        pruning = record.to_dict()
        for key in ("quant_method", "block_shapes"):
            pruning.pop(key, None)
    data.update(
        model_type=names.model_type,
        architectures=[names.model_class],
        auto_map=names.auto_map,
        osscar_format_version=FORMAT_VERSION,
        osscar_base_model_type=base,
        osscar_block_shapes=[dict(shape) for shape in shapes],
        osscar_layout=block_layout(spec, model.config),
        osscar_pruning=json.loads(json.dumps(pruning)) if pruning is not None else None,
    )
    return data, names


def strip_remote_code(data: dict[str, Any], folder: str | Path | None = None) -> dict[str, Any]:
    """``config.json`` of a remote-code checkpoint turned back into the stock family's (a copy; other configs
    are returned unchanged). With ``folder``, the two Python files are removed from it."""
    model_type = data.get("model_type")
    base = data.get("osscar_base_model_type")
    if not (isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX) and isinstance(base, str)):
        return dict(data)
    names = remote_code_names(base)
    data = {k: v for k, v in data.items() if k not in OSSCAR_FIELDS}
    auto_map = {k: v for k, v in (data.pop("auto_map", None) or {}).items() if v not in names.auto_map.values()}
    if auto_map:
        data["auto_map"] = auto_map
    data["model_type"] = base
    data["architectures"] = [names.base_model_class]
    if folder is not None:
        for file_name in REMOTE_CODE_FILES:
            (Path(folder) / file_name).unlink(missing_ok=True)
    return data
