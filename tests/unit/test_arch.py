import pytest

from osscar_hf.arch import get_spec, supported_model_types
from osscar_hf.errors import OsscarError, UnsupportedModelError
from tests.conftest import make_model


@pytest.mark.parametrize(
    "kind,spec_name,geometry",
    [("opt", "opt", (4, 1, 8)), ("llama-mha", "llama", (4, 1, 8)), ("llama-gqa", "llama", (2, 2, 8)),
     ("qwen2", "llama", (2, 2, 8)), ("mistral", "llama", (2, 2, 8))],
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
