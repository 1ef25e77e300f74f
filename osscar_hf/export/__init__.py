"""Exporting pruned models to other runtimes.

    from osscar_hf.export import export_gguf
    export_gguf("pruned/", "pruned.gguf", dtype="f16")     # llama.cpp, Ollama, LM Studio, llama-cpp-python

See :mod:`osscar_hf.export.gguf` and docs/deploy.md.
"""

from .gguf import DTYPES, export_gguf

__all__ = ["DTYPES", "export_gguf"]
