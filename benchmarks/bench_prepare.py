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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare_caseops_data as prep  # noqa: E402


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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

    results = {}
    lines = list(range(len(docs)))
    for label, want_sidecar in (("train_docs", False), ("val_docs_with_sidecar", True)):
        seconds = best_time(lambda: prep.process_chunk((docs, [want_sidecar] * len(docs), lines), ctx), args.repeat)
        results[f"per_worker_MBps_{label}"] = corpus_bytes / seconds / 1e6
        print(f"per worker, {label:>22}: {corpus_bytes / seconds / 1e6:6.2f} MB/s")

    with tempfile.TemporaryDirectory() as tmp:
        docs_path = Path(tmp) / "docs.jsonl"
        copies = [f"{d}\n[copy {c}]" for c in range(args.copies) for d in docs]  # unique: no train/val duplicates
        prep.write_demo_docs(docs_path, copies)
        total = sum(len(d.encode("utf-8")) for d in copies)
        timings = {}
        for workers in (1, 2):
            def run_once(workers=workers):
                code = prep.main(["--docs", str(docs_path), "--out", str(Path(tmp) / f"out{workers}"),
                                  "--sp", str(prep.DEMO_TOKENIZER), "--val-docs", str(len(copies) - 1),
                                  "--workers", str(workers), "--quiet", "--shard-tokens", "1000000"])
                assert code == 0
                (Path(tmp) / f"out{workers}" / "manifest.json").unlink()  # so the next repeat redoes the work
            timings[workers] = best_time(run_once, args.repeat)
            results[f"end_to_end_MBps_workers_{workers}"] = total / timings[workers] / 1e6
            print(f"end to end, {workers} worker(s), all-val: {total / timings[workers] / 1e6:6.2f} MB/s "
                  f"({total / 1e6:.1f} MB in {timings[workers]:.2f} s)")
        results["speedup_2_vs_1"] = timings[1] / timings[2]
        print(f"speed-up 2 workers vs 1: {timings[1] / timings[2]:.2f}x")

    short = "".join(docs)[:200_000]
    long = "".join(docs * 4)[:2_000_000]
    t_short = best_time(lambda: prep.process_document(ctx, short, True, 1), args.repeat)
    t_long = best_time(lambda: prep.process_document(ctx, long, True, 1), args.repeat)
    results["linearity_10x_cost_ratio"] = t_long / t_short
    print(f"linearity: 200 KB doc {t_short * 1e3:.1f} ms, 2 MB doc {t_long * 1e3:.1f} ms -> {t_long / t_short:.1f}x")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
