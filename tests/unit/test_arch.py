import dataclasses
import re

import pytest
import torch

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.arch import LLAMA_FAMILY, OPT, get_spec, register_architecture, supported_model_types
from osscar_hf.arch.experts import Experts
from osscar_hf.arch.registry import MIXTRAL
from osscar_hf.errors import OsscarError, UnsupportedModelError
from osscar_hf.io import read_block_shapes
from tests.conftest import MODEL_KINDS, VOCAB, make_model


@pytest.mark.parametrize(
    "kind,spec_name,geometry",
    [("opt", "opt", (4, 1, 8)), ("llama-mha", "llama", (4, 1, 8)), ("llama-gqa", "llama", (2, 2, 8)),
     ("qwen2", "llama", (2, 2, 8)), ("mistral", "llama", (2, 2, 8)), ("qwen3", "llama", (2, 2, 16)),
     ("gemma", "gemma", (2, 2, 8)), ("gemma2", "gemma", (2, 2, 8)), ("gemma3-text", "gemma", (2, 2, 8))],
)
def test_spec_lookup_and_geometry(kind, spec_name, geometry):
    model = make_model(kind)
    spec = get_spec(model)
    assert spec.name == spec_name
    assert spec.group_geometry(model.config) == geometry
    # Every path named by the spec exists in a real block.
    block = model.get_submodule(spec.blocks)[0]
    attention = block.get_submodule(spec.attention)
    for name in (spec.q_proj, spec.k_proj, spec.v_proj, spec.o_proj):
        attention.get_submodule(name)
    for path in (*spec.mlp_producers, spec.mlp_consumer):
        block.get_submodule(path)
    assert block.get_submodule(spec.mlp_consumer).in_features == spec.ffn_dim(model.config)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_head_logits_are_the_models_logits(kind):
    """What the global allocation's loss is computed from: the last block's output through the spec's final modules
    and the logit soft cap (Gemma 2's; the tiny model's, 0.2, bites) is what the model outputs."""
    model = make_model(kind)
    spec = get_spec(model)
    outputs = []
    model.get_submodule(spec.blocks)[-1].register_forward_hook(lambda module, args, out: outputs.append(out))
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        hidden = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
        torch.testing.assert_close(spec.head_logits(model.config, spec.head_modules(model), hidden), logits)
    assert spec.final_logit_softcap(model.config) == (0.2 if kind == "gemma2" else None)


def test_unsupported_model_lists_supported_types():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError) as err:
        get_spec(model)
    message = str(err.value)
    assert "'gpt2'" in message
    for model_type in supported_model_types():
        assert model_type in message
    assert isinstance(err.value, ValueError) and isinstance(err.value, OsscarError)


# -- register_architecture ---------------------------------------------------------------------------------------

RENAMED = "osscar_test_renamed"


@pytest.fixture
def registry(monkeypatch):
    """The architecture registry, restored after the test (registrations are process-wide)."""
    import osscar_hf.arch.registry as module

    monkeypatch.setattr(module, "_REGISTRY", dict(module._REGISTRY))
    return module


def _renamed_copy(kind: str) -> torch.nn.Module:
    """``make_model(kind)`` under classes of its own whose config says ``model_type = RENAMED``: weights, modules
    and forward unchanged, only the name the registry looks up is new."""
    base = make_model(kind)
    config_class = type("RenamedConfig", (type(base.config),), {"model_type": RENAMED})
    model_class = type("RenamedForCausalLM", (type(base),), {"config_class": config_class})
    config = config_class(**{k: v for k, v in base.config.to_dict().items() if k != "model_type"})
    config._attn_implementation = base.config._attn_implementation
    model = model_class(config)
    model.load_state_dict(base.state_dict())
    return model.eval()


def _prune(model: torch.nn.Module) -> tuple[torch.nn.Module, object]:
    ids = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    pruner = OsscarPruner(OsscarConfig(dataset=ids, num_samples=8, seq_len=32, batch_size=4, device="cpu",
                                       attention_sparsity=0.5, mlp_sparsity=0.5))
    return pruner.prune(model, progress=False), pruner.report


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind,family", [("opt", OPT), ("llama-gqa", LLAMA_FAMILY), ("mixtral", MIXTRAL)])
def test_a_registered_spec_makes_a_new_model_type_prunable_end_to_end(registry, kind, family):
    model = _renamed_copy(kind)
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match=f"does not support model_type '{RENAMED}'"):
        _prune(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    spec = dataclasses.replace(family, name="renamed", model_types=(RENAMED,))
    register_architecture(spec)
    assert RENAMED in supported_model_types() and get_spec(model) is spec
    reference = make_model(kind)  # the same weights under the stock model type
    pruned, report = _prune(model)
    stock, stock_report = _prune(reference)
    assert report.model_type == RENAMED
    # The spec is all the pipeline knows of an architecture: the renamed copy is pruned exactly as the original.
    assert read_block_shapes(pruned) == read_block_shapes(stock) != read_block_shapes(make_model(kind))
    assert [b.mlp.kept_indices for b in report.blocks] == [b.mlp.kept_indices for b in stock_report.blocks]
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_taken_model_type_is_refused_unless_overwrite(registry):
    spec = dataclasses.replace(LLAMA_FAMILY, name="mine", model_types=(RENAMED, "llama"))
    with pytest.raises(ValueError, match="model_type 'llama' is already registered \\(spec 'llama'\\)"):
        register_architecture(spec)
    assert RENAMED not in supported_model_types()  # nothing registered by a refused call
    assert get_spec(make_model("llama-mha")) is LLAMA_FAMILY
    register_architecture(spec, overwrite=True)
    assert get_spec(make_model("llama-mha")) is spec and RENAMED in supported_model_types()
    assert get_spec(make_model("qwen2")) is LLAMA_FAMILY  # the old spec keeps the types it was not asked to give up


@pytest.mark.parametrize("change,message", [
    ({"model_types": RENAMED}, "model_types must be a non-empty tuple of non-empty str, got 'osscar_test_renamed'"),
    ({"model_types": ()}, "model_types must be a non-empty tuple"),
    ({"mlp_producers": "mlp.up_proj"}, "mlp_producers must be a non-empty tuple of non-empty str"),
    ({"o_proj": ""}, "o_proj must be a non-empty str"),
    ({"module_count_attrs": {"mlp.intermediate_size": "neurons"}}, "module_count_attrs must map"),
    ({"bias_switches": {"ffn": "mlp_bias"}}, "bias_switches must map 'attention'/'mlp'"),
    ({"experts": "mlp.experts"}, "experts must be None or an Experts, got 'mlp.experts'"),
    ({"experts": Experts(config_count="")}, "experts.config_count must be a non-empty str"),
    ({"experts": Experts(checkpoint_names={"down_proj": ("w2.weight",)})},
     "experts.checkpoint_names must map parameter names to tuples of names starting with '{e}.'"),
])
def test_a_malformed_spec_is_refused_and_nothing_is_registered(registry, change, message):
    spec = dataclasses.replace(LLAMA_FAMILY, **{"name": "bad", "model_types": (RENAMED,), **change})
    before = supported_model_types()
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        register_architecture(spec)
    assert "architecture spec 'bad' is malformed" in str(info.value)
    assert supported_model_types() == before
    with pytest.raises(TypeError, match="register_architecture needs an ArchSpec, got dict"):
        register_architecture(dataclasses.asdict(LLAMA_FAMILY))


@pytest.mark.parametrize("change,missing", [
    ({"blocks": "model.decoder.layers"}, "a list of blocks at 'model.decoder.layers'"),
    ({"mlp_consumer": "mlp.down"}, "an nn.Linear at model.layers.0.mlp.down"),
    ({"o_proj": "out_proj"}, "an nn.Linear at model.layers.0.self_attn.out_proj"),
    ({"mlp_producers": ("mlp.gate_proj", "mlp.act_fn")}, "an nn.Linear at model.layers.0.mlp.act_fn"),
    ({"module_count_attrs": {"mlp.intermediate": "ffn"}}, "a count attribute model.layers.0.mlp.intermediate"),
    ({"config_ffn": "ffn_dim"}, "config field 'ffn_dim'"),
])
def test_a_spec_that_does_not_describe_the_model_is_refused_before_any_work(registry, change, missing):
    """A well-formed spec registered for a model it does not fit: a clear error naming what is missing, and the
    model as it was (without the check, a wrong count attribute was found only after block 0 was sliced)."""
    register_architecture(dataclasses.replace(LLAMA_FAMILY, **change), overwrite=True)
    model = make_model("llama-gqa")
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match=re.escape(missing)) as info:
        _prune(model)
    message = str(info.value)
    assert "architecture spec 'llama' (for model_type 'llama') does not describe this LlamaForCausalLM" in message
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("change,missing", [
    ({"experts": Experts(path="mlp.moe")}, "an experts module at model.layers.0.mlp.moe (a dense MLP instead?)"),
    ({"mlp_consumer": "mlp.experts.w2"}, "a 3-D per-expert tensor at model.layers.0.mlp.experts.w2"),
    ({"mlp_producers": ("mlp.experts.gate_up_proj",)},
     "a 3-D per-expert tensor at model.layers.0.mlp.experts.gate_up_proj with 1 rows per neuron of each of the 4"),
])
def test_an_experts_spec_that_does_not_describe_the_model_is_refused(registry, change, missing):
    register_architecture(dataclasses.replace(MIXTRAL, **change), overwrite=True)
    with pytest.raises(UnsupportedModelError, match=re.escape(missing)):
        _prune(make_model("mixtral"))


def test_a_streamed_run_refuses_a_spec_that_does_not_describe_the_checkpoint(registry, tmp_path):
    make_model("llama-gqa").save_pretrained(tmp_path / "dense")
    register_architecture(dataclasses.replace(LLAMA_FAMILY, module_count_attrs={"mlp.intermediate": "ffn"}),
                          overwrite=True)
    ids = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    pruner = OsscarPruner(OsscarConfig(dataset=ids, num_samples=8, seq_len=32, batch_size=4, device="cpu",
                                       mlp_sparsity=0.5))
    with pytest.raises(UnsupportedModelError, match="which lacks a count attribute model.layers.0.mlp.intermediate"):
        pruner.prune_checkpoint(tmp_path / "dense", tmp_path / "pruned", progress=False)
    assert not list(tmp_path.glob("pruned/*.safetensors"))


def test_attention_layout_maps_structures_to_heads_for_both_structures():
    from osscar_hf.arch import AttentionLayout

    groups = AttentionLayout(kv_heads=2, n_rep=3, head_dim=4)
    heads = AttentionLayout(kv_heads=2, n_rep=3, head_dim=4, structure="query_heads")
    assert (groups.structures, groups.solver_groups, groups.group_size, groups.partitions) == (2, 2, 12, 1)
    assert (heads.structures, heads.solver_groups, heads.group_size, heads.partitions) == (3, 6, 4, 2)
    assert groups.shape(1) == {"num_attention_heads": 3, "num_key_value_heads": 1}
    assert heads.shape(2) == {"num_attention_heads": 4, "num_key_value_heads": 2}
    assert heads.shape(0) == {"num_attention_heads": 0, "num_key_value_heads": 0}
    assert heads.solver_keep(2) == 4 and heads.shape_of_solver_kept(4) == heads.shape(2)
    kept_groups, kept_heads = heads.selection(torch.tensor([1, 2, 3, 5]))
    assert kept_groups.tolist() == [0, 1] and kept_heads.tolist() == [1, 2, 3, 5]
    kept_groups, kept_heads = groups.selection(torch.tensor([1]))
    assert kept_groups.tolist() == [1] and kept_heads.tolist() == [3, 4, 5]
