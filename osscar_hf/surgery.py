"""Model surgery: slice producers and consumers down to the kept structures.

Linears are resized in place (the same module objects keep their hooks and names), with
``in_features``/``out_features`` updated. Every index is validated first, so a bad call leaves the
module untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .arch.experts import expert_parameter, expert_parameter_name
from .arch.spec import ArchSpec, Producer, get_submodule, set_submodule
from .errors import SurgeryError
from .remote_code.configuration_osscar import (
    count_owner,
    kept_query_heads,
    kept_rows,
    rows_per_structure,
    set_count,
    structure_stride,
)
from .solver.sweep import channels_of


def check_indices(idx: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """``idx`` as int64 on the CPU, or ``SurgeryError`` (naming ``what``) unless it is 1-D, strictly increasing and
    inside ``[0, size)``: what every slicing of a module checks first, so a bad call leaves the module untouched."""
    idx = torch.as_tensor(idx)
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise SurgeryError(f"{what}: indices must be a 1-D integer tensor, got shape {tuple(idx.shape)} {idx.dtype}")
    idx = idx.to(torch.int64).cpu()
    bad = idx[(idx < 0) | (idx >= size)]
    if bad.numel():
        raise SurgeryError(f"{what}: indices {bad.tolist()[:20]} are outside [0, {size})")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise SurgeryError(f"{what}: indices must be strictly increasing (sorted, no duplicates), got {idx.tolist()[:20]}")
    return idx


def group_channels(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Channel indices of contiguous groups: group g covers ``[g*group_size, (g+1)*group_size)``."""
    # On the CPU explicitly, also under a torch.device("meta") context (skeleton resizing).
    return channels_of(torch.as_tensor(groups, dtype=torch.int64).cpu(), group_size)


def slice_linear_outputs(linear: nn.Linear, idx: torch.Tensor) -> None:
    """Keep output rows ``idx`` (and their bias entries)."""
    idx = check_indices(idx, linear.out_features, f"output rows of {linear}").to(linear.weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(0, idx).contiguous(), linear.weight.requires_grad)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, idx).contiguous(), linear.bias.requires_grad)
    linear.out_features = int(idx.numel())


def slice_linear_inputs(
    linear: nn.Linear, idx: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> None:
    """Keep input columns ``idx``; with ``weight`` (out x len(idx)), use it instead of the sliced columns; with
    ``bias`` (out), replace the bias (the linear must have one: see :func:`add_part_biases`)."""
    idx = check_indices(idx, linear.in_features, f"input columns of {linear}").to(linear.weight.device)
    if weight is not None and tuple(weight.shape) != (linear.out_features, idx.numel()):
        raise SurgeryError(
            f"replacement weight has shape {tuple(weight.shape)}, expected {(linear.out_features, idx.numel())}"
        )
    _check_bias(linear, bias)
    with torch.no_grad():
        new = linear.weight.index_select(1, idx) if weight is None else weight.to(linear.weight)
        linear.weight = nn.Parameter(new.contiguous(), linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(linear.bias).contiguous(), linear.bias.requires_grad)
    linear.in_features = int(idx.numel())


def _check_bias(linear: nn.Linear, bias: torch.Tensor | None) -> None:
    if bias is None:
        return
    if linear.bias is None:
        raise SurgeryError(f"{linear} has no bias to replace; add one first (add_part_biases)")
    if tuple(bias.shape) != (linear.out_features,):
        raise SurgeryError(f"replacement bias has shape {tuple(bias.shape)}, expected {(linear.out_features,)}")


def part_producers(block: nn.Module, spec: ArchSpec) -> dict[str, list[tuple[Producer, nn.Linear]]]:
    """The producers of a block's attention and MLP (:meth:`ArchSpec.producers`), each with its linear; a mixture of
    experts (``spec.experts``: no linears) has no ``"mlp"`` entry."""
    roots = {"attention": get_submodule(block, spec.attention)}
    if spec.experts is None:
        roots["mlp"] = block
    return {part: [(p, get_submodule(root, p.path)) for p in spec.producers(part)] for part, root in roots.items()}


def block_consumers(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """The two consumers of a block: the attention output projection and the MLP down projection (the experts
    module, for a mixture of experts)."""
    mlp = spec.mlp_consumer if spec.experts is None else spec.experts.path
    return {"attention": get_submodule(block, f"{spec.attention}.{spec.o_proj}"), "mlp": get_submodule(block, mlp)}


def part_linears(block: nn.Module, spec: ArchSpec) -> dict[str, list[nn.Linear]]:
    """The linears of a block's attention and MLP: the producers, then the consumer (last); a mixture of experts
    has no ``"mlp"`` entry."""
    producers = part_producers(block, spec)
    consumers = block_consumers(block, spec)
    return {part: [linear for _, linear in producers[part]] + [consumers[part]] for part in producers}


def producer_rows(producer: Producer, linear: nn.Linear, kept: torch.Tensor, total: int, *, n_rep: int,
                  head_dim: int, what: str, kept_heads: torch.Tensor | None = None) -> torch.Tensor:
    """The output rows of ``linear`` (laid out as ``producer`` says, for ``total`` structures) that the ``kept``
    structures own (and, for the query rows, the ``kept_heads`` when given); ``SurgeryError`` when the linear does
    not have the rows the layout implies."""
    stride = structure_stride(producer.segments, n_rep, head_dim)
    if linear.out_features != total * stride:
        raise SurgeryError(f"{what} has {linear.out_features} outputs, but its row layout {producer.segments} "
                           f"needs {stride} per structure for {total} structures")
    return kept_rows(producer.segments, producer.interleaved, kept, total, n_rep, head_dim, kept_heads)


def _check_kept_heads(kept_heads: torch.Tensor | None, kept_groups: torch.Tensor, n_rep: int,
                      num_groups: int) -> torch.Tensor:
    """The kept query heads (every head of the kept groups when None), checked: increasing, inside the kept groups,
    and the same number, at least one, in every kept group (the attention repeats each KV head that many times)."""
    if kept_heads is None:
        return kept_query_heads(kept_groups, n_rep)
    heads = check_indices(kept_heads, num_groups * n_rep, "kept query heads")
    groups, counts = torch.unique_consecutive(heads // n_rep, return_counts=True)
    if not torch.equal(groups, kept_groups) or (counts.numel() and bool((counts != counts[0]).any())):
        raise SurgeryError(
            f"kept query heads {heads.tolist()[:20]} must keep the same number (at least one) of the {n_rep} query "
            f"heads of every kept KV group {kept_groups.tolist()[:20]}, and none of another group")
    return heads


def add_part_biases(block: nn.Module, spec: ArchSpec) -> None:
    """Give every linear of each part whose consumer has no bias a zero bias (the layout of a stock model whose
    config switches the part's biases on: ``spec.bias_switches``). Outputs do not change."""
    for linears in part_linears(block, spec).values():
        if linears[-1].bias is not None:
            continue
        for linear in linears:
            if linear.bias is None:
                weight = linear.weight
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device),
                                           weight.requires_grad)


class EmptyAttention(nn.Module):
    """An attention that lost every head: its output is the output projection's bias (or zero).

    It keeps the attention's submodules under their names (the zero-width projections, and any others such as
    Qwen3's and Gemma 3's q/k norms) so the state dict keeps its layout, and still writes a one-channel placeholder
    into a KV cache so the cache's sequence length stays right during generation.
    """

    def __init__(self, modules: dict[str, nn.Module], o_proj: str, layer_idx: int | None) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self._o_proj = o_proj
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, cache: Any = None,
                layer_past: Any = None, **kwargs: Any):
        o_proj: nn.Linear = getattr(self, self._o_proj)
        # Call the (zero-input-width) projection rather than reading its bias: module hooks then run, so an
        # offloaded block (accelerate loads weights in a pre-forward hook) or an adapter works as usual.
        out = o_proj(hidden_states.new_zeros(hidden_states.shape[:-1] + (0,)))
        # The cache argument's name: `cache` (newer transformers), `past_key_values` (older), `layer_past` (GPT-NeoX).
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        if cache is not None and self.layer_idx is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return out, None


def _set_count_attrs(block: nn.Module, spec: ArchSpec, counts: dict[str, int]) -> None:
    for path, kind in spec.module_count_attrs.items():
        if kind not in counts:
            continue
        owner, _, attr = count_owner(block, path)
        if isinstance(owner, EmptyAttention):
            continue
        try:
            set_count(block, path, counts[kind])
        except AttributeError:
            raise SurgeryError(
                f"{type(owner).__name__} has no attribute {attr!r} named in spec {spec.name!r}") from None


def prune_attention(
    block: nn.Module,
    spec: ArchSpec,
    kept_groups: torch.Tensor,
    *,
    n_rep: int,
    head_dim: int,
    num_groups: int,
    kept_heads: torch.Tensor | None = None,
    o_weight: torch.Tensor | None = None,
    o_bias: torch.Tensor | None = None,
) -> None:
    """Keep the KV groups ``kept_groups`` of ``block``'s attention, and of their query heads ``kept_heads``.

    ``kept_heads``: increasing query-head indices (among ``num_groups * n_rep``; head ``h`` belongs to group ``h //
    n_rep``), the same number in every kept group; None keeps every query head of the kept groups. ``o_weight``
    (hidden x kept channels) replaces the output projection's kept columns (the refit); ``None`` keeps the original
    columns. ``o_bias`` replaces the output projection's bias. With no group kept, the attention becomes an
    :class:`EmptyAttention`.
    """
    kept_groups = check_indices(kept_groups, num_groups, "kept attention groups")
    heads = _check_kept_heads(kept_heads, kept_groups, n_rep, num_groups)
    attention = get_submodule(block, spec.attention)
    q_idx = group_channels(heads, head_dim)
    o_proj = get_submodule(attention, spec.o_proj)
    # Validate everything before changing anything.
    rows = [(linear, producer_rows(p, linear, kept_groups, num_groups, n_rep=n_rep, head_dim=head_dim,
                                   what=f"{spec.attention}.{p.path}", kept_heads=heads))
            for p, linear in part_producers(block, spec)["attention"]]
    check_indices(q_idx, o_proj.in_features, f"{spec.attention}.{spec.o_proj} columns")
    if o_weight is not None and tuple(o_weight.shape) != (o_proj.out_features, q_idx.numel()):
        raise SurgeryError(
            f"{spec.o_proj} refit weight has shape {tuple(o_weight.shape)}, "
            f"expected {(o_proj.out_features, q_idx.numel())}"
        )
    _check_bias(o_proj, o_bias)
    for linear, idx in rows:
        slice_linear_outputs(linear, idx)
    slice_linear_inputs(o_proj, q_idx, o_weight, o_bias)
    if kept_groups.numel() == 0:
        empty = EmptyAttention(dict(attention.named_children()), spec.o_proj, getattr(attention, "layer_idx", None))
        set_submodule(block, spec.attention, empty)
    kv = int(kept_groups.numel())
    _set_count_attrs(block, spec, {"heads": int(heads.numel()), "kv_heads": kv,
                                   "n_rep": int(heads.numel()) // kv if kv else n_rep})


def prune_mlp(
    block: nn.Module,
    spec: ArchSpec,
    kept_neurons: torch.Tensor,
    *,
    consumer_weight: torch.Tensor | None = None,
    consumer_bias: torch.Tensor | None = None,
) -> None:
    """Keep the FFN neurons ``kept_neurons``: producer rows and consumer columns (refit if given; the consumer's
    bias replaced by ``consumer_bias`` if given). For a mixture of experts see :func:`prune_experts`."""
    if spec.experts is not None:
        if consumer_bias is not None:
            raise SurgeryError(f"the experts of spec {spec.name!r} have no bias to replace")
        prune_experts(block, spec, kept_neurons, consumer_weight=consumer_weight)
        return
    consumer = get_submodule(block, spec.mlp_consumer)
    kept_neurons = check_indices(kept_neurons, consumer.in_features, f"kept neurons of {spec.mlp_consumer}")
    total = consumer.in_features
    rows = [(linear, producer_rows(p, linear, kept_neurons, total, n_rep=1, head_dim=1, what=p.path))
            for p, linear in part_producers(block, spec)["mlp"]]
    if consumer_weight is not None and tuple(consumer_weight.shape) != (consumer.out_features, kept_neurons.numel()):
        raise SurgeryError(
            f"{spec.mlp_consumer} refit weight has shape {tuple(consumer_weight.shape)}, "
            f"expected {(consumer.out_features, kept_neurons.numel())}"
        )
    _check_bias(consumer, consumer_bias)
    for linear, idx in rows:
        slice_linear_outputs(linear, idx)
    slice_linear_inputs(consumer, kept_neurons, consumer_weight, consumer_bias)
    _set_count_attrs(block, spec, {"ffn": int(kept_neurons.numel())})


def expert_neurons(local: torch.Tensor, neurons: int) -> torch.Tensor:
    """Flat structure indices ``e * neurons + j`` of each expert's kept neurons ``local[e]`` (experts x kept)."""
    local = torch.as_tensor(local, dtype=torch.int64, device="cpu")
    offsets = torch.arange(local.shape[0], dtype=torch.int64, device="cpu").unsqueeze(1) * neurons
    return (local + offsets).reshape(-1)


def _local_neurons(kept: torch.Tensor, experts: int, neurons: int, what: str) -> torch.Tensor:
    """``kept`` (flat indices among ``experts * neurons``, checked) as each expert's neurons (experts x kept), the
    same number in every expert."""
    kept = check_indices(kept, experts * neurons, what)
    if kept.numel() % experts or not bool(
            (kept.reshape(experts, -1) // neurons == torch.arange(experts).unsqueeze(1)).all()):
        raise SurgeryError(f"{what}: {kept.tolist()[:20]} must keep the same number of neurons in each of the "
                           f"{experts} experts (flat indices expert * {neurons} + neuron)")
    return kept.reshape(experts, -1) % neurons


def prune_experts(block: nn.Module, spec: ArchSpec, kept_neurons: torch.Tensor, *,
                  consumer_weight: torch.Tensor | None = None) -> None:
    """Keep, in every expert of ``block``'s mixture of experts, the neurons ``kept_neurons`` (flat indices ``e * I +
    j``, the same number per expert, see :func:`expert_neurons`): each expert's producer rows (its layout's
    :func:`kept_rows`) and consumer columns, or ``consumer_weight`` (experts x out x kept: the refit)."""
    experts = spec.experts
    assert experts is not None
    module = get_submodule(block, experts.path)
    down = expert_parameter(block, experts, spec.mlp_consumer)
    num, out, total = down.shape
    local = _local_neurons(kept_neurons, num, total, f"kept neurons of {spec.mlp_consumer}")
    per = local.shape[1]
    if consumer_weight is not None and tuple(consumer_weight.shape) != (num, out, per):
        raise SurgeryError(f"{spec.mlp_consumer} refit weight has shape {tuple(consumer_weight.shape)}, "
                           f"expected {(num, out, per)}")
    new = {}
    for p in spec.producers("mlp"):
        param = expert_parameter(block, experts, p.path)
        if param.shape[1] != structure_stride(p.segments, 1, 1) * total:
            raise SurgeryError(f"{p.path} has {param.shape[1]} rows per expert, but its row layout {p.segments} "
                               f"needs {structure_stride(p.segments, 1, 1)} per neuron for {total} neurons")
        rows = [kept_rows(p.segments, p.interleaved, local[e], total, 1, 1).to(param.device) for e in range(num)]
        new[p.path] = torch.stack([param[e].index_select(0, rows[e]) for e in range(num)])
    idx = local.to(down.device)
    new[spec.mlp_consumer] = (torch.stack([down[e].index_select(1, idx[e]) for e in range(num)])
                              if consumer_weight is None else consumer_weight.to(down))
    with torch.no_grad():
        for path, tensor in new.items():
            old = expert_parameter(block, experts, path)
            setattr(module, expert_parameter_name(experts, path), nn.Parameter(tensor.contiguous(), old.requires_grad))
    _set_count_attrs(block, spec, {"ffn": per})


def block_shape(block: nn.Module, spec: ArchSpec, *, n_rep: int, head_dim: int) -> dict[str, int]:
    """The current structure counts of a block, read from its weights: the query heads from the output projection's
    inputs, the KV heads from the rows of the producers that hold them (``n_rep`` is unused: a block may keep fewer
    query heads per KV head than the model's ratio); with a shared expert, its width too (``shared_ffn_dim``)."""
    attention = get_submodule(block, spec.attention)
    heads = get_submodule(attention, spec.o_proj).in_features // head_dim
    kv_heads = 0
    for producer, linear in part_producers(block, spec)["attention"]:
        kv_rows = sum(rows_per_structure(kind, 1, head_dim) for kind in producer.segments if kind != "q")
        if kv_rows:
            kv_heads = (linear.out_features - producer.segments.count("q") * heads * head_dim) // kv_rows
            break
    shape = {
        "num_key_value_heads": kv_heads,
        "num_attention_heads": heads,
        "ffn_dim": (get_submodule(block, spec.mlp_consumer).in_features if spec.experts is None
                    else expert_parameter(block, spec.experts, spec.mlp_consumer).shape[2]),
    }
    shared = spec.shared_expert_spec()
    if shared is not None:
        shape["shared_ffn_dim"] = get_submodule(block, shared.mlp_consumer).in_features
    return shape


def resize_block(block: nn.Module, spec: ArchSpec, shape: dict[str, int], *, n_rep: int, head_dim: int) -> None:
    """Shrink ``block`` to ``shape`` (a :func:`block_shape` dict) by keeping its first structures: the first
    ``num_key_value_heads`` KV groups, the first ``num_attention_heads / num_key_value_heads`` query heads of each,
    the first neurons (of every expert, and of a shared expert).

    Meant for a skeleton about to receive a pruned checkpoint's weights (on the meta device, where slicing
    costs nothing): the values are overwritten by the loaded weights, only the sizes matter. A block with no
    KV head left becomes an :class:`EmptyAttention`. Asking for more structures than the block has, or for a
    head count that is not 1 to ``n_rep`` times the KV-head count, raises ``SurgeryError``.
    """
    current = block_shape(block, spec, n_rep=n_rep, head_dim=head_dim)
    heads, kv, ffn = int(shape["num_attention_heads"]), int(shape["num_key_value_heads"]), int(shape["ffn_dim"])
    if not (heads == kv == 0 or (kv > 0 and heads % kv == 0 and 1 <= heads // kv <= n_rep)):
        raise SurgeryError(
            f"target shape {shape} does not have the same number of query heads, 1 to {n_rep} as the model's config "
            "implies, for every KV head")
    if set(shape) != set(current):
        raise SurgeryError(f"target shape {shape} must have exactly the keys {sorted(current)} of spec {spec.name!r}")
    if kv > current["num_key_value_heads"] or any(shape[k] > current[k] for k in ("ffn_dim", "shared_ffn_dim")
                                                   if k in current):
        raise SurgeryError(f"cannot grow a block of shape {current} to {shape}: the config and the shapes disagree")
    if heads < current["num_attention_heads"]:
        groups = torch.arange(kv, device="cpu")
        prune_attention(block, spec, groups, n_rep=n_rep, head_dim=head_dim, num_groups=current["num_key_value_heads"],
                        kept_heads=kept_query_heads(groups, n_rep, heads // kv if kv else 0))
    if ffn < current["ffn_dim"]:
        kept = torch.arange(ffn, device="cpu")
        if spec.experts is not None:  # the first ffn neurons of every expert
            num = expert_parameter(block, spec.experts, spec.mlp_consumer).shape[0]
            kept = expert_neurons(kept.expand(num, ffn), current["ffn_dim"])
        prune_mlp(block, spec, kept)
    shared = spec.shared_expert_spec()
    if shared is not None and shape["shared_ffn_dim"] < current["shared_ffn_dim"]:
        prune_mlp(block, shared, torch.arange(int(shape["shared_ffn_dim"]), device="cpu"))
