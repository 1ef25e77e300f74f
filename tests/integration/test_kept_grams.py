"""OSSCAR's global allocation prunes every block on the Gram matrices its planning's uniform first prune
accumulated (``reuse_planning_grams``, the default): no second pass over the calibration data, in memory, streamed
and resumed alike; ``reuse_planning_grams=False`` runs the sequential pass instead."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.pipeline.kept import KeptStatisticsStream
from osscar_hf.streaming import PROGRESS_NAME, partial_folder
from tests.conftest import interrupt_at, make_model

SMALL = dict(num_samples=8, seq_len=32, batch_size=4, device="cpu", allocation_samples=4)
GLOBAL = dict(sparsity=0.35, min_part_keep=0.0)


def _spied_prune(monkeypatch, tokenizer, texts, **options):
    """Prune a tiny Llama; return the model, the pruner, the Grams the planning kept and those the pruning pass
    solved on (by block and part), and the block forwards after the plan was made."""
    import osscar_hf.pipeline.block as block_module
    import osscar_hf.pipeline.kept as kept_module
    from osscar_hf.pipeline import measure

    model = make_model("llama-gqa", num_hidden_layers=3)
    kept, solved, forwards, planned = {}, {}, [0], [False]
    real_measure, real_solve = measure.measured_sizes, block_module.solve_and_slice

    def measured(*args, **kwargs):
        sizes = real_measure(*args, **kwargs)
        planned[0] = True
        return sizes

    def solve(block, index, spec, settings, stats):
        if planned[0]:
            solved.update({(index, part): st.gram.clone() for part, st in stats.items()})
        else:
            kept.update({(index, part): st.gram.clone() for part, st in stats.items()})
        return real_solve(block, index, spec, settings, stats)

    for block in model.model.layers:
        block.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + planned[0]))
    monkeypatch.setattr(measure, "measured_sizes", measured)
    monkeypatch.setattr(block_module, "solve_and_slice", solve)
    monkeypatch.setattr(kept_module, "solve_and_slice", solve)
    pruner = OsscarPruner(OsscarConfig(dataset=texts, **SMALL, **GLOBAL, **options))
    pruner.prune(model, tokenizer, progress=False)
    return model, pruner, kept, solved, forwards[0]


def test_the_pruning_pass_solves_on_the_first_prunes_grams_without_a_forward(monkeypatch, tokenizer,
                                                                           calibration_texts):
    _, pruner, kept, solved, forwards = _spied_prune(monkeypatch, tokenizer, calibration_texts)
    assert forwards == 0  # no calibration forward after the plan
    assert solved and set(solved) <= set(kept)
    for key, gram in solved.items():
        assert torch.equal(gram, kept[key]), key
    pruned = [(b.attention.kept < b.attention.structures, b.mlp.kept < b.mlp.structures) for b in pruner.report.blocks]
    assert any(any(p) for p in pruned)


def test_without_reuse_the_pruning_pass_runs_the_calibration_data_again(monkeypatch, tokenizer, calibration_texts):
    _, _, kept, solved, forwards = _spied_prune(monkeypatch, tokenizer, calibration_texts,
                                                reuse_planning_grams=False)
    assert forwards > 0
    assert any(not torch.equal(gram, kept[key]) for key, gram in solved.items() if key in kept)


def test_every_part_is_kept_even_one_the_first_prune_leaves_whole(monkeypatch, tokenizer, calibration_texts):
    """At a small sparsity the uniform first prune removes no KV group; the allocation may still remove some."""
    _, pruner, kept, _, _ = _spied_prune(monkeypatch, tokenizer, calibration_texts)
    assert {part for _, part in kept} == {"attention", "mlp"}
    assert len(kept) == 2 * len(pruner.report.blocks)


def test_a_streamed_run_keeps_its_grams_across_a_resume(tmp_path, tokenizer, calibration_texts, monkeypatch):
    make_model("llama-gqa", num_hidden_layers=3).save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "dense")
    config = OsscarConfig(dataset=calibration_texts, **SMALL, **GLOBAL)
    memory = OsscarPruner(config).prune(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), tokenizer,
                                        progress=False)
    # in the pruning pass only (the planning's first prune is a BlockStream)
    real_step = interrupt_at(monkeypatch, KeptStatisticsStream, "_select_and_slice", 1)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        OsscarPruner(config).prune_checkpoint(tmp_path / "dense", target, progress=False)
    partial = partial_folder(target.absolute())
    assert len(json.loads((partial / PROGRESS_NAME).read_text())["blocks"]) == 1
    assert sorted(p.name for p in (partial / "planning-grams").iterdir()) == [
        "block-00001.safetensors", "block-00002.safetensors"]  # block 0's went with its shard
    monkeypatch.setattr(KeptStatisticsStream, "_select_and_slice", real_step)
    folder = OsscarPruner(config).prune_checkpoint(tmp_path / "dense", target, progress=False)
    assert not (folder / "planning-grams").exists()
    streamed = AutoModelForCausalLM.from_pretrained(folder)
    sa, sb = memory.state_dict(), streamed.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_option_is_a_checked_flag_recorded_only_when_off():
    from osscar_hf.errors import OsscarConfigError

    assert "reuse_planning_grams" not in OsscarConfig(sparsity=0.3).to_dict()
    assert OsscarConfig(sparsity=0.3, reuse_planning_grams=False).to_dict()["reuse_planning_grams"] is False
    with pytest.raises(OsscarConfigError, match="reuse_planning_grams"):
        OsscarConfig(sparsity=0.3, reuse_planning_grams="yes")
