"""Producers as data: which output rows of a separate, fused or interleaved projection belong to which structure
(``kept_rows``, shared by the surgery and the remote-code template), and the spec checks of such layouts."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from osscar_hf.arch import LLAMA_FAMILY, ArchSpec, Producer
from osscar_hf.errors import SurgeryError
from osscar_hf.remote_code.configuration_osscar import OsscarCountView, kept_rows, set_count
from osscar_hf.surgery import block_shape, group_channels, prune_attention, prune_mlp

M, N_REP, HD = 3, 2, 2  # KV groups, query heads per group, head_dim


def _labels(segments, interleaved, total, n_rep, head_dim):
    """(kind, structure, offset) of every output row of a producer, built row by row from the layout's meaning."""
    width = {"q": n_rep * head_dim, "k": head_dim, "v": head_dim, "neurons": 1}
    if interleaved:
        return [(kind, s, o) for s in range(total) for kind in segments for o in range(width[kind])]
    return [(kind, s, o) for kind in segments for s in range(total) for o in range(width[kind])]


@pytest.mark.parametrize("segments,interleaved", [
    (("q",), False), (("k",), False), (("q", "k", "v"), False), (("q", "k", "v"), True),
    (("neurons", "neurons"), False), (("neurons",), False)])
@pytest.mark.parametrize("kept", [[], [1], [0, 2], [0, 1, 2]])
def test_kept_rows_are_the_rows_of_the_kept_structures(segments, interleaved, kept):
    n_rep, head_dim = (1, 1) if segments[0] == "neurons" else (N_REP, HD)
    labels = _labels(segments, interleaved, M, n_rep, head_dim)
    rows = kept_rows(segments, interleaved, torch.tensor(kept, dtype=torch.int64), M, n_rep, head_dim)
    assert rows.dtype == torch.int64 and rows.tolist() == sorted(rows.tolist())
    assert [labels[r] for r in rows.tolist()] == [label for label in labels if label[1] in kept]


@pytest.mark.parametrize("segments,interleaved", [(("q",), False), (("k",), False), (("q", "k", "v"), False),
                                                  (("q", "k", "v"), True)])
@pytest.mark.parametrize("kept,heads", [([0, 2], [1, 5]), ([1], [2, 3]), ([0, 1, 2], [0, 2, 4]), ([], [])])
def test_kept_rows_of_kept_query_heads_are_those_heads_and_the_groups_kv_rows(segments, interleaved, kept, heads):
    """With some query heads of each kept group: the q rows of exactly those heads (head h is the (h % n_rep)-th
    of group h // n_rep), every k and v row of the kept groups."""
    labels = _labels(segments, interleaved, M, N_REP, HD)
    rows = kept_rows(segments, interleaved, torch.tensor(kept, dtype=torch.int64), M, N_REP, HD,
                     torch.tensor(heads, dtype=torch.int64))
    assert rows.tolist() == sorted(rows.tolist())

    def wanted(label):
        kind, structure, offset = label
        if kind == "q":
            return structure * N_REP + offset // HD in heads
        return structure in kept

    assert [labels[r] for r in rows.tolist()] == [label for label in labels if wanted(label)]


def test_separate_projections_keep_what_they_always_kept():
    kept = torch.tensor([0, 2])
    assert torch.equal(kept_rows(("q",), False, kept, M, N_REP, HD), group_channels(kept, N_REP * HD))
    assert torch.equal(kept_rows(("v",), False, kept, M, N_REP, HD), group_channels(kept, HD))
    assert torch.equal(kept_rows(("neurons",), False, kept, M, 1, 1), kept)


class _Block(nn.Module):
    """A block with one fused attention producer and one fused MLP producer, rows labelled by their index."""

    def __init__(self, interleaved: bool) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(4, M * (N_REP + 2) * HD, bias=True)
        self.attn.out = nn.Linear(M * N_REP * HD, 4)
        self.attn.heads = M * N_REP
        self.up = nn.Linear(4, 2 * 5)
        self.down = nn.Linear(5, 4)
        with torch.no_grad():
            for linear in (self.attn.qkv, self.up):
                linear.weight.copy_(torch.arange(linear.out_features, dtype=torch.float32)[:, None].expand(-1, 4))
                linear.bias.copy_(torch.arange(linear.out_features, dtype=torch.float32))


def _fused_spec(interleaved: bool) -> ArchSpec:
    return ArchSpec(name="fused", model_types=("fused",), blocks="layers", attention="attn",
                    attention_producers=(Producer("qkv", ("q", "k", "v"), interleaved),), o_proj="out",
                    mlp_producers=(Producer("up", ("neurons", "neurons")),), mlp_consumer="down",
                    module_count_attrs={"attn.heads": "heads"})


@pytest.mark.parametrize("interleaved", [False, True])
def test_surgery_slices_fused_and_interleaved_producers_by_their_layout(interleaved):
    block, spec = _Block(interleaved), _fused_spec(interleaved)
    assert spec.problems() == []
    labels = _labels(("q", "k", "v"), interleaved, M, N_REP, HD)
    prune_attention(block, spec, torch.tensor([0, 2]), n_rep=N_REP, head_dim=HD, num_groups=M)
    kept = [i for i, label in enumerate(labels) if label[1] in (0, 2)]
    assert block.attn.qkv.weight[:, 0].tolist() == kept and block.attn.qkv.bias.tolist() == kept
    assert block.attn.out.in_features == 2 * N_REP * HD and block.attn.heads == 2 * N_REP
    prune_mlp(block, spec, torch.tensor([1, 4]))
    assert block.up.bias.tolist() == [1, 4, 6, 9] and block.down.in_features == 2  # [gate | up]
    assert block_shape(block, spec, n_rep=N_REP, head_dim=HD) == {
        "num_key_value_heads": 2, "num_attention_heads": 4, "ffn_dim": 2}
    with pytest.raises(SurgeryError, match=r"attn.qkv has 16 outputs, but its row layout \('q', 'k', 'v'\) needs 8"):
        prune_attention(block, spec, torch.tensor([0]), n_rep=N_REP, head_dim=HD, num_groups=4)


@pytest.mark.parametrize("change,message", [
    ({"attention_producers": (Producer("qkv_proj", ("q", "k")),), "q_proj": None, "k_proj": None, "v_proj": None},
     "must hold each of the segments 'q', 'k', 'v'"),
    ({"attention_producers": (Producer("qkv_proj", ("q", "k", "v")),)}, "either as q_proj/k_proj/v_proj or as"),
    ({"mlp_producers": (Producer("mlp.up_proj", ("q",)),)}, "mlp_producers must be a non-empty tuple"),
    ({"q_proj": None, "k_proj": None, "v_proj": None}, "needs q_proj, k_proj and v_proj, or attention_producers"),
])
def test_malformed_layouts_are_named(change, message):
    assert any(message in problem for problem in dataclasses.replace(LLAMA_FAMILY, **change).problems())


def test_a_count_in_a_shared_config_is_overridden_in_a_private_view():
    shared = type("Config", (), {})()
    shared.num_attention_heads, shared.other = 4, "a"
    module = nn.Module()
    module.config = shared
    block = nn.Module()
    block.attn = module
    set_count(block, "attn.config.num_attention_heads", 2)
    view = module.config
    assert isinstance(view, OsscarCountView) and view.num_attention_heads == 2 and shared.num_attention_heads == 4
    shared.other = "b"  # later changes of the shared config reach the module; writes go to the shared config
    view.other2 = "c"
    assert view.other == "b" and shared.other2 == "c"
    copied = copy.deepcopy(block)
    assert copied.attn.config.num_attention_heads == 2 and copied.attn.config.other == "b"
    set_count(block, "attn.config.num_attention_heads", 1)
    assert module.config is view and view.num_attention_heads == 1 and shared.num_attention_heads == 4
