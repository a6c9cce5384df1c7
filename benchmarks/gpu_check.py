"""One-command check of train_gpt.py's GPU path on a single H100/H200, in at most 8 minutes.

What it measures, section by section, each written to the JSON as soon as it finishes:
  environment   GPU, torch/triton versions, whether FA3 imports and runs (`fa3_available`), the attention
                backend `select_attention_backend("auto")` picks, the compile settings of a record run
  agreement     fa3 / flex / sdpa / varlen against the `plain` reference in bf16: max abs difference of
                attention outputs and of the model's logits (record model, eager), for every available backend
  compile       dynamo's counters (graphs, graph breaks, recompiles) for the compiled training
                forward+backward at the record shape, over micro-batches with few, typical and many
                documents, recurrence off then on
  training      optimizer-step time at the record shape: PRESET=pr1855 (11 x 512, vocab 8192, seq 2048),
                1 GPU with gradient accumulation 8 (8 micro-steps of 48 x 2048 = 786,432 tokens), bf16
                autocast, torch.compile (inductor), recurrence off and on; peak memory; projected steps in
                600 s on 8 GPUs against PR 1855 (4,945 steps at 121.7 ms)
  eval          compiled eval warm-up (`compile_and_warm_up_eval`, as a run does it), plain eval and phased
                LoRA TTT throughput on a synthetic validation stream of random-token documents with a
                FineWeb-like length distribution, each run twice: the first pass counts the graphs compiled
                inside the scored eval (the warm-up should have made them), the second is the steady state,
                projected to the 50,000-document split on 8 GPUs; peak memory of one full-size TTT batch
                (64 documents, LoRA rank 80, context 2048)
  triton_kernels  FUSED_MLP and FUSED_CE vs their PyTorch references in bf16 at the record width (16,384
                tokens, width 512, MLP 2048, vocab 8192): max difference of the output and of every input
                gradient, and forward+backward milliseconds of kernel and reference (CUDA + triton only)

A hard time budget (--budget-s, 450 s on GPU) is checked before every section and between the steps of
a section; a section that does not fit is recorded as skipped, and the JSON is rewritten (atomically)
after every section, so whatever finished is on disk even if the process is killed.

    python benchmarks/gpu_check.py                       # GPU: records/gpu_checks/<gpu-name>_<date>.json
    python benchmarks/gpu_check.py --cpu-smoke --out x.json   # every section at a tiny shape on CPU

On the workplace's device machine (one H200; Python 3.12, torch 2.11, Triton, no FA3, no network):
nothing needs to be carried. train_gpt.py imports brotli at module top and brotli is not installed
there, so this script puts a stub `brotli` module in place when the real one is missing (the check
never packs code or writes an artifact; the stub raises if called), and python-minifier is imported
only when packing. The one command (the run tool's `command`, from the repository root):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

with timeout_s=600 (the check stops starting work after --budget-s; a compile already running can overrun
it). Then copy the returned gpu_check.json to records/gpu_checks/<gpu-name>_<date>.json and commit it.
Inductor compiles dominate the time (two training graphs, seven eval warm-up graphs for phased TTT and any recompiles);
if the JSON shows eval skipped and device time is left, a second call runs only that part:
`... benchmarks/gpu_check.py --sections eval --budget-s 300 --out $OUT/gpu_check_eval.json`. To use
the real brotli there instead of the stub, carry its wheel: here run `echo /.whl/ >> .git/info/exclude;
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl brotli==1.2.1` (the version
installed here), pass carry [".whl"] and start the command with `python3 -m pip install -q --no-index
--no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;`.
"""

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
import traceback
import types
from dataclasses import dataclass

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def import_train_gpt() -> tuple[types.ModuleType, str]:
    """train_gpt, and how brotli was satisfied: the real module, or a stub that raises when used
    (train_gpt imports brotli at its top, but only artifact packing calls it; this check never does)."""
    if importlib.util.find_spec("brotli") is not None:
        brotli_status = "installed"
    else:
        stub = types.ModuleType("brotli")

        def unavailable(*args, **kwargs):
            raise RuntimeError("brotli is not installed; gpu_check.py stubbed it and never packs artifacts")

        stub.compress = stub.decompress = unavailable
        stub.error = RuntimeError
        sys.modules["brotli"] = stub
        brotli_status = "stub (not installed; artifact packing unavailable)"
    import train_gpt
    return train_gpt, brotli_status


train_gpt, BROTLI_STATUS = import_train_gpt()

PR1855_STEPS, PR1855_STEP_MS = 4945, 121.7  # published: 8xH100, 600 s, 786,432 tokens per step
CHALLENGE_VAL_DOCS = 50_000
AGREEMENT_TOLERANCE = 0.05  # max abs difference allowed, relative to max(1, the reference's largest magnitude)


@dataclass
class CheckShape:
    """Everything that differs between the GPU check and its CPU smoke run."""
    env: dict                 # Hyperparameters.from_env input
    device: str
    compile_backend: str
    autocast: str             # bf16 | fp32
    micro_rows: int           # sequences per micro-step (one rank of 8)
    accum: int                # micro-steps per optimizer step on this one GPU
    timed_steps: int          # optimizer steps timed per recurrence state
    doc_mean: float           # mean document length in tokens (BOS included)
    doc_max: int              # longest document
    plain_docs: int           # documents in the plain-eval sample
    ttt_docs: int             # documents in the phased-TTT sample
    agreement_rows: int       # rows of the logits comparison
    budget_s: float


GPU_SHAPE = CheckShape(env=dict(PRESET="pr1855"), device="cuda", compile_backend="inductor", autocast="bf16",
                       micro_rows=48, accum=8, timed_steps=3, doc_mean=700.0, doc_max=32768, plain_docs=4096,
                       ttt_docs=320, agreement_rows=2, budget_s=450.0)
# PRESET=tiny's settings in a 1-layer model (run twice once recurrence is on) with short contexts, so every section
# runs in seconds on 2 cores. Its eval batches are 2 rows / 2 documents, the warm-up's batch, because each eval
# graph with dynamic shapes costs seconds of tracing here; the GPU run measures the recompiles of real batches.
SMOKE_SHAPE = CheckShape(env=dict(PRESET="tiny", VOCAB_SIZE="512", NUM_LAYERS="1", MODEL_DIM="32", NUM_HEADS="2",
                                  NUM_KV_HEADS="1", ROPE_DIMS="8", LOOP_START="0", LOOP_END="0", NUM_LOOPS="2",
                                  PARALLEL_START_LAYER="-1", SMEAR_GATE_DIMS="8", SPARSE_ATTN_GATE_DIMS="8",
                                  TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="96", EVAL_BATCH_TOKENS=str(2 * 8 * 96),
                                  PHASED_TTT_CHUNK_TOKENS="24", PHASED_TTT_DOCS_PER_BATCH="2",
                                  PHASED_TTT_LORA_RANK="4"),
                         device="cpu", compile_backend="eager", autocast="fp32", micro_rows=4, accum=2,
                         timed_steps=1, doc_mean=24.0, doc_max=200, plain_docs=48, ttt_docs=12, agreement_rows=2,
                         budget_s=160.0)  # the eval warm-up traces 7 graphs (one-row batches too)


# --- helpers: clock, memory, counters, synthetic data ---------------------------------------------


class Deadline:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset, GiB (None on CPU: not measured)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(device: torch.device, work) -> tuple[float, object]:
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - started, result


def guard_failures() -> list[str]:
    """Failed guards that preceded each recompile (one per cache entry that no longer matched), oldest
    first, from torch._dynamo.utils.guard_failures."""
    from torch._dynamo.utils import guard_failures
    return [reason for failures in guard_failures.values() for reason in failures]


def distinct_reasons(failures: list[str], count: int = 8) -> list[str]:
    """The first `count` distinct guard failures (first line; "frame/entry:" says which cache entry)."""
    reasons = []
    for failure in failures:
        reason = failure.split("\n")[0].strip()[:200]
        if reason not in reasons:
            reasons.append(reason)
    return reasons[:count]


def dynamo_counts() -> dict:
    """Snapshot of dynamo's bookkeeping: graphs compiled and graph breaks (torch._dynamo.utils.counters),
    and the guard failures that caused recompiles."""
    from torch._dynamo.utils import counters
    breaks = dict(counters["graph_break"])
    failures = guard_failures()
    return dict(unique_graphs=int(counters["stats"]["unique_graphs"]), graph_breaks=int(sum(breaks.values())),
                graph_break_reasons=sorted(breaks)[:5], guard_failures=len(failures),
                recompile_reasons=distinct_reasons(failures))


def counts_since(before: dict) -> dict:
    """Graphs, graph breaks and guard failures since `before`, with the reasons of those recompiles."""
    after = dynamo_counts()
    return dict(after, recompile_reasons=distinct_reasons(guard_failures()[before["guard_failures"]:]),
                **{key: after[key] - before[key] for key in ("unique_graphs", "graph_breaks", "guard_failures")})


def compiled_since(before: dict) -> dict:
    """What a timed eval compiled although the warm-up ran first: each graph here is compile time
    inside the scored eval of a run."""
    since = counts_since(before)
    return dict(graphs_compiled=since["unique_graphs"], recompile_reasons=since["recompile_reasons"])


def reset_dynamo(compile_backend: str) -> None:
    """Forget every compiled graph and counter, then apply a run's compile settings."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.guard_failures.clear()
    train_gpt.configure_compile(compile_backend)


def document_lengths(count: int, mean: float, max_len: int, seed: int) -> np.ndarray:
    """FineWeb-like document lengths (tokens, BOS included): log-normal with sigma 1.1 (median about
    half the mean, a long tail to many thousands), clipped to [2, max_len]."""
    sigma = 1.1
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(math.log(mean) - sigma**2 / 2, sigma, count))
    return np.clip(np.round(lengths), 2, max_len).astype(np.int64)


def quantile_sample(lengths: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` lengths at evenly spaced quantiles of `lengths` (so the tail is represented in
    proportion), in a random order like a real stream."""
    ordered = np.sort(lengths)
    picks = ordered[((np.arange(count) + 0.5) * len(ordered) / count).astype(np.int64)]
    return np.random.default_rng(seed).permutation(picks)


def token_stream(lengths: np.ndarray, vocab_size: int, seed: int) -> np.ndarray:
    """Random-token documents of the given lengths, each starting with BOS."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab_size, int(lengths.sum()), dtype=np.int64)
    tokens[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = train_gpt.BOS_ID
    return tokens


def synthetic_val(lengths: np.ndarray, vocab_size: int, seed: int):
    """A ValData of random-token documents; every non-BOS token stands for 1-6 bytes."""
    tokens = token_stream(lengths, vocab_size, seed)
    byte_counts = np.random.default_rng(seed + 1).integers(1, 7, tokens.size)
    byte_counts[tokens == train_gpt.BOS_ID] = 0
    return train_gpt.make_val_data(tokens, byte_counts, vocab_size=vocab_size)


def micro_batch(rows: int, seq_len: int, vocab_size: int, doc_mean: float, doc_max: int, seed: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One training micro-batch as TrainLoader makes it: rows*seq_len+1 contiguous stream tokens, so
    documents run across row boundaries; (inputs, targets) [rows, seq_len]."""
    need, count = rows * seq_len + 1, max(4, int(2 * (rows * seq_len + 1) / doc_mean))
    lengths = document_lengths(count, doc_mean, doc_max, seed)
    while lengths.sum() < need:  # rare: too few long documents were drawn
        count *= 2
        lengths = document_lengths(count, doc_mean, doc_max, seed)
    span = torch.from_numpy(token_stream(lengths, vocab_size, seed)[:need])
    return span[:-1].view(rows, seq_len).to(device), span[1:].view(rows, seq_len).to(device)


def document_starts(inputs: torch.Tensor) -> int:
    """Document starts of a micro-batch (BOS tokens and row starts), as DocumentLayout counts them."""
    starts = inputs == train_gpt.BOS_ID
    starts[:, 0] = True
    return int(starts.sum())


def build_model(h, backend: str, device: torch.device, seed: int = 0) -> "train_gpt.GPT":
    """A record-configuration GPT with every zero-initialized path made live (small noise on every
    parameter), so attention and logits comparisons exercise all of the network."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(h.model, backend).to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_((torch.randn(param.shape, generator=generator) * 0.02).to(device))
    return model


# --- sections ----------------------------------------------------------------------------------------


def check_triton_kernels(device: torch.device, tokens: int = 16384) -> dict:
    """Each Triton kernel of train_gpt.py against its PyTorch reference, forward and backward, in bf16."""
    if device.type != "cuda" or not train_gpt.triton_available():
        return dict(status="skipped: needs CUDA and triton")
    try:
        return compare_triton_kernels(device, tokens)
    except Exception as error:  # a kernel that fails here must not cost the rest of the check
        return dict(status=f"error: {type(error).__name__}: {error}")


def compare_triton_kernels(device: torch.device, tokens: int) -> dict:
    train_gpt.fused_ops()
    generator = torch.Generator(device="cpu").manual_seed(0)

    def leaves(*shapes_and_scales):
        return [(torch.randn(shape, generator=generator) * scale).to(device, torch.bfloat16).requires_grad_(True)
                for shape, scale in shapes_and_scales]

    def compare(fused, reference, inputs, extra=()):
        results, times = [], []
        for function in (fused, reference):
            copies = [tensor.detach().clone().requires_grad_(True) for tensor in inputs]
            out = function(*copies, *extra)
            out.float().square().mean().backward()
            results.append([out.detach().float()] + [copy.grad.float() for copy in copies])
            def step():
                out = function(*copies, *extra)
                out.float().square().mean().backward()
            step()
            times.append(min(timed(device, step)[0] for _ in range(5)) * 1e3)
        differences = [float((a - b).abs().max()) for a, b in zip(*results)]
        return dict(max_abs_difference=dict(zip(["output"] + [f"grad_{i}" for i in range(len(inputs))], differences)),
                    fused_ms=times[0], reference_ms=times[1], speedup=times[1] / times[0])

    x, up, down = leaves(((tokens, 512), 1.0), ((2048, 512), 0.04), ((512, 2048), 0.02))
    mlp = compare(train_gpt.FusedLeakyReLU2MLP.apply,
                  lambda x, up, down: train_gpt.leaky_relu2(x @ up.T) @ down.T, [x, up, down])
    logits, = leaves(((tokens, 8192), 5.0))
    targets = torch.randint(0, 8192, (tokens,), generator=generator).to(device)
    ce = compare(train_gpt.fused_softcapped_nll, train_gpt.softcapped_nll_reference, [logits], (targets, 30.0))
    return dict(status="ok", fused_mlp=mlp, fused_ce=ce)


def check_environment(shape: CheckShape, device: torch.device, backend: str) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        gpu=gpu, capability=list(torch.cuda.get_device_capability(device)) if gpu else None,
        gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30 if gpu else None,
        cuda=torch.version.cuda, python=platform.python_version(), torch=torch.__version__, triton=triton_version,
        fa3_module_found=importlib.util.find_spec("flash_attn_interface") is not None,
        fa3_available=train_gpt.fa3_available(device), fa3_problem=train_gpt.fa3_problem(device) or None,
        attention_backend=backend,
        attention_backend_auto=train_gpt.select_attention_backend("auto", device),
        brotli=BROTLI_STATUS, autocast=shape.autocast,
        compile=dict(backend=shape.compile_backend, train="torch.compile(model, dynamic=False, fullgraph=True)",
                     eval="torch.compile(per_token_nll, dynamic=True, fullgraph=True)",
                     recompile_limit=torch._dynamo.config.recompile_limit,
                     fail_on_recompile_limit_hit=bool(torch._dynamo.config.fail_on_recompile_limit_hit),
                     cu_seqlens_bucket=train_gpt.CU_SEQLENS_BUCKET),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32, cpu_threads=torch.get_num_threads())


def available_backends(device: torch.device) -> dict:
    """{backend: None if it can run here, else why not} for the backends compared with `plain`; flex,
    sdpa and varlen are tried everywhere (an error is reported per backend)."""
    problem = train_gpt.fa3_problem(device)  # why FA3 cannot run here (import or first call)
    fa3 = f"unavailable: {problem}" if problem else None
    return {"fa3": fa3, "flex": None, "sdpa": None, "varlen": None}


def check_agreement(h, shape: CheckShape, device: torch.device, deadline: Deadline) -> dict:
    """Each backend against `plain` in bf16: (1) attention() on the same random q, k, v and documents
    (flex also compiled, the kernel training uses); (2) the whole model's logits (eager, recurrence on,
    same weights). Inputs are bf16 (attention) or run under bf16 autocast (logits), as in a record run."""
    seq_len, heads, kv_heads, head_dim = h.data.train_seq_len, h.model.num_heads, h.model.num_kv_heads, h.model.head_dim
    rows = shape.agreement_rows
    inputs, _ = micro_batch(rows, seq_len, h.model.vocab_size, shape.doc_mean, shape.doc_max, 11, device)
    generator = torch.Generator(device="cpu").manual_seed(5)
    q, k, v = (torch.randn(rows, seq_len, n, head_dim, generator=generator).to(device, torch.bfloat16)
               for n in (heads, kv_heads, kv_heads))
    reference_layout = train_gpt.DocumentLayout.build(inputs, "plain")
    reference_attention = train_gpt.attention(q, k, v, reference_layout).float()
    model = build_model(h, "plain", device)
    model.set_recurrence(True)
    autocast = train_gpt.compute_context(device, "bf16")
    with torch.no_grad(), autocast:
        reference_logits = model.forward_logits(inputs).float()
    result = dict(reference="plain", dtype="bf16", rows=rows, seq_len=seq_len, documents=document_starts(inputs),
                  reference_attention_max_abs=float(reference_attention.abs().max()),
                  reference_logits_max_abs=float(reference_logits.abs().max()), backends={})
    for backend, unavailable in available_backends(device).items():
        if unavailable:
            result["backends"][backend] = dict(status=unavailable)
            continue
        if deadline.left() < 5:
            result["backends"][backend] = dict(status="skipped: time budget spent")
            continue
        try:
            layout = train_gpt.DocumentLayout.build(inputs, backend)
            with torch.no_grad():
                attention_diff = (train_gpt.attention(q, k, v, layout).float() - reference_attention).abs().max()
                model.attn_backend = backend
                with autocast:
                    logits_diff = (model.forward_logits(inputs).float() - reference_logits).abs().max()
            diffs = dict(attention_max_abs_diff=float(attention_diff), logits_max_abs_diff=float(logits_diff))
            if backend == "flex":  # eager flex is an unfused reference; training runs the compiled kernel
                compiled = torch.compile(train_gpt.attention, fullgraph=True, backend=shape.compile_backend)
                with torch.no_grad():
                    compiled_diff = (compiled(q, k, v, layout).float() - reference_attention).abs().max()
                diffs["attention_compiled_max_abs_diff"] = float(compiled_diff)
            # bf16 rounding moves O(1) outputs by a few ulps (~1e-2); a masking error moves them by O(1)
            within = all(value <= AGREEMENT_TOLERANCE * max(1.0, result["reference_logits_max_abs" if "logits" in key
                                                                      else "reference_attention_max_abs"])
                         for key, value in diffs.items())
            result["backends"][backend] = dict(status="ok", within_tolerance=within, **diffs)
        except Exception as error:  # one backend failing must not hide the others
            result["backends"][backend] = dict(status=f"error: {type(error).__name__}: {error}"[:500])
        finally:
            model.attn_backend = "plain"
    del model
    return result


def expected_graphs(backend: str, pairs: set) -> int:
    """Graphs a correct compile produces for the (cu_seqlens bucket, recurrence) pairs seen: one per
    pair with fa3/varlen (cu_seqlens is an input whose length is the bucket), else one per recurrence
    state (the dense mask / block mask has a shape fixed by [B, T])."""
    if backend in ("fa3", "varlen"):
        return len(pairs)
    return len({recurrence for _, recurrence in pairs})


def check_training(h, shape: CheckShape, device: torch.device, backend: str, deadline: Deadline) -> dict:
    """Compiled training at the record shape. For recurrence off, then on: one untimed optimizer step
    (compiles every cu_seqlens bucket of its micro-batches), `timed_steps` timed steps on the same
    micro-batches (so nothing recompiles inside the timing), then one micro-step each with few and
    with many documents per row (compile counts only). Returns {"compile": ..., "training": ...}."""
    seq_len, vocab = h.data.train_seq_len, h.model.vocab_size
    reset_dynamo(shape.compile_backend)
    model = build_model(h, backend, device)
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    forward = torch.compile(model, dynamic=False, fullgraph=True, backend=shape.compile_backend)
    batches = [micro_batch(shape.micro_rows, seq_len, vocab, shape.doc_mean, shape.doc_max, 100 + index, device)
               for index in range(shape.accum)]
    extremes = {"few_documents": shape.doc_mean * 8, "many_documents": shape.doc_mean / 8}
    compile_log, pairs, states = [], set(), {}

    flat = train_gpt.packs_flat(h.data.train_packing, backend)  # the record packs each micro-batch as one row

    def bucket(inputs):
        layout = train_gpt.DocumentLayout.build(inputs.reshape(1, -1) if flat else inputs, "varlen", seq_len)
        return layout.cu_seqlens.numel()

    def micro_steps(step_batches):
        return train_gpt.forward_backward(forward, step_batches, optimizer, backend, shape.autocast, flat).item()

    for recurrence in (False, True):
        name = "recurrence_on" if recurrence else "recurrence_off"
        if deadline.left() < (20 if shape.device == "cpu" else 90):
            states[name] = dict(status="skipped: time budget spent")
            continue
        model.set_recurrence(recurrence)
        before = dynamo_counts()
        compile_s, loss = timed(device, lambda: micro_steps(batches))
        optimizer.step()
        pairs |= {(bucket(inputs), recurrence) for inputs, _ in batches}
        compile_log.append(dict(what=f"{name}: first optimizer step ({shape.accum} typical micro-batches)",
                                seconds=round(compile_s, 2), documents_per_micro_batch=[
                                    document_starts(inputs) for inputs, _ in batches], **counts_since(before)))
        before = dynamo_counts()
        reset_peak_memory(device)
        step_times, micro_times, optimizer_times = [], [], []
        for _ in range(shape.timed_steps):
            micro_s, loss = timed(device, lambda: micro_steps(batches))
            optimizer_s, _ = timed(device, optimizer.step)
            step_times.append(micro_s + optimizer_s)
            micro_times.append(micro_s / shape.accum)
            optimizer_times.append(optimizer_s)
        timing_counts = counts_since(before)
        states[name] = dict(status="ok", step_s=min(step_times), micro_step_s=min(micro_times),
                            optimizer_step_s=min(optimizer_times), step_s_all=[round(t, 4) for t in step_times],
                            tokens_per_s_1gpu=shape.accum * shape.micro_rows * seq_len / min(step_times),
                            peak_memory_gib=peak_memory_gib(device), loss=loss,
                            graphs_compiled_while_timing=timing_counts["unique_graphs"])
        for label, mean in extremes.items():
            if deadline.left() < (10 if shape.device == "cpu" else 60):
                compile_log.append(dict(what=f"{name}: {label}", status="skipped: time budget spent"))
                continue
            inputs, targets = micro_batch(shape.micro_rows, seq_len, vocab, mean, shape.doc_max, 7, device)
            before = dynamo_counts()
            seconds, _ = timed(device, lambda: micro_steps([(inputs, targets)]))
            pairs.add((bucket(inputs), recurrence))
            compile_log.append(dict(what=f"{name}: {label}", seconds=round(seconds, 2),
                                    documents_per_micro_batch=[document_starts(inputs)], **counts_since(before)))
    totals = dynamo_counts()
    compile_result = dict(status="ok" if len(states) == 2 and all(s["status"] == "ok" for s in states.values())
                          else "truncated", backend=shape.compile_backend, attention_backend=backend,
                          buckets_and_recurrence_seen=sorted([b, r] for b, r in pairs),
                          expected_graphs=expected_graphs(backend, pairs), **totals, steps=compile_log)
    compile_result["ok"] = (totals["unique_graphs"] == compile_result["expected_graphs"]
                            and totals["graph_breaks"] == 0)
    training = dict(status=compile_result["status"], train_packing="flat" if flat else "rows",
                    micro_rows=shape.micro_rows, seq_len=seq_len,
                    grad_accum=shape.accum, tokens_per_step=shape.accum * shape.micro_rows * seq_len,
                    autocast=shape.autocast, **states)
    if all(states.get(name, {}).get("status") == "ok" for name in ("recurrence_off", "recurrence_on")):
        training["projection_8gpu"] = project_training(h, states["recurrence_off"], states["recurrence_on"])
    del forward, optimizer, model
    return dict(compile=compile_result, training=training)


def project_training(h, off: dict, on: dict) -> dict:
    """Steps in 600 s on 8 GPUs. Assumptions: each of the 8 ranks does one micro-step per optimizer
    step (8 // 8 = 1), so a step takes one micro-step plus 1/8 of this GPU's optimizer step (Muon's
    Newton-Schulz work is sharded over the ranks; AdamW is small); gradient communication is not
    modelled (taken as free). Recurrence is off for ENABLE_LOOPING_AT of the training budget
    (MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS) and on for the rest."""
    budget = train_gpt.training_budget_seconds(h)
    step_off = off["micro_step_s"] + off["optimizer_step_s"] / 8
    step_on = on["micro_step_s"] + on["optimizer_step_s"] / 8
    switch = h.model.enable_looping_at
    steps = switch * budget / step_off + (1 - switch) * budget / step_on
    return dict(step_s_recurrence_off=step_off, step_s_recurrence_on=step_on, training_budget_s=budget,
                projected_steps=int(steps), mean_step_ms=1000 * budget / steps,
                pr1855_steps=PR1855_STEPS, pr1855_step_ms=PR1855_STEP_MS,
                steps_vs_pr1855=steps / PR1855_STEPS,
                assumption="8 ranks x 1 micro-step of 48x2048 each; step = micro-step + optimizer/8; "
                           "communication free; recurrence on after ENABLE_LOOPING_AT of the budget")


def check_eval(h, shape: CheckShape, device: torch.device, backend: str, deadline: Deadline) -> dict:
    """Compiled evaluation as a run does it: compile_and_warm_up_eval (random tokens), then plain eval
    and phased TTT under bf16 autocast (CUDA) on quantile samples of a 50,000-document FineWeb-like
    length distribution; throughput is scored tokens per second on this GPU, projected to 8 GPUs."""
    reset_dynamo(shape.compile_backend)
    vocab, config = h.model.vocab_size, h.eval
    split_lengths = document_lengths(CHALLENGE_VAL_DOCS, shape.doc_mean, shape.doc_max, seed=2026)
    split_tokens = int(split_lengths.sum())
    distribution = dict(documents=CHALLENGE_VAL_DOCS, tokens=split_tokens, mean=float(split_lengths.mean()),
                        median=float(np.median(split_lengths)), p99=float(np.percentile(split_lengths, 99)),
                        max=int(split_lengths.max()),
                        shape=f"log-normal, sigma 1.1, clipped to [2, {shape.doc_max}] tokens (BOS included)")
    result = dict(status="ok", val_distribution=distribution)
    if deadline.left() < (20 if shape.device == "cpu" else 90):  # the warm-up alone compiles seven graphs
        return dict(status="skipped: time budget spent", val_distribution=distribution)
    model = build_model(h, backend, device)
    model.set_recurrence(True)
    spare = build_model(h, backend, device)  # compile_and_warm_up_eval compiles two models and warms one
    context = train_gpt.RunContext(artifact_dir="", log=lambda message: None, device=device,
                                   compile_backend=shape.compile_backend, autocast=shape.autocast)
    before = dynamo_counts()
    result["warm_up"] = dict(seconds=train_gpt.compile_and_warm_up_eval(h, spare, model, context),
                             **counts_since(before))
    del spare
    use_bf16 = shape.autocast == "bf16" and device.type == "cuda"  # as evaluate_after_training
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def measure(val, run_eval, **extra) -> dict:
        """Run an eval twice. The first pass pays for every graph compiled inside it (as a run's scored
        eval would); the second, run if time allows, is the steady state that the projection uses. The
        sample is quantile-spread over the split, so time scales with the document count."""
        before = dynamo_counts()
        with autocast:
            runs = [run_eval()]
        entry = dict(status="ok", documents=val.num_docs, tokens=val.num_tokens, **extra,
                     first_seconds=runs[0]["eval_time_s"], **compiled_since(before))
        if deadline.left() > (5 if shape.device == "cpu" else 45):
            dynamic = dynamo_counts()
            with autocast:
                runs.append(run_eval())
            entry["graphs_compiled_in_second_pass"] = counts_since(dynamic)["unique_graphs"]
        steady = runs[-1]
        entry.update(steady_state=len(runs) == 2, seconds=steady["eval_time_s"],
                     tokens_per_s=steady["scored_tokens"] / steady["eval_time_s"],
                     compile_seconds_inside_eval=runs[0]["eval_time_s"] - steady["eval_time_s"] if len(runs) == 2
                     else None, projected_split_seconds_8gpu=steady["eval_time_s"] * CHALLENGE_VAL_DOCS
                     / val.num_docs / 8, assumption="steady-state sample time x 50,000 / sample documents / 8 "
                     "ranks (perfect sharding, no communication)")
        if any(run.get("ttt_stopped_by_budget") for run in runs):
            entry["status"] = "truncated: time budget"
        if "ttt_phases_trained" in steady:
            entry["phases_trained"] = steady["ttt_phases_trained"]
        return entry

    if deadline.left() < (10 if shape.device == "cpu" else 45):
        result["plain"] = dict(status="skipped: time budget spent")
    else:
        val = synthetic_val(quantile_sample(split_lengths, shape.plain_docs, 1), vocab, 1).to(device)
        result["plain"] = measure(val, lambda: train_gpt.eval_stream(model, val, config.eval_seq_len,
                                                                      config.batch_rows(8)),
                                  batch_rows=config.batch_rows(8))
    if deadline.left() < (10 if shape.device == "cpu" else 45):
        result["ttt_full_batch"] = dict(status="skipped: time budget spent")
    else:
        result["ttt_full_batch"] = ttt_full_batch(model, h, device, autocast)
    if deadline.left() < (15 if shape.device == "cpu" else 60):
        result["ttt_phased"] = dict(status="skipped: time budget spent")
    else:
        val = synthetic_val(quantile_sample(split_lengths, shape.ttt_docs, 2), vocab, 2).to(device)
        prefix = max(1, round(config.phased_ttt_prefix_docs * shape.ttt_docs / CHALLENGE_VAL_DOCS))
        ttt_config = dataclasses.replace(config, phased_ttt_prefix_docs=prefix)
        # the TTT budget only guards this check's deadline; a pass that hit it is reported as truncated
        result["ttt_phased"] = measure(val, lambda: train_gpt.eval_ttt_phased(
            model, val, ttt_config, time_budget_s=max(1.0, deadline.left() - 10)), prefix_docs=prefix,
            docs_per_batch=config.phased_ttt_docs_per_batch, lora_rank=config.phased_ttt_lora_rank)
    if all(result.get(mode, {}).get("status") == "ok" for mode in ("plain", "ttt_phased")):
        total = sum(result[mode]["projected_split_seconds_8gpu"] for mode in ("plain", "ttt_phased"))
        result["projected_eval_seconds_8gpu"] = dict(
            plain_plus_ttt_phased=total, within_600s=total <= 600.0,
            note="a run also evaluates pre-quant and quantized plain (2 x plain) before TTT")
    result.update(dynamo_totals=dynamo_counts())
    if any(str(result.get(mode, {}).get("status", "ok")) != "ok" for mode in ("plain", "ttt_full_batch", "ttt_phased")):
        result["status"] = "truncated"
    del model
    return result


def ttt_full_batch(model, h, device: torch.device, autocast) -> dict:
    """One TTT chunk at full size: PHASED_TTT_DOCS_PER_BATCH documents (64) with their own rank
    PHASED_TTT_LORA_RANK (80) adapters over EVAL_SEQ_LEN (2048) tokens of context, forward, backward and
    an Adam step on the adapters; peak memory and seconds."""
    config = h.eval
    docs, width = config.phased_ttt_docs_per_batch, config.eval_seq_len
    sites = tuple(site.strip() for site in config.phased_ttt_lora_sites.split(",") if site.strip())
    for param in model.parameters():
        param.requires_grad_(False)
    lora = train_gpt.BatchedLoRA(docs, train_gpt.lora_site_dims(model, sites), config.phased_ttt_lora_rank,
                                 config.phased_ttt_lora_alpha).to(device)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=config.phased_ttt_lr)
    tokens = torch.from_numpy(token_stream(np.full(docs, width + 1), h.model.vocab_size, 3)).view(docs, width + 1)
    tokens = tokens.to(device)
    reset_peak_memory(device)
    before = dynamo_counts()

    def step():
        with autocast:
            nll = model.per_token_nll(tokens[:, :-1], tokens[:, 1:], lora=lora)
        optimizer.zero_grad(set_to_none=True)
        nll.mean(dim=1).sum().backward()
        optimizer.step()

    first_s, _ = timed(device, step)
    second_s, _ = timed(device, step)
    for param in model.parameters():
        param.requires_grad_(True)
    return dict(status="ok", documents=docs, context=width, lora_rank=config.phased_ttt_lora_rank,
                lora_parameters=sum(p.numel() for p in lora.parameters()), first_s=first_s, second_s=second_s,
                peak_memory_gib=peak_memory_gib(device), **compiled_since(before))


# --- running the sections, the JSON and the summary ----------------------------------------------------


def default_out_path(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join(REPO, "records", "gpu_checks", f"{re.sub(r'[^A-Za-z0-9.-]+', '-', name)}_{date}.json")


def write_json(path: str, report: dict) -> None:
    text = json.dumps(report, indent=2, default=lambda value: repr(value)) + "\n"
    train_gpt.atomic_write_bytes(path, text.encode())


SECTION_KEYS = {"environment": ("environment",), "agreement": ("agreement",), "training": ("compile", "training"),
                "eval": ("eval",)}  # the training run gives both the compile counts and the step times


def run_sections(shape: CheckShape, mode: str, out: str, backend_request: str, selected: list[str]) -> dict:
    deadline = Deadline(shape.budget_s)
    device = torch.device(shape.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as start_run does
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)  # tiny shapes are per-op overhead; one thread avoids contention
    h = train_gpt.Hyperparameters.from_env(shape.env)
    train_gpt.configure_compile(shape.compile_backend)
    backend = train_gpt.select_attention_backend(backend_request, device)
    report = dict(schema=1, mode=mode, started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), budget_s=shape.budget_s, preset=h.run.preset,
        model=dict(num_layers=h.model.num_layers, model_dim=h.model.model_dim, vocab_size=h.model.vocab_size,
                   train_seq_len=h.data.train_seq_len, eval_seq_len=h.eval.eval_seq_len),
        sections={}, triton_kernels=check_triton_kernels(device), complete=False)
    sections = {"environment": lambda: dict(environment=dict(status="ok", **check_environment(shape, device, backend))),
                "agreement": lambda: dict(agreement=dict(status="ok", **check_agreement(h, shape, device, deadline))),
                "training": lambda: check_training(h, shape, device, backend, deadline),
                "eval": lambda: dict(eval=check_eval(h, shape, device, backend, deadline))}
    write_json(out, report)
    for name, section in sections.items():
        started = time.perf_counter()
        if name not in selected:
            results = {key: dict(status="not run (--sections)") for key in SECTION_KEYS[name]}
        elif deadline.left() <= 0:
            results = {key: dict(status="skipped: time budget spent") for key in SECTION_KEYS[name]}
        else:
            try:
                results = section()
            except Exception as error:  # record it and go on: later sections may still work
                failure = dict(status=f"error: {type(error).__name__}: {error}"[:1000],
                               traceback=traceback.format_exc()[-4000:])
                results = {key: failure for key in SECTION_KEYS[name]}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        report.update(results)
        status = ", ".join(f"{key} {results[key]['status']}" for key in SECTION_KEYS[name])
        report["sections"][name] = dict(seconds=round(time.perf_counter() - started, 2), status=status)
        report["elapsed_s"] = round(deadline.elapsed(), 2)
        write_json(out, report)
        print(f"[{deadline.elapsed():6.1f}s] {name}: {status} ({report['sections'][name]['seconds']:.1f}s)", flush=True)
    report["complete"] = all(report[key]["status"] == "ok" for keys in SECTION_KEYS.values() for key in keys)
    write_json(out, report)
    return report


def summary_lines(report: dict) -> list[str]:
    """The human summary: one line per finding."""
    def number(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "n/a"

    env = report.get("environment", {})
    lines = [f"gpu check ({report['mode']}): {env.get('gpu') or 'cpu'}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, fa3 {'yes' if env.get('fa3_available') else 'no'}, attention "
             f"{env.get('attention_backend')}, compile {env.get('compile', {}).get('backend')}, brotli "
             f"{env.get('brotli')}"]
    for backend, values in report.get("agreement", {}).get("backends", {}).items():
        lines.append(f"  agreement {backend:>6} vs plain (bf16): attention max|diff| "
                     f"{number(values.get('attention_max_abs_diff'), '.2e')}, logits max|diff| "
                     f"{number(values.get('logits_max_abs_diff'), '.2e')} [{values.get('status')}, within tolerance "
                     f"{values.get('within_tolerance')}]")
    compiled = report.get("compile", {})
    lines.append(f"  compile: {compiled.get('unique_graphs')} graphs (expected {compiled.get('expected_graphs')}), "
                 f"{compiled.get('graph_breaks')} graph breaks, recompiled on: "
                 f"{'; '.join(reason[:70] for reason in compiled.get('recompile_reasons', [])[:3])} "
                 f"[{compiled.get('status')}, ok={compiled.get('ok')}]")
    training = report.get("training", {})
    for name in ("recurrence_off", "recurrence_on"):
        state = training.get(name, {})
        lines.append(f"  train {name}: step {number(state.get('step_s'), '.3f')} s on this device "
                     f"({training.get('grad_accum')} x {training.get('micro_rows')} x {training.get('seq_len')}), "
                     f"micro-step {number(state.get('micro_step_s'), '.4f')} s, optimizer "
                     f"{number(state.get('optimizer_step_s'), '.4f')} s, peak "
                     f"{number(state.get('peak_memory_gib'), '.1f')} GiB [{state.get('status')}]")
    projection = training.get("projection_8gpu")
    if projection:
        lines.append(f"  projected 8 GPUs: {projection['projected_steps']} steps in "
                     f"{projection['training_budget_s']:.0f} s ({projection['mean_step_ms']:.1f} ms/step) vs PR 1855 {PR1855_STEPS} steps "
                     f"({PR1855_STEP_MS} ms/step)")
    evaluation = report.get("eval", {})
    distribution = evaluation.get("val_distribution")
    if distribution:
        lines.append(f"  val split (synthetic): {distribution['documents']} docs, {distribution['tokens']:,} tokens, "
                     f"mean {distribution['mean']:.0f}, median {distribution['median']:.0f}, max {distribution['max']}")
    lines.append(f"  eval warm-up: {number(evaluation.get('warm_up', {}).get('seconds'), '.1f')} s")
    for mode in ("plain", "ttt_phased"):
        values = evaluation.get(mode, {})
        lines.append(f"  eval {mode}: {number(values.get('tokens_per_s'), ',.0f')} tokens/s on this device, projected "
                     f"{number(values.get('projected_split_seconds_8gpu'), '.1f')} s for the split on 8 GPUs, "
                     f"{values.get('graphs_compiled')} new graphs [{values.get('status')}]")
    batch = evaluation.get("ttt_full_batch", {})
    lines.append(f"  ttt full batch ({batch.get('documents')} docs x {batch.get('context')}, rank "
                 f"{batch.get('lora_rank')}): peak {number(batch.get('peak_memory_gib'), '.1f')} GiB, "
                 f"{number(batch.get('second_s'), '.3f')} s [{batch.get('status')}]")
    lines.append(f"  triton kernels: {report.get('triton_kernels')}")
    lines.append(f"  complete: {report.get('complete')} in {report.get('elapsed_s')} s")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every section at a tiny shape on CPU")
    parser.add_argument("--out", help="JSON path (default records/gpu_checks/<gpu-name>_<date>.json)")
    parser.add_argument("--budget-s", type=float, help="hard time budget in seconds (GPU 450, smoke 160)")
    parser.add_argument("--attn-backend", default=None, help="training/eval attention backend (GPU default auto, "
                                                                  "smoke default varlen)")
    parser.add_argument("--compile-backend", default=None, help="inductor | aot_eager | eager")
    parser.add_argument("--sections", default=",".join(SECTION_KEYS),
                        help="comma-separated subset of " + ",".join(SECTION_KEYS) + " (e.g. a second run of eval)")
    args = parser.parse_args(argv)
    shape = SMOKE_SHAPE if args.cpu_smoke else GPU_SHAPE
    if args.budget_s is not None:
        shape = dataclasses.replace(shape, budget_s=args.budget_s)
    if args.compile_backend:
        shape = dataclasses.replace(shape, compile_backend=args.compile_backend)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke, or on a GPU machine")
    backend_request = args.attn_backend or ("varlen" if args.cpu_smoke else "auto")
    out = args.out or default_out_path(torch.device(shape.device))
    selected = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(SECTION_KEYS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTION_KEYS)}")
    report = run_sections(shape, "cpu-smoke" if args.cpu_smoke else "gpu", out, backend_request, selected)
    print("\n".join(summary_lines(report)))
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    main()
