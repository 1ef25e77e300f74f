"""The OSSCAR layer-wise solver: pure functions on torch tensors (no modules, hooks or I/O).

    H = new_gram(p)
    count = 0
    for X in batches:                      # the consumer layer's inputs, (..., p)
        count = accumulate_gram(H, count, X)
    solution = solve_layer(H, linear.weight.T, group_size=1, num_keep=p // 2, step=10, swap_size=10)

See ALGORITHM.md for the math: stage A (greedy backward elimination, :mod:`.elimination`), stage B
(local search by swaps, :mod:`.local_search`), both on the swept system of :mod:`.sweep`. Memory: the solve
works in one ``p x p`` buffer (:mod:`.packed`: the swept system in its lower triangle, H untouched in its
upper one) plus ``O(p q)``; with ``in_place=True`` that buffer is H's own storage, lent for the call.
"""

from __future__ import annotations

from osscar_hf.solver.gram import accumulate_cross_gram, accumulate_gram, new_gram
from osscar_hf.solver.layer import LayerSolution, solve_layer
from osscar_hf.solver.patches import conv_rows

__all__ = ["LayerSolution", "accumulate_cross_gram", "accumulate_gram", "conv_rows", "new_gram", "solve_layer"]
