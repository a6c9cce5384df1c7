"""Throughput and linearity of prepare_caseops_data.py (a benchmark, not a test: no timing asserts).

Measures, with the shipped 1024-vocab CaseOps tokenizer on the stdlib-docstring demo corpus:
1. per-worker throughput of the document path in MB/s of ORIGINAL text: training documents
   (transform + tokenize + round-trip check) and validation documents (+ byte map + sidecar);
2. the whole pipeline (scan, workers, shard writes, manifest) with --workers 1 and 2, every
   document a validation document except the last (worst case: all sidecars), and the speed-up;
3. linearity: one document 10x longer costs at most ~12x (a prefix-decoding attribution would be
   quadratic).
Targets from the issue: >= 1 MB/s per worker, 2 workers >= 1.6x of 1, 10x longer <= ~12x.

Usage: python benchmarks/bench_prepare.py [--repeat 3] [--copies 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare_caseops_data as prep  # noqa: E402


def best_time(fn, repeat: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process (the main process of a run) and of its finished children (workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings")
    parser.add_argument("--copies", type=int, default=2, help="corpus copies in the end-to-end run")
    args = parser.parse_args()

    docs = prep.build_demo_corpus()
    corpus_bytes = sum(len(d.encode("utf-8")) for d in docs)
    model_bytes = prep.DEMO_TOKENIZER.read_bytes()
    ctx = prep.make_worker_context(model_bytes, "caseops", "bench")
    print(f"corpus: {len(docs):,} docs, {corpus_bytes / 1e6:.2f} MB; tokenizer {prep.DEMO_TOKENIZER.name}")

    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
          "(other processes on the machine slow the wall-clock figures)")
    results = {}
    lines = list(range(len(docs)))
    for label, want_sidecar in (("train_docs", False), ("val_docs_with_sidecar", True)):
        work = lambda: prep.process_chunk((docs, [want_sidecar] * len(docs), lines), ctx)  # noqa: E731
        wall = best_time(work, args.repeat)
        cpu = best_time(work, args.repeat, clock=time.process_time)
        results[f"per_worker_MBps_{label}_wall"] = corpus_bytes / wall / 1e6
        results[f"per_worker_MBps_{label}_cpu"] = corpus_bytes / cpu / 1e6
        print(f"per worker, {label:>22}: {corpus_bytes / wall / 1e6:6.2f} MB/s wall, "
              f"{corpus_bytes / cpu / 1e6:6.2f} MB/s per CPU-second")

    with tempfile.TemporaryDirectory() as tmp:
        docs_path = Path(tmp) / "docs.jsonl"
        copies = [f"{d}\n[copy {c}]" for c in range(args.copies) for d in docs]  # unique: no train/val duplicates
        prep.write_demo_docs(docs_path, copies)
        total = sum(len(d.encode("utf-8")) for d in copies)
        timings = {1: float("inf"), 2: float("inf")}
        cpu = {1: [0.0, 0.0], 2: [0.0, 0.0]}  # main process, worker processes
        for _ in range(args.repeat):  # interleaved, so both settings see the same machine load
            for workers in (1, 2):
                out = Path(tmp) / f"out{workers}"
                main_before, workers_before = cpu_seconds()
                start = time.perf_counter()
                code = prep.main(["--docs", str(docs_path), "--out", str(out), "--sp", str(prep.DEMO_TOKENIZER),
                                  "--val-docs", str(len(copies) - 1), "--workers", str(workers), "--quiet",
                                  "--shard-tokens", "1000000"])
                timings[workers] = min(timings[workers], time.perf_counter() - start)
                main_after, workers_after = cpu_seconds()
                cpu[workers][0] += (main_after - main_before) / args.repeat
                cpu[workers][1] += (workers_after - workers_before) / args.repeat
                assert code == 0
                (out / "manifest.json").unlink()  # so that the next repeat redoes the work
        for workers in (1, 2):
            results[f"end_to_end_MBps_workers_{workers}"] = total / timings[workers] / 1e6
            results[f"end_to_end_cpu_s_main_workers_{workers}"] = cpu[workers][0]
            results[f"end_to_end_cpu_s_worker_processes_workers_{workers}"] = cpu[workers][1]
            print(f"end to end, {workers} worker(s), all-val: {total / timings[workers] / 1e6:6.2f} MB/s "
                  f"({total / 1e6:.1f} MB in {timings[workers]:.2f} s wall; CPU-s per run: main process "
                  f"{cpu[workers][0]:.2f}, worker processes {cpu[workers][1]:.2f})")
        results["speedup_2_vs_1"] = timings[1] / timings[2]
        print(f"speed-up 2 workers vs 1: {timings[1] / timings[2]:.2f}x")

    short = "".join(docs)[:200_000]
    long = "".join(docs * 4)[:2_000_000]
    t_short = best_time(lambda: prep.process_document(ctx, short, True, 1), args.repeat, clock=time.process_time)
    t_long = best_time(lambda: prep.process_document(ctx, long, True, 1), args.repeat, clock=time.process_time)
    results["linearity_10x_cost_ratio"] = t_long / t_short
    print(f"linearity (CPU time, val path): 200 KB doc {t_short * 1e3:.1f} ms, 2 MB doc {t_long * 1e3:.1f} ms "
          f"-> {t_long / t_short:.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
