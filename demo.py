"""The whole pipeline on the embedded demo corpus, on CPU, in a few minutes.

    python demo.py                       # prepare data, train, quantize, pack, evaluate with TTT, summarize
    python demo.py --seeds 1 2 3 --record records/example_cpu_demo   # 3 seeds + a (non-record) records folder

Steps: `prepare_caseops_data.py --demo` (CaseOps shards, val byte sidecars, the committed 1024-token
demo tokenizer), then `train_gpt.py` with PRESET=small (every record feature at CPU scale, schedules
relative to the run's length), a 150 s training budget and the whole 300-document demo validation
split (GPTQ + LQER + rANS artifact, plain and chunked-TTT evaluation), once per seed, each in its own
run directory. The settings are what the ladder (benchmarks/bench_ladder.py) found best at this scale:
relative schedules (the record's step-counted EMA costs +0.87 bpb in a short run) and chunked
score-first TTT (phased LoRA TTT was worse here). Extra environment variables are passed through to
train_gpt.py, so `ITERATIONS=50 python demo.py` or `TTT_MODE=phased python demo.py` work as expected.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))
DEMO_DEFAULTS = {"PRESET": "small", "TTT_MODE": "chunked", "MAX_WALLCLOCK_SECONDS": "150", "ITERATIONS": "2000",
                 "VAL_MAX_DOCS": "300", "EVAL_MAX_SECONDS": "600"}


def run(command: list[str], env: dict[str, str]) -> None:
    """Run a step with its output streaming to this terminal; stop the demo if it fails."""
    print("$ " + " ".join(command), flush=True)
    completed = subprocess.run(command, env=env, cwd=REPO)
    if completed.returncode != 0:
        sys.exit(f"demo: step failed with exit code {completed.returncode}: {' '.join(command)}")


def fmt_bpb(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def describe(summary: dict, seconds: float) -> str:
    """The short human summary of one run."""
    limit = summary["hyperparameters"]["artifact_limit_bytes"]
    stages = [("pre-quant (EMA)", summary["pre_quant_val_bpb"]), ("quantized", summary["quant_val_bpb"]),
              ("quantized sliding window", summary["sliding_val_bpb"]),
              (f"quantized + TTT ({summary['ttt_mode']})", summary["ttt_val_bpb"])]
    lines = [f"run {summary['run_id']} (seed {summary['seed']}, {summary['device']}, world size "
             f"{summary['world_size']})"]
    lines += [f"  val_bpb {label:<28} {fmt_bpb(value)}" for label, value in stages]
    lines.append(f"  artifact  {summary['artifact_bytes']:,} bytes = code {summary['code_bytes']:,} + model "
                 f"{summary['model_bytes']:,}  (limit {limit:,}: {'ok' if summary['artifact_limit_ok'] else 'OVER'})")
    lines.append(f"  training  {summary['steps']} steps in {summary['train_time_s']:.1f} s "
                 f"(+{summary.get('gptq_calibration_time_s', 0):.1f} s GPTQ calibration; cap ok: "
                 f"{summary['train_time_ok']})")
    lines.append(f"  eval      {summary['eval_time_s']:.1f} s (limit ok: {summary['eval_time_ok']}); "
                 f"whole run {seconds:.0f} s wall")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "demo_run"), help="data and run directories go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one training run per seed")
    parser.add_argument("--record", help="also assemble a non-record records folder from the runs here")
    args = parser.parse_args()

    data_dir = os.path.join(args.out, "data")
    env = dict(os.environ)
    run([sys.executable, "prepare_caseops_data.py", "--demo", "--out", data_dir, "--workers", "2"], env)

    summaries, run_dirs = [], []
    for seed in args.seeds:
        run_dir = os.path.join(args.out, f"run_seed{seed}")
        # the small preset with a 150 s training budget, chunked TTT, the whole demo val split (300
        # documents) and the challenge's 600 s evaluation budget; the environment overrides any of them
        run_env = dict(DEMO_DEFAULTS, **env)
        run_env.update(DATA_PATH=data_dir,
                       TOKENIZER_PATH=os.path.join(data_dir, "tokenizer.model"), SEED=str(seed),
                       ARTIFACT_DIR=run_dir, RUN_ID=f"demo-seed{seed}")
        started = time.time()
        run([sys.executable, "train_gpt.py"], run_env)
        with open(os.path.join(run_dir, "summary.json")) as handle:
            summaries.append((json.load(handle), time.time() - started))
        run_dirs.append(run_dir)

    if args.record:
        run([sys.executable, os.path.join("records", "make_record.py"), "assemble", *run_dirs, "--out",
             args.record, "--name", "CPU demo (PRESET=small)", "--non-record", "--non-record-reason",
             "CPU demo of the pipeline on the stdlib-docstring demo corpus (PRESET=small, 150 s on 1 CPU "
             "thread); not FineWeb, not 8xH100, not comparable to any record"], env)
        run([sys.executable, os.path.join("records", "make_record.py"), "validate", args.record], env)

    print("\n=== demo summary ===")
    for summary, seconds in summaries:
        print(describe(summary, seconds))
    print(f"outputs: {args.out} (train.log, summary.json, final_model.ptz, train_gpt_packed.py per run)")


if __name__ == "__main__":
    main()
