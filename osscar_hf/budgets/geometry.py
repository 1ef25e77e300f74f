"""What each structure of a decoder block costs: parameters, and multiply-adds per token.

Read from the block modules' shapes (real or on the meta device, so a skeleton built from ``config.json`` is
enough): no weight is read. Budgets count the decoder blocks only; embeddings, final norm and LM head are never
pruned and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..arch import ArchSpec, get_submodule
from ..remote_code.configuration_osscar import structure_stride
from ..surgery import part_linears, part_producers

__all__ = ["BlockGeometry", "block_geometries"]


@dataclass(frozen=True)
class BlockGeometry:
    """One decoder block: its structure counts and what one structure of each part costs.

    ``attention_params`` / ``mlp_params``: parameters of one attention structure (its q/k/v rows, biases included,
    and its output-projection columns) / one FFN neuron (its producer rows with biases, its consumer column).
    ``fixed_params``: the rest of the block (norms, the consumers' biases), which pruning never removes.
    ``attention_flops`` / ``mlp_flops``: multiply-adds per token of one structure: its weights, plus for attention
    the scores and the weighted sum of values over the context (``2 * query heads * head_dim * context``, with the
    mean context of a causal window of ``seq_len`` tokens, ``(seq_len + 1) / 2``).
    """

    attention_structures: int
    mlp_structures: int
    attention_params: int
    mlp_params: int
    fixed_params: int
    attention_flops: float
    mlp_flops: float

    def params(self, attention: int, mlp: int) -> int:
        """Parameters of the block when it keeps ``attention`` structures and ``mlp`` neurons."""
        return self.fixed_params + attention * self.attention_params + mlp * self.mlp_params

    def flops(self, attention: int, mlp: int) -> float:
        """Multiply-adds per token of the block's linears and attention when it keeps those structures."""
        return attention * self.attention_flops + mlp * self.mlp_flops

    def cost(self, target: str, attention: int, mlp: int) -> float:
        """``params`` or ``flops`` (``target``) of the block at those sizes."""
        return self.params(attention, mlp) if target == "params" else self.flops(attention, mlp)

    def unit_costs(self, target: str) -> dict[str, float]:
        """What one structure of each part costs under ``target``."""
        if target == "params":
            return {"attention": float(self.attention_params), "mlp": float(self.mlp_params)}
        return {"attention": self.attention_flops, "mlp": self.mlp_flops}


def _rows_cost(linear: nn.Linear, rows: int, with_bias: bool) -> int:
    return rows * (linear.in_features + (1 if (linear.bias is not None or with_bias) else 0))


def block_geometries(model: nn.Module, spec: ArchSpec, *, seq_len: int, with_biases: bool = False
                     ) -> list[BlockGeometry]:
    """The geometry of every decoder block of ``model`` (dense shapes; a meta skeleton will do).

    ``with_biases``: count the biases a bias-compensating method gives every linear (see
    :func:`osscar_hf.surgery.add_part_biases`) as if they were there.
    """
    m, n_rep, head_dim = spec.group_geometry(model.config)
    out = []
    for block in get_submodule(model, spec.blocks):
        linears = part_linears(block, spec)
        producers = part_producers(block, spec)
        o, consumer = linears["attention"][-1], linears["mlp"][-1]
        attention_bias = with_biases or o.bias is not None
        mlp_bias = with_biases or consumer.bias is not None
        q_rows = n_rep * head_dim
        # Rows one structure owns in each producer (a KV group's q, k and v heads; a neuron's row of each).
        rows = {part: [(structure_stride(p.segments, n_rep, head_dim), lin) for p, lin in pairs]
                for part, pairs in producers.items()}
        attention_params = (sum(_rows_cost(lin, r, attention_bias) for r, lin in rows["attention"])
                            + o.out_features * q_rows)
        mlp_params = sum(_rows_cost(lin, r, mlp_bias) for r, lin in rows["mlp"]) + consumer.out_features
        neurons = consumer.in_features
        total = sum(p.numel() for p in block.parameters())
        extra = 0
        if with_biases:  # biases the method will add to linears that have none yet
            extra = sum(lin.out_features for part in linears.values() for lin in part if lin.bias is None)
        fixed = total + extra - m * attention_params - neurons * mlp_params
        context = (seq_len + 1) / 2
        attention_weights = sum(lin.in_features * r for r, lin in rows["attention"]) + o.out_features * q_rows
        out.append(BlockGeometry(
            attention_structures=m, mlp_structures=neurons, attention_params=attention_params, mlp_params=mlp_params,
            fixed_params=fixed, attention_flops=attention_weights + 2 * q_rows * context,
            mlp_flops=sum(lin.in_features * r for r, lin in rows["mlp"]) + consumer.out_features,
        ))
    return out
