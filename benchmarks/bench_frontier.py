"""The post-PR-1855 mechanisms on the CPU demo data: each one on and off, val_bpb and eval time.

PRESET=tiny on the demo corpus (prepare_caseops_data.py --demo, built once into --data). Per seed the
base configuration is trained once; a mechanism whose settings are all quantization or evaluation
settings is measured by re-quantizing and re-evaluating that same trained model (POST_TRAINING_ONLY=1
on a copy of its folder), so its difference to the base is the mechanism alone; a training-time
mechanism gets its own full run. Reported per mechanism: quantized and TTT val_bpb per seed, the mean
difference to the base (negative = better), and the TTT eval time relative to the base's.

A tiny CPU model trained for a minute is not the 8xH100 system: some mechanisms do not help here (a
longer eval context helps only a model that can use it), and differences of a few 1e-3 are seed noise.

Adding a mechanism is one line in MECHANISMS: (name, env overrides).

    python benchmarks/bench_frontier.py            # 2 seeds, 150 steps (the tiny preset), 64 val documents
    python benchmarks/bench_frontier.py --quick    # 1 seed, 40 steps, 24 val documents: ~12 minutes on 2 busy cores

README.md ("Presets of the open record candidates") quotes one --quick table.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_gpt  # noqa: E402

# (name, env overrides). The first entry is the base every other is compared with.
MECHANISMS = [
    ("base (pr1855 line, tiny)", {}),
    ("long eval context 1.5x train (PR 1953)", {"EVAL_SEQ_LEN": "192"}),
    ("TTT LoRA without Q/V (PR 1953)", {"PHASED_TTT_LORA_SITES": "k,o,mlp,head"}),
    ("TTT LoRA on K,O only (PR 2119)", {"PHASED_TTT_LORA_SITES": "k,o"}),
    ("TTT local lr x0.75 (PR 1953)", {"PHASED_TTT_LOCAL_LR_MULT": "0.75"}),
    ("PR 1953 eval stack (all three)", {"EVAL_SEQ_LEN": "192", "PHASED_TTT_LORA_SITES": "k,o,mlp,head",
                                        "PHASED_TTT_LOCAL_LR_MULT": "0.75"}),
    ("MLP leaky slope 0.3 (PR 1945/1967)", {"MLP_LEAKY_SLOPE": "0.3"}),
    ("QK-gain init 5.25 (PR 1953)", {"QK_GAIN_INIT": "5.25"}),
    ("small early TTT chunks 16:8,64:24 (PR 2014 shape)", {"PHASED_TTT_CHUNK_SCHEDULE": "16:8,64:24"}),
    ("train context 32->64->128 (PR 2014 shape)", {"TRAIN_SEQ_SCHEDULE": "32@0.1,64@0.7,128@1", "WARMUP_STEPS": "6"}),
    # tiny matrices have 64-256 input columns: groups of 16 keep the promoted share near PR 1945's 1 of 8-32
    ("AWQ-lite int8 salient group (PR 1908/1945)", {"AWQ_LITE_ENABLED": "1", "AWQ_LITE_GROUP_SIZE": "16"}),
    # orders 6, 4, 2 instead of 16..8: 24-64 demo documents hold few repeated 8-token contexts to hint from
    ("n-gram tilt, orders 6..2 (PR 2130 shape)", {"NGRAM_TILT": "1", "NGRAM_TILT_MAX_ORDER": "6",
                                                  "NGRAM_TILT_MIN_ORDER": "2"}),
    ("asymmetric logit rescale (PR 1945/2130)", {"ASYM_LOGIT_RESCALE": "1"}),
    ("weight-decay schedule wd_strong (PR 2020)", {"WEIGHT_DECAY_SCHEDULE": "0.4,0.85,0.5,1.75"}),
]
POST_TRAINING_SECTIONS = {"quant", "eval"}


def post_training_only(overrides: dict) -> bool:
    """True when every override is a quantization or evaluation setting (the trained model can be reused)."""
    sections = train_gpt.knob_fields()
    return all(sections[key.lower()][0] in POST_TRAINING_SECTIONS for key in overrides)


def run_train_gpt(env: dict, log_path: str) -> dict:
    with open(log_path, "w") as log:
        completed = subprocess.run([sys.executable, "train_gpt.py"], env=env, cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
    if completed.returncode:
        raise SystemExit(f"train_gpt.py failed ({completed.returncode}); see {log_path}")
    with open(os.path.join(env["ARTIFACT_DIR"], "summary.json")) as handle:
        return json.load(handle)


def measure(summary: dict) -> dict:
    ttt = summary.get("evals", {}).get("quantized_ttt_phased", {})
    return {"quant": summary["quant_val_bpb"], "ttt": summary["ttt_val_bpb"], "ttt_s": ttt.get("eval_time_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 training steps, 24 val documents")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 1 2 (--quick: 1)")
    parser.add_argument("--data", default="/tmp/bench_frontier_data", help="demo data folder (built if missing)")
    parser.add_argument("--out", default="/tmp/bench_frontier_runs", help="run folders go here (replaced)")
    args = parser.parse_args()
    seeds = args.seeds or ([1] if args.quick else [1, 2])
    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        subprocess.run([sys.executable, "prepare_caseops_data.py", "--demo", "--out", args.data, "--workers", "1"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    common = {key: value for key, value in os.environ.items() if key not in train_gpt.knob_fields()}
    # a fixed number of steps, not the wallclock cap: on a shared CPU the cap would make the amount of
    # training (and so every difference) depend on the machine's load
    common.update(PRESET="tiny", DATA_PATH=args.data, TOKENIZER_PATH=os.path.join(args.data, "tokenizer.model"),
                  MAX_WALLCLOCK_SECONDS="0", GPTQ_RESERVE_SECONDS="0", ITERATIONS="40" if args.quick else "150",
                  VAL_MAX_DOCS="24" if args.quick else "64")
    results = {name: {} for name, _ in MECHANISMS}
    for seed in seeds:
        base_dir = None
        for index, (name, overrides) in enumerate(MECHANISMS):
            run_dir = os.path.join(args.out, f"m{index}_seed{seed}")
            env = dict(common, SEED=str(seed), ARTIFACT_DIR=run_dir, RUN_ID=f"frontier-m{index}-s{seed}", **overrides)
            if index and post_training_only(overrides):
                os.makedirs(run_dir)
                shutil.copy(os.path.join(base_dir, "final_model.pt"), run_dir)
                env["POST_TRAINING_ONLY"] = "1"
            started = time.perf_counter()
            results[name][seed] = measure(run_train_gpt(env, run_dir + ".log"))
            print(f"seed {seed} {name}: {results[name][seed]} ({time.perf_counter() - started:.0f} s)", flush=True)
            if index == 0:
                base_dir = run_dir
    print_table(results, seeds)


def print_table(results: dict, seeds: list) -> None:
    base = results[MECHANISMS[0][0]]
    print(f"\n| mechanism | how | quant val_bpb per seed | TTT val_bpb per seed | mean TTT delta vs base | "
          f"TTT eval time vs base |")
    print("|---|---|---|---|---|---|")
    for name, overrides in MECHANISMS:
        rows = results[name]
        how = "base" if not overrides else ("re-eval" if post_training_only(overrides) else "retrained")
        quant = " / ".join(f"{rows[s]['quant']:.4f}" for s in seeds)
        ttt = " / ".join(f"{rows[s]['ttt']:.4f}" for s in seeds)
        delta = statistics.mean(rows[s]["ttt"] - base[s]["ttt"] for s in seeds)
        time_ratio = statistics.mean(rows[s]["ttt_s"] / base[s]["ttt_s"] for s in seeds)
        print(f"| {name} | {how} | {quant} | {ttt} | {delta:+.4f} | {time_ratio:.2f}x |")


if __name__ == "__main__":
    main()
