"""The llama.cpp side of ``benchmarks/gguf_llamacpp.py``, run by a Python that has llama-cpp-python (and numpy, no
torch needed): ``python gguf_llamacpp_worker.py JOB.json RESULT.json``.

The job names a GGUF file, token-id windows to score, prompts to continue greedily and a text to tokenize; the result
holds every window's summed next-token NLL and token count, the greedy continuations, the token ids of the text,
and seconds spent.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def window_nll(llm, window: list[int]) -> tuple[float, int]:
    """Summed NLL of tokens 1.. of ``window`` given their prefix (one pass with every position's logits)."""
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    targets = np.asarray(window[1:])
    return float((log_z - logits[np.arange(len(targets)), targets]).sum()), len(targets)


def greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` argmax continuations of ``prompt``, one token at a time."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def logits(llm, ids: list[int]) -> list[list[float]]:
    """Every position's logits for one sequence."""
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float32).tolist()


def main(job_path: str, result_path: str) -> None:
    import llama_cpp

    job = json.loads(open(job_path, encoding="utf-8").read())
    if "logits_of" in job:  # tiny models: raw logits of a few sequences
        # a float32 KV cache (GGML type 0): what is compared is the file, not the cache's f16 rounding
        llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                              type_k=0, type_v=0)
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump({"logits": [logits(llm, ids) for ids in job["logits_of"]]}, handle)
        return
    n_ctx = max(len(w) for w in job["windows"] + job["prompts"]) + job["new_tokens"]
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=job.get("threads", 2), seed=0)
    started = time.perf_counter()
    nll = [window_nll(llm, w) for w in job["windows"]]
    eval_seconds = time.perf_counter() - started
    continuations = [greedy(llm, p, job["new_tokens"]) for p in job["prompts"]]
    tokens = llm.tokenize(job["text"].encode("utf-8"), add_bos=False, special=False) if job.get("text") else []
    result = {"nll": [n for n, _ in nll], "count": [c for _, c in nll], "continuations": continuations,
              "tokens": tokens, "eval_seconds": eval_seconds, "llama_cpp_version": llama_cpp.__version__,
              "add_bos": bool(llm.metadata.get("tokenizer.ggml.add_bos_token") == "true")}
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
