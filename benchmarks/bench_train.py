"""CPU training throughput of train_gpt.py's model, as a fraction of this machine's matmul peak.

Measures, in one run: the fp32 and bf16 matmul peak (square GEMMs), then tokens/s of the training
forward + backward for the record shape (PR 1855 defaults, recurrence on and off), the naive-baseline
shape (9x512, vocab 1024, MLP 2x, no recurrence/XSA/gates) and the tiny CPU shape. The Muon/AdamW
step is a fixed cost per optimizer step (independent of the batch), reported separately. Model FLOPs per token are counted analytically (6 x matmul weights applied per token, looped
layers counted per pass, + causal attention 6 x layers x seq_len x width); utilization = achieved
model FLOP/s / measured peak. bf16 autocast is measured only where the bf16 peak beats fp32.

    python benchmarks/bench_train.py            # about 2-3 minutes on 2 idle cores
    python benchmarks/bench_train.py --quick    # record shape at seq 512, one timed step
    python benchmarks/bench_train.py --compile inductor   # only: compiled vs eager at a small shape,
                                                          # with compile counts and compile time
    python benchmarks/bench_train.py --compile inductor --compile-shape record   # the same, record model
    python benchmarks/bench_train.py --packing DATA_DIR   # only: TRAIN_PACKING rows vs flat on real
                                                          # shards: documents seen whole, step time
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402


def matmul_peak(dtype: torch.dtype, seconds: float = 1.5) -> float:
    """Best FLOP/s over a few square GEMM sizes (larger sizes skipped once one GEMM is slow). Sizes go
    up to 4096: on this 2-core CPU fp32 reaches ~100 GFLOP/s at 2048 and ~115 at 3072-4096, and with
    2048 as the largest size the model's big GEMMs measured above "peak" (over 100% utilization)."""
    best = 0.0
    for size in (512, 1024, 2048, 3072, 4096):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        start = time.perf_counter()
        a @ b
        if time.perf_counter() - start > seconds:  # a slow dtype on this CPU: one GEMM is enough
            return max(best, 2 * size ** 3 / (time.perf_counter() - start))
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * size ** 3 * count / (time.perf_counter() - start))
    return best


def model_flops_per_token(model: train_gpt.GPT, seq_len: int) -> dict:
    """Training FLOPs per token by component: 6 x weights applied per token (looped layers once per
    pass) for the block matrices and the tied head, + causal attention (QK^T and AV over an average
    context of T/2, forward and backward: 6 x passes x T x width)."""
    h = model.h
    passes = sum(map(len, model.layer_order()))
    block = model.blocks[0]
    attn_weights = sum(m.weight.numel() for m in block.attn.modules() if isinstance(m, train_gpt.MatrixLinear))
    mlp_weights = sum(m.weight.numel() for m in block.mlp.modules() if isinstance(m, train_gpt.MatrixLinear))
    parts = {"attn_proj": 6 * passes * attn_weights, "mlp": 6 * passes * mlp_weights,
             "head": 6 * h.model.vocab_size * h.model.model_dim, "attention": 6 * passes * seq_len * h.model.model_dim}
    parts["total"] = sum(parts.values())
    return parts


def bench_shape(name: str, env: dict, batch: int, steps: int, recurrence: bool, autocast: str,
                time_optimizer: bool = True) -> dict:
    h = train_gpt.Hyperparameters.from_env(env)
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "sdpa")
    model.set_recurrence(recurrence)
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    ids = torch.randint(8, h.model.vocab_size, (batch, h.data.train_seq_len))
    ids[:, 0] = train_gpt.BOS_ID
    device = torch.device("cpu")

    def forward_backward() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        with train_gpt.compute_context(device, autocast):
            loss = model(ids, ids)
        loss.backward()
        return time.perf_counter() - start

    forward_backward()  # warm-up (allocations, first-call dispatch)
    seconds = sum(forward_backward() for _ in range(steps)) / steps
    optimizer_seconds = float("nan")
    if time_optimizer:
        start = time.perf_counter()
        optimizer.step()  # Muon + AdamW: a fixed cost per optimizer step, independent of the batch
        optimizer_seconds = time.perf_counter() - start
    tokens = batch * h.data.train_seq_len
    return dict(name=name, autocast=autocast, tokens_per_step=tokens, params=sum(p.numel() for p in model.parameters()),
                layer_applications=sum(map(len, model.layer_order())),
                flops=model_flops_per_token(model, h.data.train_seq_len),
                tokens_per_s=tokens / seconds, optimizer_s=optimizer_seconds)


def compiled_vs_eager(backend: str, shape: str = "tiny", steps: int = 4) -> None:
    """Training forward + backward as train_model runs it (layout built outside, `forward_backward`),
    eager and torch.compile(fullgraph=True, dynamic=False), recurrence off and on; with the graphs
    compiled, graph breaks and compile seconds (first call of each state). `shape`: the tiny preset's
    micro-step, or the record model (PRESET=pr1855) on 2 rows of 512 tokens (its 48 x 2048 would take
    minutes per step on a CPU)."""
    from torch._dynamo.utils import counters

    if shape == "record":
        h = train_gpt.Hyperparameters.from_env(dict(PRESET="pr1855", TRAIN_SEQ_LEN="512"))
        rows = 2
    else:
        h = train_gpt.Hyperparameters.from_env(dict(PRESET="tiny", VOCAB_SIZE="1024"))
        rows = h.data.batch_layout(1)[1]
    train_gpt.configure_compile(backend)
    ids = torch.randint(8, h.model.vocab_size, (rows, h.data.train_seq_len), generator=torch.Generator().manual_seed(0))
    ids[:, ::37] = train_gpt.BOS_ID  # a few documents per row
    batches = [(ids, ids.roll(-1, 1))]
    tokens = ids.numel()
    print(f"{shape} shape: {rows} x {h.data.train_seq_len} tokens per micro-step, {torch.get_num_threads()} threads")
    for label in ("eager", backend):
        torch.manual_seed(0)
        model = train_gpt.GPT(h.model, "sdpa")
        optimizer = train_gpt.TrainingOptimizer(model, h.optim)
        forward = model if label == "eager" else torch.compile(model, dynamic=False, fullgraph=True, backend=backend)
        for recurrence in (False, True):
            model.set_recurrence(recurrence)
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            train_gpt.forward_backward(forward, batches, optimizer, "sdpa", "fp32").item()
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                train_gpt.forward_backward(forward, batches, optimizer, "sdpa", "fp32").item()
            rate = tokens * steps / (time.perf_counter() - start)
            print(f"  {label:9s} recurrence {'on ' if recurrence else 'off'}: {rate:8.0f} tok/s fwd+bwd, first call "
                  f"{first:6.1f}s, graphs compiled {counters['stats']['unique_graphs'] - graphs}, graph breaks "
                  f"{sum(counters['graph_break'].values())}", flush=True)


def segment_lengths(ids: torch.Tensor, flat: bool, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(segment id of every token of the micro-batch's span, lengths of its attention segments, its
    cu_seqlens bucket) as forward_backward lays it out under TRAIN_PACKING=rows or flat."""
    ids = ids.reshape(1, -1) if flat else ids
    layout = train_gpt.DocumentLayout.build(ids, "varlen", max_seqlen=seq_len)
    starts = layout.cu_seqlens.long()
    segment = torch.searchsorted(starts, torch.arange(ids.numel()), right=True)
    return segment, torch.bincount(segment)[1:], starts.numel()


def packing_rows_vs_flat(data_dir: str, seq_len: int, rows: int, steps: int, timed_steps: int) -> None:
    """Over the first `steps` micro-batches of the training stream: how many documents lying wholly inside
    a micro-batch are attended as one segment (rows: those not crossing a row boundary; flat: those of
    at most seq_len tokens), the sum of squared segment lengths (FA3's attention work), how many
    micro-batches fall in each cu_seqlens bucket (one compiled graph each), and the tiny
    model's forward+backward time per micro-batch with ATTN_BACKEND=varlen under each packing."""
    paths = train_gpt.shard_paths(os.path.join(data_dir, "fineweb_train_*.bin"), "DATA_PATH")
    h = train_gpt.Hyperparameters.from_env(dict(PRESET="tiny", TRAIN_SEQ_LEN=str(seq_len)))
    torch.set_num_threads(h.run.cpu_threads)  # 1, as the tiny preset runs: 2 threads on a shared 2-core box thrash
    print(f"{data_dir}: {rows} x {seq_len} tokens per micro-batch, {steps} micro-batches, {torch.get_num_threads()} threads")
    for flat in (False, True):
        loader = train_gpt.TrainLoader(paths, h.model.vocab_size, seq_len, rows, 1, 0, 1, seed=0)
        inside = whole = short = work = 0
        buckets: dict[int, int] = {}
        for _ in range(steps):
            inputs, _ = loader.next_step()[0]
            stream = inputs.reshape(-1)
            segment, lengths, bucket = segment_lengths(inputs, flat, seq_len)
            buckets[bucket] = buckets.get(bucket, 0) + 1
            bos = torch.nonzero(stream == train_gpt.BOS_ID).flatten().tolist()
            for begin, end in zip(bos, bos[1:]):  # documents that start and end inside the span
                inside += 1
                short += end - begin <= seq_len
                whole += bool(segment[begin] == segment[end - 1])
            work += int((lengths.double() ** 2).sum())
        print(f"  {'flat' if flat else 'rows'}: {whole}/{inside} documents inside a micro-batch seen whole "
              f"({100 * whole / inside:.1f}%; {short} of them have <= {seq_len} tokens), "
              f"sum of squared segment lengths {work / steps:.3g} per micro-batch, cu_seqlens buckets "
              f"{dict(sorted(buckets.items()))}", flush=True)
    if not timed_steps:  # the varlen reference builds a dense [N, N] mask: time small shapes only
        return
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "varlen")
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    batches = train_gpt.TrainLoader(paths, h.model.vocab_size, seq_len, rows, 1, 0, 1, seed=0).next_step()
    for flat in (False, True, False, True):  # interleaved, so load changes on a shared machine hit both
        train_gpt.forward_backward(model, batches, optimizer, "varlen", "fp32", flat)  # warm-up
        start = time.perf_counter()
        for _ in range(timed_steps):
            train_gpt.forward_backward(model, batches, optimizer, "varlen", "fp32", flat).item()
        print(f"  {'flat' if flat else 'rows'}: {1e3 * (time.perf_counter() - start) / timed_steps:.1f} ms per "
              f"micro-batch fwd+bwd (tiny model, varlen reference attention on CPU)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller record batch and fewer steps")
    parser.add_argument("--compile", default="", help="only compare compiled (this backend) vs eager training")
    parser.add_argument("--compile-shape", default="tiny", choices=["tiny", "record"],
                        help="with --compile: the tiny preset's micro-step or the record model")
    parser.add_argument("--packing", default="", metavar="DATA_DIR",
                        help="only compare TRAIN_PACKING rows vs flat on this folder's train shards")
    parser.add_argument("--seq-len", type=int, default=128, help="--packing: TRAIN_SEQ_LEN")
    parser.add_argument("--rows", type=int, default=4, help="--packing: rows per micro-batch")
    parser.add_argument("--steps", type=int, default=200, help="--packing: micro-batches counted")
    parser.add_argument("--timed-steps", type=int, default=20, help="--packing: micro-batches timed per packing (0: none)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.packing:
        packing_rows_vs_flat(args.packing, args.seq_len, args.rows, args.steps, args.timed_steps)
        return
    if args.compile:
        compiled_vs_eager(args.compile, args.compile_shape)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    dtypes = ["fp32"] + (["bf16"] if peak["bf16"] > peak["fp32"] else [])
    if "bf16" not in dtypes:
        print("bf16 autocast not measured on the big shapes: this CPU's bf16 matmul is slower than fp32")
    record_seq = "512" if args.quick else "2048"
    steps = 1 if args.quick else 2
    shapes = [  # name, env, batch, timed steps, recurrence, time the optimizer step
        ("record (pr1855, loop on)", dict(TRAIN_SEQ_LEN=record_seq), 1, steps, True, True),
        ("record (pr1855, loop off)", dict(TRAIN_SEQ_LEN=record_seq), 1, steps, False, False),
        ("naive baseline 9x512 v1024", dict(PRESET="baseline"), 2, steps, False, True),
        ("tiny preset", dict(PRESET="tiny"), 16, 3, True, True),
    ]
    results = []
    for name, env, batch, count, recurrence, time_optimizer in shapes:
        # bf16 on the tiny shape is always measured, to show the CPU's bf16 speed on a real model
        for autocast in dtypes + (["bf16"] if name.startswith("tiny") and "bf16" not in dtypes else []):
            quick_bf16 = autocast == "bf16" and "bf16" not in dtypes
            result = bench_shape(name, env, 4 if quick_bf16 else batch, 1 if quick_bf16 else count, recurrence,
                                 autocast, time_optimizer and not quick_bf16)
            result["flops_per_token"] = result["flops"]["total"]
            utilization = result["tokens_per_s"] * result["flops_per_token"] / peak[autocast]
            result["peak_fraction"] = utilization
            results.append(result)
            print(f"{name:28s} {autocast}: {result['tokens_per_s']:8.0f} tok/s fwd+bwd "
                  f"(+ optimizer {result['optimizer_s'] * 1e3:6.0f} ms per step) "
                  f"{result['flops_per_token'] / 1e6:7.1f} MFLOP/token, {result['layer_applications']} layer passes, "
                  f"{result['params'] / 1e6:.2f}M params -> {100 * utilization:.1f}% of {autocast} peak", flush=True)
    record = next(r for r in results if r["name"].startswith("record (pr1855, loop on)"))
    baseline = next(r for r in results if r["name"].startswith("naive"))
    print(f"record/baseline: {record['flops_per_token'] / baseline['flops_per_token']:.2f}x FLOPs per token, "
          f"{baseline['tokens_per_s'] / record['tokens_per_s']:.2f}x the time per token")
    print("FLOPs per token by component (MFLOP): " + ", ".join(
        f"{part} {baseline['flops'][part] / 1e6:.1f} -> {record['flops'][part] / 1e6:.1f}"
        for part in ("attn_proj", "mlp", "head", "attention")))
    print("  record vs baseline at equal width 512: 17 layer passes (11 layers, 3-5 looped 3x) vs 9, MLP 4x vs 2x,"
          " vocab 8192 vs 1024 in the tied head, context 2048 vs 1024; XSA, gates, smear, skips and lane mixes are"
          " elementwise (no FLOPs counted) and show up only as the gap between FLOP ratio and time ratio")


if __name__ == "__main__":
    main()
