"""Compression of the quantized model: bytes, bits per weight and seconds for each coder and layout
on the same quantized states (prints a table, asserts nothing).

    python benchmarks/bench_compress.py               # both states (~10 minutes on 2 shared cores)
    python benchmarks/bench_compress.py --quick       # tiny trained state only (~1 minute)
    python benchmarks/bench_compress.py --column-sigma 0   # record shape without column structure
    python benchmarks/bench_compress.py --fast        # skip lzma and the per-group brotli/lzma/PPMd rows
    python benchmarks/bench_compress.py --checkpoint RUN/final_model.pt   # plus a real trained state

States
1. "tiny trained": the `tiny` preset GPT (vocab 1024, 6 layers x 64) trained 400 AdamW steps on tokens
   of a random sparse bigram process, then GPTQ (Hessians from 2 training batches) with the preset's
   settings. Real training, but a small model: per-artifact overheads weigh more than at record size.
2. "record shape": the default preset's GPT (11 layers x 512, MLP 4x, 8/4 heads, vocab 8192): int6
   matrices (SDClip 12.85 / MLP 12.85 / attention 13 per the preset), tied int7 embedding, int8 gates,
   fp16 smalls. Gaussian weights would give i.i.d. codes with no structure at all, which no trained
   model has, so the matrices are synthesized with the two departures from Gaussian seen in trained
   weights: heavier-tailed rows (each row Student-t with df drawn from {4, 6, 10, 30}) and columns of
   different scale (each column scaled by exp(sigma * N(0, 1)), sigma = --column-sigma, default 0.25;
   the tiny trained state's own spread of log column RMS is printed for comparison). They are
   quantized by quantize_model_state with round-to-nearest (no Hessians) and the preset's SDClip
   settings, so code histograms are those of SDClip int6/int7 on such rows.

Coders and layouts (all bytes are whole artifacts unless marked "~", which are stream sums without
the ~100-byte frame)
- brotli 1 stream: the format before this change (all arrays, byte shuffle stride 2, brotli q11 w24)
- brotli / lzma per width: one stream per element width
- ~roles+L1 sort: PR 1855's per-group compression: codes bucketed by role (name without layer
  numbers), rows of each matrix ordered by a greedy L1 nearest-neighbour walk (the permutation stored
  as uint16 + brotli; the 8192-row embedding is not sorted: the 8192^2 L1 distances cost minutes),
  each group coded by the best of brotli q11, lzma extreme and PPMd (pyppmd, orders 2-6);
  other arrays as "brotli per width". ZPAQ/PAQ coders have no installable PyPI package here (`paq`
  fails to build), so PPMd stands in for the context-modelling coder.
- rans: serialize_artifact's default (per-role tables refined by row/column bins, rANS)
- rans 1 table/role: the same with _RANS_CLASSES = ((1, 1),): what the bins add
- ~constriction: the same one-table-per-role model coded by the `constriction` package's ANS coder
  (if installed): an independent check that our coder reaches what an entropy coder can.
Entropy: empirical order-0 entropy of each matrix's codes (its own histogram), summed; "role" pools
the histogram over each role (what one table per role can reach).
"""

import argparse
import math
import os
import sys
import time

import brotli
import lzma
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_gpt  # noqa: E402
from train_gpt import (GPT, Hyperparameters, collect_hessians, deserialize_artifact,  # noqa: E402
                       quantize_model_state, serialize_artifact)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


# --- states --------------------------------------------------------------------------------------


def bigram_tokens(vocab, count, seed=0):
    """Tokens of a random sparse bigram process: each token has 8 likely successors (Zipf weights)."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(8, vocab, size=(vocab, 8))
    weights = 1.0 / np.arange(1, 9)
    weights /= weights.sum()
    tokens = np.empty(count, dtype=np.int64)
    tokens[0] = 1
    choices = rng.choice(8, size=count, p=weights)
    for index in range(1, count):
        tokens[index] = successors[tokens[index - 1], choices[index]]
    return torch.from_numpy(tokens)


def tiny_trained_state(steps=400, seed=0):
    h = Hyperparameters.from_env({"PRESET": "tiny", "NUM_LOOPS": "1"})
    torch.manual_seed(seed)
    model = GPT(h.model)
    tokens = bigram_tokens(h.model.vocab_size, 200_000, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    batch, length = 16, h.data.train_seq_len

    def sample():
        starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=generator)
        rows = torch.stack([tokens[s:s + length + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    for step in range(steps):
        inputs, targets = sample()
        loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"tiny trained: {steps} steps, final training loss {loss.item():.3f}")
    hessians = collect_hessians(model, [sample()[0] for _ in range(2)])
    return quantize_model_state(model.state_dict(), hessians, h.quant), model.state_dict()


def record_shape_state(column_sigma, seed=0):
    h = Hyperparameters.from_env({})
    torch.manual_seed(seed)
    state = GPT(h.model).state_dict()
    settings = h.quant
    rng = np.random.default_rng(seed)
    for name, tensor in state.items():
        if train_gpt.classify_tensor(name, tensor, settings)[0] in ("matrix", "gate"):
            rows, cols = tensor.shape[0], tensor[0].numel()
            tails = rng.choice([4, 6, 10, 30], size=(rows, 1))
            weight = rng.standard_t(tails, size=(rows, cols)) * np.exp(column_sigma * rng.standard_normal(cols))
            state[name] = torch.from_numpy((0.02 * weight).astype(np.float32)).reshape(tensor.shape)
    return quantize_model_state(state, {}, settings)


def column_spread(state_dict):
    """Median over matrices of the std of log column RMS (the 'sigma' of the record-shape synthesis)."""
    spreads = [torch.log(t.float().pow(2).mean(0).sqrt() + 1e-12).std().item()
               for name, t in state_dict.items() if t.ndim == 2 and min(t.shape) >= 32]
    return float(np.median(spreads))


# --- the PR 1855-style per-group layout -------------------------------------------------------------


def role_of(name):
    return "".join(c for c in name if not c.isdigit())


def nearest_neighbour_order(codes):
    """Greedy walk: start at row 0, always go to the closest unvisited row in L1 distance."""
    rows = torch.from_numpy(codes.astype(np.float32))
    distances = torch.cdist(rows, rows, p=1)
    distances.fill_diagonal_(float("inf"))
    order = [0]
    distances[:, 0] = float("inf")
    for _ in range(len(rows) - 1):
        following = int(torch.argmin(distances[order[-1]]))
        distances[:, following] = float("inf")
        order.append(following)
    return np.array(order)


def ppmd_best(data):
    import pyppmd
    return min(len(pyppmd.compress(data, max_order=order, mem_size=1 << 28)) for order in (2, 4, 6))


def per_group_sizes(container, sort_rows=True):
    """-> (total bytes, {role: (bytes, best coder)}, compress seconds)."""
    start = time.perf_counter()
    groups, permutations = {}, bytearray()
    for name, entry in container["entries"].items():
        if entry["kind"] == "quant":
            codes = entry["codes"].numpy()
            if sort_rows and len(codes) <= 4096:
                order = nearest_neighbour_order(codes)
                codes = codes[order]
                permutations += order.astype("<u2").tobytes()
            groups.setdefault(role_of(name), bytearray()).extend(codes.tobytes())
    rest = {"entries": {name: {k: (torch.zeros(0, dtype=torch.int8) if k == "codes" else v) for k, v in e.items()}
                        for name, e in container["entries"].items()}}
    total = len(serialize_artifact(rest, codec="brotli", per_group=True)) + len(brotli.compress(bytes(permutations)))
    chosen = {}
    for role, data in groups.items():
        data = bytes(data)
        sizes = {"brotli": len(brotli.compress(data, quality=11, lgwin=24)),
                 "lzma": len(lzma.compress(data, format=lzma.FORMAT_ALONE, preset=9 | lzma.PRESET_EXTREME))}
        try:
            sizes["ppmd"] = ppmd_best(data)
        except ImportError:
            pass
        best = min(sizes, key=sizes.get)
        chosen[role] = (sizes[best], best)
        total += sizes[best]
    return total, chosen, time.perf_counter() - start


def constriction_size(container):
    """Codes coded with one table per role (probabilities = the role's histogram; the tables
    counted as 256 uint16 per role, brotli'd), by constriction's ANS coder."""
    import constriction
    groups = {}
    for name, entry in container["entries"].items():
        if entry["kind"] == "quant":
            groups.setdefault(role_of(name), []).append(entry["codes"].numpy().ravel().view(np.uint8))
    total, tables = 0, []
    for codes in groups.values():
        symbols = np.concatenate(codes).astype(np.int32)
        counts = np.bincount(symbols, minlength=256).astype(np.float64)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(symbols, constriction.stream.model.Categorical(counts / counts.sum(), perfect=False))
        total += 4 * len(coder.get_compressed())
        tables.append(np.round(counts / counts.sum() * 2 ** 15).astype("<u2"))
    return total + len(brotli.compress(train_gpt.byte_shuffle(np.concatenate(tables).tobytes(), 2)))


# --- report ----------------------------------------------------------------------------------------


def entropy_bits(container):
    """(per-matrix order-0 entropy, role-pooled order-0 entropy) in bits, and the number of codes."""
    own, pooled, count = 0.0, {}, 0
    for name, entry in container["entries"].items():
        if entry["kind"] == "quant":
            counts = np.bincount(entry["codes"].numpy().ravel().view(np.uint8), minlength=256)
            own += -(counts[counts > 0] * np.log2(counts[counts > 0] / counts.sum())).sum()
            pooled[role_of(name)] = pooled.get(role_of(name), 0) + counts
            count += counts.sum()
    role = sum(-(c[c > 0] * np.log2(c[c > 0] / c.sum())).sum() for c in pooled.values())
    return own, role, int(count)


def report(label, container, fast=False):
    own, role, weights = entropy_bits(container)
    print(f"\n== {label}: {weights:,} quantized weights; order-0 entropy of the codes: per matrix "
          f"{own / weights:.4f} bits/weight ({own / 8:,.0f} bytes), pooled per role {role / weights:.4f} "
          f"({role / 8:,.0f} bytes)")
    print(f"{'layout / coder':28s} {'bytes':>12s} {'vs brotli':>10s} {'bits/weight':>12s} {'compress s':>11s} "
          f"{'decompress s':>13s}")
    rows = []

    def add(name, size, compress_s, decompress_s=None):
        rows.append((name, size))
        base = rows[0][1]
        print(f"{name:28s} {size:12,d} {100 * (size / base - 1):+9.2f}% {8 * size / weights:12.4f} "
              f"{compress_s:11.2f} {'' if decompress_s is None else f'{decompress_s:13.2f}'}", flush=True)

    for name, options in (("brotli 1 stream (before)", dict(codec="brotli")),
                          ("brotli per width", dict(codec="brotli", per_group=True)),
                          ("lzma 1 stream", dict(codec="lzma")),
                          ("lzma per width", dict(codec="lzma", per_group=True)),
                          ("rans (default)", dict(codec="rans"))):
        if fast and "lzma" in name:
            continue
        blob, compress_s = timed(serialize_artifact, container, **options)
        restored, decompress_s = timed(deserialize_artifact, blob)
        assert all(torch.equal(restored["entries"][n]["codes"], e["codes"])
                   for n, e in container["entries"].items() if e["kind"] == "quant")
        add(name, len(blob), compress_s, decompress_s)
    saved = train_gpt._RANS_CLASSES
    train_gpt._RANS_CLASSES = ((1, 1),)
    try:
        blob, compress_s = timed(serialize_artifact, container)
        add("rans 1 table/role", len(blob), compress_s, timed(deserialize_artifact, blob)[1])
    finally:
        train_gpt._RANS_CLASSES = saved
    try:
        rest = {"entries": {n: {k: (torch.zeros(0, dtype=torch.int8) if k == "codes" else v) for k, v in e.items()}
                            for n, e in container["entries"].items()}}
        size, seconds = timed(constriction_size, container)
        add("~constriction 1 table/role", size + len(serialize_artifact(rest, codec="brotli", per_group=True)), seconds)
    except ImportError:
        print("(constriction not installed: cross-check skipped)")
    for sort_rows in () if fast else (False, True):
        total, chosen, seconds = per_group_sizes(container, sort_rows)
        add("~roles" + (" + L1 row sort" if sort_rows else "") + ", best coder", total, seconds)
        print("    " + ", ".join(f"{role.removeprefix('blocks.')}: {size:,} {coder}"
                                 for role, (size, coder) in sorted(chosen.items())))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny trained state only")
    parser.add_argument("--column-sigma", type=float, default=0.25)
    parser.add_argument("--fast", action="store_true", help="skip lzma and the per-group rows")
    parser.add_argument("--checkpoint", help="also a real trained state: final_model.pt of a run (quantized "
                        "with round-to-nearest and the default preset's settings; no Hessians are stored)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["model"]
        print(f"checkpoint: spread of log column RMS (median over matrices) {column_spread(state):.3f}")
        settings = Hyperparameters.from_env({}).quant
        report(f"checkpoint {args.checkpoint} (round-to-nearest)", quantize_model_state(state, {}, settings), args.fast)
    container, state_dict = tiny_trained_state()
    print(f"tiny trained: spread of log column RMS (median over matrices) {column_spread(state_dict):.3f}")
    report("tiny trained (GPTQ)", container, args.fast)
    if not args.quick:
        report(f"record shape (synthetic t-tailed rows, column sigma {args.column_sigma})",
               record_shape_state(args.column_sigma), args.fast)


if __name__ == "__main__":
    main()
