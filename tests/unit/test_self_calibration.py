"""Data-free calibration, ``OsscarConfig(dataset="self")``: windows sampled from the model being pruned."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from osscar_hf import CalibrationDataError, OsscarConfig, OsscarPruner
from osscar_hf.calibration import build_calibration_windows
from osscar_hf.card import build_model_card
from osscar_hf.self_calibration import SELF_TEMPERATURE, SELF_TOP_P, sample_token_windows
from tests.conftest import VOCAB, _config, make_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model("llama-gqa")


def test_windows_have_the_asked_shape_and_start_from_bos(model) -> None:
    windows = sample_token_windows(model, count=5, seq_len=12, seed=0, batch_size=2, progress=False)
    assert windows.shape == (5, 12) and windows.dtype == torch.long
    assert torch.all(windows[:, 0] == model.config.bos_token_id)
    assert int(windows.min()) >= 0 and int(windows.max()) < VOCAB
    assert len({tuple(row.tolist()) for row in windows}) == 5  # five different samples, not one repeated


def test_same_seed_same_windows_other_seed_other_windows(model) -> None:
    first = sample_token_windows(model, count=4, seq_len=10, seed=3, progress=False)
    again = sample_token_windows(model, count=4, seq_len=10, seed=3, progress=False)
    other = sample_token_windows(model, count=4, seq_len=10, seed=4, progress=False)
    assert torch.equal(first, again)
    assert not torch.equal(first[:, 1:], other[:, 1:])


def test_a_tiny_nucleus_is_greedy_decoding(model) -> None:
    """top_p keeps only the most likely token when it is tiny: the sampler then follows the argmax."""
    windows = sample_token_windows(model, count=2, seq_len=8, seed=0, top_p=1e-9, progress=False)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    assert torch.equal(windows[:, 1:], logits[:, :-1].argmax(-1))


def test_pruning_on_self_samples_records_their_provenance(model) -> None:
    pruner = OsscarPruner(OsscarConfig(0.5, 0.5, dataset="self", num_samples=4, seq_len=16, seed=7))
    pruned = pruner.prune(make_model("llama-gqa"), progress=False)
    report = pruner.report
    assert report.parameters_after < report.parameters_before
    assert pruned.config.num_key_value_heads == 1
    assert report.calibration["num_samples"] == 4 and report.calibration["seq_len"] == 16
    provenance = report.calibration["sampled_from_model"]
    assert provenance["seed"] == 7 and provenance["start_token_id"] == model.config.bos_token_id
    assert provenance["temperature"] == SELF_TEMPERATURE and provenance["top_p"] == SELF_TOP_P
    assert "sampled from the dense model" in provenance["text"]
    assert report.config["dataset"] == "self"
    card = str(build_model_card(report, base_model=None, config=pruner.config))
    section = card[card.index("## Calibration data"):card.index("## Pruning configuration")]
    assert "text sampled from the dense model itself" in section and "top-p 0.95" in section
    assert "local file" not in section
    # The windows it calibrated on are the seeded samples of the dense model.
    expected = sample_token_windows(model, count=4, seq_len=16, seed=7, progress=False)
    assert torch.equal(OsscarPruner(OsscarConfig(0.5, 0.5, dataset="self", num_samples=4, seq_len=16, seed=7))
                       .calibration_windows(model), expected)


def test_held_out_windows_are_other_samples_and_leave_calibration_unchanged(model) -> None:
    pruner = OsscarPruner(OsscarConfig(dataset="self", sparsity=0.3, num_samples=4, seq_len=10, allocation_samples=3))
    alone, none = pruner.calibration_window_sets(model, held_out=0, progress=False)
    windows, held = pruner.calibration_window_sets(model, held_out=3, progress=False)
    assert none is None and torch.equal(alone, windows)
    assert held.shape == (3, 10)
    calibration_rows = {tuple(row.tolist()) for row in windows}
    assert not any(tuple(row.tolist()) in calibration_rows for row in held)


def test_global_allocation_runs_on_self_samples() -> None:
    pruner = OsscarPruner(OsscarConfig(dataset="self", sparsity=0.3, num_samples=4, seq_len=16, allocation_samples=2))
    pruner.prune(make_model("llama-gqa"), progress=False)
    assert pruner.report.calibration["sampled_from_model"]["held_out_samples"] == 2


def test_streaming_refuses_self_before_reading_anything(tmp_path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CalibrationDataError, match="prune_checkpoint never holds"):
        OsscarPruner(OsscarConfig(0.5, 0.5, dataset="self")).prune_checkpoint(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_on_the_meta_device_cannot_be_sampled() -> None:
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(_config("llama-gqa"))
    with pytest.raises(CalibrationDataError, match="meta device"):
        sample_token_windows(skeleton, count=1, seq_len=4, seed=0, progress=False)


def test_a_model_without_start_token_is_refused() -> None:
    bare = make_model("llama-gqa", bos_token_id=None, eos_token_id=None)
    with pytest.raises(CalibrationDataError, match="bos_token_id"):
        sample_token_windows(bare, count=1, seq_len=4, seed=0, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"count": 0}, "count must be an int >= 1"),
    ({"temperature": 0.0}, "temperature must be"),
    ({"top_p": 1.5}, "top_p must be in"),
])
def test_bad_sampler_settings_are_named(model, kwargs, message) -> None:
    settings = {"count": 1, "seq_len": 4, "seed": 0, "progress": False} | kwargs
    with pytest.raises(CalibrationDataError, match=message):
        sample_token_windows(model, **settings)


def test_the_text_loader_explains_where_self_is_handled(tokenizer) -> None:
    with pytest.raises(CalibrationDataError, match="sample_token_windows"):
        build_calibration_windows("self", tokenizer, num_samples=1, seq_len=4, seed=0)


def test_the_progress_bar_counts_every_sampled_token(model, monkeypatch) -> None:
    import osscar_hf.self_calibration as self_calibration

    counted = []
    real_tqdm = self_calibration.tqdm

    class CountingBar(real_tqdm):
        def close(self):
            counted.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(self_calibration, "tqdm", CountingBar)
    sample_token_windows(model, count=5, seq_len=7, seed=0, batch_size=2, progress=True)
    assert counted[0] == (5 * 6, 5 * 6)  # tokens sampled, out of the total announced
