"""Throughput of the evaluation modes on CPU, and how TTT time grows with the validation size.

    python benchmarks/bench_eval.py                                   # random weights, synthetic docs
    python benchmarks/bench_eval.py --data DIR --train-steps 300      # a small model trained on DIR
                                                                      # (e.g. prepare_caseops_data.py --demo)
    python benchmarks/bench_eval.py --compile inductor --sizes 16     # + every mode compiled vs eager

Every mode scores the same tokens (every token after each document's BOS); tokens/s counts scored
tokens. With --train-steps the model is first trained on DIR's train shard (AdamW, plain loop), so
the TTT gains over plain eval are meaningful; they are reported as val_bpb deltas. With --quantize
the modes run on a round-to-nearest int6 copy (the quantization section's RTN path, no Hessians), so
the deltas are over quantized plain eval; the float model's plain eval is printed as pre_quant.
"""

import argparse
import copy
import dataclasses
import glob
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train_gpt import (  # noqa: E402
    BOS_ID, EvalSettings, eval_stream, eval_ttt_chunked, eval_ttt_phased, load_val_data, make_val_data, read_shard,
)
from train_gpt import GPT, Hyperparameters, RunContext, compile_and_warm_up_eval, configure_compile  # noqa: E402


def small_model(vocab_size, args):
    h = Hyperparameters.from_env({
        "PRESET": "tiny", "VOCAB_SIZE": str(vocab_size), "NUM_LAYERS": str(args.layers),
        "MODEL_DIM": str(args.dim), "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8",
        "LOOP_START": "1", "LOOP_END": "1", "NUM_LOOPS": "2", "PARALLEL_START_LAYER": str(args.layers - 1)})
    torch.manual_seed(0)
    model = GPT(h.model, attn_backend="sdpa")
    model.set_recurrence(True)
    return h, model


def synthetic_val(num_docs, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    tokens, byte_counts = [], []
    for _ in range(num_docs):
        length = int(rng.integers(50, 1500))
        tokens += [BOS_ID] + rng.integers(2, vocab_size, length).tolist()
        byte_counts += [0] + rng.integers(1, 6, length).tolist()
    return make_val_data(np.array(tokens), np.array(byte_counts), vocab_size=vocab_size)


def first_docs(val, num_docs):
    end = int(val.doc_starts[num_docs]) if num_docs < val.num_docs else val.num_tokens
    return make_val_data(val.tokens[:end].numpy(), val.byte_counts[:end].numpy())


def train(model, data_dir, steps, seq_len, batch_rows):
    tokens = np.concatenate([read_shard(path).astype(np.int64)
                             for path in sorted(glob.glob(os.path.join(data_dir, "fineweb_train_*.bin")))])
    tokens = torch.from_numpy(tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_rows,), generator=generator)
        rows = torch.stack([tokens[s: s + seq_len + 1] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (steps - step) / (0.3 * steps))
        loss = model(rows[:, :-1], rows[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"train step {step}/{steps} loss {loss.item():.4f} t {elapsed:.0f}s", flush=True)
    model.eval()


def eval_config(args):
    return EvalSettings(eval_seq_len=args.seq_len, eval_batch_tokens=args.batch * args.seq_len,
                          sliding_stride=args.stride, ttt_chunk_tokens=args.ttt_chunk, ttt_epochs=args.ttt_epochs,
                          ttt_lr=args.ttt_lr, ttt_batch_seqs=16, phased_ttt_lora_rank=8, phased_ttt_lr=args.lora_lr,
                          phased_ttt_chunk_tokens=48, phased_ttt_docs_per_batch=args.docs_per_batch,
                          phased_ttt_prefix_docs=args.prefix_docs, phased_ttt_num_phases=3,
                          phased_ttt_global_lr=args.global_lr, phased_ttt_global_chunk_tokens=args.ttt_chunk)


def modes(args):
    config = eval_config(args)
    return {
        "plain": lambda model, val: eval_stream(model, val, args.seq_len, args.batch),
        "sliding": lambda model, val: eval_stream(model, val, args.seq_len, args.batch, args.stride),
        "ttt_chunked": lambda model, val: eval_ttt_chunked(model, val, config),
        "ttt_phased": lambda model, val: eval_ttt_phased(model, val, config),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder with fineweb_val_*.bin (+ byte sidecars) and fineweb_train_*.bin")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--docs", type=int, default=64, help="val documents for the throughput table")
    parser.add_argument("--sizes", default="16,32,64", help="val document counts for the TTT scaling table")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ttt-chunk", type=int, default=4096)
    parser.add_argument("--ttt-epochs", type=int, default=3)
    parser.add_argument("--ttt-lr", type=float, default=0.005)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--global-lr", type=float, default=0.001)
    parser.add_argument("--docs-per-batch", type=int, default=16)
    parser.add_argument("--prefix-docs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", action="store_true", help="evaluate an RTN int6 copy (see docstring)")
    parser.add_argument("--compile", default="", help="also run every mode compiled with this torch.compile "
                        "backend (inductor | aot_eager | eager) after the run's eval warm-up, vs eager")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.data:
        full_val = load_val_data(os.path.join(args.data, "fineweb_val_[0-9]*.bin"), args.vocab_size)
    else:
        full_val = synthetic_val(max(args.docs, *map(int, args.sizes.split(","))), args.vocab_size)
    h, model = small_model(args.vocab_size, args)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {args.layers} layers x {args.dim}, "
          f"seq_len {args.seq_len}, torch threads {args.threads}")
    if args.train_steps:
        train(model, args.data, args.train_steps, args.seq_len, batch_rows=16)
    model.eval()

    val = first_docs(full_val, args.docs)
    print(f"\nthroughput on {val.num_docs} docs, {val.num_tokens - val.num_docs} scored tokens")
    print(f"{'mode':<12} {'val_bpb':>9} {'delta':>8} {'seconds':>8} {'tokens/s':>9}")
    if args.quantize:
        import copy

        from train_gpt import QuantSettings, load_quantized_into, quantize_model_state

        pre_quant = eval_stream(model, val, args.seq_len, args.batch)
        print(f"{'pre_quant':<12} {pre_quant['val_bpb']:9.4f} {'':>8} {pre_quant['eval_time_s']:8.2f}")
        settings = QuantSettings(quant_small_tensor_numel=1024, lqer_enabled=False)  # no Hessians: round-to-nearest
        model = load_quantized_into(copy.deepcopy(model), quantize_model_state(model.state_dict(), {}, settings))
    baseline, eager_results = None, {}
    for name, run in modes(args).items():
        result = eager_results[name] = run(model, val)
        baseline = baseline if baseline is not None else result["val_bpb"]
        print(f"{name:<12} {result['val_bpb']:9.4f} {result['val_bpb'] - baseline:+8.4f} "
              f"{result['eval_time_s']:8.2f} {result['scored_tokens'] / result['eval_time_s']:9.0f}", flush=True)
    if args.compile:
        compare_compiled(args, h, model, val, eager_results)

    print("\nTTT time vs validation size")
    print(f"{'docs':>5} {'tokens':>7} {'chunked_s':>10} {'phased_s':>9} {'sliding_s':>10}")
    for num_docs in map(int, args.sizes.split(",")):
        subset = first_docs(full_val, num_docs)
        runs = modes(args)
        times = [runs[name](model, subset)["eval_time_s"] for name in ("ttt_chunked", "ttt_phased", "sliding")]
        print(f"{subset.num_docs:5d} {subset.num_tokens:7d} {times[0]:10.2f} {times[1]:9.2f} {times[2]:10.2f}",
              flush=True)


def compare_compiled(args, h, model, val, eager_results):
    """Every mode again on a copy compiled as a run compiles it (compile_eval_forward + the warm-up on
    random tokens), with the graphs each mode still compiled inside its timed eval (should be 0)."""
    from torch._dynamo.utils import counters

    configure_compile(args.compile)
    h = dataclasses.replace(h, eval=eval_config(args))
    compiled, spare = copy.deepcopy(model), copy.deepcopy(model)
    context = RunContext("", lambda line: None, torch.device("cpu"), compile_backend=args.compile)
    warm_up_s = compile_and_warm_up_eval(h, spare, compiled, context)
    print(f"\ncompiled ({args.compile}): warm-up {warm_up_s:.1f}s, {counters['stats']['unique_graphs']} graphs, "
          f"{sum(counters['graph_break'].values())} graph breaks")
    print(f"{'mode':<12} {'eager tok/s':>11} {'compiled':>9} {'speedup':>8} {'bpb diff':>9} {'graphs in eval':>15}")
    for name, run in modes(args).items():
        before = counters["stats"]["unique_graphs"]
        result, eager = run(compiled, val), eager_results[name]
        eager_rate, rate = (r["scored_tokens"] / r["eval_time_s"] for r in (eager, result))
        print(f"{name:<12} {eager_rate:11.0f} {rate:9.0f} {rate / eager_rate:7.2f}x "
              f"{result['val_bpb'] - eager['val_bpb']:+9.1e} {counters['stats']['unique_graphs'] - before:15d}",
              flush=True)


if __name__ == "__main__":
    main()
