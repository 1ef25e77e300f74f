"""The llama.cpp side of ``benchmarks/speed.py``, run by a Python that has llama-cpp-python (and numpy, no torch):
``python speed_llamacpp_worker.py JOB.json RESULT.json``.

The job names GGUF files (one per model), cells ``[batch, prompt, repetitions, new_tokens]`` (batch must be 1: the
Python API evaluates one sequence) and a thread count. Every model is loaded once; in each repetition of a cell
every model runs once, in an order that rotates between repetitions: the prompt (random ids, seeded) in one batch
with the last position's logits only (prefill), then ``new_tokens`` greedy steps of one token (decode). The result
holds, per cell and model, the prefill and decode tokens/s of every repetition.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated position (the only row computed without ``logits_all``)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def run_once(llm, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """Tokens per wall-clock second and per CPU second (this process, all threads; ggml's threads poll for work
    briefly, which counts) of one prompt and of ``new_tokens`` greedy steps after it."""
    llm.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    llm.eval(prompt)
    token = int(np.argmax(last_logits(llm)))
    prefill = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(np.argmax(last_logits(llm)))
    decode = time.perf_counter() - wall, time.process_time() - cpu
    return {"prefill": len(prompt) / prefill[0], "decode": new_tokens / decode[0],
            "prefill_cpu": len(prompt) / prefill[1], "decode_cpu": new_tokens / decode[1]}


def run_cell(models: dict, cell: list[int], seed: int) -> dict[str, dict[str, list[float]]]:
    batch, prompt_len, repetitions, new_tokens = cell
    if batch != 1:
        raise ValueError("llama-cpp-python's Llama evaluates one sequence: batch must be 1")
    vocab = next(iter(models.values())).n_vocab()
    prompt = np.random.default_rng(seed).integers(0, vocab, prompt_len).tolist()
    names = list(models)
    for name in names:  # warm-up
        run_once(models[name], prompt, 2)
    out: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for rep in range(repetitions):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for key, value in run_once(models[name], prompt, new_tokens).items():
                out[name].setdefault(key, []).append(value)
    return out


def main(job_path: str, result_path: str) -> None:
    import llama_cpp

    job = json.loads(open(job_path, encoding="utf-8").read())
    n_ctx = max(c[1] + c[3] for c in job["cells"]) + 8
    n_batch = max(c[1] for c in job["cells"])
    models = {name: llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                    n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
              for name, path in job["models"].items()}
    result = {"llama_cpp_version": llama_cpp.__version__, "cells": []}
    for cell in job["cells"]:
        started = time.perf_counter()
        timings = run_cell(models, cell, job.get("seed", 0))
        result["cells"].append({"cell": cell, "timings": timings, "seconds": time.perf_counter() - started})
        print(f"llama.cpp cell {cell[0]}x{cell[1]}: {time.perf_counter() - started:.0f} s", file=sys.stderr,
              flush=True)
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
