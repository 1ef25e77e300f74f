"""Peak host memory of streaming pruning (OsscarPruner.prune_checkpoint) on a checkpoint larger than it.

    python benchmarks/memory.py [--layers 32 --hidden 2560 --ffn 10240 --heads 32] [--workdir DIR]

On a GPU, ``--device cuda`` also records each block's peak device memory and time, e.g. at OPT-30B shapes
(a few blocks are enough for per-block figures):

    python benchmarks/memory.py --device cuda --allocator mapped --layers 4 --hidden 7168 --ffn 28672 --heads 56

1. Writes a random OPT checkpoint with OPT-2.7B shapes (bfloat16, one shard per block, about 5.3 GB)
   without ever holding more than one block of it in memory.
2. Prunes it with ``prune_checkpoint`` in fresh child processes and reads each one's peak RSS: once with
   ``map_large_allocations=False`` (glibc's default allocator settings) and once with the default
   ``map_large_allocations=True`` (every allocation of 1 MiB or more in its own memory map during the run;
   ``--allocator`` picks one).
3. Compares the peak with the memory the algorithm needs at once: the largest block, the calibration
   activations (block inputs and next inputs) and the two Gram matrices (the bound), and the solver's
   working set for the largest consumer beyond its float32 Gram matrix (two p x q values in the solver dtype,
   plus for a float64 solve the Gram's conversion to float64, 4 more bytes per value), on top of
   the interpreter with torch, transformers and the OPT modeling code imported (measured in the child
   before pruning: code, not data).

Prints a table and writes benchmarks/results/memory.md and memory.json (memory_cuda.md/.json with
``--device cuda``, so the CPU record stays; ``--results-name`` picks another name). Random weights are fine
here: memory and time do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def make_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """Write the random checkpoint shard by shard; return its size in bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(hidden_size=args.hidden, ffn_dim=args.ffn, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, vocab_size=args.vocab, word_embed_proj_dim=args.hidden,
                       max_position_embeddings=2048, dtype="bfloat16")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}  # tied
    groups: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        group = f"block{int(parts[3]):03d}" if key.startswith("model.decoder.layers.") else "other"
        groups.setdefault(group, []).append(key)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    names = sorted(groups)
    for i, group in enumerate(names, 1):
        tensors = {}
        for key in groups[group]:
            if key.endswith("layer_norm.weight"):
                t = torch.ones(shapes[key])
            elif key.endswith("bias"):
                t = torch.zeros(shapes[key])
            else:
                t = torch.randn(shapes[key], generator=generator) * 0.02
            tensors[key] = t.to(torch.bfloat16)
        name = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return total


def _memory_status() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes, from /proc (Linux).

    Not ``getrusage``: its ``ru_maxrss`` survives ``exec``, so a child started by a big parent would report
    the parent's peak. ``VmHWM`` belongs to the process's own address space.
    """
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def child(args: argparse.Namespace) -> None:
    """Run in a fresh process: prune the checkpoint streaming and print measurements as JSON."""
    import torch
    from transformers import OPTForCausalLM  # noqa: F401  (the model's code: the pruning imports it anyway)

    import osscar_hf  # noqa: F401
    from osscar_hf import OsscarConfig, OsscarPruner
    from osscar_hf.methods import osscar as osscar_method
    from osscar_hf.host_memory import heap_fragmentation_hint

    if args.map_large_allocations and heap_fragmentation_hint() is None:
        sys.exit("prune_checkpoint(map_large_allocations=True) would not change the allocator here (not glibc, or "
                 "MALLOC_MMAP_THRESHOLD_ is set)")

    # Record (only) whether the pipeline lets the solver work in the Gram's storage: it sizes the working set.
    in_place_calls: list[bool] = []
    solve_layer = osscar_method.solve_layer

    def recording_solve_layer(*solve_args: object, **solve_kwargs: object) -> object:
        in_place_calls.append(bool(solve_kwargs.get("in_place", False)))
        return solve_layer(*solve_args, **solve_kwargs)

    osscar_method.solve_layer = recording_solve_layer
    baseline, _ = _memory_status()
    ids = torch.randint(2, args.vocab, (args.num_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    config = OsscarConfig(attention_sparsity=args.attention_sparsity, mlp_sparsity=args.mlp_sparsity, dataset=ids,
                          num_samples=args.num_samples, seq_len=args.seq_len, solver_dtype=args.solver_dtype,
                          device=args.device, batch_size=args.batch_size)
    device = config.resolved_device()
    pruner = OsscarPruner(config)
    start = time.perf_counter()
    pruner.prune_checkpoint(args.checkpoint, args.output, overwrite=True, progress=False,
                            map_large_allocations=args.map_large_allocations)
    seconds = time.perf_counter() - start
    _, peak = _memory_status()
    print(json.dumps({
        "baseline_rss": baseline, "peak_rss": peak, "seconds": seconds,
        "block_seconds": [b.seconds for b in pruner.report.blocks],
        "block_peak_rss": [b.peak_host_rss_bytes for b in pruner.report.blocks],
        "block_peak_device": [b.peak_device_memory_bytes for b in pruner.report.blocks],
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "parameters_before": pruner.report.parameters_before, "parameters_after": pruner.report.parameters_after,
        "solver_in_place": bool(in_place_calls) and all(in_place_calls),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--ffn", type=int, default=10240)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--attention-sparsity", type=float, default=0.25)
    parser.add_argument("--mlp-sparsity", type=float, default=0.25)
    parser.add_argument("--solver-dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu",
                        help="compute device for the blocks: cpu (default), cuda or cuda:N (the activations stay "
                             "in host memory)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "osscar-memory-benchmark")
    parser.add_argument("--allocator", choices=["both", "default", "mapped"], default="both",
                        help="prune_checkpoint(map_large_allocations=False) (glibc's defaults), =True, or both")
    parser.add_argument("--results-name", default=None,
                        help="write benchmarks/results/NAME.md and NAME.json (default: memory, or memory_cuda on a GPU)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated checkpoint (WORKDIR/dense, reused by later runs) and the output")
    parser.add_argument("--map-large-allocations", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from osscar_hf import OsscarConfig
    from osscar_hf.errors import OsscarConfigError

    try:  # a bad or absent device fails here, before any work
        on_gpu = OsscarConfig(device=args.device).resolved_device().type == "cuda"
    except OsscarConfigError as error:
        sys.exit(str(error))
    source, output = args.workdir / "dense", args.workdir / "pruned"
    started = time.perf_counter()
    created = not (source / "model.safetensors.index.json").exists()
    if not created:
        wanted = {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "ffn_dim": args.ffn,
                  "num_attention_heads": args.heads, "vocab_size": args.vocab}
        found = json.loads((source / "config.json").read_text())
        if any(found.get(k) != v for k, v in wanted.items()):
            sys.exit(f"{source} holds a checkpoint of other shapes ({ {k: found.get(k) for k in wanted} }, asked for "
                     f"{wanted}); pass another --workdir, or delete that folder")
        size = json.loads((source / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        print(f"reusing the checkpoint in {source} ({size / GIB:.2f} GiB)")
    else:
        size = make_checkpoint(source, args)
        print(f"wrote a random OPT checkpoint of {size / GIB:.2f} GiB to {source} in "
              f"{time.perf_counter() - started:.0f} s")
    base = [sys.executable, __file__, "--child", "--checkpoint", str(source), "--output", str(output),
            *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("child", "checkpoint", "output", "workdir", "keep", "allocator", "map_large_allocations",
                           "results_name")]]
    kinds = ["default", "mapped"] if args.allocator == "both" else [args.allocator]
    results = {}
    for kind in kinds:
        command = [*base, "--map-large-allocations"] if kind == "mapped" else base
        print(f"pruning with the {kind} allocator settings ...", flush=True)
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TQDM_DISABLE": "1"}  # the user's policy wins
        run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if run.returncode != 0:
            sys.exit(f"the pruning process failed:\n{run.stderr[-4000:]}")
        results[kind] = json.loads(run.stdout.strip().splitlines()[-1])

    text, sizes = report(args, results, size, on_gpu)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = args.results_name or ("memory_cuda" if on_gpu else "memory")
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                      "sizes": sizes, "runs": results}, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
        if created:  # a checkpoint found there is left where it was
            shutil.rmtree(source, ignore_errors=True)


def report(args: argparse.Namespace, results: dict[str, dict], size: int, on_gpu: bool) -> tuple[str, dict[str, int]]:
    """The Markdown tables for one benchmark run, and the sizes they compare against, by name."""
    kinds = list(results)
    h, f, s = args.hidden, args.ffn, 2  # bfloat16 bytes
    solver_bytes = {"float32": 4, "float64": 8}[args.solver_dtype]
    block = (4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h) * s
    activations = 2 * args.num_samples * args.seq_len * h * s  # this block's inputs and the next block's
    grams = (f * f + h * h) * 4
    # The solver's memory beyond the Gram matrix it is given (osscar_hf.solver.layer.solve_layer): two (p, q)
    # tensors, plus a p x p working copy of the Gram unless the pipeline lets it work in place.
    # The Grams are float32: a float32 solve works in the Gram's own storage; for a float64 one the pipeline
    # converts the Gram first (p x p values of 8 bytes instead of 4 from then on), unless in_place is off.
    in_place = all(r.get("solver_in_place", False) for r in results.values())
    solver = (f * f * (solver_bytes - 4) if in_place else f * f * solver_bytes) + 2 * f * h * solver_bytes
    if not in_place:
        solver_label = f"a {args.solver_dtype} copy of the Gram + 2pq"
    elif args.solver_dtype == "float32":
        solver_label = "2pq, in the Gram's storage"
    else:
        solver_label = f"the Gram converted to {args.solver_dtype} (+4 bytes per value) + 2pq"
    bound = block + activations + grams
    # On a GPU only the block, its Grams, one batch of activations (in and out) and the solver are there at once.
    batch = 2 * min(args.batch_size, args.num_samples) * args.seq_len * h * s
    device_bound = block + grams + batch
    sizes = [
        ("checkpoint size", size),
        ("largest block", block),
        ("calibration activations (inputs + next inputs)", activations),
        ("Gram matrices (fc2 + out_proj, fp32)", grams),
        ("bound: block + activations + Grams", bound),
        (f"solver working set for fc2 beyond its Gram ({solver_label}, {args.solver_dtype})", solver),
        ("bound + solver working set", bound + solver),
    ]
    labels = {"default": "map_large_allocations=False (glibc defaults)",
              "mapped": "map_large_allocations=True (default)"}
    header = " | ".join(labels[k] for k in kinds)

    def row(name: str, values: list[str]) -> str:
        return f"| {name} | {' | '.join(values)} |"

    def gib(key: str) -> list[str]:
        return [f"{results[k][key] / GIB:.2f} GiB" for k in kinds]

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    above = {k: results[k]["peak_rss"] - results[k]["baseline_rss"] for k in kinds}
    run_rows = [
        row("interpreter with torch, transformers and the OPT code (RSS before pruning)", gib("baseline_rss")),
        row("peak RSS of the pruning process", gib("peak_rss")),
        row("peak RSS above the interpreter", [f"{above[k] / GIB:.2f} GiB" for k in kinds]),
        row("**above the interpreter / bound**", [f"**{above[k] / bound:.2f}x**" for k in kinds]),
        row("above the interpreter / (bound + solver working set)",
            [f"{above[k] / (bound + solver):.2f}x" for k in kinds]),
        row("peak RSS / bound", [f"{results[k]['peak_rss'] / bound:.2f}x" for k in kinds]),
        row("peak RSS / checkpoint size", [f"{results[k]['peak_rss'] / size:.2f}x" for k in kinds]),
        row("peak RSS when block 0 was done",
            [f"{results[k]['block_peak_rss'][0] / GIB:.2f} GiB" for k in kinds]),
        row("peak RSS when the last block was done",
            [f"{results[k]['block_peak_rss'][-1] / GIB:.2f} GiB" for k in kinds]),
        row("total time", [f"{results[k]['seconds']:.0f} s" for k in kinds]),
        row("median time per block", [f"{median(results[k]['block_seconds']):.1f} s" for k in kinds]),
    ]
    if on_gpu:
        sizes += [("one batch of activations on the device (in + out)", batch),
                  ("device bound: block + Grams + one batch", device_bound)]
        run_rows += [
            row("peak device memory, median over blocks",
                [f"{median(results[k]['block_peak_device']) / GIB:.2f} GiB" for k in kinds]),
            row("peak device memory, largest block", [f"{max(results[k]['block_peak_device']) / GIB:.2f} GiB"
                                                      for k in kinds]),
            row("largest / device bound", [f"{max(results[k]['block_peak_device']) / device_bound:.2f}x"
                                           for k in kinds]),
            row("largest / (device bound + solver working set)",
                [f"{max(results[k]['block_peak_device']) / (device_bound + solver):.2f}x" for k in kinds]),
        ]
    first = results[kinds[0]]
    lines = [
        "# Streaming pruning: peak host and device memory" if on_gpu else "# Streaming pruning: peak host memory",
        "",
        (f"Random OPT checkpoint: {args.layers} layers, hidden {h}, FFN {f}, {args.heads} heads, vocab {args.vocab}, "
         f"bfloat16, one shard per block. `prune_checkpoint` on {first['device']} ({first['device_name']}), "
         f"activations in host memory, attention sparsity "
         f"{args.attention_sparsity}, MLP sparsity {args.mlp_sparsity}, {args.num_samples} calibration windows of "
         f"{args.seq_len} tokens, solver {args.solver_dtype}. Peak RSS is the pruning process's own `VmHWM` (Linux "
         f"/proc){'; peak device memory is `torch.cuda.max_memory_allocated` over each block' if on_gpu else ''}. "
         f"Machine: {platform.machine()}, {os.cpu_count()} CPUs. Parameters "
         f"{first['parameters_before']:,} -> {first['parameters_after']:,}."),
        "",
        "| quantity | GiB |",
        "|---|---:|",
        *[f"| {name} | {value / GIB:.2f} |" for name, value in sizes],
        "",
        f"| one pruning process each | {header} |",
        "|---|" + "---:|" * len(kinds),
        *run_rows,
    ]
    return "\n".join(lines) + "\n", dict(sizes)


if __name__ == "__main__":
    main()
