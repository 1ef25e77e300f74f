"""The llama.cpp side of ``benchmarks/gguf_tokenizer.py``, run by a Python that has llama-cpp-python (no torch):
``python gguf_tokenizer_worker.py JOB.json RESULT.json``.

The job lists GGUF files with texts; each file is loaded with ``vocab_only=True`` and each text tokenized without
special tokens (``add_bos=False, special=False``); the job's ``special_texts`` also with them (``add_bos=True``: the
file's ``add_bos_token`` decides). The result holds the ids by file, in the job's order.
"""

from __future__ import annotations

import json
import sys


def tokenize_all(path: str, texts: list[str], special_texts: list[str]) -> dict[str, object]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    plain = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    full = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in special_texts]
    return {"plain": plain, "with_specials": full, "tokenizer_model": llm.metadata.get("tokenizer.ggml.model"),
            "llama_cpp_version": llama_cpp.__version__}


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path, encoding="utf-8").read())
    results = [tokenize_all(f["gguf"], f["texts"], f.get("special_texts", [])) for f in job["files"]]
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
