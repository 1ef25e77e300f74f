"""Data-parallel pruning (torch.distributed, gloo on the CPU): time per block with 1 and 2 processes, and the bytes
all-reduced per block against the ideal (the two p x p float32 Grams of a block's consumers).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/distributed.py [--layers 4 --hidden 512 --ffn 1536 --heads 8]

A random Llama with GQA (random weights: time and traffic do not depend on the values) is pruned in memory from
random calibration token ids, in fresh processes started with torch.multiprocessing: one process with all the CPU
threads, one process with one thread (the share of each rank below), and ``--procs`` ranks of one thread each under
torchrun's environment variables (osscar_hf initialises the gloo group itself). Every setting runs ``--repeats``
times; the figures are medians over the blocks and the repeats. The ranks' bytes are counted by wrapping
``torch.distributed.all_reduce`` and ``broadcast`` in the worker processes.

Prints a table and writes benchmarks/results/distributed.md and distributed.json (``--results-name`` picks another
name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=args.seq_len)
    return AutoModelForCausalLM.from_config(config).eval()


def _count_traffic(counts: dict[str, int]) -> None:
    """Wrap the collectives osscar_hf uses so that the bytes each sends are added to ``counts``."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    def wrap(name: str, module: Any) -> None:
        real = getattr(module, name)

        def counting(tensor: Any, *a: Any, **k: Any) -> Any:
            counts[name] = counts.get(name, 0) + tensor.numel() * tensor.element_size()
            return real(tensor, *a, **k)

        setattr(module, name, counting)

    wrap("all_reduce", dist)
    wrap("broadcast", dist)  # tensors
    wrap("broadcast", c10d)  # broadcast_object_list sends through it


def _worker(rank: int, world: int, threads: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch

    from osscar_hf import OsscarConfig, OsscarPruner
    import osscar_hf.pipeline.block as block_module

    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    counts: dict[str, int] = {}
    _count_traffic(counts)
    statistics_bytes: list[int] = []
    real_reduce = block_module.reduce_statistics

    def reduce(stats: Any, ranks: Any) -> int:
        sent = real_reduce(stats, ranks)
        statistics_bytes.append(sent)
        return sent

    block_module.reduce_statistics = reduce
    cpu_seconds: list[float] = []  # this process's CPU time per block (the work it did, whatever else runs)
    real_prune = block_module.BlockStream.prune

    def timed_prune(self: Any, index: int, block: Any) -> Any:
        started = time.process_time()
        try:
            return real_prune(self, index, block)
        finally:
            cpu_seconds.append(time.process_time() - started)

    block_module.BlockStream.prune = timed_prune
    ids = torch.randint(0, args.vocab, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(1))
    config = OsscarConfig(dataset=ids, num_samples=args.windows, seq_len=args.seq_len, batch_size=args.batch_size,
                          attention_sparsity=args.attention_sparsity, mlp_sparsity=args.mlp_sparsity, device="cpu",
                          activation_storage="memory")
    pruner = OsscarPruner(config)
    started = time.perf_counter()
    pruner.prune(_model(args), progress=False)
    total = time.perf_counter() - started
    Path(out.format(rank=rank)).write_text(json.dumps({
        "block_seconds": [b.seconds for b in pruner.report.blocks], "total_seconds": total,
        "block_cpu_seconds": cpu_seconds, "statistics_bytes_per_block": statistics_bytes, "collective_bytes": counts,
        "kept": [(b.attention.kept_indices, b.mlp.kept_indices) for b in pruner.report.blocks]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(procs: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Rank 0's figures, with the CPU seconds per block of the busiest rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "rank{rank}.json")
        load = os.getloadavg()[0]
        mp.spawn(_worker, args=(procs, threads, _free_port(), args, out), nprocs=procs)
        ranks = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(procs)]
    result = ranks[0]
    result["block_cpu_seconds"] = [max(cpu) for cpu in zip(*(r["block_cpu_seconds"] for r in ranks))]
    result["load_before"] = load
    return result


def ideal_bytes(args: argparse.Namespace) -> int:
    """Two p x p float32 Grams: the attention output projection's (p = heads * head_dim) and the MLP's (p = ffn)."""
    return 4 * (args.hidden ** 2 + args.ffn ** 2)


def summarise(name: str, runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    seconds = [s for run in runs for s in run["block_seconds"]]
    cpu = [s for run in runs for s in run["block_cpu_seconds"]]
    row: dict[str, Any] = {"setting": name, "median_block_seconds": statistics.median(seconds),
                           "median_block_cpu_seconds": statistics.median(cpu),
                           "load_before": [r["load_before"] for r in runs],
                           "median_total_seconds": statistics.median(r["total_seconds"] for r in runs),
                           "block_seconds": [r["block_seconds"] for r in runs]}
    reduced = runs[0]["statistics_bytes_per_block"]
    if any(reduced):
        collective = runs[0]["collective_bytes"]
        row.update(statistics_bytes_per_block=statistics.median(reduced), ideal_bytes_per_block=ideal_bytes(args),
                   all_reduce_bytes_per_block=collective.get("all_reduce", 0) / args.layers,
                   broadcast_bytes_per_block=collective.get("broadcast", 0) / args.layers)
    row["kept"] = runs[0]["kept"]
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, cpus: int) -> str:
    mib = 2 ** 20
    lines = [
        "# Data-parallel pruning: time per block and bytes all-reduced",
        "",
        f"Random Llama (GQA): {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads, "
        f"{args.kv_heads} KV heads. `prune()` on the CPU, attention sparsity {args.attention_sparsity}, MLP sparsity "
        f"{args.mlp_sparsity}, {args.windows} calibration windows of {args.seq_len} tokens in batches of "
        f"{args.batch_size}, {args.repeats} runs per setting, medians over blocks and runs. Ranks: gloo, one thread "
        f"each. Machine: {platform.machine()}, {cpus} CPUs, `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}`. "
        "Written by `benchmarks/distributed.py`.",
        "",
        "Wall time depends on what else the machine runs (the 1-minute load average before each run is in the JSON);"
        " CPU seconds per block are those of the busiest process (all its threads), the work it did.",
        "",
        "| setting | median s / block | median s / run | wall speed-up per block | median CPU s / block, busiest "
        "process | load average before the runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    base = rows[0]["median_block_seconds"]
    for row in rows:
        loads = ", ".join(f"{x:.1f}" for x in row["load_before"])
        lines.append(f"| {row['setting']} | {row['median_block_seconds']:.2f} | {row['median_total_seconds']:.1f} | "
                     f"{base / row['median_block_seconds']:.2f}x | {row['median_block_cpu_seconds']:.2f} | {loads} |")
    dist_rows = [r for r in rows if "statistics_bytes_per_block" in r]
    if dist_rows:
        r = dist_rows[0]
        lines += [
            "",
            f"| bytes per block ({r['setting']}), each rank | MiB | / ideal |",
            "|---|---:|---:|",
            f"| ideal: two p x p float32 Grams (p = {args.hidden} and {args.ffn}) | "
            f"{r['ideal_bytes_per_block'] / mib:.2f} | 1.000 |",
            f"| statistics all-reduced (Grams with padded rows, token counts) | "
            f"{r['statistics_bytes_per_block'] / mib:.2f} | "
            f"{r['statistics_bytes_per_block'] / r['ideal_bytes_per_block']:.3f} |",
            f"| everything all-reduced (also the agreements that no rank failed) | "
            f"{r['all_reduce_bytes_per_block'] / mib:.2f} | "
            f"{r['all_reduce_bytes_per_block'] / r['ideal_bytes_per_block']:.3f} |",
            f"| broadcast: the solutions (kept indices, refit weights, report figures) | "
            f"{r['broadcast_bytes_per_block'] / mib:.2f} | "
            f"{r['broadcast_bytes_per_block'] / r['ideal_bytes_per_block']:.3f} |",
        ]
    lines += ["", "Kept structures against the first setting (float rounding differs with the thread count and the "
              "order of the sums; near-ties on random weights may flip):", ""]
    for row in rows[1:]:
        lines.append(f"- {row['setting']}: {kept_agreement(rows[0]['kept'], row['kept'])}")
    lines.append("")
    return "\n".join(lines)


def kept_agreement(first: list[Any], other: list[Any]) -> str:
    """How far two runs' kept structures agree: identical consumers, and the share of kept structures in common."""
    pairs = [(set(a), set(b)) for x, y in zip(first, other) for a, b in zip(x, y)]
    identical = sum(a == b for a, b in pairs)
    common = sum(len(a & b) for a, b in pairs) / max(1, sum(len(a) for a, _ in pairs))
    return f"{identical} of {len(pairs)} consumers identical, {common:.1%} of kept structures in common"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--attention-sparsity", type=float, default=0.25)
    parser.add_argument("--mlp-sparsity", type=float, default=0.5)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results-name", default="distributed")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    settings = [(f"1 process, {cpus} threads", 1, cpus), ("1 process, 1 thread", 1, 1),
                (f"{args.procs} processes, 1 thread each", args.procs, 1)]
    rows = []
    for name, procs, threads in settings:
        runs = [run_setting(procs, threads, args) for _ in range(args.repeats)]
        rows.append(summarise(name, runs, args))
        print(f"{name}: median {rows[-1]['median_block_seconds']:.2f} s per block", flush=True)
    text = markdown(rows, args, cpus)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results_name}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"{args.results_name}.json").write_text(json_record(rows, args, cpus), encoding="utf-8")


def json_record(rows: list[dict[str, Any]], args: argparse.Namespace, cpus: int) -> str:
    """The results as JSON: every figure, the kept structures summarised against the first setting's."""
    out = [{k: v for k, v in row.items() if k != "kept"} | {"kept_against_first": kept_agreement(rows[0]["kept"],
                                                                                               row["kept"])}
           for row in rows]
    return json.dumps({"settings": vars(args), "cpus": cpus, "rows": out}, indent=1) + "\n"


if __name__ == "__main__":
    main()
