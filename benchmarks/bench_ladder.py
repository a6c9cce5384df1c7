"""The ladder: from the naive baseline to the record stack one technique at a time, measured on CPU.

Every rung is a set of environment overrides on top of the rung below, starting from PRESET=baseline
at one fixed CPU shape (LADDER_SHAPE: the `tiny` preset's 6 layers x 64 wide, vocab 1024, 2,048 tokens
per step). The training rungs follow the order in which the leaderboard adopted each technique, with
the record's step-counted schedules (EMA decay, Muon momentum warm-up) expressed as the same share of
this run as of the record's ~4,930 steps, so the last training rung is the `small` preset's training
at this shape; DIAGNOSTICS measures the step-counted originals against their rungs. The post-training
rungs (GPTQ, LQER, sliding window, chunked and phased TTT) re-quantize and re-evaluate the last
training rung's saved model of each seed (equal steps) with POST_TRAINING_ONLY=1 (no retraining).

Each rung is trained with every seed twice:
- at equal steps: ITERATIONS=N for every rung;
- at equal wallclock: the budget is the baseline's N steps, T = N * t_baseline, and rung r gets
  round(T / t_r) steps, where t_r is its optimizer-step time measured in this process before any run
  starts: single-threaded CPU time (time.process_time, which other processes' load does not inflate)
  of forward + backward + optimizer + EMA on one batch, interleaved over the rungs (R rounds; per
  rung the median round), with depth recurrence timed off and on and weighted by ENABLE_LOOPING_AT.
  A run's own wallclock never decides its length, so a busy shared machine cannot bias the ladder.
The score of a training rung is the pre-quantization val_bpb (the EMA weights when EMA is on); of a
post-training rung, the stage it adds (quantized, sliding, TTT). Each rung reports the mean and sample
std over seeds, the delta to the rung below and its two-sided Welch p-value (records/make_record.py's
test), the measured tokens/s and the delta published by the record that introduced the technique.

    python benchmarks/bench_ladder.py --quick   # 2 seeds, 8 steps, 8 val documents: ~10 minutes
    python benchmarks/bench_ladder.py           # 3 seeds, 40 steps, 32 val documents: about an hour
    python benchmarks/bench_ladder.py --report --out DIR   # rebuild the table and plot from DIR

Runs go to OUT/runs/<rung>/steps<N>/seed<S>/ (train.log, summary.json); a run with a summary.json is
skipped, so the same command resumes. OUT/ladder.md and OUT/ladder.png are the results. The data
is the demo corpus (prepare_caseops_data.py --demo), built under OUT/data when --data is not given.
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "records"))

# The fixed CPU shape of every rung (the `tiny` preset's model); the baseline's sequence length is half
# the record line's, as 1,024 is half of 2,048. Quantization and evaluation stay the baseline's (int8 +
# zlib, plain eval) until the post-training rungs change them.
LADDER_SHAPE = dict(
    VOCAB_SIZE=1024, NUM_LAYERS=6, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, LOOP_START=2, LOOP_END=3,
    TRAIN_SEQ_LEN=64, EVAL_SEQ_LEN=64, ROPE_DIMS=16, TRAIN_BATCH_TOKENS=2048, GRAD_ACCUM_STEPS=1,
    CPU_THREADS=1, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, GPTQ_RESERVE_SECONDS=0, EVAL_BATCH_TOKENS=8192,
    EVAL_MAX_SECONDS=3600, QUANT_SMALL_TENSOR_NUMEL=1024, GPTQ_CALIBRATION_BATCHES=2, TRAIN_LOG_EVERY=25,
    # PR 1855's orthogonal q/k/v/MLP-up init joined the record stack after the committed results were
    # measured: kept off on every rung until the ladder is rerun with it as a rung of its own
    ORTHOGONAL_INIT=0)

# (name, overrides on top of the rung below, introducing record, its published val_bpb delta or None).
# Published deltas are the introducing record's own comparison (3-seed means on 8xH100) as its README
# states it; techniques adopted inside a bigger change carry the note instead of a number.
TRAINING_RUNGS = [
    ("baseline", dict(PRESET="baseline"), "naive baseline", "1.2244"),
    ("LeakyReLU(0.5)^2", dict(MLP_ACT="leaky_relu2"), "PR 493; 2026-03-23 record",
     "-0.003 (PR 493 ablation); -0.0021 (2026-03-23 ablation)"),
    ("MLP 4x", dict(MLP_MULT=4), "PR 1218", "-0.0168 with vocab 4096 + WD 0.085 (1.1147 -> 1.0979)"),
    ("sequence length x2", dict(TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128), "2026-03-18 LongContextSeq2048",
     "-0.0186 (1.2244 -> 1.2058)"),
    ("partial RoPE + LN scale", dict(ROPE_DIMS=8, LN_SCALE=1), "2026-03-21 PartialRoPE record",
     "-0.0023 (1.1271 -> 1.1248)"),
    ("XSA (all layers)", dict(XSA=1), "2026-03-20 XSA records; XSA-all 2026-03-29",
     "~-0.002 (partial XSA); -0.0047 with EMA (1.1318 -> 1.1271)"),
    # the record's EMA and momentum warm-up are counted in steps; here they are the same share of the run
    # (DIAGNOSTICS measures the step-counted versions): see the `small` preset
    ("EMA (horizon 6% of the run, = 0.9965 at 4,930 steps)", dict(EMA_DECAY=0.9965, EMA_HORIZON_FRAC=0.058),
     "2026-03-20 XSA4+EMA record; 0.9965 PR 1445", "with XSA, row above"),
    ("QK gain 5.0", dict(QK_GAIN_INIT=5.0), "2026-04-06 QK5 record (vs 4.0)", "-0.0008 sliding (1.08563 -> 1.08486)"),
    ("Muon WD + MuonEq-R + Polar Express + record optimizer", dict(
        MUON_WEIGHT_DECAY=0.095, MUON_ROW_NORMALIZE=1, MUON_POLAR_EXPRESS=1, MATRIX_LR=0.026,
        MUON_MOMENTUM=0.97, MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM_WARMUP_FRAC=0.3, EMBED_LR=0.03,
        EMBED_WEIGHT_DECAY=0.085, SCALAR_LR=0.02, SCALAR_WEIGHT_DECAY=0.02, GRAD_CLIP_NORM=0.3,
        WARMDOWN_FRAC=0.75, ADAM_BETA2=0.99, GRAD_CLIP_SCOPE="local"),  # the scope is moot on one process
     "2026-04-03 MuonEqR record; Polar NS 2026-04-23",
     "MuonEq-R ~-0.001 (2026-04-03); Polar NS inside -0.0021 (2026-04-23)"),
    ("U-Net skip gates", dict(SKIP_GATES=1), "PR 1493 line", "no isolated figure"),
    ("depth recurrence (layers 2-3, x3 from 35%)", dict(NUM_LOOPS=3), "2026-04-03 record; PR 1331/1437",
     "~-0.003 (2026-04-03, layers 4-5 twice)"),
    ("parallel lanes (from layer 4)", dict(PARALLEL_START_LAYER=4), "2026-03-31 record (PR 1204)",
     "-0.0043 with mini recurrence (1.1105 -> 1.1063)"),
    ("gated attention", dict(GATED_ATTN=1), "PR 1736", "-0.0064 with CaseOps, loop 4-5, phased TTT"),
    ("SmearGate (BOS-masked)", dict(SMEAR_GATE=1), "PR 1667; 2026-04-16 record",
     "-0.0005 with attention output gate (1.07193 -> 1.07139)"),
    ("sparse attention gate", dict(SPARSE_ATTN_GATE=1), "2026-04-23 record", "inside -0.0021 (with Polar NS, MIN_LR)"),
    ("MIN_LR 0.1, warmdown 85%", dict(MIN_LR=0.1, WARMDOWN_FRAC=0.85), "2026-04-23 record; PR 1855",
     "inside -0.0021 (with Polar NS, sparse gate)"),
]

# Off-ladder variants, each against the ladder rung it modifies (equal steps only): the record's
# step-counted schedules at this run length. (name, rung index, overrides, run folder)
DIAGNOSTICS = [
    ("EMA decay 0.9965 per step (the record's, not scaled)", 6, dict(EMA_HORIZON_FRAC=0), "06_EMA_0_9965"),
    ("momentum warm-up over 1,500 steps (the record's, not scaled)", 8,
     dict(MUON_MOMENTUM_WARMUP_FRAC=0, MUON_MOMENTUM_WARMUP_STEPS=1500), "diag_08_momentum_1500_steps"),
]

# Post-training rungs: (name, overrides, stage scored, introducing record, published delta). They are
# evaluated by three POST_TRAINING_ONLY runs per model: gptq (rung 1), all but phased (rungs 2-4) and
# phased (rung 5); the quantization is deterministic, so rungs 2-5 share one quantized model.
RECORD_QUANT = dict(QUANT_SCHEME="gptq", QUANT_MATRIX_BITS=6, QUANT_MLP_BITS=6, QUANT_EMBED_BITS=7,
                    QUANT_MATRIX_CLIP_SIGMAS=12.85, QUANT_MLP_CLIP_SIGMAS=11.5, QUANT_ATTN_CLIP_SIGMAS=13.0,
                    QUANT_EMBED_CLIP_SIGMAS=14.0, QUANT_COMPRESSOR="brotli", QUANT_BYTE_SHUFFLE=1)
SMALL_TTT = dict(TTT_CHUNK_TOKENS=2048, TTT_BATCH_SEQS=8, PHASED_TTT_PREFIX_DOCS=16, PHASED_TTT_LORA_RANK=4,
                 PHASED_TTT_LORA_ALPHA=7.2, PHASED_TTT_DOCS_PER_BATCH=8, PHASED_TTT_GLOBAL_CHUNK_TOKENS=2048)
POST_RUNS = {
    "gptq": dict(RECORD_QUANT, LQER_ENABLED=0),
    "chunked": dict(RECORD_QUANT, **SMALL_TTT, LQER_ENABLED=1, SLIDING_WINDOW_ENABLED=1, SLIDING_STRIDE=32,
                    TTT_ENABLED=1, TTT_MODE="chunked"),
    "phased": dict(RECORD_QUANT, **SMALL_TTT, LQER_ENABLED=1, TTT_ENABLED=1, TTT_MODE="phased"),
}
POST_RUNGS = [  # (name, post run, summary field, introducing record, published delta)
    ("GPTQ int6/int7 + brotli (vs int8 + zlib)", "gptq", "quant_val_bpb", "PR 1019; 2026-03-29 full GPTQ",
     "no isolated figure (buys bytes for a bigger model)"),
    ("LQER rank 4 (top 3 tensors)", "chunked", "quant_val_bpb", "PR 1797; PR 1855", "no isolated figure"),
    ("sliding window (stride 32)", "chunked", "sliding_val_bpb", "2026-03-19 SlidingWindowEval",
     "-0.0319 (1.2244 -> 1.1925)"),
    ("chunked score-first TTT", "chunked", "ttt_val_bpb", "PR 549; PR 1493", "-0.0017 (sliding 1.0827 -> 1.0810)"),
    ("phased LoRA TTT (vs chunked)", "phased", "ttt_val_bpb", "PR 1626; PR 1736",
     "-0.0124 vs quantized (1.0785 -> 1.06549)"),
]

FULL = dict(seeds=[1, 2, 3], steps=40, val_docs=32, timing_rounds=3)
QUICK = dict(seeds=[1, 2], steps=8, val_docs=8, timing_rounds=1)


def rung_envs(data_dir: str, steps: int, val_docs: int) -> list[dict[str, str]]:
    """The cumulative environment of each training rung (strings, as train_gpt.py reads them)."""
    envs, current = [], dict(LADDER_SHAPE, DATA_PATH=data_dir, TOKENIZER_PATH=os.path.join(data_dir, "tokenizer.model"),
                             ITERATIONS=steps, VAL_MAX_DOCS=val_docs)
    for _, overrides, _, _ in TRAINING_RUNGS:
        current = dict(current, **overrides)
        envs.append({key: str(value) for key, value in current.items()})
    return envs


def slug(index: int) -> str:
    name = TRAINING_RUNGS[index][0] if index < len(TRAINING_RUNGS) else POST_RUNGS[index - len(TRAINING_RUNGS)][0]
    return f"{index:02d}_" + "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_")[:32]


# -----------------------------------------------------------------------------
# Step times, measured interleaved in this process
# -----------------------------------------------------------------------------

def measure_step_times(envs: list[dict[str, str]], rounds: int, steps_per_round: int = 2) -> list[dict]:
    """CPU seconds per optimizer step of each rung (forward + backward + optimizer + EMA on one random
    batch, one thread), rounds interleaved over the rungs; per rung the median round, recurrence off
    and on."""
    import torch
    import train_gpt
    torch.set_num_threads(1)
    states = []
    for env in envs:
        h = train_gpt.Hyperparameters.from_env(env)
        torch.manual_seed(0)
        model = train_gpt.GPT(h.model, "sdpa")
        optimizer = train_gpt.TrainingOptimizer(model, h.optim)
        ema = train_gpt.ExponentialMovingAverage(model, 0.99) if h.optim.ema_decay > 0 else None
        rows = h.data.train_batch_tokens // h.data.train_seq_len
        ids = torch.randint(8, h.model.vocab_size, (rows, h.data.train_seq_len))
        ids[:, 0] = train_gpt.BOS_ID
        modes = [False, True] if h.model.recurrence_enabled else [False]
        states.append(dict(h=h, model=model, optimizer=optimizer, ema=ema, ids=ids,
                           times={mode: [] for mode in modes}))

    def timed_steps(state: dict, recurrence: bool, count: int) -> float:
        state["model"].set_recurrence(recurrence)
        start = time.process_time()
        for _ in range(count):
            train_gpt.forward_backward(state["model"], [(state["ids"], state["ids"])], state["optimizer"],
                                       "sdpa", "fp32")
            state["optimizer"].step()
            if state["ema"] is not None:
                state["ema"].update(state["model"])
        return (time.process_time() - start) / count

    for state in states:  # first calls allocate and dispatch: not timed
        for mode in state["times"]:
            timed_steps(state, mode, 1)
    for round_index in range(rounds):
        for state in states:
            for mode in state["times"]:
                state["times"][mode].append(timed_steps(state, mode, steps_per_round))
        print(f"[ladder] timing round {round_index + 1}/{rounds} done", flush=True)
    results = []
    for state in states:
        h = state["h"]
        medians = {mode: statistics.median(values) for mode, values in state["times"].items()}
        looped_share = 1.0 - h.model.enable_looping_at if h.model.recurrence_enabled else 0.0
        seconds = (1 - looped_share) * medians[False] + looped_share * medians.get(True, medians[False])
        results.append(dict(step_s=seconds, step_s_plain=medians[False], step_s_looped=medians.get(True),
                            tokens_per_s=h.data.train_batch_tokens / seconds))
    return results


# -----------------------------------------------------------------------------
# Runs (in worker processes: train_gpt.main(env) once per run, its output to the run's output.log)
# -----------------------------------------------------------------------------

def run_one(task: tuple[str, dict[str, str], str | None]) -> dict | None:
    run_dir, env, source_checkpoint = task
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as handle:
            return json.load(handle)
    os.makedirs(run_dir, exist_ok=True)
    if source_checkpoint:  # a post-training rung: evaluate a copy of the training rung's final model
        if not os.path.exists(source_checkpoint):
            return None
        shutil.copyfile(source_checkpoint, os.path.join(run_dir, "final_model.pt"))
    import train_gpt
    started = time.time()
    with open(os.path.join(run_dir, "output.log"), "w") as out, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        try:
            summary = train_gpt.main(dict(env, ARTIFACT_DIR=run_dir))
        except Exception as error:  # recorded, the ladder goes on
            with open(os.path.join(run_dir, "failed.json"), "w") as handle:
                json.dump(dict(error=f"{type(error).__name__}: {error}"), handle)
            return None
    print(f"[ladder] {os.path.relpath(run_dir)}: {time.time() - started:.0f}s pre-quant "
          f"{summary.get('pre_quant_val_bpb')}", flush=True)
    return summary


def run_tasks(tasks: list, workers: int) -> None:
    if not tasks:
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        for _ in pool.imap(run_one, tasks):
            pass


def plan_and_run(args: argparse.Namespace, config: dict) -> None:
    data_dir = args.data or os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        subprocess.run([sys.executable, os.path.join(REPO, "prepare_caseops_data.py"), "--demo", "--out", data_dir,
                        "--workers", "2"], check=True)
    envs = rung_envs(data_dir, config["steps"], config["val_docs"])
    timing_path = os.path.join(args.out, "timing.json")
    if os.path.exists(timing_path):
        with open(timing_path) as handle:
            timing = json.load(handle)
    else:
        started = time.time()
        timing = dict(rungs=measure_step_times(envs, config["timing_rounds"]), seconds=time.time() - started)
        os.makedirs(args.out, exist_ok=True)
        with open(timing_path, "w") as handle:
            json.dump(timing, handle, indent=1)
    base_time = timing["rungs"][0]["step_s"]
    wall_steps = [max(1, round(config["steps"] * base_time / rung["step_s"])) for rung in timing["rungs"]]
    plan = dict(config=config, data=data_dir, envs=envs, wall_steps=wall_steps, command=" ".join(sys.argv))
    with open(os.path.join(args.out, "plan.json"), "w") as handle:
        json.dump(plan, handle, indent=1)
    def train_tasks(step_counts: list[int], order: list[int]) -> list:
        return [(os.path.join(args.out, "runs", slug(index), f"steps{step_counts[index]}", f"seed{seed}"),
                 dict(envs[index], ITERATIONS=str(step_counts[index]), SEED=str(seed)), None)
                for index in order for seed in config["seeds"]]

    last = len(envs) - 1
    print(f"[ladder] equal-wallclock steps per rung: {wall_steps}", flush=True)
    # equal steps first, then the post-training rungs on those models, then equal wallclock (the last
    # rungs first: they answer whether the stack beats the baseline in the same time)
    run_tasks(train_tasks([config["steps"]] * len(envs), list(range(len(envs)))), args.workers)
    post_tasks = []
    for name, overrides in POST_RUNS.items():
        for seed in config["seeds"]:
            source = os.path.join(args.out, "runs", slug(last), f"steps{config['steps']}", f"seed{seed}",
                                  "final_model.pt")
            run_dir = os.path.join(args.out, "runs", f"post_{name}", f"steps{config['steps']}", f"seed{seed}")
            env = dict(envs[last], **{k: str(v) for k, v in overrides.items()}, ITERATIONS=str(config["steps"]),
                       SEED=str(seed), POST_TRAINING_ONLY="1")
            post_tasks.append((run_dir, env, source))
    run_tasks(post_tasks, args.workers)
    run_tasks([(os.path.join(args.out, "runs", folder, f"steps{config['steps']}", f"seed{seed}"),
                dict(envs[index], **{k: str(v) for k, v in overrides.items()}, SEED=str(seed)), None)
               for _, index, overrides, folder in DIAGNOSTICS for seed in config["seeds"]], args.workers)
    run_tasks(train_tasks(wall_steps, [last, last - 1] + list(range(last - 1))), args.workers)


# -----------------------------------------------------------------------------
# Report: table and plot from the run folders
# -----------------------------------------------------------------------------

def read_scores(out: str, folder: str, steps: int, seeds: list[int], field: str) -> list[float]:
    scores = []
    for seed in seeds:
        path = os.path.join(out, "runs", folder, f"steps{steps}", f"seed{seed}", "summary.json")
        if os.path.exists(path):
            with open(path) as handle:
                value = json.load(handle).get(field)
            if value is not None:
                scores.append(float(value))
    return scores


def compare(new: list[float], old: list[float]) -> tuple[float | None, float | None]:
    """(mean(new) - mean(old), two-sided Welch p) or Nones when a side has under 2 values."""
    from make_record import mean_and_std, welch_improvement_test
    if len(new) < 2 or len(old) < 2:
        return None, None
    (new_mean, new_std), (old_mean, old_std) = mean_and_std(new), mean_and_std(old)
    one_sided = welch_improvement_test(new_mean, new_std, len(new), old_mean, old_std, len(old))["p_value"]
    return new_mean - old_mean, min(1.0, 2 * min(one_sided, 1 - one_sided))


def ladder_rows(out: str) -> tuple[list[dict], dict]:
    with open(os.path.join(out, "plan.json")) as handle:
        plan = json.load(handle)
    with open(os.path.join(out, "timing.json")) as handle:
        timing = json.load(handle)
    seeds, steps, wall_steps = plan["config"]["seeds"], plan["config"]["steps"], plan["wall_steps"]
    rows = []
    for index, (name, overrides, source, published) in enumerate(TRAINING_RUNGS):
        rows.append(dict(name=name, overrides=overrides, source=source, published=published,
                         tokens_per_s=timing["rungs"][index]["tokens_per_s"], wall_steps=wall_steps[index],
                         equal_steps=read_scores(out, slug(index), steps, seeds, "pre_quant_val_bpb"),
                         equal_wall=read_scores(out, slug(index), wall_steps[index], seeds, "pre_quant_val_bpb"),
                         quant=read_scores(out, slug(index), steps, seeds, "quant_val_bpb")))
    last = len(TRAINING_RUNGS) - 1
    below_field = ("quant_val_bpb", slug(last))
    for name, post, field, source, published in POST_RUNGS:
        row = dict(name=name, overrides=POST_RUNS[post], source=source, published=published,
                   tokens_per_s=None, wall_steps=None,
                   equal_steps=read_scores(out, f"post_{post}", steps, seeds, field),
                   equal_wall=read_scores(out, f"post_{post}", wall_steps[last], seeds, field),
                   below=below_field)
        rows.append(row)
        below_field = (field, f"post_{post}")
    # the rung below a post-training rung is scored on the same stage as that rung's own input
    for row in rows[len(TRAINING_RUNGS):]:
        field, folder = row["below"]
        row["below_equal_steps"] = read_scores(out, folder, steps, seeds, field)
        row["below_equal_wall"] = read_scores(out, folder, wall_steps[last], seeds, field)
    for index, row in enumerate(rows[:len(TRAINING_RUNGS)]):
        if index:
            row["below_equal_steps"], row["below_equal_wall"] = rows[index - 1]["equal_steps"], rows[index - 1]["equal_wall"]
    return rows, plan


def fmt_scores(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def fmt_delta(new: list[float], old: list[float] | None) -> str:
    if old is None:
        return "-"
    delta, p_value = compare(new, old)
    return "-" if delta is None else f"{delta:+.4f} (p={p_value:.2g})"


def write_report(out: str) -> str:
    rows, plan = ladder_rows(out)
    config = plan["config"]
    lines = [
        f"Seeds {config['seeds']}; {config['steps']} steps of 2,048 tokens at equal steps; equal wallclock = "
        f"the baseline's {config['steps']} steps of time, converted to steps per rung from step times measured "
        f"interleaved; {config['val_docs']} validation documents of the demo corpus. Score: pre-quant val_bpb "
        "(training rungs), the added stage's val_bpb (post-training rungs). Δ: mean minus the rung below "
        "(negative = better), p: two-sided Welch. Command: `" + plan["command"] + "`.",
        "",
        "| # | rung (added on top of the row above) | introduced by | published Δ (8xH100) | tok/s | "
        "equal steps: val_bpb | Δ (p) | equal wallclock: steps | val_bpb | Δ (p) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(rows):
        lines.append(" | ".join([
            f"| {index}", row["name"], row["source"], row["published"] or "-",
            f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-",
            fmt_scores(row["equal_steps"]), fmt_delta(row["equal_steps"], row.get("below_equal_steps")),
            str(row["wall_steps"] or "-"), fmt_scores(row["equal_wall"]),
            fmt_delta(row["equal_wall"], row.get("below_equal_wall"))]) + " |")
    seeds, steps = config["seeds"], config["steps"]
    lines += ["", "Off the ladder: the record's step-counted schedules at this run length, each against the rung "
              "it modifies (equal steps).", "", "| variant | of rung | val_bpb | Δ vs that rung (p) |", "|---|---|---|---|"]
    for name, index, _, folder in DIAGNOSTICS:
        scores = read_scores(out, folder, steps, seeds, "pre_quant_val_bpb")
        lines.append(f"| {name} | {index} | {fmt_scores(scores)} | {fmt_delta(scores, rows[index]['equal_steps'])} |")
    base, top = rows[0], rows[len(TRAINING_RUNGS) - 1]
    lines.append("")
    for label, field in (("equal steps", "equal_steps"), ("equal wallclock", "equal_wall")):
        if base[field] and top[field]:
            delta, p_value = compare(top[field], base[field])
            if delta is not None:
                lines.append(f"Last training rung (the `small` preset's training) vs baseline, pre-quant, at {label}: "
                             f"{delta:+.4f} (p={p_value:.2g}).  ")
    baseline_final = read_scores(out, slug(0), steps, seeds, "quant_val_bpb")
    for name, post, field, _, _ in POST_RUNGS[::-1]:
        final = read_scores(out, f"post_{post}", steps, seeds, field)
        if final and baseline_final:
            delta, p_value = compare(final, baseline_final)
            if delta is not None:
                lines.append(f"Final score (the last post-training rung with results, {name}) vs the baseline's "
                             f"(int8 + zlib) at equal steps: {delta:+.4f} (p={p_value:.2g}).")
            break
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "ladder.md"), "w") as handle:
        handle.write(text)
    plot(rows, os.path.join(out, "ladder.png"))
    return text


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(11, 5.5))
    positions = list(range(len(rows)))
    for field, label, offset in (("equal_steps", "equal steps", -0.12), ("equal_wall", "equal wallclock", 0.12)):
        xs, means, errors = [], [], []
        for position, row in zip(positions, rows):
            if row[field]:
                xs.append(position + offset)
                means.append(statistics.fmean(row[field]))
                errors.append(statistics.stdev(row[field]) if len(row[field]) > 1 else 0.0)
        axis.errorbar(xs, means, yerr=errors, marker="o", capsize=3, linestyle="-", label=label)
    axis.axvline(len(TRAINING_RUNGS) - 0.5, color="grey", linestyle=":")
    axis.set_xticks(positions)
    axis.set_xticklabels([row["name"].split(" (")[0] for row in rows], rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("val_bpb (mean ± std over seeds)")
    axis.set_title("The ladder at CPU scale: training rungs (pre-quant), then post-training rungs")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 8 steps, 8 val documents")
    parser.add_argument("--out", help="results folder (default benchmarks/results/ladder[_quick])")
    parser.add_argument("--data", help="prepared data folder (default: the demo corpus, built under OUT/data)")
    parser.add_argument("--workers", type=int, default=2, help="concurrent runs (each uses 1 thread)")
    parser.add_argument("--report", action="store_true", help="only rebuild ladder.md and ladder.png from OUT")
    args = parser.parse_args()
    args.out = args.out or os.path.join(REPO, "benchmarks", "results", "ladder_quick" if args.quick else "ladder")
    if not args.report:
        plan_and_run(args, QUICK if args.quick else FULL)
    print(write_report(args.out))


if __name__ == "__main__":
    main()
