"""What each structure of a decoder block costs: parameters, and multiply-adds per token.

Read from the block modules' shapes (real or on the meta device, so a skeleton built from ``config.json`` is
enough): no weight is read. Budgets count the decoder blocks only; embeddings, final norm and LM head are never
pruned and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..arch import ArchSpec, AttentionLayout, Producer, attention_layout, get_submodule
from ..arch.experts import expert_parameter, shared_expert_keep
from ..remote_code.configuration_osscar import structure_stride
from ..surgery import part_linears, part_producers

__all__ = ["BlockGeometry", "block_geometries"]


@dataclass(frozen=True)
class BlockGeometry:
    """One decoder block: its structure counts and what one structure of each part costs.

    ``attention_params`` / ``mlp_params``: parameters of one attention structure (its q/k/v rows, biases included,
    and its output-projection columns) / one FFN neuron (its producer rows with biases, its consumer column).
    ``attention_base_params``: parameters the attention has as long as it keeps any structure and loses with the
    last one (the key and value heads, when the structures are query heads; 0 for KV groups, which own theirs).
    ``fixed_params``: the rest of the block (norms, the consumers' biases), which pruning never removes.
    ``attention_flops`` / ``mlp_flops`` / ``attention_base_flops``: the same in multiply-adds per token: the
    weights, plus for attention the scores and the weighted sum of values over the context (``2 * query heads *
    head_dim * context``, with the mean context of a causal window of ``seq_len`` tokens, ``(seq_len + 1) / 2``).
    ``shared_structures`` / ``shared_params`` / ``shared_flops``: a mixture of experts' shared expert (0 without one):
    its neurons and what one costs; it keeps the routed experts' fraction of them (:meth:`shared_kept`), so
    :meth:`unit_costs` counts its share in an MLP structure. ``attention_fixed``: the family's attention cannot be
    pruned (``ArchSpec.attention_fixed``): every plan keeps all its structures.
    """

    attention_structures: int
    mlp_structures: int
    attention_params: int
    mlp_params: int
    fixed_params: int
    attention_flops: float
    mlp_flops: float
    attention_base_params: int = 0
    attention_base_flops: float = 0.0
    shared_structures: int = 0
    shared_params: int = 0
    shared_flops: float = 0.0
    attention_fixed: bool = False

    def shared_kept(self, mlp: int) -> int:
        """Neurons a shared expert keeps beside ``mlp`` per routed expert (:func:`shared_expert_keep`)."""
        return shared_expert_keep(mlp, self.mlp_structures, self.shared_structures)

    def params(self, attention: int, mlp: int) -> int:
        """Parameters of the block when it keeps ``attention`` structures and ``mlp`` neurons."""
        base = self.attention_base_params if attention > 0 else 0
        shared = self.shared_kept(mlp) * self.shared_params
        return self.fixed_params + base + attention * self.attention_params + mlp * self.mlp_params + shared

    def flops(self, attention: int, mlp: int) -> float:
        """Multiply-adds per token of the block's linears and attention when it keeps those structures."""
        base = self.attention_base_flops if attention > 0 else 0.0
        return base + attention * self.attention_flops + mlp * self.mlp_flops + self.shared_kept(mlp) * self.shared_flops

    def cost(self, target: str, attention: int, mlp: int) -> float:
        """``params`` or ``flops`` (``target``) of the block at those sizes."""
        return self.params(attention, mlp) if target == "params" else self.flops(attention, mlp)

    def unit_costs(self, target: str) -> dict[str, float]:
        """What one structure of each part costs under ``target`` (the attention's base aside)."""
        ratio = self.shared_structures / self.mlp_structures if self.mlp_structures else 0.0  # a shared expert's share
        if target == "params":
            return {"attention": float(self.attention_params), "mlp": self.mlp_params + ratio * self.shared_params}
        return {"attention": self.attention_flops, "mlp": self.mlp_flops + ratio * self.shared_flops}

    def base_costs(self, target: str) -> dict[str, float]:
        """What each part loses with its last structure besides that structure's cost, under ``target``."""
        base = self.attention_base_params if target == "params" else self.attention_base_flops
        return {"attention": float(base), "mlp": 0.0}


def _rows_cost(linear: nn.Linear, rows: int, with_bias: bool) -> int:
    return rows * (linear.in_features + (1 if (linear.bias is not None or with_bias) else 0))


def _attention_rows(producer: Producer, layout: AttentionLayout) -> tuple[int, int]:
    """Output rows of an attention producer (per structure, and the base's): a KV group owns its q, k and v rows;
    a query-head structure owns one q head of every KV group, and the k and v rows are the base."""
    if not layout.query_heads:
        return structure_stride(producer.segments, layout.n_rep, layout.head_dim), 0
    q = producer.segments.count("q")
    return q * layout.kv_heads * layout.head_dim, (len(producer.segments) - q) * layout.kv_heads * layout.head_dim


def _mlp_costs(block: nn.Module, spec: ArchSpec, config: object, with_biases: bool) -> tuple[int, int, float]:
    """(neurons, parameters of one, its multiply-adds per token) of a block's MLP. A mixture of experts' structure
    is one neuron of every expert (each keeps the same count): its parameters in every expert, its multiply-adds in
    the experts a token is routed to."""
    if spec.experts is None:
        producers = part_producers(block, spec)["mlp"]
        consumer = get_submodule(block, spec.mlp_consumer)
        bias = with_biases or consumer.bias is not None
        rows = [(structure_stride(p.segments, 1, 1), lin) for p, lin in producers]
        params = sum(_rows_cost(lin, r, bias) for r, lin in rows) + consumer.out_features
        flops = sum(lin.in_features * r for r, lin in rows) + consumer.out_features
        return consumer.in_features, params, float(flops)
    down = expert_parameter(block, spec.experts, spec.mlp_consumer)
    experts, hidden, neurons = down.shape
    one = sum(expert_parameter(block, spec.experts, p.path).shape[2] * structure_stride(p.segments, 1, 1)
              for p in spec.producers("mlp")) + hidden
    per_token = int(getattr(config, spec.experts.config_per_token))
    return neurons, experts * one, float(per_token * one)


def block_geometries(model: nn.Module, spec: ArchSpec, *, seq_len: int, with_biases: bool = False,
                     attention_structure: str = "kv_groups") -> list[BlockGeometry]:
    """The geometry of every decoder block of ``model`` (dense shapes; a meta skeleton will do).

    ``with_biases``: count the biases a bias-compensating method gives every linear (see
    :func:`osscar_hf.surgery.add_part_biases`) as if they were there. ``attention_structure``: what one attention
    structure is (:class:`~osscar_hf.arch.AttentionLayout`).
    """
    layout = attention_layout(spec, model.config, attention_structure)
    q_columns = layout.group_size * layout.solver_groups // layout.structures  # o_proj inputs per structure
    out = []
    for block in get_submodule(model, spec.blocks):
        linears = part_linears(block, spec)
        producers = part_producers(block, spec)
        o = linears["attention"][-1]
        attention_bias = with_biases or o.bias is not None
        attention_rows = [(_attention_rows(p, layout), lin) for p, lin in producers["attention"]]
        attention_params = (sum(_rows_cost(lin, r, attention_bias) for (r, _), lin in attention_rows)
                            + o.out_features * q_columns)
        base_params = sum(_rows_cost(lin, b, attention_bias) for (_, b), lin in attention_rows)
        neurons, mlp_params, mlp_flops = _mlp_costs(block, spec, model.config, with_biases)
        shared_spec = spec.shared_expert_spec()
        shared = _mlp_costs(block, shared_spec, model.config, False) if shared_spec is not None else (0, 0, 0.0)
        total = sum(p.numel() for p in block.parameters())
        extra = 0
        if with_biases:  # biases the method will add to linears that have none yet
            extra = sum(lin.out_features for part in linears.values() for lin in part if lin.bias is None)
        fixed = (total + extra - layout.structures * attention_params - base_params - neurons * mlp_params
                 - shared[0] * shared[1])
        context = (seq_len + 1) / 2
        attention_weights = sum(lin.in_features * r for (r, _), lin in attention_rows) + o.out_features * q_columns
        out.append(BlockGeometry(
            attention_structures=layout.structures, mlp_structures=neurons, attention_params=attention_params,
            mlp_params=mlp_params, fixed_params=fixed, attention_flops=attention_weights + 2 * q_columns * context,
            mlp_flops=mlp_flops,
            attention_base_params=base_params,
            attention_base_flops=float(sum(lin.in_features * b for (_, b), lin in attention_rows)),
            shared_structures=shared[0], shared_params=shared[1], shared_flops=shared[2],
            attention_fixed=spec.attention_fixed is not None,
        ))
    return out
