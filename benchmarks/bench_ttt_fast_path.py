"""Phased TTT throughput on CPU: every batch adapted vs every batch on the fast path (what the
projected time budget falls back to: scoring only, no LoRA, chunks of half the context).

    python benchmarks/bench_ttt_fast_path.py [--docs 24] [--context 256]

A small random-weight model (4 layers, width 128, vocab 1024) on synthetic documents of 50-1500
tokens; both runs score the same tokens.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_eval import small_model, synthetic_val  # noqa: E402
from train_gpt import EvalSettings, eval_ttt_phased  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = small_model(1024, argparse.Namespace(layers=4, dim=128)).eval()
    val = synthetic_val(args.docs, 1024, seed=0)
    config = EvalSettings(eval_seq_len=args.context, phased_ttt_lora_rank=8, phased_ttt_lora_alpha=14.4,
                          phased_ttt_chunk_tokens=48, phased_ttt_docs_per_batch=8, phased_ttt_prefix_docs=0)
    for label, budget in (("adapted", None), ("fast path (budget 0)", 0.0)):
        started = time.perf_counter()
        result = eval_ttt_phased(model, val, config, time_budget_s=budget)
        seconds = time.perf_counter() - started
        print(f"{label}: {result['scored_tokens']} tokens in {seconds:.1f}s = "
              f"{result['scored_tokens'] / seconds:.0f} tokens/s, val_bpb {result['val_bpb']:.4f}, "
              f"batches adapted {result['ttt_batches_adapted']}/{result['ttt_batches']}")


if __name__ == "__main__":
    main()
