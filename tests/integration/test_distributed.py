"""Data-parallel pruning under torch.distributed: two CPU processes (gloo) against one.

One spawned run of two ranks does every distributed check (spawning costs an import of torch and transformers per
process): in-memory prunes of a tiny Llama with GQA, a tiny OPT (several methods and budgets) and a tiny Mixtral, under torchrun's
environment variables (osscar_hf initialises and destroys the group); then, under a group the test initialises, a
streamed prune, and a streamed prune in which rank 1 fails, resumed afterwards. The parent process computes the
single-process results and compares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from osscar_hf import OsscarConfig, OsscarPruner
from osscar_hf.cli import _rank_log_level
from osscar_hf.distributed import SINGLE, Ranks, is_main_process, process_ranks
from osscar_hf.errors import OsscarConfigError
from osscar_hf.pipeline.orchestrate import rank_windows
from tests.conftest import make_model, make_text, make_tokenizer

WORLD = 2
SMALL = dict(num_samples=8, seq_len=32, batch_size=2, device="cpu")
GLOBAL = dict(sparsity=0.3, allocation="global")
# name: (model kind, config fields, whether every block forward runs on the calibration windows only)
CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "llama-gqa": ("llama-gqa", dict(attention_sparsity=0.5, mlp_sparsity=0.5), True),
    "opt-dense-targets": ("opt", dict(attention_sparsity=0.5, mlp_sparsity=0.5, dense_targets=True), True),
    "opt-wanda_sp": ("opt", dict(attention_sparsity=0.5, mlp_sparsity=0.5, method="wanda_sp"), True),
    "opt-flap-global": ("opt", dict(sparsity=0.3, method="flap"), True),
    # a Gram per expert, and a shared expert: a third consumer, solved by rank 0 beside the attention
    "qwen2_moe": ("qwen2_moe", dict(attention_sparsity=0.5, mlp_sparsity=0.5), True),
    # OSSCAR's global allocation: each rank also carries half the held-out windows through its planning passes
    "llama-gqa-global": ("llama-gqa", GLOBAL, True),
    # the allocation search: the same candidates on every rank, each on its half of the held-out windows, the KL summed
    "llama-gqa-search": ("llama-gqa", dict(GLOBAL, allocation_search=3), True),
}
STREAMED = {"llama-gqa": "llama-gqa", "opt": "opt"}  # checkpoint name: model kind
FAILING_BLOCK = 1


def _texts() -> list[str]:
    words = make_text().split()
    return [" ".join(words[i:i + 200]) for i in range(0, len(words), 200)]


def _pruner(**fields: Any) -> OsscarPruner:
    return OsscarPruner(OsscarConfig(dataset=_texts(), **SMALL, **fields))


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def _prune_case(name: str) -> dict[str, Any]:
    """Prune the case in memory; the state, kept structures, block forwards and experts solved by this process (all
    blocks together), and the damage curves OSSCAR's allocation measured (None for other plans)."""
    import osscar_hf.pipeline.experts as experts_module
    import osscar_hf.pipeline.sensitivity as sensitivity

    kind, fields, _ = CASES[name]
    model = make_model(kind)
    forwards, solves, solve_one = [0], [0], experts_module._select_one
    damage: list[Any] = [None]
    allocate = sensitivity.global_sizes

    def recorded(config: Any, geometries: Any, curves: Any) -> Any:
        damage[0] = curves
        return allocate(config, geometries, curves)

    for block in _blocks(model):
        block.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def counted(*args: Any, **kwargs: Any) -> Any:
        solves[0] += 1
        return solve_one(*args, **kwargs)

    experts_module._select_one, sensitivity.global_sizes = counted, recorded
    try:
        pruner = _pruner(**fields)
        pruner.prune(model, make_tokenizer(), progress=False)
    finally:
        experts_module._select_one, sensitivity.global_sizes = solve_one, allocate
    kept = [(b.attention.kept_indices, b.mlp.kept_indices) for b in pruner.report.blocks]
    return {"state": model.state_dict(), "kept": kept, "forwards": forwards[0], "expert_solves": solves[0],
            "damage": damage[0]}


def _streamed_prunes(root: Path, rank: int) -> dict[str, Any]:
    """Streamed prunes under an initialised group: one plain, one where this rank fails (rank 1) then resumed."""
    import osscar_hf.streaming.run as streaming_run
    from osscar_hf.pipeline.block import BlockStream

    out: dict[str, Any] = {}
    fields = dict(attention_sparsity=0.5, mlp_sparsity=0.5)
    _pruner(**fields).prune_checkpoint(root / "llama-gqa", root / "dist-llama-gqa", progress=False)
    _pruner(**GLOBAL).prune_checkpoint(root / "llama-gqa", root / "dist-global-llama-gqa", progress=False)
    real_load, real_prune = streaming_run.ShardBlocks.load, BlockStream.prune

    def failing_load(self, index: int, block: torch.nn.Module) -> None:
        if rank == 1 and index == FAILING_BLOCK:
            out["raised_at"] = time.time()
            raise RuntimeError("injected failure")
        real_load(self, index, block)

    streaming_run.ShardBlocks.load = failing_load
    try:
        _pruner(**fields).prune_checkpoint(root / "opt", root / "dist-opt", progress=False)
    except Exception as exc:  # noqa: BLE001 - recorded for the parent's assertions
        out["error"] = (type(exc).__name__, str(exc), time.time())
    finally:
        streaming_run.ShardBlocks.load = real_load
    partial = root / ".dist-opt.osscar-partial" / "osscar_progress.json"
    out["finished_before_resume"] = len(json.loads(partial.read_text())["blocks"]) if partial.is_file() else None
    solved: list[int] = []

    def counting_prune(self, index: int, block: torch.nn.Module):
        solved.append(index)
        return real_prune(self, index, block)

    BlockStream.prune = counting_prune
    try:
        _pruner(**fields).prune_checkpoint(root / "opt", root / "dist-opt", progress=False)
    finally:
        BlockStream.prune = real_prune
    out["solved_on_resume"] = solved
    return out


def _worker(rank: int, root: Path, ports: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]))
    results: dict[str, Any] = {name: _prune_case(name) for name in CASES}
    results["group_left_initialised"] = dist.is_initialized()
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        del os.environ[name]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank, world_size=WORLD)
    try:
        results["streamed"] = _streamed_prunes(root, rank)
    finally:
        dist.destroy_process_group()
    torch.save(results, root / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """The two ranks' results and the single process's, for the same cases."""
    root = tmp_path_factory.mktemp("distributed")
    for name, kind in STREAMED.items():
        make_model(kind).save_pretrained(root / name, max_shard_size="20KB")
        make_tokenizer().save_pretrained(root / name)
    mp.spawn(_worker, args=(root, (_free_port(), _free_port())), nprocs=WORLD)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = {name: _prune_case(name) for name in CASES}
    for name in STREAMED:
        _pruner(attention_sparsity=0.5, mlp_sparsity=0.5).prune_checkpoint(root / name, root / f"single-{name}",
                                                                            progress=False)
    _pruner(**GLOBAL).prune_checkpoint(root / "llama-gqa", root / "single-global-llama-gqa", progress=False)
    return {"root": root, "ranks": ranks, "single": single}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_return_the_same_model_as_one_process(runs, case):
    first, second = (r[case] for r in runs["ranks"])
    single = runs["single"][case]
    assert first["state"].keys() == second["state"].keys() == single["state"].keys()
    for key, tensor in first["state"].items():
        assert torch.equal(tensor, second["state"][key]), key  # bit for bit on both ranks
        torch.testing.assert_close(tensor, single["state"][key], rtol=1e-4, atol=1e-5, msg=key)
    assert first["kept"] == second["kept"] == single["kept"]
    dense = make_model(CASES[case][0]).state_dict()
    assert sum(t.numel() for t in single["state"].values()) < sum(t.numel() for t in dense.values())  # pruned


def test_each_rank_solves_half_the_experts(runs):
    counts = [r["qwen2_moe"]["expert_solves"] for r in runs["ranks"]]
    assert counts == [runs["single"]["qwen2_moe"]["expert_solves"] // WORLD] * WORLD
    assert runs["single"]["qwen2_moe"]["expert_solves"] == 2 * 4  # two blocks of four experts


@pytest.mark.parametrize("case", sorted(c for c, (_, _, calibration_only) in CASES.items() if calibration_only))
def test_each_rank_runs_half_the_block_forwards(runs, case):
    counts = [r[case]["forwards"] for r in runs["ranks"]]
    single = runs["single"][case]["forwards"]
    assert single > 0 and sum(counts) == single  # no forward run twice
    if case == "llama-gqa-search":  # the search's first stage (held-out batch 0) runs on the rank that holds it
        assert counts[0] > counts[1]
    else:
        assert counts == [single // WORLD] * WORLD


def test_ranks_measure_the_damage_of_one_process_on_half_the_held_out_windows(runs):
    """The labels drawn for every window and the moments summed over the ranks: the curves one process measures."""
    single = runs["single"]["llama-gqa-global"]["damage"]
    assert single and any(v > 0 for curve in single.values() for v in curve.values())
    for rank in runs["ranks"]:
        damage = rank["llama-gqa-global"]["damage"]
        assert damage.keys() == single.keys()
        for key, curve in single.items():
            assert damage[key].keys() == curve.keys(), key
            for size, value in curve.items():
                assert damage[key][size] == pytest.approx(value, rel=1e-4, abs=1e-9), (key, size)


def test_held_out_windows_are_split_only_when_every_rank_gets_one():
    from osscar_hf.pipeline.sensitivity import held_out_shares

    assert held_out_shares(8, SINGLE) is None
    assert held_out_shares(8, Ranks(rank=1, world_size=3)) == [range(0, 3), range(3, 6), range(6, 8)]
    assert held_out_shares(2, Ranks(rank=0, world_size=3)) is None  # every rank runs both


def test_the_group_osscar_initialises_is_destroyed(runs):
    assert [r["group_left_initialised"] for r in runs["ranks"]] == [False, False]


def _same_checkpoint(folder: Path, expected: Path) -> None:
    names = sorted(os.listdir(expected))
    assert sorted(os.listdir(folder)) == names
    for name in names:
        if name.endswith(".safetensors"):
            got, want = load_file(folder / name), load_file(expected / name)
            assert got.keys() == want.keys(), name
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
        elif name.endswith(".json") and name != "osscar_report.json":  # the report holds timings
            assert json.loads((folder / name).read_text()) == json.loads((expected / name).read_text()), name
    report, single = (json.loads((f / "osscar_report.json").read_text()) for f in (folder, expected))
    assert [(b["attention"]["kept_indices"], b["mlp"]["kept_indices"]) for b in report["blocks"]] == [
        (b["attention"]["kept_indices"], b["mlp"]["kept_indices"]) for b in single["blocks"]]


def test_streamed_checkpoint_is_the_single_process_one(runs):
    root = runs["root"]
    _same_checkpoint(root / "dist-llama-gqa", root / "single-llama-gqa")
    # the global allocation's planning copies in a folder per rank, the held-out windows split
    _same_checkpoint(root / "dist-global-llama-gqa", root / "single-global-llama-gqa")


def test_a_failing_rank_stops_the_other_and_the_run_resumes(runs):
    root = runs["root"]
    first, second = (r["streamed"] for r in runs["ranks"])
    assert second["error"][:2] == ("RuntimeError", "injected failure")
    assert first["error"][0] == "RankFailedError"
    assert "rank 1 failed: RuntimeError: injected failure" in first["error"][1]
    assert first["error"][2] - second["raised_at"] < 30  # stopped at its next agreement, not a timeout
    assert first["finished_before_resume"] == FAILING_BLOCK  # the blocks before the failure are kept
    assert first["solved_on_resume"] == second["solved_on_resume"] == [FAILING_BLOCK]
    _same_checkpoint(root / "dist-opt", root / "single-opt")


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port"],
    # accelerate's multi-GPU launcher is torchrun's underneath; on a machine without GPUs osscar_hf picks gloo
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launched_command_line_writes_the_single_process_checkpoint(runs, launcher):
    """``torchrun -m osscar_hf prune --stream`` and ``accelerate launch -m osscar_hf prune --stream``: osscar_hf
    initialises the group from the launcher's environment; only rank 0 writes and prints."""
    root = runs["root"]
    data = root / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
    command = [sys.executable, *LAUNCHERS[launcher], str(_free_port()), "-m", "osscar_hf", "prune",
               str(root / "llama-gqa"), "--stream", "--output", str(root / f"cli-{launcher}"), "--dataset", str(data),
               "--num-samples", "8", "--seq-len", "32", "--batch-size", "2",
               "--attention-sparsity", "0.5", "--mlp-sparsity", "0.5", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0's summary only
    _same_checkpoint(root / f"cli-{launcher}", root / "single-llama-gqa")


def test_command_line_logs_below_warning_on_rank_0_only(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    assert (_rank_log_level("INFO"), _rank_log_level("ERROR")) == ("WARNING", "ERROR")
    monkeypatch.setenv("RANK", "0")
    assert is_main_process() and _rank_log_level("DEBUG") == "DEBUG"


def test_rank_shares_cover_the_batches_once():
    for count in range(2, 12):
        for world in (2, 3):
            shares = [Ranks(rank=r, world_size=world).share(count) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(count))
    windows = torch.arange(14).reshape(7, 2)
    parts = [rank_windows(windows, 2, Ranks(rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat(parts), windows) and parts[0].shape[0] == 4  # whole batches: 2 + 2, then 2 + 1
    assert rank_windows(windows, 2, SINGLE) is windows
    with pytest.raises(OsscarConfigError, match="num_samples=7 .* 2 batches, fewer than the 3 ranks"):
        rank_windows(windows, 4, Ranks(rank=0, world_size=3))


def test_one_process_without_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with process_ranks(torch.device("cpu")) as ranks:
        assert ranks is SINGLE and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OsscarConfigError, match="WORLD_SIZE='2' is set but RANK, MASTER_ADDR, MASTER_PORT"):
        with process_ranks(torch.device("cpu")):
            pass
