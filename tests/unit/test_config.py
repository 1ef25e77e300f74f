"""Tests of osscar_hf.config: defaults, validation, serialisation round trips, version handling."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

import osscar_hf
from osscar_hf.config import OsscarConfig, keep_count
from osscar_hf.errors import OsscarConfigError, OsscarError

DEFAULTS = {
    "attention_sparsity": 0.0,
    "mlp_sparsity": 0.0,
    "dataset": None,
    "text_column": "text",
    "num_samples": 128,
    "seq_len": 2048,
    "seed": 0,
    "damping": 0.01,
    "mlp_step": 10,
    "attention_step": 2,
    "local_search": True,
    "local_search_iters": 30,
    "mlp_swap_size": 10,
    "attention_swap_size": 5,
    "propagate": True,
    "dense_targets": False,
    "solver_dtype": "float64",
    "device": "auto",
    "batch_size": 8,
    "block_shapes": None,
    "library_versions": None,
    "quant_method": "osscar",
}


# --------------------------------------------------------------------------- defaults and helpers
def test_defaults():
    cfg = OsscarConfig()
    assert cfg.to_dict() == DEFAULTS
    assert isinstance(cfg, QuantizationConfigMixin)
    assert cfg.quant_method == "osscar"


def test_quant_method_in_dict_and_json_string():
    cfg = OsscarConfig(0.25, 0.5)
    assert cfg.to_dict()["quant_method"] == "osscar"
    assert json.loads(cfg.to_json_string())["quant_method"] == "osscar"
    assert dict(cfg) == cfg.to_dict()


def test_sparsities_positional_rest_keyword_only():
    cfg = OsscarConfig(0.25, 0.5, seed=3)
    assert (cfg.attention_sparsity, cfg.mlp_sparsity, cfg.seed) == (0.25, 0.5, 3)
    with pytest.raises(TypeError):
        OsscarConfig(0.25, 0.5, None)


def test_quant_method_not_settable_by_init():
    with pytest.raises(TypeError):
        OsscarConfig(quant_method="gptq")


def test_normalisation():
    cfg = OsscarConfig(
        attention_sparsity=0, solver_dtype=torch.float32, device=torch.device("cuda", 1), dataset=Path("a.txt")
    )
    assert cfg.attention_sparsity == 0.0 and isinstance(cfg.attention_sparsity, float)
    assert cfg.solver_dtype == "float32"
    assert cfg.device == "cuda:1"
    assert cfg.dataset == "a.txt"
    assert OsscarConfig(device="CPU").device == "cpu"
    assert OsscarConfig(solver_dtype=torch.float64).solver_dtype == "float64"


def test_torch_solver_dtype():
    assert OsscarConfig().torch_solver_dtype() == torch.float64
    assert OsscarConfig(solver_dtype="float32").torch_solver_dtype() == torch.float32


def test_resolved_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert OsscarConfig().resolved_device() == torch.device(expected)
    assert OsscarConfig(device="cpu").resolved_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_resolved_device_cuda_unavailable():
    with pytest.raises(OsscarConfigError, match="device='cuda:0' but CUDA is not available"):
        OsscarConfig(device="cuda:0").resolved_device()


@pytest.mark.parametrize(
    ("m", "sparsity", "expected"),
    [(10, 0.0, 10), (10, 0.25, 8), (1536, 0.25, 1152), (1536, 0.5, 768), (3, 1 / 3, 2), (5, 0.5, 3), (7, 0.5, 3),
     (1, 0.6, 0), (0, 0.5, 0), (9, 0.99, 0)],
)
def test_keep_count(m, sparsity, expected):
    assert keep_count(m, sparsity) == expected


@pytest.mark.parametrize(("m", "sparsity"), [(-1, 0.5), (4, 1.0), (4, -0.1), (True, 0.5), (4, math.nan)])
def test_keep_count_rejects(m, sparsity):
    with pytest.raises(OsscarConfigError):
        keep_count(m, sparsity)


def _set_then_check() -> None:
    cfg = OsscarConfig()
    cfg.mlp_step = 0
    cfg.post_init()


def _bad_json_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    OsscarConfig.from_json_file(path)


REFUSALS = {  # every way a config is refused, and a word of the message that names the culprit
    "constructor": (lambda tmp: OsscarConfig(mlp_sparsity=1.5), "mlp_sparsity"),
    "post_init after a change": (lambda tmp: _set_then_check(), "mlp_step"),
    "update": (lambda tmp: OsscarConfig().update(seq_len=0), "seq_len"),
    "from_dict unknown key": (lambda tmp: OsscarConfig.from_dict({"mlp_sparsty": 0.5}), "mlp_sparsty"),
    "from_dict not a dict": (lambda tmp: OsscarConfig.from_dict(["mlp_sparsity"]), "config_dict"),
    "from_json_file bad JSON": (_bad_json_file, "not valid JSON"),
    "pruner unknown method": (lambda tmp: osscar_hf.OsscarPruner(OsscarConfig(method="nope")), "nope"),
    "pruner method without refit": (
        lambda tmp: osscar_hf.OsscarPruner(OsscarConfig(mlp_sparsity=0.5, dense_targets=True, method="magnitude")),
        "dense_targets"),
    "pruner given a dict": (lambda tmp: osscar_hf.OsscarPruner({"mlp_sparsity": 0.5}), "OsscarConfig"),
    "keep_count": (lambda tmp: keep_count(4, 1.0), "sparsity"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_every_refusal_is_caught_as_value_error_and_as_osscar_error(name, tmp_path):
    """errors.py's promise: callers may catch either ``ValueError`` (generic code) or ``OsscarError`` (everything
    osscar_hf raises). A path that let a bare ``ValueError``/``TypeError``/``JSONDecodeError`` through, or an error
    class that lost a base, would fail here."""
    refuse, culprit = REFUSALS[name]
    try:
        refuse(tmp_path)
    except ValueError as exc:
        assert isinstance(exc, OsscarError), f"{name}: {type(exc).__name__} is not an OsscarError"
        assert culprit in str(exc)
    else:
        pytest.fail(f"{name}: nothing was refused")


def test_lazy_public_import():
    assert osscar_hf.OsscarConfig is OsscarConfig


# --------------------------------------------------------------------------- validation
BAD_VALUES = [
    ("attention_sparsity", 1.0, "attention_sparsity must be a number in [0, 1), got 1.0"),
    ("attention_sparsity", -0.1, "attention_sparsity must be a number in [0, 1), got -0.1"),
    ("attention_sparsity", math.nan, "attention_sparsity must be a number in [0, 1), got nan"),
    ("attention_sparsity", True, "attention_sparsity must be a number in [0, 1), got True"),
    ("attention_sparsity", "0.5", "attention_sparsity must be a number in [0, 1), got '0.5'"),
    ("mlp_sparsity", 1.5, "mlp_sparsity must be a number in [0, 1), got 1.5"),
    ("mlp_sparsity", None, "mlp_sparsity must be a number in [0, 1), got None"),
    ("text_column", "", "text_column must be a non-empty str, got ''"),
    ("text_column", 3, "text_column must be a non-empty str, got 3"),
    ("num_samples", 0, "num_samples must be an int >= 1, got 0"),
    ("num_samples", 12.0, "num_samples must be an int >= 1, got 12.0"),
    ("num_samples", True, "num_samples must be an int >= 1, got True"),
    ("seq_len", 0, "seq_len must be an int >= 1, got 0"),
    ("seq_len", "2048", "seq_len must be an int >= 1, got '2048'"),
    ("seed", -1, "seed must be an int >= 0, got -1"),
    ("damping", -0.01, "damping must be a finite number >= 0, got -0.01"),
    ("damping", math.inf, "damping must be a finite number >= 0, got inf"),
    ("damping", math.nan, "damping must be a finite number >= 0, got nan"),
    ("damping", False, "damping must be a finite number >= 0, got False"),
    ("mlp_step", 0, "mlp_step must be an int >= 1, got 0"),
    ("attention_step", 0, "attention_step must be an int >= 1, got 0"),
    ("local_search", 1, "local_search must be a bool (True or False), got 1"),
    ("local_search_iters", -1, "local_search_iters must be an int >= 0, got -1"),
    ("mlp_swap_size", 0, "mlp_swap_size must be an int >= 1, got 0"),
    ("attention_swap_size", 0, "attention_swap_size must be an int >= 1, got 0"),
    ("propagate", "yes", "propagate must be a bool (True or False), got 'yes'"),
    ("dense_targets", None, "dense_targets must be a bool (True or False), got None"),
    ("solver_dtype", "float16", "solver_dtype must be one of ['float32', 'float64']"),
    ("solver_dtype", torch.bfloat16, "got torch.bfloat16"),
    ("device", "tpu", "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device of those, got 'tpu'"),
    ("device", "cuda:x", "got 'cuda:x'"),
    ("device", torch.device("meta"), "got device(type='meta')"),
    ("batch_size", 0, "batch_size must be an int >= 1, got 0"),
    ("dataset", 42, "dataset must be None, a str"),
    ("dataset", "", "dataset must not be an empty str"),
    ("dataset", [], "dataset must not be an empty list"),
    ("dataset", ["a", 1], "dataset as a list must hold only str"),
    ("dataset", [[1, 2], []], "dataset row 1 must be a non-empty list of int token ids"),
    ("dataset", [[1, True]], "dataset row 0 must be a non-empty list of int token ids"),
    ("dataset", torch.zeros(2, 3), "2-D integer tensor"),
    ("dataset", torch.arange(3), "shape (3,)"),
    ("block_shapes", [], "block_shapes must be None or a non-empty list"),
    ("block_shapes", [{"ffn_dim": 3}], "block_shapes[0] must be a dict with exactly the keys"),
    ("block_shapes", [{"num_attention_heads": 4, "num_key_value_heads": 2, "ffn_dim": -1}],
     "block_shapes[0]['ffn_dim'] must be an int >= 0, got -1"),
    ("block_shapes", [{"num_attention_heads": 3, "num_key_value_heads": 2, "ffn_dim": 8}],
     "num_attention_heads=3 must be a multiple of num_key_value_heads=2"),
    ("block_shapes", [{"num_attention_heads": 2, "num_key_value_heads": 0, "ffn_dim": 8}],
     "both 0 for a block that lost every head"),
    ("library_versions", {"torch": 2}, "library_versions must be None or a dict of str to str"),
    ("activation_storage", "ram", "activation_storage must be one of ['auto', 'memory', 'disk'], got 'ram'"),
    ("activation_storage", None, "activation_storage must be one of ['auto', 'memory', 'disk'], got None"),
    ("activation_storage", True, "got True"),
    ("activation_dir", "", "activation_dir must be None or a non-empty folder path (str or os.PathLike), got ''"),
    ("activation_dir", 3, "activation_dir must be None or a non-empty folder path"),
]


@pytest.mark.parametrize(("name", "value", "needle"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_invalid_field_raises_naming_field(name, value, needle):
    with pytest.raises(OsscarConfigError) as info:
        OsscarConfig(**{name: value})
    assert needle in str(info.value)
    assert name in str(info.value)


def test_dense_targets_needs_propagate():
    with pytest.raises(OsscarConfigError, match="dense_targets=True requires propagate=True"):
        OsscarConfig(dense_targets=True, propagate=False)


def test_hf_dataset_missing_column():
    import datasets

    ds = datasets.Dataset.from_dict({"body": ["a", "b"]})
    with pytest.raises(OsscarConfigError, match=r"no column text_column='text'.*\['body'\]"):
        OsscarConfig(dataset=ds)


def test_accepted_edge_values():
    cfg = OsscarConfig(
        attention_sparsity=0.999, mlp_sparsity=0, damping=0, local_search_iters=0, device="cuda", seed=2**40
    )
    assert cfg.damping == 0.0 and cfg.device == "cuda"


def test_update_validates_and_returns_unused():
    cfg = OsscarConfig()
    unused = cfg.update(mlp_sparsity=0.5, foo=1)
    assert cfg.mlp_sparsity == 0.5 and unused == {"foo": 1}
    with pytest.raises(OsscarConfigError, match="mlp_sparsity must be a number in"):
        cfg.update(mlp_sparsity=2.0)
    assert cfg.mlp_sparsity == 0.5  # unchanged after a rejected update


def test_post_init_revalidates_after_setattr():
    cfg = OsscarConfig()
    cfg.seq_len = 0
    with pytest.raises(OsscarConfigError, match="seq_len must be an int >= 1, got 0"):
        cfg.post_init()


# --------------------------------------------------------------------------- serialisation
def _datasets():
    import datasets

    return {
        "none": (None, None),
        "name": ("wikitext2", "wikitext2"),
        "path": ("/data/calib.jsonl", "/data/calib.jsonl"),
        "texts": (["one text", "two texts"], ["one text", "two texts"]),
        "token_lists": ([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]),
        "tensor": (torch.arange(6).reshape(2, 3), [[0, 1, 2], [3, 4, 5]]),
        "hf_dataset": (datasets.Dataset.from_dict({"body": ["x", "y"]}), ["x", "y"]),
    }


DATASET_KINDS = ["none", "name", "path", "texts", "token_lists", "tensor", "hf_dataset"]


def _config_with(kind):
    value, serialised = _datasets()[kind]
    text_column = "body" if kind == "hf_dataset" else "text"
    cfg = OsscarConfig(
        0.25, 0.5, dataset=value, text_column=text_column, num_samples=4, seq_len=64, seed=3, damping=0.05,
        local_search=False, solver_dtype=torch.float32, device="cpu", batch_size=2,
    )
    return cfg, serialised


@pytest.mark.parametrize("kind", DATASET_KINDS)
def test_dict_round_trip(kind):
    cfg, serialised = _config_with(kind)
    d = cfg.to_dict()
    assert d["dataset"] == serialised
    json.dumps(d)  # JSON-serialisable
    again = OsscarConfig.from_dict(d)
    assert again.to_dict() == d
    assert again == cfg


@pytest.mark.parametrize("kind", DATASET_KINDS)
def test_json_file_round_trip(kind, tmp_path):
    cfg, _ = _config_with(kind)
    p = tmp_path / "osscar_config.json"
    cfg.to_json_file(p)
    assert OsscarConfig.from_json_file(p).to_dict() == cfg.to_dict()
    assert [f.name for f in tmp_path.iterdir()] == ["osscar_config.json"]  # no temp file left behind


def test_json_file_records_versions(tmp_path):
    import transformers

    p = tmp_path / "c.json"
    OsscarConfig().to_json_file(p)
    data = json.loads(p.read_text())
    assert data["osscar_version"] == osscar_hf.__version__
    assert data["transformers_version"] == transformers.__version__
    assert data["torch_version"] == torch.__version__
    assert data["quant_method"] == "osscar"


def test_json_file_overwrites(tmp_path):
    p = tmp_path / "c.json"
    OsscarConfig(mlp_sparsity=0.1).to_json_file(p)
    OsscarConfig(mlp_sparsity=0.2).to_json_file(str(p))
    assert OsscarConfig.from_json_file(str(p)).mlp_sparsity == 0.2


def test_from_json_file_missing(tmp_path):
    with pytest.raises(OsscarConfigError, match="does not exist"):
        OsscarConfig.from_json_file(tmp_path / "nope.json")


def test_from_json_file_bad_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(OsscarConfigError, match="is not valid JSON"):
        OsscarConfig.from_json_file(p)


def test_from_dict_unknown_key():
    with pytest.raises(OsscarConfigError) as info:
        OsscarConfig.from_dict({"mlp_sparsity": 0.5, "mlp_sparsty": 0.5, "zzz": 1})
    msg = str(info.value)
    assert "unknown OsscarConfig keys ['mlp_sparsty', 'zzz']" in msg
    assert "accepted keys are" in msg and "'mlp_sparsity'" in msg and "'osscar_version'" in msg


def test_from_dict_unknown_key_same_version_still_raises():
    with pytest.raises(OsscarConfigError, match=r"unknown OsscarConfig keys \['zzz'\]"):
        OsscarConfig.from_dict({"zzz": 1, "osscar_version": osscar_hf.__version__})


def test_from_dict_wrong_quant_method():
    with pytest.raises(OsscarConfigError, match="quant_method must be 'osscar' for an OsscarConfig, got 'gptq'"):
        OsscarConfig.from_dict({"quant_method": "gptq"})


def test_from_dict_invalid_value():
    with pytest.raises(OsscarConfigError, match="seq_len must be an int >= 1, got -5"):
        OsscarConfig.from_dict({"seq_len": -5})


def test_from_dict_bad_version_string():
    with pytest.raises(OsscarConfigError, match="osscar_version must be a version string"):
        OsscarConfig.from_dict({"zzz": 1, "osscar_version": "not a version"})


def test_newer_version_file_warns_and_drops(tmp_path, caplog):
    d = OsscarConfig(mlp_sparsity=0.5).to_dict()
    d.update({"osscar_version": "99.0.0", "transformers_version": "9.9", "future_knob": 3, "another": "x"})
    p = tmp_path / "future.json"
    p.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="osscar_hf.config"):
        cfg = OsscarConfig.from_json_file(p)
    assert cfg.mlp_sparsity == 0.5
    assert "['another', 'future_knob']" in caplog.text and "99.0.0" in caplog.text
    assert "future_knob" not in cfg.to_dict()


def test_from_dict_kwargs_like_mixin():
    cfg, unused = OsscarConfig.from_dict({"mlp_sparsity": 0.5}, return_unused_kwargs=True, seed=9, foo=1)
    assert cfg.seed == 9 and cfg.mlp_sparsity == 0.5 and unused == {"foo": 1}
    assert OsscarConfig.from_dict({}, seed=4).seed == 4


def test_auto_quantization_config_style_dispatch():
    # transformers passes the config.json dict (with quant_method) to from_dict.
    d = OsscarConfig(0.25, 0.25).to_dict()
    assert OsscarConfig.from_dict(d).to_dict() == d


def test_equality():
    assert OsscarConfig(mlp_sparsity=0.5) == OsscarConfig(mlp_sparsity=0.5)
    assert OsscarConfig(mlp_sparsity=0.5) != OsscarConfig(mlp_sparsity=0.25)
    assert OsscarConfig(dataset=torch.tensor([[1, 2]])) == OsscarConfig(dataset=[[1, 2]])


def test_repr_is_short():
    cfg = OsscarConfig(dataset=["x" * 1000] * 10_000)
    text = repr(cfg)
    assert len(text) < 600
    assert "<10000 texts" in text and "mlp_sparsity=0.0" in text
    assert "<token ids 2x3>" in repr(OsscarConfig(dataset=torch.zeros(2, 3, dtype=torch.long)))
    assert "<token ids, 1 rows>" in repr(OsscarConfig(dataset=[[1]]))
    assert "'wikitext2'" in repr(OsscarConfig(dataset="wikitext2"))


# --------------------------------------------------------------------------- the config stored in a pruned model
SHAPES = [{"num_attention_heads": 4, "num_key_value_heads": 2, "ffn_dim": 24},
          {"num_attention_heads": 0, "num_key_value_heads": 0, "ffn_dim": 0}]


@pytest.mark.parametrize("kind", DATASET_KINDS)
def test_for_model_config_is_small_and_round_trips(kind):
    import transformers

    cfg, _ = _config_with(kind)
    stored = cfg.for_model_config(SHAPES)
    d = stored.to_dict()
    assert d["block_shapes"] == SHAPES and d["quant_method"] == "osscar"
    assert d["library_versions"] == {
        "osscar_hf": osscar_hf.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    assert d["dataset"] is None or isinstance(d["dataset"], str)
    if kind in ("none", "name", "path"):
        assert d["dataset"] == cfg.to_dict()["dataset"]
    else:
        assert d["dataset"].startswith("<in-memory calibration data: ")
    assert OsscarConfig.from_dict(json.loads(json.dumps(d))) == stored
    assert {k: v for k, v in d.items() if k not in ("dataset", "block_shapes", "library_versions")} == {
        k: v for k, v in cfg.to_dict().items() if k not in ("dataset", "block_shapes", "library_versions")}
    assert cfg.block_shapes is None  # the original is unchanged


def test_for_model_config_describes_big_data_briefly():
    texts = ["word " * 2000] * 500  # 5 MB of text
    d = OsscarConfig(dataset=texts).for_model_config(SHAPES).to_dict()
    assert len(json.dumps(d)) < 2000
    assert "500 texts, 5000000 chars, sha256 " in d["dataset"]
    other = OsscarConfig(dataset=texts[:-1] + ["other"]).for_model_config(SHAPES).to_dict()["dataset"]
    assert other != d["dataset"]


def test_block_shapes_are_copied_and_summarised_in_repr():
    shapes = [dict(s) for s in SHAPES]
    cfg = OsscarConfig(block_shapes=shapes)
    shapes[0]["ffn_dim"] = 99
    cfg.to_dict()["block_shapes"][0]["ffn_dim"] = 98
    assert cfg.block_shapes == SHAPES
    assert "block_shapes=<2 blocks>" in repr(cfg)


# --------------------------------------------------------------------------- where activations are kept
def test_activation_fields_defaults_and_normalisation(tmp_path):
    cfg = OsscarConfig()
    assert (cfg.activation_storage, cfg.activation_dir) == ("auto", None)
    cfg = OsscarConfig(activation_storage=" Disk ", activation_dir=tmp_path)
    assert cfg.activation_storage == "disk" and cfg.activation_dir == str(tmp_path)
    with pytest.raises(TypeError):
        OsscarConfig(0.1, 0.1, "disk")  # keyword-only


def test_result_neutral_fields():
    assert OsscarConfig.RESULT_NEUTRAL_FIELDS == ("activation_storage", "activation_dir")
    assert set(OsscarConfig.RESULT_NEUTRAL_FIELDS) <= set(OsscarConfig.field_names())
    assert "RESULT_NEUTRAL_FIELDS" not in OsscarConfig.field_names()


def test_activation_fields_serialise_only_when_set(tmp_path):
    d = OsscarConfig(mlp_sparsity=0.5).to_dict()
    assert "activation_storage" not in d and "activation_dir" not in d  # defaults: the dict earlier versions wrote
    cfg = OsscarConfig(mlp_sparsity=0.5, activation_storage="disk", activation_dir=str(tmp_path / "act"))
    d = cfg.to_dict()
    assert d["activation_storage"] == "disk" and d["activation_dir"] == str(tmp_path / "act")
    assert OsscarConfig.from_dict(json.loads(json.dumps(d))) == cfg
    cfg.to_json_file(tmp_path / "c.json")
    assert OsscarConfig.from_json_file(tmp_path / "c.json") == cfg
    assert OsscarConfig.from_dict({**d, "activation_storage": "memory"}).activation_storage == "memory"


def test_activation_fields_take_part_in_equality():
    assert OsscarConfig(activation_storage="auto") == OsscarConfig()
    assert OsscarConfig(activation_storage="disk") != OsscarConfig(activation_storage="memory")
    assert OsscarConfig(activation_dir="/a") != OsscarConfig(activation_dir="/b")


def test_old_config_dict_without_activation_fields_loads():
    old = {k: v for k, v in DEFAULTS.items()}  # as written before the fields existed
    old.update(mlp_sparsity=0.5, osscar_version="0.0.1")
    cfg = OsscarConfig.from_dict(old)
    assert cfg.mlp_sparsity == 0.5 and cfg.activation_storage == "auto" and cfg.activation_dir is None


def test_for_model_config_drops_machine_specific_activation_settings(tmp_path):
    cfg = OsscarConfig(0.25, 0.5, activation_storage="disk", activation_dir=str(tmp_path))
    stored = cfg.for_model_config(SHAPES)
    assert (stored.activation_storage, stored.activation_dir) == ("auto", None)
    d = stored.to_dict()
    assert "activation_storage" not in d and "activation_dir" not in d and str(tmp_path) not in json.dumps(d)
    plain = OsscarConfig(0.25, 0.5).for_model_config(SHAPES).to_dict()
    assert {k: v for k, v in d.items() if k != "library_versions"} == {
        k: v for k, v in plain.items() if k != "library_versions"}
    assert cfg.activation_dir == str(tmp_path)  # the original is unchanged
