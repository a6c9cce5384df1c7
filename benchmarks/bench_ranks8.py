"""Eight Gloo ranks on CPU against one process: the whole run at a tiny shape.

    python benchmarks/bench_ranks8.py [--ranks 8] [--iterations 5] [--out results.json]

Runs train_gpt.py twice on the same tiny synthetic dataset (the test suite's `tiny_dataset`): once as
one process (gradient accumulation 8) and once under `torchrun --nproc_per_node=N` with Gloo
(gradient accumulation 8/N: 1 for 8 ranks, so Muon's matrices are sharded over all 8 ranks), with
training, GPTQ, the artifact, plain / sliding evaluation and phased TTT over all ranks (documents
claimed from the shared queue, global-SGD phases). Prints each step's loss and each score side by
side, the wall time of both runs, and whether they agree within the stated tolerances:
- training loss per step: 2e-3 absolute (only float summation order differs: rank all-reduce vs
  sequential accumulation; Newton-Schulz keeps the difference small over a few steps);
- val_bpb of every eval: 5e-3 absolute (weights of the two runs differ by the above; TTT adds its
  own summation-order noise), and the same number of scored tokens, BOS targets and TTT phases.
Exit status 0 when all agree. Too slow for the test suite on a small shared CPU machine (see the
wall time it prints); the 2-rank version of the same comparison is a test
(tests/test_train_gpt_training.py::test_two_gloo_ranks_match_one_process).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_tiny_dataset  # noqa: E402

LOSS_TOLERANCE = 2e-3
BPB_TOLERANCE = 5e-3

ENV = dict(PRESET="tiny", VOCAB_SIZE="512", MAX_WALLCLOCK_SECONDS="0", GPTQ_RESERVE_SECONDS="0",
           TRAIN_BATCH_TOKENS="2048", GRAD_ACCUM_STEPS="0", WARMUP_STEPS="0", TRAIN_LOG_EVERY="1", EMA_DECAY="0",
           ATTN_BACKEND="sdpa", COMPILE="0", POST_TRAINING_ENABLED="1", GPTQ_CALIBRATION_BATCHES="2",
           QUANT_SMALL_TENSOR_NUMEL="1024", VAL_MAX_DOCS="40", SLIDING_WINDOW_ENABLED="1", EVAL_SEQ_LEN="128",
           EVAL_BATCH_TOKENS="1024", SLIDING_STRIDE="64", TTT_ENABLED="1", TTT_MODE="phased",
           PHASED_TTT_PREFIX_DOCS="16", PHASED_TTT_NUM_PHASES="2", PHASED_TTT_DOCS_PER_BATCH="2",
           PHASED_TTT_CHUNK_TOKENS="32", PHASED_TTT_GLOBAL_CHUNK_TOKENS="512", PHASED_TTT_LORA_RANK="4",
           EVAL_MAX_SECONDS="100000", SAVE_TOKEN_NLL="0", CPU_THREADS="1",
           # the presets clip each rank's own gradient before the all-reduce (PR 1855), which by design
           # depends on the number of ranks; the comparison clips the averaged gradient, as 1 process does
           GRAD_CLIP_SCOPE="global")


def run(launcher: list, env: dict, artifact_dir: Path) -> tuple[list, dict, float]:
    full_env = dict(os.environ, **env, ARTIFACT_DIR=str(artifact_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    started = time.perf_counter()
    result = subprocess.run(launcher + [str(REPO / "train_gpt.py")], env=full_env, cwd=artifact_dir.parent,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"run failed ({' '.join(launcher)}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    losses = [float(m.group(1)) for m in re.finditer(r"train_loss:([0-9.naif]+)", result.stdout)]
    return losses, json.loads((artifact_dir / "summary.json").read_text()), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--out", help="write the comparison as JSON here")
    args = parser.parse_args()
    env = dict(ENV, ITERATIONS=str(args.iterations))
    with tempfile.TemporaryDirectory(prefix="bench_ranks8_") as tmp:
        tmp = Path(tmp)
        data = write_tiny_dataset(tmp / "data")
        env["DATA_PATH"] = data.path
        one = run([sys.executable], env, tmp / "one")
        many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"],
                   env, tmp / "many")
    (losses_1, summary_1, seconds_1), (losses_n, summary_n, seconds_n) = one, many
    report = {"ranks": args.ranks, "wall_s_1": round(seconds_1, 1), f"wall_s_{args.ranks}": round(seconds_n, 1),
              "world_size": summary_n["world_size"], "loss_1": losses_1, f"loss_{args.ranks}": losses_n, "evals": {}}
    ok = summary_n["world_size"] == args.ranks and len(losses_1) == len(losses_n) == args.iterations
    worst_loss = max(abs(a - b) for a, b in zip(losses_1, losses_n))
    ok &= worst_loss < LOSS_TOLERANCE
    print(f"{'step':>4} {'1 process':>10} {f'{args.ranks} ranks':>10}")
    for step, (a, b) in enumerate(zip(losses_1, losses_n), 1):
        print(f"{step:>4} {a:>10.5f} {b:>10.5f}")
    print(f"training loss: worst difference {worst_loss:.2e} (tolerance {LOSS_TOLERANCE:g})")
    for label, result_1 in summary_1["evals"].items():
        result_n = summary_n["evals"][label]
        counts = ("scored_tokens", "bos_targets", "ttt_phases_trained", "ttt_batches")
        same_counts = all(result_1.get(key) == result_n.get(key) for key in counts)
        difference = abs(result_1["val_bpb"] - result_n["val_bpb"])
        ok &= same_counts and difference < BPB_TOLERANCE
        report["evals"][label] = {"val_bpb_1": result_1["val_bpb"], f"val_bpb_{args.ranks}": result_n["val_bpb"],
                                  "difference": difference, "same_counts": same_counts,
                                  "eval_time_s_1": round(result_1["eval_time_s"], 2),
                                  f"eval_time_s_{args.ranks}": round(result_n["eval_time_s"], 2)}
        print(f"{label:>26}: val_bpb {result_1['val_bpb']:.6f} vs {result_n['val_bpb']:.6f} (diff {difference:.2e}, "
              f"tolerance {BPB_TOLERANCE:g}); counts {'same' if same_counts else 'DIFFER'} "
              f"({', '.join(f'{key}={result_n.get(key)}' for key in counts if key in result_n)}); "
              f"eval {result_1['eval_time_s']:.1f}s vs {result_n['eval_time_s']:.1f}s")
    print(f"wall time: 1 process {seconds_1:.1f}s, {args.ranks} ranks {seconds_n:.1f}s; "
          f"{'AGREE' if ok else 'DISAGREE'}")
    report["agree"] = bool(ok)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
