"""Budgets: how many structures every decoder block keeps.

- :mod:`.geometry`: what one structure of each part costs (parameters, multiply-adds per token);
- :mod:`.plan`: sizes from the config (uniform fractions, explicit sizes, a uniform or global ``sparsity``);
- :mod:`.allocate`: spending a global budget on measured damage curves (OSSCAR's allocation);
- :mod:`.flap`: FLAP's global ranking of standardised scores;
- :mod:`.exchange`: budget-neutral exchanges between blocks' parts (OSSCAR's allocation search).

The measurements themselves run in the pipeline (:mod:`osscar_hf.pipeline.measure`).
"""

from .allocate import PartCurve, allocate, lower_hull
from .exchange import ExchangeBudget, propose_exchange
from .flap import flap_sizes, level_scores, standardised_structure_scores
from .geometry import BlockGeometry, block_geometries
from .plan import (
    allowed_sizes,
    check_budget,
    explicit_sizes,
    global_sizes,
    part_floor,
    part_floors,
    plan_fixed_sizes,
    round_neurons,
    uniform_budget_sizes,
    uses_global_allocation,
)
from .sizes import BlockSize

__all__ = [
    "BlockGeometry", "BlockSize", "ExchangeBudget", "PartCurve", "allocate", "allowed_sizes", "block_geometries", "check_budget",
    "explicit_sizes", "flap_sizes", "propose_exchange", "global_sizes", "level_scores", "lower_hull", "part_floor", "part_floors",
    "plan_fixed_sizes", "round_neurons", "standardised_structure_scores", "uniform_budget_sizes", "uses_global_allocation",
]
