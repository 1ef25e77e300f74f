"""The llama.cpp side of ``benchmarks/speed.py``, run by a Python that has llama-cpp-python (and numpy, no torch):
``python speed_llamacpp_worker.py JOB.json RESULT.json``.

The job names GGUF files (one per model), cells ``[batch, prompt, repetitions, new_tokens]`` and a thread count.
Batch 1 runs through llama-cpp-python's ``Llama`` (one sequence); a larger batch through llama.cpp's own C API
(:class:`Batched`: one context with a sequence per row, ``llama_decode`` on a batch of every sequence's tokens).
In each repetition of a cell every model runs once, in an order that rotates between repetitions: the prompts
(random ids, seeded) in one batch with the last position's logits only (prefill), then ``new_tokens`` greedy steps
of one token per sequence (decode). The result holds, per cell and model, the prefill and decode tokens/s of every
repetition.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

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


def _no_log(level: int, text: bytes, data: Any) -> None:
    return None


_QUIET: Any = None  # the ctypes callback, kept alive for the process (set in main)


class Batched:
    """One model in a llama.cpp context of ``batch`` sequences (llama.cpp's C API through llama-cpp-python's
    bindings), with the same ``run_once`` as the one-sequence path."""

    def __init__(self, path: str, batch: int, prompt: int, new_tokens: int, threads: int) -> None:
        import llama_cpp as lib

        self.lib, self.batch_size = lib, batch
        lib.llama_log_set(_QUIET, None)  # llama.cpp's own loading and graph logs (Llama(verbose=False) does the same)
        self.model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch = batch * (prompt + new_tokens + 8), batch * prompt
        params.n_ubatch, params.n_seq_max = min(512, batch * prompt), batch
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(batch * prompt, 0, batch)

    def n_vocab(self) -> int:
        return self.vocab

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, wants logits)`` entries."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, row: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, row), shape=(self.vocab,))))

    def run_once(self, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
        """Like :func:`run_once`, for every sequence at once (tokens/s count every sequence's tokens)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        length = len(prompts[0])
        wall, cpu = time.perf_counter(), time.process_time()
        self._decode([(t, p, s, p == length - 1) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)])
        tokens = [self._argmax(s * length + length - 1) for s in range(len(prompts))]
        prefill = time.perf_counter() - wall, time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        for step in range(new_tokens):
            self._decode([(t, length + step, s, True) for s, t in enumerate(tokens)])
            tokens = [self._argmax(s) for s in range(len(prompts))]
        decode = time.perf_counter() - wall, time.process_time() - cpu
        done = len(prompts) * new_tokens
        return {"prefill": len(prompts) * length / prefill[0], "decode": done / decode[0],
                "prefill_cpu": len(prompts) * length / prefill[1], "decode_cpu": done / decode[1]}

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _run(model: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    return model.run_once(prompts, new_tokens) if isinstance(model, Batched) else run_once(model, prompts[0],
                                                                                             new_tokens)


def run_cell(models: dict, cell: list[int], seed: int) -> dict[str, dict[str, list[float]]]:
    batch, prompt_len, repetitions, new_tokens = cell
    vocab = next(iter(models.values())).n_vocab()
    prompts = np.random.default_rng(seed).integers(0, vocab, (batch, prompt_len)).tolist()
    names = list(models)
    for name in names:  # warm-up
        _run(models[name], prompts, 2)
    out: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for rep in range(repetitions):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for key, value in _run(models[name], prompts, new_tokens).items():
                out[name].setdefault(key, []).append(value)
    return out


def main(job_path: str, result_path: str) -> None:
    import llama_cpp

    global _QUIET
    _QUIET = llama_cpp.llama_log_callback(_no_log)
    job = json.loads(open(job_path, encoding="utf-8").read())
    single = [c for c in job["cells"] if c[0] == 1]
    n_ctx = max((c[1] + c[3] for c in single), default=0) + 8
    n_batch = max((c[1] for c in single), default=1)
    models = {name: llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                    n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
              for name, path in job["models"].items()} if single else {}
    result = {"llama_cpp_version": llama_cpp.__version__, "cells": []}
    for cell in job["cells"]:
        started = time.perf_counter()
        batched = {name: Batched(path, cell[0], cell[1], cell[3], job["threads"])
                   for name, path in job["models"].items()} if cell[0] > 1 else None
        try:
            timings = run_cell(batched or models, cell, job.get("seed", 0))
        finally:
            for model in (batched or {}).values():
                model.close()
        result["cells"].append({"cell": cell, "timings": timings, "seconds": time.perf_counter() - started})
        print(f"llama.cpp cell {cell[0]}x{cell[1]}: {time.perf_counter() - started:.0f} s", file=sys.stderr,
              flush=True)
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
