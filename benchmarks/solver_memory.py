"""Peak host memory and time of ``solve_layer`` on one large synthetic layer (OPT-2.7B's fc2 by default).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/solver_memory.py [--p 10240 --q 2560] [--repeats 3]
        [--ref HEAD] [--output benchmarks/results/solver_memory.md]

Problem: the settings ``benchmarks/memory.py`` prunes with (OsscarConfig defaults for an MLP consumer):
group_size 1, 25% sparsity, step 10, swap size 10, 30 local-search rounds, damping 0.01, solver float32.
H = X^T X / N from N = 1024 tokens (as in memory.py: 8 windows of 128 tokens) of ReLU features, so H has
rank N < p and only the damping makes it positive definite, like an fc2 Gram; W_hat is a bfloat16
``weight.T`` view, as the pipeline passes it.

Each run is a fresh child process. Its baseline is its RSS once torch is imported and the inputs (H,
W_hat) exist; the peak is ``VmHWM`` from /proc/self/status. Stage peaks come from resetting ``VmHWM``
(``echo 5 > /proc/self/clear_refs``) at the entry of every solver function that ``solve_layer`` calls
(the public names imported into ``osscar_hf.solver.layer``) and reading it at the exit; code in
``solve_layer`` and its private helpers between two calls is reported as "(between)" before the next one.

Cases: the working tree's ``solve_layer`` with ``in_place=False`` (a working copy of H) and
``in_place=True`` (H's own storage is the workspace), and with ``--ref REF`` the same problem solved by
``osscar_hf`` as of git ref REF (extracted with ``git archive`` into a temporary folder). Runs of the cases
are interleaved, and times are medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_inputs(p: int, q: int, tokens: int, seed: int) -> tuple[Any, Any]:
    """H (p x p float32 running-mean Gram of ReLU features) and W_hat (a bfloat16 (p, q) ``weight.T`` view)."""
    import torch

    from osscar_hf.solver import accumulate_gram, new_gram

    gen = torch.Generator().manual_seed(seed)
    H = new_gram(p)
    count = 0
    for _ in range(0, tokens, 256):
        X = torch.relu(torch.randn(min(256, tokens - count), p, generator=gen))
        count = accumulate_gram(H, count, X)
    del X
    weight = (torch.randn(q, p, generator=gen) * 0.02).to(torch.bfloat16)
    return H, weight.T


def child(config: dict[str, Any]) -> None:
    """One run in a fresh process: prints a JSON line with the peaks, stages and times."""
    import torch

    import osscar_hf.solver.layer as layer_module
    from osscar_hf.solver import solve_layer

    H, W_hat = make_inputs(config["p"], config["q"], config["tokens"], config["seed"])
    kwargs = dict(config["kwargs"])
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    accepted = inspect.signature(solve_layer).parameters
    for key in list(kwargs):
        if key not in accepted:
            raise SystemExit(f"this solve_layer has no argument {key!r}")

    stages: list[dict[str, Any]] = []
    can_reset = _reset_peak()

    last = [0.0]

    def close_between(next_name: str) -> None:
        status = _status()
        if can_reset:
            stages.append({"name": f"(between) before {next_name}", "peak": status["VmHWM"],
                           "seconds": time.perf_counter() - last[0]})
            _reset_peak()

    def wrap(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            close_between(name)
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                status = _status()
                stages.append({"name": name, "peak": status["VmHWM"], "seconds": time.perf_counter() - start,
                               "rss_after": status["VmRSS"]})
                _reset_peak()
                last[0] = time.perf_counter()

        return wrapper

    if config["stages"]:
        for name, value in list(vars(layer_module).items()):
            if (inspect.isfunction(value) and name != "solve_layer" and not name.startswith("_")
                    and getattr(value, "__module__", "").startswith("osscar_hf.solver")):
                setattr(layer_module, name, wrap(name, value))

    torch.set_num_threads(config["threads"]) if config["threads"] else None
    baseline = _status()["VmRSS"]
    _reset_peak()
    start = last[0] = time.perf_counter()
    solution = solve_layer(H, W_hat, **kwargs)
    seconds = time.perf_counter() - start
    close_between("return")
    peak = max([s["peak"] for s in stages] + [_status()["VmHWM"]]) if can_reset else _status()["VmHWM"]
    # Merge consecutive calls of the same function (e.g. check_finite) into one row.
    merged: list[dict[str, Any]] = []
    for stage in stages:
        if merged and merged[-1]["name"] == stage["name"]:
            merged[-1]["peak"] = max(merged[-1]["peak"], stage["peak"])
            merged[-1]["seconds"] += stage["seconds"]
            merged[-1]["calls"] += 1
        else:
            merged.append({**stage, "calls": 1})
    print(json.dumps({
        "baseline": baseline, "peak": peak, "seconds": seconds, "stages": merged, "peak_reset": can_reset,
        "seconds_stage_a": solution.seconds_stage_a, "seconds_local_search": solution.seconds_local_search,
        "objective": solution.objective, "objective_stage_a": solution.objective_stage_a,
        "swaps": solution.swaps_accepted, "relative_error": solution.relative_error,
        "kept_sha1": hashlib.sha1(solution.kept_groups.numpy().tobytes()).hexdigest()[:12],
        "kept": int(solution.kept_groups.numel()),
        "H_bytes": H.numel() * H.element_size(),
    }))


def run_case(source: Path, config: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(source) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True,
                         env=env, cwd=source, check=False)
    if run.returncode != 0:
        raise SystemExit(f"the child process failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def extract_ref(ref: str, folder: Path) -> Path:
    """``osscar_hf`` as of git ref ``ref``, extracted into ``folder`` (git state is not touched)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "osscar_hf"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=10240)
    parser.add_argument("--q", type=int, default=2560)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--swap-size", type=int, default=10)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the child (0: torch's default)")
    parser.add_argument("--ref", action="append", default=[], help="also run osscar_hf as of this git ref")
    parser.add_argument("--no-in-place", action="store_true", help="skip the in_place=True case")
    parser.add_argument("--output", type=Path, help="write the tables here (Markdown) and a .json next to it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    base = {"p": args.p, "q": args.q, "tokens": args.tokens, "seed": 0, "threads": args.threads,
            "stages": True}
    solve = {"group_size": 1, "num_keep": args.p - round(args.sparsity * args.p), "step": args.step,
             "swap_size": args.swap_size, "local_search_iters": args.iters, "damping": 0.01,
             "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[str, Path, dict[str, Any]]] = []
        for ref in args.ref:
            folder = Path(tmp) / ref.replace("/", "_")
            folder.mkdir()
            cases.append((f"{ref} (git)", extract_ref(ref, folder), {}))
        cases.append(("working tree, in_place=False", REPO, {}))
        if not args.no_in_place:
            cases.append(("working tree, in_place=True", REPO, {"in_place": True}))
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in cases}
        for repeat in range(args.repeats):
            for name, source, extra in cases:
                config = {**base, "kwargs": {**solve, **extra}}
                result = run_case(source, config)
                results[name].append(result)
                print(f"[{repeat + 1}/{args.repeats}] {name}: peak above baseline "
                      f"{(result['peak'] - result['baseline']) / GIB:.3f} GiB, {result['seconds']:.1f} s", flush=True)

    first = next(iter(results.values()))[0]
    h_gib = first["H_bytes"] / GIB
    p, q = args.p, args.q
    value_bytes = {"float32": 4, "float64": 8}[args.dtype]
    lines = [
        "# Solver peak memory (`solve_layer`, one large layer)",
        "",
        (f"p = {p} inputs, q = {q} outputs, group_size 1, keep {solve['num_keep']}, step {args.step}, swap size "
         f"{args.swap_size}, {args.iters} local-search rounds, solver {args.dtype}; H from {args.tokens} tokens of "
         f"ReLU features (float32, {h_gib:.3f} GiB), W_hat bfloat16. torch {_torch_version()}, "
         f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY="
         f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, load average {os.getloadavg()[0]:.2f} at the end; "
         f"medians of {args.repeats} runs, each in a fresh process. 'Peak' is VmHWM minus the RSS once the inputs "
         f"exist (H itself is not counted). For scale: p^2 = {p * p * value_bytes / GIB:.3f} GiB, p q = "
         f"{p * q * value_bytes / GIB:.3f} GiB in the solver dtype."),
        "",
        ("| case | peak above inputs (GiB) | in units of p^2 | total (s) | stage A (s) | local search (s) | swaps "
         "| objective | rel. error | kept set (SHA-1) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, runs in results.items():
        peak = statistics.median(r["peak"] - r["baseline"] for r in runs)
        r0 = runs[0]
        lines.append(
            f"| {name} | {peak / GIB:.3f} | {peak / (p * p * value_bytes):.2f} | "
            f"{statistics.median(r['seconds'] for r in runs):.1f} | "
            f"{statistics.median(r['seconds_stage_a'] for r in runs):.1f} | "
            f"{statistics.median(r['seconds_local_search'] for r in runs):.1f} | {r0['swaps']} | "
            f"{r0['objective']:.8g} | {r0['relative_error']:.5g} | {r0['kept_sha1']} |")
    lines += ["", ("Where the peak comes from (first run of each case; peak RSS above the inputs while the stage "
                   "ran, GiB):"), ""]
    for name, runs in results.items():
        lines += [f"**{name}**", "", "| stage | calls | seconds | peak (GiB) |", "|---|---:|---:|---:|"]
        for stage in runs[0]["stages"]:
            lines.append(f"| {stage['name']} | {stage['calls']} | {stage['seconds']:.2f} | "
                         f"{(stage['peak'] - runs[0]['baseline']) / GIB:.3f} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps({"settings": vars(args) | {"output": str(args.output)},
                                                                "results": results}, indent=1, default=str) + "\n")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
