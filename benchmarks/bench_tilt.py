"""Eval-time cost (and effect) of NGRAM_TILT and ASYM_LOGIT_RESCALE relative to plain phased TTT, on CPU.

    python prepare_caseops_data.py --demo --out /tmp/demo_data      # once
    python benchmarks/bench_tilt.py --data /tmp/demo_data --seeds 1 2

For each seed a PRESET=tiny model (vocab 1024, 6 x 64, seq 128) is trained for --train-steps with a
plain AdamW loop on the demo train shard (bench_eval.train), then the tiny preset's phased TTT eval
(64 val documents, 16 prefix documents in 3 phases, LoRA rank 4) runs with: nothing added, the
n-gram tilt, the asymmetric rescale (same trained weights, the two caps start at LOGIT_SOFTCAP), and
both. Each eval runs --repeats times; the table shows the fastest time, val_bpb and, for the tilt,
how many scored targets got a hint. A model this small on 64 demo documents says little about the
val_bpb effects at record scale (the rescale's caps hardly move in 16 prefix documents of global
SGD); the timings are the point, and on a shared CPU they are noisy (compare within one run).
"""

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_eval import train  # noqa: E402
from train_gpt import GPT, Hyperparameters, eval_ttt_phased, load_val_data  # noqa: E402


def tiny_model(seed: int, asym: bool) -> GPT:
    h = Hyperparameters.from_env({"PRESET": "tiny", "ASYM_LOGIT_RESCALE": "1" if asym else "0"})
    torch.manual_seed(seed)
    model = GPT(h.model, attn_backend="sdpa")
    model.set_recurrence(True)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder from prepare_caseops_data.py --demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h = Hyperparameters.from_env({"PRESET": "tiny"})
    val = load_val_data(os.path.join(args.data, "fineweb_val_[0-9]*.bin"), h.model.vocab_size,
                        max_docs=h.data.val_max_docs)
    print(f"val: {val.num_docs} documents, {val.num_tokens - 1} scored tokens; torch threads {args.threads}")
    configs = {"phased": (False, False), "+tilt": (True, False), "+rescale": (False, True), "+both": (True, True)}
    print(f"{'seed':>4} {'config':<9} {'val_bpb':>8} {'delta':>8} {'eval_s':>7} {'x phased':>8} {'hinted':>7}")
    for seed in args.seeds:
        trained = tiny_model(seed, asym=False)
        train(trained, args.data, args.train_steps, h.data.train_seq_len, batch_rows=16)
        base_bpb = base_seconds = None
        for name, (tilt, asym) in configs.items():
            model = tiny_model(seed, asym)
            model.load_state_dict(trained.state_dict(), strict=False)  # the caps keep their init, LOGIT_SOFTCAP
            model.eval()
            config = dataclasses.replace(h.eval, ngram_tilt=tilt)
            results = [eval_ttt_phased(model, val, config) for _ in range(args.repeats)]
            seconds = min(result["eval_time_s"] for result in results)
            bpb = results[0]["val_bpb"]
            base_bpb, base_seconds = (bpb, seconds) if base_bpb is None else (base_bpb, base_seconds)
            hinted = results[0].get("ngram_tilt_hinted", "")
            print(f"{seed:>4} {name:<9} {bpb:8.4f} {bpb - base_bpb:+8.4f} {seconds:7.2f} {seconds / base_seconds:8.2f} "
                  f"{hinted:>7}", flush=True)


if __name__ == "__main__":
    main()
