"""Reload a model pruned by osscar_hf and generate text with it.

    python examples/reload_and_generate.py PRUNED_DIR_OR_HUB_ID [--prompt "The history of"] [--max-new-tokens 40]

PRUNED_DIR_OR_HUB_ID is a folder written by ``osscar-hf prune`` (or ``osscar_hf.save_pruned``), or a Hub repo
it was pushed to. ``import osscar_hf`` registers the "osscar" quantization method with transformers, so the
stock ``AutoModelForCausalLM.from_pretrained`` rebuilds the smaller blocks, including per-block shapes that a
stock config cannot express. Checkpoints whose blocks all share one stock-expressible shape load even
without osscar_hf.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import osscar_hf  # noqa: F401 - registers the "osscar" quantization method with transformers
from osscar_hf import count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="pruned model folder or Hub id")
    parser.add_argument("--prompt", default="The history of the city begins")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    blocks = getattr(model.config, "quantization_config", None)
    print(f"{args.model}: {count_parameters(model):,} parameters"
          f" ({'per-block shapes, osscar format' if blocks is not None else 'stock config'})")

    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
