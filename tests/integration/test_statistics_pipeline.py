"""What the pipeline hands a method for each consumer, under ``propagate`` and ``dense_targets``
(ALGORITHM.md section 5), against the same statistics computed by hand from the dense and pruned models.

The seam is :meth:`PruningMethod.select`: every call is recorded (a copy of its :class:`LayerStatistics`) and the
real method then runs, so the pipeline prunes as usual. The hand computation needs no pipeline code: forward
pre-hooks on the consumers of a plain model forward.

* The dense stream: the consumers' inputs of the dense model.
* The pruned stream at block 1: the same of a "hybrid" model, the dense model with block 0 swapped for the
  pruned model's block 0 (block 1 is still dense when its statistics are accumulated).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn as nn

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.arch import ArchSpec, get_spec
from osscar_hf.methods import LayerProblem, LayerStatistics, Selection, get_method
from tests.conftest import VOCAB, make_model

PARTS = ("attention", "mlp")
WINDOWS = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(11))
SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu", attention_sparsity=0.5, mlp_sparsity=0.5)

Inputs = dict[tuple[int, str], torch.Tensor]  # (block, part) -> consumer inputs (tokens, channels), float64


def _consumer_paths(spec: ArchSpec) -> dict[str, str]:
    return {"attention": f"{spec.attention}.{spec.o_proj}", "mlp": spec.mlp_consumer}


def consumer_inputs(model: nn.Module, ids: torch.Tensor) -> Inputs:
    """Every block's consumer inputs on ``ids`` in one forward, recorded by forward pre-hooks."""
    spec = get_spec(model)
    seen: Inputs = {}
    handles = []
    for b, block in enumerate(model.get_submodule(spec.blocks)):
        for part, path in _consumer_paths(spec).items():
            def hook(_module: nn.Module, args: tuple[Any, ...], key: tuple[int, str] = (b, part)) -> None:
                seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

            handles.append(block.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def with_pruned_first_block(dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """A copy of the dense model whose block 0 is a copy of the pruned model's block 0."""
    spec = get_spec(dense)
    hybrid = copy.deepcopy(dense)
    hybrid.get_submodule(spec.blocks)[0] = copy.deepcopy(pruned.get_submodule(spec.blocks)[0])
    return hybrid


def gram(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``a^T b / N`` (``b = a`` by default): the running means the pipeline keeps."""
    return a.T @ (a if b is None else b) / a.shape[0]


@contextmanager
def recording(method: str) -> Iterator[list[tuple[int, LayerStatistics]]]:
    """Record (consumer width, copy of the statistics) of every ``select`` call of ``method``, in call order."""
    cls = type(get_method(method))
    real = cls.select
    calls: list[tuple[int, LayerStatistics]] = []

    def select(self: Any, problem: LayerProblem) -> Selection:
        s = problem.statistics
        kept = {name: None if getattr(s, name) is None else getattr(s, name).detach().double().clone()
                for name in ("gram", "cross_gram", "mean", "mean_square")}
        calls.append((problem.weight.shape[1], LayerStatistics(**kept, tokens=s.tokens)))
        return real(self, problem)

    cls.select = select
    try:
        yield calls
    finally:
        cls.select = real


def prune_recorded(kind: str, method: str, **options: Any) -> tuple[nn.Module, nn.Module, dict]:
    """(dense copy, pruned model, {(block, part): statistics the method was given})."""
    # Weights ten times the default scale: a pruned block then moves the next block's inputs well beyond the
    # float32 noise of the running means (at the default scale an OPT block barely changes its residual stream).
    dense = make_model(kind, init_std=0.2, initializer_range=0.2)
    original = copy.deepcopy(dense)
    config = OsscarConfig(dataset=WINDOWS, method=method, **SMALL, **options)
    with recording(method) as calls:
        pruned = OsscarPruner(config).prune(dense, progress=False)
    spec = get_spec(original)
    widths = {"attention": spec.num_heads(original.config) * spec.head_dim(original.config),
              "mlp": spec.ffn_dim(original.config)}
    keys = [(b, part) for b in range(original.config.num_hidden_layers) for part in PARTS]
    assert [width for width, _ in calls] == [widths[part] for _, part in keys]
    return original, pruned, {key: stats for key, (_, stats) in zip(keys, calls)}


def assert_matches(got: torch.Tensor | None, expected: torch.Tensor, what: str) -> None:
    """Float32 running means against float64 by hand: relative to the matrix's scale."""
    assert got is not None, f"{what}: not handed to the method"
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def assert_differs(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """The two candidate statistics are far apart, so matching one of them discriminates."""
    gap = (a - b).abs().max().item()
    assert gap > 1e-2 * b.abs().max().item(), f"{what}: the two streams give the same statistics; no test"


def _streams(original: nn.Module, pruned: nn.Module) -> tuple[Inputs, Inputs]:
    """(dense stream, pruned stream) consumer inputs; the pruned one only at block 1."""
    dense = consumer_inputs(original, WINDOWS)
    hybrid = consumer_inputs(with_pruned_first_block(original, pruned), WINDOWS)
    return dense, {key: x for key, x in hybrid.items() if key[0] == 1}


@pytest.mark.parametrize("kind", ["opt", "llama-gqa"])
@pytest.mark.parametrize("propagate", [True, False])
def test_the_gram_comes_from_the_stream_propagate_names(kind, propagate):
    """propagate=True: block 1's Gram is that of the pruned block 0's outputs; propagate=False: of the dense
    model's own activations. Block 0 sees the calibration inputs either way; no cross-Gram without dense targets."""
    original, pruned, given = prune_recorded(kind, "osscar", propagate=propagate)
    dense, pruned_stream = _streams(original, pruned)
    for part in PARTS:
        assert_differs(gram(pruned_stream[1, part]), gram(dense[1, part]), part)
        assert_matches(given[0, part].gram, gram(dense[0, part]), f"block 0 {part} Gram")
        expected = pruned_stream[1, part] if propagate else dense[1, part]
        assert_matches(given[1, part].gram, gram(expected), f"block 1 {part} Gram")
        assert given[0, part].cross_gram is None and given[1, part].cross_gram is None
        assert given[1, part].tokens == WINDOWS.numel()


@pytest.mark.parametrize("kind", ["opt", "llama-gqa"])
def test_dense_targets_hand_over_the_cross_gram_of_the_two_streams(kind):
    """dense_targets=True: the Gram is the pruned stream's, the cross-Gram X_pruned^T X_dense / N pairs it with
    the dense model's own activations (at block 0 the two streams are the same)."""
    original, pruned, given = prune_recorded(kind, "osscar", dense_targets=True)
    dense, pruned_stream = _streams(original, pruned)
    for part in PARTS:
        assert_matches(given[0, part].gram, gram(dense[0, part]), f"block 0 {part} Gram")
        assert_matches(given[0, part].cross_gram, gram(dense[0, part]), f"block 0 {part} cross-Gram")
        expected_cross = gram(pruned_stream[1, part], dense[1, part])
        assert_differs(expected_cross, gram(pruned_stream[1, part]), part)
        assert_differs(expected_cross, expected_cross.T, part)  # the order of the two streams shows
        assert_matches(given[1, part].gram, gram(pruned_stream[1, part]), f"block 1 {part} Gram")
        assert_matches(given[1, part].cross_gram, expected_cross, f"block 1 {part} cross-Gram")


@pytest.mark.parametrize("propagate", [True, False])
def test_moments_come_from_the_stream_propagate_names(propagate):
    """The score methods' moments (E[x], E[x^2] per channel) follow ``propagate`` too."""
    original, pruned, given = prune_recorded("llama-gqa", "wanda_sp", propagate=propagate)
    dense, pruned_stream = _streams(original, pruned)
    for part in PARTS:
        expected = pruned_stream[1, part] if propagate else dense[1, part]
        assert_differs(pruned_stream[1, part].pow(2).mean(0), dense[1, part].pow(2).mean(0), part)
        assert_matches(given[1, part].mean, expected.mean(0), f"block 1 {part} mean")
        assert_matches(given[1, part].mean_square, expected.pow(2).mean(0), f"block 1 {part} mean square")
        assert given[1, part].gram is None and given[1, part].cross_gram is None
