"""Benchmark of the quantization section (prints figures, asserts nothing).

    python benchmarks/bench_quant.py                      # everything (~10 minutes on 2 CPU cores)
    python benchmarks/bench_quant.py --quick              # skip whole-model compression variants
    python benchmarks/bench_quant.py --penalty-seconds 90 # only: quantization penalty of a small trained GPT

1. GPTQ time at int6 for the four published shapes, ours vs a textbook per-column implementation
   (cholesky_inverse + upper Cholesky, per-column updates on W, blocks of 128) timed in the same
   process, so a busy machine slows both alike.
2. Quality on correlated-input Hessians: Hessian-weighted relative error of GPTQ vs round-to-nearest
   (2048x512, int6, clip 12.85), and a per-tensor clip-sigma search.
3. Bits per weight of int6 codes after byte shuffle + brotli-11 vs their empirical entropy.
4. The record-shape model (11 layers, 512 wide, MLP 4x, 8/4 heads, vocab 8192; the real GPT when
   train_gpt.py imports, random weights): Hessian collection + GPTQ time, then bits per weight of
   each tensor class and the whole artifact (single stream vs per-group, brotli vs lzma).
"""

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_gpt import (QuantSettings, collect_hessians, dequantize_codes, dequantize_state,  # noqa: E402
                             gptq_quantize, hessian_weighted_error, quantize_model_state, rtn_quantize,
                             serialize_artifact)


def correlated_hessian(cols, tokens=8192, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(cols) + 2.0 * torch.randn(cols, cols, generator=generator) / cols ** 0.5
    inputs = torch.randn(tokens, cols, generator=generator) @ mixing
    return inputs.t() @ inputs / tokens


def textbook_gptq(weight, hessian, bits, clip_sigmas, block_size=128, damp=0.01):
    """The usual per-column GPTQ loop (the shape of the published code), for timing only."""
    clip_range = 2 ** (bits - 1) - 1
    rows, cols = weight.shape
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1.0
    hessian.diagonal().add_(damp * hessian.diagonal().mean())
    order = torch.argsort(hessian.diagonal(), descending=True)
    w = weight[:, order].clone()
    hessian = hessian[order][:, order]
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    step = (clip_sigmas * weight.std(dim=1) / clip_range).clamp_min(1e-10).half().float()
    codes = torch.zeros(rows, cols, dtype=torch.int8)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros(rows, end - start)
        for j in range(end - start):
            q = torch.clamp(torch.round(block[:, j] / step), -clip_range, clip_range)
            codes[:, start + j] = q.to(torch.int8)
            error = (block[:, j] - q * step) / upper[start + j, start + j]
            errors[:, j] = error
            block[:, j:] -= error[:, None] * upper[start + j, start + j:end][None, :]
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes[:, torch.argsort(order)]


def median_time(function, repeats=5):
    """(median wall seconds, median CPU seconds of this process); CPU time is the steadier figure
    when other processes share the cores."""
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return statistics.median(walls), statistics.median(cpus)


def entropy_bits(codes):
    _, counts = np.unique(codes.numpy(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def bits_per_weight_of(entries, **options):
    numel = sum(math.prod(e["shape"]) if e["kind"] == "quant" else e["tensor"].numel() for e in entries.values())
    return 8 * len(serialize_artifact({"entries": entries}, **options)) / numel


def bench_gptq_speed():
    print("== GPTQ int6 time (median of 5), ours vs textbook per-column, same process")
    for rows, cols, target in ((512, 512, 0.04), (2048, 512, 0.10), (512, 2048, 0.28), (8192, 512, 0.36)):
        weight = torch.randn(rows, cols) * 0.02
        hessian = correlated_hessian(cols, tokens=4096)
        ours = median_time(lambda: gptq_quantize(weight, hessian, 6, 12.85))
        textbook = median_time(lambda: textbook_gptq(weight, hessian, 6, 12.85))
        print(f"{rows:5d}x{cols:<5d} ours {ours[0]:.3f} s wall / {ours[1]:.3f} s CPU   textbook {textbook[0]:.3f} s / "
              f"{textbook[1]:.3f} s   published target {target:.2f} s")


def bench_quality():
    print("== quality, 2048x512 int6 clip 12.85, correlated inputs")
    weight = torch.randn(2048, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    hessian = correlated_hessian(512)
    codes, scales = gptq_quantize(weight, hessian, 6, 12.85)
    rtn_codes, _ = rtn_quantize(weight, 6, 12.85)
    gptq_error = hessian_weighted_error(weight, dequantize_codes(codes, scales), hessian)
    rtn_error = hessian_weighted_error(weight, dequantize_codes(rtn_codes, scales), hessian)
    print(f"Hessian-weighted relative error: GPTQ {gptq_error:.3e}  RTN {rtn_error:.3e}  (published 1.54e-2 vs 1.71e-2)")
    entries = {"w": {"kind": "quant", "shape": [2048, 512], "bits": 6, "codes": codes, "scales": scales}}
    code_bytes = len(serialize_artifact({"entries": {"w": {"kind": "raw", "tensor": codes}}}))
    print(f"int6 codes: {8 * code_bytes / codes.numel():.3f} bits/weight after shuffle+brotli-11, "
          f"empirical entropy {entropy_bits(codes):.3f} (published 3.285 vs 3.225); "
          f"with fp16 scales {bits_per_weight_of(entries):.3f}")
    print("== rate-distortion: error vs stored bits/weight over clip sigmas (compare at equal bytes)")
    for clip in (8.0, 10.0, 11.0, 12.0, 12.85, 14.0, 16.0):
        row = []
        for label, quantize in (("GPTQ", lambda c: gptq_quantize(weight, hessian, 6, c)), ("RTN", lambda c: rtn_quantize(weight, 6, c))):
            codes, scales = quantize(clip)
            error = hessian_weighted_error(weight, dequantize_codes(codes, scales), hessian)
            size = bits_per_weight_of({"w": {"kind": "quant", "shape": [2048, 512], "bits": 6, "codes": codes, "scales": scales}})
            row.append(f"{label} error {error:.3e} at {size:.3f} bits/weight")
        print(f"  clip {clip:5.2f}: " + "   ".join(row))


def record_model():
    """The real GPT at record shape, or stand-in Linears of the same shapes if it does not import."""
    try:
        import train_gpt

        h = train_gpt.Hyperparameters.from_env({"PRESET": "pr1855"})
        model = train_gpt.GPT(h.model, "sdpa")
        model.set_recurrence(True)
        return model, h.model.vocab_size, "train_gpt.GPT (pr1855 preset, random init, recurrence on)"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the stand-in
        print(f"(train_gpt.GPT unavailable: {exc!r}; using stand-in Linears)")

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = torch.nn.Embedding(8192, 512)
            self.blocks = torch.nn.ModuleList()
            for _ in range(11):
                block = torch.nn.Module()
                block.attn = torch.nn.Module()
                for name, rows in (("q_proj", 512), ("k_proj", 256), ("v_proj", 256), ("out_proj", 512)):
                    setattr(block.attn, name, torch.nn.Linear(512, rows, bias=False))
                block.mlp = torch.nn.Module()
                block.mlp.fc, block.mlp.proj = torch.nn.Linear(512, 2048, bias=False), torch.nn.Linear(2048, 512, bias=False)
                self.blocks.append(block)

        def forward_logits(self, input_ids, lora=None):
            x = self.tok_emb(input_ids)
            for index in (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10):
                block = self.blocks[index]
                a = block.attn
                x = x + a.out_proj(a.q_proj(x) + torch.cat([a.k_proj(x), a.v_proj(x)], -1)) * 0.1
                x = x + block.mlp.proj(torch.relu(block.mlp.fc(x)) ** 2) * 0.1
            if lora is not None:
                lora("head", -1, x)
            return x @ self.tok_emb.weight.t()

    with torch.no_grad():
        model = StandIn()
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model, 8192, "stand-in Linears of the record shapes"


def bench_whole_model(quick):
    print("== record-shape model: Hessians + GPTQ on CPU")
    model, vocab, label = record_model()
    print(f"model: {label}, {sum(p.numel() for p in model.parameters()):,} parameters")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialized projections would be free to store: use N(0, 0.02) everywhere
        for tensor in model.state_dict().values():
            if tensor.ndim == 2 and tensor.numel() > 65_536:
                tensor.normal_(0.0, 0.02, generator=generator)
    # random stand-ins for training tokens; few, because a CPU forward of the full model is slow
    batches = [torch.randint(0, vocab, (1, 256), generator=generator) for _ in range(2)]
    with torch.no_grad():  # untimed first call: allocator and kernel set-up, as in a warm training process
        model.forward_logits(batches[0])
    start = time.perf_counter()
    counts = {}
    hessians = collect_hessians(model, batches, call_counts=counts)
    hessian_time = time.perf_counter() - start
    looped = {name: count for name, count in counts.items() if count > len(batches)}
    print(f"Hessians: {len(hessians)} tensors from {sum(b.numel() for b in batches)} tokens in {hessian_time:.2f} s; "
          f"looped-layer call counts: {sorted(set(looped.values()))} over {len(looped)} tensors")
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    settings = QuantSettings(quant_mlp_clip_sigmas=12.0, quant_embed_clip_sigmas=15.0, lqer_enabled=False)  # PR 1736
    start = time.perf_counter()
    container = quantize_model_state(state, hessians, settings)
    gptq_time = time.perf_counter() - start
    print(f"GPTQ whole model: {gptq_time:.2f} s; total with Hessians {hessian_time + gptq_time:.2f} s (target < 10 s)")
    lqer_settings = QuantSettings(quant_mlp_clip_sigmas=12.0, quant_embed_clip_sigmas=15.0, lqer_rank=4, lqer_top_k=3)
    start = time.perf_counter()
    lqer_container = quantize_model_state(state, hessians, lqer_settings)
    print(f"GPTQ + LQER(rank 4, top 3): {time.perf_counter() - start:.2f} s")

    print("== bits per weight by tensor class (each class serialized alone, shuffle+brotli-11)")
    entries = container["entries"]
    classes = {
        "embedding int7": [n for n in entries if n == settings.embed_name],
        "attention int6": [n for n in entries if ".attn." in n and entries[n]["kind"] == "quant" and entries[n]["bits"] == 6],
        "MLP int6": [n for n in entries if ".mlp." in n and entries[n]["kind"] == "quant"],
        "attention gate int8": [n for n in entries if entries[n]["kind"] == "quant" and entries[n]["bits"] == 8],
        "small fp16": [n for n in entries if entries[n]["kind"] == "float"],
    }
    for label, names in classes.items():
        if names:
            bpw = bits_per_weight_of({n: entries[n] for n in names})
            codes = [entries[n]["codes"] for n in names if entries[n]["kind"] == "quant"]
            entropy = entropy_bits(torch.cat([c.reshape(-1) for c in codes])) if codes else float("nan")
            print(f"  {label:22s} {len(names):3d} tensors  {bpw:.3f} bits/weight  (code entropy {entropy:.3f})")
    lqer_names = [n for n, e in lqer_container["entries"].items() if e.get("lqer_rank")]
    extra = len(serialize_artifact({"entries": {n: lqer_container["entries"][n] for n in lqer_names}})) - \
        len(serialize_artifact({"entries": {n: entries[n] for n in lqer_names}}))
    print(f"  LQER factors on {lqer_names}: +{extra} bytes")
    for name in lqer_names:
        before = hessian_weighted_error(state[name], dequantize_state({"entries": {name: entries[name]}})[name], hessians[name])
        after = hessian_weighted_error(state[name], dequantize_state({"entries": {name: lqer_container["entries"][name]}})[name], hessians[name])
        print(f"    {name}: Hessian-weighted error {before:.3e} -> {after:.3e}")
    if quick:
        return
    print("== whole artifact (model bytes), 8 bits/byte over all parameters")
    numel = sum(t.numel() for t in state.values())
    for options in (dict(codec="brotli"), dict(codec="brotli", per_group=True), dict(codec="lzma")):
        start = time.perf_counter()
        blob = serialize_artifact(container, **options)
        print(f"  {options}: {len(blob):,} bytes ({8 * len(blob) / numel:.3f} bits/param) in {time.perf_counter() - start:.1f} s")


def byte_corpus(limit_bytes):
    """Bytes of the Python standard library's sources: real text, no download. Byte 1 (BOS) does not
    occur in them, so every row is one document."""
    import sysconfig

    root, chunks, total = sysconfig.get_paths()["stdlib"], [], 0
    for directory, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py") and total < limit_bytes:
                with open(os.path.join(directory, name), "rb") as handle:
                    chunks.append(handle.read())
                total += len(chunks[-1])
    data = torch.frombuffer(bytearray(b"".join(chunks)[:limit_bytes]), dtype=torch.uint8).long()
    return data.clamp_min(2)  # keep ids 0/1 (pad/BOS) out of the text


def bench_penalty(train_seconds):
    """Quantization penalty (quantized minus pre-quant bits per byte) of a small GPT trained on CPU
    on byte-level text: GPTQ, GPTQ + LQER (both schemes, with the relative output and weight errors
    of the corrected tensors) and round-to-nearest, with their model bytes."""
    import train_gpt

    print(f"== quantization penalty, small GPT trained {train_seconds:.0f} s on CPU (byte-level stdlib text)")
    h = train_gpt.Hyperparameters.from_env({"PRESET": "tiny", "VOCAB_SIZE": "256", "MODEL_DIM": "128",
                                             "NUM_LAYERS": "4", "LOOP_START": "1", "LOOP_END": "2",
                                             "PARALLEL_START_LAYER": "3", "QUANT_SMALL_TENSOR_NUMEL": "4096"})
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "sdpa")
    model.set_recurrence(True)
    data = byte_corpus(3_000_000)
    train, val = data[: -200_000], data[-200_000:]
    seq_len, batch = 128, 16
    generator = torch.Generator().manual_seed(0)

    def sample(source):
        starts = torch.randint(0, len(source) - seq_len - 1, (batch,), generator=generator)
        rows = torch.stack([source[s:s + seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start, steps = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - start < train_seconds:
        inputs, targets = sample(train)
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    model.eval()
    val_rows = val[: (len(val) - 1) // seq_len * seq_len + 1]
    val_inputs = val_rows[:-1].view(-1, seq_len)[:256]
    val_targets = val_rows[1:].view(-1, seq_len)[:256]

    def bits_per_byte(weights):
        model.load_state_dict(weights)
        with torch.no_grad():
            losses = [model(val_inputs[i:i + 32], val_targets[i:i + 32]).item() for i in range(0, len(val_inputs), 32)]
        return statistics.mean(losses) / math.log(2)  # one token = one byte

    trained = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    hessians = collect_hessians(model, [sample(train)[0] for _ in range(8)])  # training batches only
    pre = bits_per_byte(trained)
    print(f"{steps} steps, pre-quant val {pre:.4f} bits/byte")
    base = dataclasses.replace(h.quant, lqer_enabled=False)
    clips = ("quant_embed_clip_sigmas", "quant_mlp_clip_sigmas", "quant_attn_clip_sigmas")
    # (settings, Hessians): without Hessians every matrix is rounded to nearest with the same scales
    variants = {"GPTQ": (base, hessians),
                "GPTQ + LQER pr1855": (dataclasses.replace(base, lqer_enabled=True, lqer_rank=4, lqer_top_k=3,
                                                           lqer_scheme="pr1855"), hessians),
                "GPTQ + LQER hessian": (dataclasses.replace(base, lqer_enabled=True, lqer_rank=4, lqer_top_k=3,
                                                            lqer_scheme="hessian"), hessians),
                "RTN (same clips)": (base, {})}
    for clip_scale in (0.85, 0.75):  # RTN with tighter clips spends more bytes
        tighter = dataclasses.replace(base, **{name: getattr(base, name) * clip_scale for name in clips})
        variants[f"RTN clips x{clip_scale}"] = (tighter, {})
    plain_weights = None
    for label, (settings, matrix_hessians) in variants.items():
        container = quantize_model_state(trained, matrix_hessians, settings)
        model_bytes = len(serialize_artifact(container))
        weights = dequantize_state(container)
        quantized = bits_per_byte(weights)
        print(f"  {label:22s} val {quantized:.4f} bits/byte  penalty {quantized - pre:+.4f}  model {model_bytes:,} bytes")
        plain_weights = weights if label == "GPTQ" else plain_weights
        for name in [n for n, e in container["entries"].items() if e.get("lqer_rank")]:  # the LQER'd tensors
            errors = [(hessian_weighted_error(trained[name], w[name], hessians[name]),
                       float((trained[name] - w[name]).norm() / trained[name].norm())) for w in (plain_weights, weights)]
            print(f"    {name}: output error {errors[0][0]:.4e} -> {errors[1][0]:.4e}, "
                  f"weight error {errors[0][1]:.4e} -> {errors[1][1]:.4e}")
    model.load_state_dict(trained)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    # 1 by default: on a shared 2-core machine two OpenMP threads spin-wait against other processes
    # and elementwise ops ran ~35x slower than with one thread (measured 12 ms vs 0.35 ms)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--penalty-seconds", type=float, default=0.0,
                        help="also train a small GPT for this long and measure quantization penalties")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          "(other processes slow every figure alike; compare within one run)")
    if args.penalty_seconds:
        bench_penalty(args.penalty_seconds)
        return
    bench_gptq_speed()
    bench_quality()
    bench_whole_model(args.quick)


if __name__ == "__main__":
    main()
