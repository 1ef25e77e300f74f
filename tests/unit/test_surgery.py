"""Surgery against the masked dense model: slicing must not change what the model computes."""

import copy

import pytest
import torch

from osscar_hf.arch import get_spec
from osscar_hf.errors import SurgeryError
from osscar_hf.surgery import EmptyAttention, group_channels, prune_attention, prune_mlp, slice_linear_inputs
from tests.conftest import MODEL_KINDS, VOCAB, make_model


def _prune_and_mask(model, kept_per_block, seed=0):
    """Prune ``model`` per ``kept_per_block`` with random refit weights; return the masked dense twin."""
    spec = get_spec(model)
    m, n_rep, hd = spec.group_geometry(model.config)
    masked = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for block, masked_block, (groups, neurons) in zip(
        model.get_submodule(spec.blocks), masked.get_submodule(spec.blocks), kept_per_block
    ):
        groups, neurons = torch.tensor(groups, dtype=torch.long), torch.tensor(neurons, dtype=torch.long)
        o_proj = masked_block.get_submodule(f"{spec.attention}.{spec.o_proj}")
        down = masked_block.get_submodule(spec.mlp_consumer)
        cols = group_channels(groups, n_rep * hd)
        o_new = torch.randn(o_proj.out_features, cols.numel(), generator=gen) * 0.2
        d_new = torch.randn(down.out_features, neurons.numel(), generator=gen) * 0.2
        with torch.no_grad():
            o_full = torch.zeros_like(o_proj.weight)
            o_full[:, cols] = o_new
            o_proj.weight.copy_(o_full)
            d_full = torch.zeros_like(down.weight)
            d_full[:, neurons] = d_new
            down.weight.copy_(d_full)
        prune_attention(block, spec, groups, n_rep=n_rep, head_dim=hd, num_groups=m, o_weight=o_new)
        prune_mlp(block, spec, neurons, consumer_weight=d_new)
    return masked


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_pruned_logits_equal_masked_dense(kind):
    model = make_model(kind)
    spec = get_spec(model)
    m = spec.group_geometry(model.config)[0]
    ffn = spec.ffn_dim(model.config)
    # Block 0 keeps some structures, block 1 keeps a different subset.
    kept = [(list(range(0, m, 2)), [1, 2, 5, 7, 10, 20, 33, ffn - 1]), ([m - 1], list(range(0, ffn, 3)))]
    masked = _prune_and_mask(model, kept)
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = model(ids).logits, masked(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # The pruned model really is smaller.
    block = model.get_submodule(spec.blocks)[0]
    assert block.get_submodule(spec.mlp_consumer).in_features == len(kept[0][1])
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_empty_attention_and_empty_mlp_still_run(kind):
    model = make_model(kind)
    spec = get_spec(model)
    m = spec.group_geometry(model.config)[0]
    kept = [([], [3, 4]), (list(range(m)), [])]  # block 0 loses every head, block 1 every neuron
    masked = _prune_and_mask(model, kept)
    blocks = model.get_submodule(spec.blocks)
    attention = blocks[0].get_submodule(spec.attention)
    assert isinstance(attention, EmptyAttention)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
    # The emptied parts hold no weights, yet keep every state-dict key (zero-width tensors under the original
    # names), so a checkpoint of the pruned model has the stock layout.
    state, dense_state = model.state_dict(), masked.state_dict()
    assert state.keys() == dense_state.keys()
    emptied = [f"{spec.blocks}.0.{spec.attention}.{name}.weight" for name in (spec.q_proj, spec.k_proj, spec.v_proj,
                                                                                spec.o_proj)]
    emptied += [f"{spec.blocks}.1.{path}.weight" for path in (*spec.mlp_producers, spec.mlp_consumer)]
    for key in emptied:
        assert state[key].numel() == 0 and state[key].shape != dense_state[key].shape, key
    for path, count in spec.module_count_attrs.items():  # the sizes the modules hold say "no neuron left"
        owner, _, attr = path.rpartition(".")
        if count == "ffn":
            assert getattr(blocks[1].get_submodule(owner), attr) == 0
    # An attention with no head adds its output projection's bias (or nothing) to the residual stream.
    hidden = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, weights = attention(hidden)
    o_bias = attention.get_submodule(spec.o_proj).bias
    expected = torch.zeros_like(hidden) if o_bias is None else o_bias.detach().expand_as(hidden)
    assert torch.equal(out, expected) and weights is None


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("empty_first", [False, True])
def test_generate_with_kv_cache_matches_masked_dense(kind, empty_first):
    model = make_model(kind)
    spec = get_spec(model)
    m = spec.group_geometry(model.config)[0]
    first = [] if empty_first else [0]
    kept = [(first, list(range(0, 48, 2))), (list(range(1, m)), list(range(1, 48, 2)))]
    masked = _prune_and_mask(model, kept, seed=3)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=1)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        ref = masked.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached.sequences, ref.sequences)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b, c in zip(cached.logits, ref.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    # A decoding loop of one's own, without generate: the positions of the next token come from the cache's length,
    # which a block with no head keeps too.
    with torch.no_grad():
        prefix = model(cached.sequences[:, :9], use_cache=True)
        assert prefix.cache.get_seq_length() == 9
        step = model(cached.sequences[:, 9:10], cache=prefix.cache).logits[:, -1]
        torch.testing.assert_close(step, model(cached.sequences[:, :10]).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_bad_indices_raise_and_leave_module_untouched():
    model = make_model("llama-gqa")
    spec = get_spec(model)
    block = model.get_submodule(spec.blocks)[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"\[5\] are outside \[0, 2\)"):
        prune_attention(block, spec, torch.tensor([0, 5]), n_rep=2, head_dim=8, num_groups=2)
    with pytest.raises(SurgeryError, match="strictly increasing"):
        prune_mlp(block, spec, torch.tensor([3, 1]))
    with pytest.raises(SurgeryError, match="expected"):
        prune_mlp(block, spec, torch.tensor([1, 3]), consumer_weight=torch.zeros(32, 5))
    after = block.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_slice_linear_inputs_keeps_bias_and_updates_features():
    lin = torch.nn.Linear(6, 3)
    bias = lin.bias.detach().clone()
    cols = lin.weight.detach()[:, [1, 4]].clone()
    slice_linear_inputs(lin, torch.tensor([1, 4]))
    assert lin.in_features == 2 and lin.weight.shape == (3, 2)
    assert torch.equal(lin.weight.detach(), cols) and torch.equal(lin.bias.detach(), bias)
