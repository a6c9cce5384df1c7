"""Parameter Golf training stack: one script that trains, quantizes and evaluates a small GPT.

The challenge: the lowest bits-per-byte on the FineWeb validation set with an artifact (counted code
+ compressed model) of at most 16,000,000 bytes, 600 s of training on 8xH100 and 600 s of evaluation.
The defaults reproduce the best published record line (PR 1736 / PR 1855); `PRESET=<name>` selects
another published system and every knob is an environment variable (see `env_var_table()`).

Launch:
    python train_gpt.py                                        # one process (GPU if present, else CPU)
    torchrun --standalone --nproc_per_node=8 train_gpt.py      # 8 GPUs (NCCL) or 8 CPU workers (Gloo)
    PRESET=tiny DATA_PATH=./data python train_gpt.py           # a ~1 minute CPU run of every feature

Importing this file has no side effects (no CUDA init, no process group, no file writes): the tests
import its functions on a CPU-only machine. Sections, in the order the data flows:
config, data, model, optimizers, training loop, quantization and artifact, evaluation and TTT, main.
"""

import base64
import contextlib
import copy
import dataclasses
import datetime
import glob
import hashlib
import importlib.util
import io
import json
import linecache
import lzma
import math
import os
import platform
import queue
import signal
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import brotli
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BOS_ID = 1  # every document starts with BOS; attention and smearing never cross it


# -----------------------------------------------------------------------------
# Config
#
# Every knob is a field of one of the section dataclasses below, read from the environment variable of
# the same name in upper case; the comment after a field is its help text (docs/env_table.py turns these
# into the README's tables, so help costs no counted bytes). `Hyperparameters.from_env()` runs when a
# run starts, never at import: defaults, then the PRESET's published settings, then explicit environment
# variables; the result is validated, and each section of the script receives its part (`h.model`,
# `h.quant`, `h.eval`, ...).
# -----------------------------------------------------------------------------


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class RunSettings:
    preset: str = "pr1855"  # published configuration to start from (see PRESETS)
    run_id: str = ""  # run name; default: <preset>-<date>-<random>
    seed: int = 1337  # seed for initialization and data order
    artifact_dir: str = ""  # where checkpoint, log, code and summary.json go; default: runs/<RUN_ID>
    device: str = "auto"  # auto|cpu|cuda (auto: CUDA when available)
    compile: str = "auto"  # torch.compile training and eval forwards: auto (on for CUDA, off for CPU)|0|1
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager traces and checks graphs without codegen
    attn_backend: str = "auto"  # auto|fa3|flex|sdpa|plain|varlen (FA3 layout, plain math) attention kernel
    fused_mlp: str = "auto"  # Triton LeakyReLU(0.5)^2 MLP up-projection (PR 1736): auto (CUDA + triton)|0|1
    fused_ce: str = "auto"  # Triton softcapped cross-entropy (PR 1855): auto (CUDA + triton)|0|1
    autocast: str = "auto"  # auto|bf16|fp32 compute dtype (auto: bf16 on CUDA, fp32 on CPU)
    cpu_threads: int = 0  # CPU intra-op threads; 0 = torch's default (small models run best on 1)
    post_training_only: bool = False  # skip training; quantize/evaluate ARTIFACT_DIR/final_model.pt
    post_training_enabled: bool = True  # run quantization and evaluation after training (0: train only)
    resume: bool = False  # continue an interrupted run from ARTIFACT_DIR/interrupted.pt (not a record run)
    ignore_env: str = ""  # comma-separated env vars that look like knobs but are not ours (else an error)


@dataclass
class DataSettings:
    data_path: str = "./data/datasets/fineweb10B_sp8192_caseops"  # folder with fineweb_{train,val}_*.bin shards
    train_files: str = ""  # glob of train shards; default: DATA_PATH/fineweb_train_*.bin
    val_files: str = ""  # glob of val shards; default: DATA_PATH/fineweb_val_[0-9]*.bin
    tokenizer_path: str = ""  # SentencePiece model; its vocab size must equal VOCAB_SIZE
    train_seq_len: int = 2048  # tokens per training sequence
    train_batch_tokens: int = 786432  # tokens per optimizer step, all ranks together
    train_seq_schedule: str = ""  # "len@until,...": shorter sequences early, same tokens per step; last len = TRAIN_SEQ_LEN (PR 2014: 1024@0.1,2048@0.7,3072@1)
    train_packing: str = "flat"  # rows: attention restarts at each row of TRAIN_SEQ_LEN | flat: a micro-batch is one row, attention restarts at each BOS and every TRAIN_SEQ_LEN tokens into a document (PR 1855; fa3/varlen only, other backends use rows)
    grad_accum_steps: int = 0  # micro-steps per optimizer step; 0 = 8 // WORLD_SIZE
    val_max_docs: int = 50000  # validation documents scored (challenge: first 50,000)

    @property
    def train_glob(self) -> str:
        return self.train_files or os.path.join(self.data_path, "fineweb_train_*.bin")

    @property
    def val_glob(self) -> str:
        return self.val_files or os.path.join(self.data_path, "fineweb_val_[0-9]*.bin")

    def batch_layout(self, world_size: int, seq_len: int = 0) -> tuple[int, int]:
        """(grad_accum_steps, sequences per rank per micro-step) for this world size (and a sequence
        length of TRAIN_SEQ_SCHEDULE; default TRAIN_SEQ_LEN); errors name env vars."""
        accum = self.grad_accum_steps or max(1, 8 // world_size)
        seq_len = seq_len or self.train_seq_len
        per_micro = world_size * accum * seq_len
        if self.train_batch_tokens % per_micro:
            raise ValueError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} is not divisible by WORLD_SIZE*"
                             f"GRAD_ACCUM_STEPS*sequence length={world_size}*{accum}*{seq_len} (TRAIN_SEQ_LEN"
                             f"/TRAIN_SEQ_SCHEDULE)")
        return accum, self.train_batch_tokens // per_micro

    def seq_schedule(self) -> list[tuple[int, float]]:
        """TRAIN_SEQ_SCHEDULE as [(seq_len, until_fraction)], or [(TRAIN_SEQ_LEN, 1.0)] when empty."""
        if not self.train_seq_schedule.strip():
            return [(self.train_seq_len, 1.0)]
        try:
            stages = [(int(length), float(until)) for length, until in
                      (item.split("@") for item in self.train_seq_schedule.split(","))]
        except ValueError:
            raise ValueError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r}: use len@fraction,... "
                             f"(e.g. 1024@0.1,2048@0.7,3072@1)") from None
        fractions = [until for _, until in stages]
        require(all(length > 0 for length, _ in stages) and fractions == sorted(set(fractions))
                and 0 < fractions[0] and fractions[-1] == 1.0 and stages[-1][0] == self.train_seq_len,
                f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r}: positive lengths, increasing fractions "
                f"ending at 1, last length = TRAIN_SEQ_LEN={self.train_seq_len}")
        return stages


def seq_len_at(schedule: list[tuple[int, float]], progress: float) -> int:
    """The training sequence length at a training fraction: the first stage whose `until` is above it."""
    for length, until in schedule:
        if progress < until:
            return length
    return schedule[-1][0]


@dataclass
class ModelSettings:
    vocab_size: int = 8192  # vocabulary size (token ids must be below it)
    num_layers: int = 11  # physical transformer blocks
    model_dim: int = 512  # residual stream width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention)
    mlp_mult: int = 4  # MLP hidden width = MLP_MULT * MODEL_DIM
    mlp_act: str = "leaky_relu2"  # leaky_relu2 (LeakyReLU(MLP_LEAKY_SLOPE)^2, PR 1274+) | relu2 (baseline)
    mlp_leaky_slope: float = 0.5  # negative slope of leaky_relu2 (PR 1945/1967: 0.3 lets more negative signal through)
    tied_embed_init_std: float = 0.005  # init std of the tied embedding / output head
    orthogonal_init: bool = True  # q, k, v and MLP-up matrices start orthogonal (PR 1493/1855); 0: nn.Linear init
    logit_softcap: float = 30.0  # logits = c*tanh(z/c); 0 disables
    asym_logit_rescale: bool = False  # separate softcaps for positive and negative logits, init LOGIT_SOFTCAP, fitted only by TTT weight updates (PR 1923/1945)
    rope_dims: int = 16  # head dims that get rotary embedding (partial RoPE); 0 = none
    rope_base: float = 10000.0  # RoPE base frequency
    qk_gain_init: float = 5.0  # init of the learned per-head query gain (q, k are RMS-normed)
    ln_scale: bool = True  # scale each block's normed input by 1/sqrt(layer+1)
    xsa: bool = True  # exclusive self-attention on all layers (remove own-value component)
    unet_skips: bool = True  # U-Net skip connections encoder -> decoder with learned weights
    skip_gates: bool = True  # sigmoid gate between the stream and each U-Net skip (PR 1493)
    resid_mix: bool = True  # per-block learned mix of the stream and the embedding stream
    loop_start: int = 3  # first physical layer of the depth-recurrence loop
    loop_end: int = 5  # last physical layer of the loop (inclusive)
    num_loops: int = 3  # passes through the loop once recurrence is on (1 = no recurrence)
    enable_looping_at: float = 0.35  # training fraction at which recurrence switches on
    parallel_start_layer: int = 8  # first layer with two-lane parallel residuals; -1 = off
    gated_attn: bool = True  # per-head sigmoid gate on the attention output (PR 1736)
    gated_attn_init_std: float = 0.005  # init std of the dense attention-gate weights (the sparse gate starts at 0)
    sparse_attn_gate: bool = True  # feed the attention gate only the first dims of its input (PR 1855)
    sparse_attn_gate_dims: int = 12  # input dims the sparse attention gate sees
    sparse_attn_gate_scale: float = 0.5  # multiplier on the sparse gate's logits
    smear_gate: bool = True  # gated previous-token smear of the embedding, masked at BOS (PR 1855)
    smear_gate_dims: int = 12  # embedding dims the smear gate sees

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def recurrence_enabled(self) -> bool:
        return self.num_loops > 1


@dataclass
class OptimSettings:
    iterations: int = 20000  # step limit (the wallclock cap usually stops first)
    max_wallclock_seconds: float = 600.0  # absolute cap for training + GPTQ calibration; 0 = none
    warmup_steps: int = 20  # compile warm-up steps, undone afterwards (weights + optimizer restored)
    warmdown_frac: float = 0.85  # last fraction of training with linear LR decay
    min_lr: float = 0.1  # LR floor at the end of warmdown, as a fraction of the peak
    matrix_lr: float = 0.026  # Muon learning rate for matrix weights
    muon_momentum: float = 0.97  # Muon momentum after warm-up
    muon_momentum_warmup_start: float = 0.92  # Muon momentum at step 0
    muon_momentum_warmup_steps: int = 1500  # steps to warm Muon momentum up
    muon_momentum_warmup_frac: float = 0.0  # >0: momentum warm-up over this fraction of training (not steps)
    muon_nesterov: bool = True  # Nesterov momentum in Muon
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_polar_express: bool = True  # Polar-Express Newton-Schulz coefficients (PR 1855)
    muon_row_normalize: bool = True  # MuonEq-R: normalize update rows before Newton-Schulz
    muon_weight_decay: float = 0.095  # decoupled weight decay of Muon matrices
    muon_weight_decay_mlp: float = -1.0  # weight decay of MLP matrices; <0 = MUON_WEIGHT_DECAY (PR 1812: 0.115)
    weight_decay_schedule: str = ""  # "hold,ramp,low,high": all WD x1 until progress hold, linear to x low at ramp, to x high at the end (PR 2020: 0.4,0.85,0.5,1.75); empty = constant
    embed_lr: float = 0.03  # AdamW learning rate of the tied embedding
    embed_weight_decay: float = 0.085  # AdamW weight decay of the tied embedding
    scalar_lr: float = 0.02  # AdamW learning rate of gains, gates, mixes and skip weights
    scalar_weight_decay: float = 0.02  # AdamW weight decay of the scalar group
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.99  # AdamW beta2 (0.95 before PR 1855)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip_norm: float = 0.3  # gradient-norm clip; 0 = off
    grad_clip_scope: str = "local"  # local: each rank clips its own gradient before averaging (PR 1736/1855) | global
    ema_decay: float = 0.9965  # EMA of weights (the EMA is what gets quantized); 0 = off
    ema_horizon_frac: float = 0.0  # >0: EMA horizon 1/(1-decay) = this fraction of expected steps (not EMA_DECAY)
    train_log_every: int = 50  # log a step line every N steps
    checkpoint_every: int = 0  # write ARTIFACT_DIR/checkpoint.pt every N steps (0: never); final_model.pt: at the end

    def weight_decay_points(self) -> tuple[float, float, float, float] | None:
        """WEIGHT_DECAY_SCHEDULE as (hold, ramp, low, high), or None when empty (constant decay)."""
        if not self.weight_decay_schedule.strip():
            return None
        try:
            hold, ramp, low, high = (float(item) for item in self.weight_decay_schedule.split(","))
        except ValueError:
            raise ValueError(f"WEIGHT_DECAY_SCHEDULE={self.weight_decay_schedule!r}: use hold,ramp,low,high "
                             f"(e.g. 0.4,0.85,0.5,1.75)") from None
        require(0 <= hold < ramp <= 1 and low >= 0 and high >= 0,
                f"WEIGHT_DECAY_SCHEDULE={self.weight_decay_schedule!r}: needs 0 <= hold < ramp <= 1, low and "
                f"high >= 0")
        return hold, ramp, low, high


@dataclass
class QuantSettings:
    quant_scheme: str = "gptq"  # gptq (SDClip GPTQ) | int8 (per-row int8, baseline)
    gptq_calibration_batches: int = 16  # training batches used for GPTQ Hessians
    gptq_calibration_source: str = "windows"  # windows: random TRAIN_SEQ_LEN windows of this rank's train shards (PR 1736/1855) | train: the first training batches | generated (model-sampled, PR 1274)
    gptq_reserve_seconds: float = 4.0  # part of MAX_WALLCLOCK_SECONDS kept for GPTQ calibration
    gptq_generated_seq_len: int = 512  # length of each model-sampled calibration sequence
    gptq_generated_temperature: float = 0.8  # sampling temperature of generated calibration
    gptq_damp: float = 0.01  # GPTQ Hessian damping (fraction of the mean diagonal)
    gptq_block_size: int = 128  # GPTQ column block size
    quant_matrix_bits: int = 6  # bits of attention and other matrices
    quant_mlp_bits: int = 6  # bits of MLP matrices (PR 1274: 5)
    quant_matrix_clip_sigmas: float = 12.85  # SDClip sigmas of matrices not listed below
    quant_mlp_clip_sigmas: float = 11.5  # SDClip sigmas of MLP matrices
    quant_attn_clip_sigmas: float = 13.0  # SDClip sigmas of attention matrices
    quant_embed_bits: int = 7  # bits of the tied embedding
    quant_embed_clip_sigmas: float = 14.0  # SDClip sigmas of the tied embedding
    quant_gate_bits: int = 8  # bits of attention-gate weights (per row)
    quant_small_tensor_numel: int = 65536  # tensors with at most this many elements stay fp16
    quant_compressor: str = "rans"  # rans (rANS-coded quantized codes, brotli for the rest) | brotli | lzma | zlib
    quant_byte_shuffle: bool = True  # byte shuffle (stride 2) before compression
    awq_lite_enabled: bool = False  # GPTQ gives the most activation-salient column groups of each matrix AWQ_LITE_BITS (PR 1908/1945)
    awq_lite_bits: int = 8  # bits of the salient column groups
    awq_lite_group_size: int = 64  # columns per AWQ-lite group
    awq_lite_top_k: int = 1  # salient groups per matrix
    lqer_enabled: bool = True  # low-rank correction of the quantization error (PR 1855)
    lqer_rank: int = 4  # LQER rank
    lqer_scheme: str = "pr1855"  # pr1855 (SVD of W-Wq, top-k by its norm, A int2/matrix, B int4/group) | hessian
    lqer_bits: int = 4  # LQER factor bits (hessian scheme: both factors; pr1855 scheme: B, A is int2)
    lqer_group_size: int = 64  # LQER factor quantization group size
    lqer_top_k: int = 3  # tensors that get an LQER correction
    artifact_limit_bytes: int = 16_000_000  # challenge cap on code + compressed model bytes


@dataclass
class EvalSettings:
    eval_seq_len: int = 2048  # context length of evaluation
    eval_batch_tokens: int = 524288  # tokens per evaluation batch, all ranks together
    eval_max_seconds: float = 600.0  # evaluation time limit checked in the summary
    sliding_window_enabled: bool = False  # also report quantized sliding-window val_bpb (PR 1493 line)
    sliding_stride: int = 64  # sliding-window stride
    save_token_nll: bool = False  # write token_nll.npz: every scored token of the final eval mode
    ttt_enabled: bool = True  # run test-time training
    ttt_mode: str = "phased"  # phased (LoRA, PR 1736) | chunked (score-first SGD, PR 1493)
    ttt_lr: float = 0.005  # chunked TTT: SGD learning rate
    ttt_momentum: float = 0.9  # chunked TTT: SGD momentum
    ttt_epochs: int = 3  # chunked TTT: epochs per chunk
    ttt_chunk_tokens: int = 32768  # chunked TTT: tokens per chunk
    ttt_batch_seqs: int = 32  # chunked TTT: rows of EVAL_SEQ_LEN per SGD step, all ranks together
    ttt_grad_clip: float = 1.0  # chunked TTT: gradient clip
    ttt_params: str = "all"  # chunked TTT: weights that adapt, all or comma-separated name parts
    phased_ttt_prefix_docs: int = 2500  # phased TTT: scored documents split into phases
    phased_ttt_num_phases: int = 3  # phased TTT: global-SGD phases
    phased_ttt_lora_rank: int = 80  # phased TTT: LoRA rank
    phased_ttt_lora_alpha: float = 144.0  # phased TTT: adapter output scaled by alpha/rank (PR 1767/1855: 1.8)
    phased_ttt_lora_sites: str = "q,k,v,o,mlp,head"  # phased TTT: sites with a LoRA (a subset of these)
    phased_ttt_warm_start_a: bool = True  # phased TTT: LoRA A factors carry over between batches of a phase (PR 1767)
    phased_ttt_lr: float = 1e-4  # phased TTT: LoRA Adam learning rate
    phased_ttt_local_lr_mult: float = 1.0  # phased TTT: multiplier on the per-document LoRA lr only, not the global SGD (PR 1953: 0.75)
    phased_ttt_beta1: float = 0.0  # phased TTT: LoRA Adam beta1
    phased_ttt_beta2: float = 0.99  # phased TTT: LoRA Adam beta2
    phased_ttt_weight_decay: float = 0.5  # phased TTT: LoRA Adam weight decay
    phased_ttt_chunk_tokens: int = 48  # phased TTT: tokens scored per LoRA update
    phased_ttt_chunk_schedule: str = ""  # phased TTT: "until:chunk,...": a document's first targets in smaller chunks, more updates early (PR 2014: 256:8,2000:24)
    phased_ttt_docs_per_batch: int = 64  # phased TTT: documents per length-sorted batch
    phased_ttt_global_lr: float = 0.001  # phased TTT: global SGD learning rate
    phased_ttt_global_momentum: float = 0.9  # phased TTT: global SGD momentum
    phased_ttt_global_epochs: int = 1  # phased TTT: global SGD epochs per phase
    phased_ttt_global_chunk_tokens: int = 32768  # phased TTT: global SGD chunk tokens
    phased_ttt_global_grad_clip: float = 1.0  # phased TTT: global SGD gradient clip
    ngram_tilt: bool = False  # boost a token n-gram's hint in every scored distribution, renormalized over the vocabulary; counts only from already-scored tokens (PR 1514/2130)
    ngram_tilt_max_order: int = 16  # n-gram tilt: longest context in tokens; orders max, max-2, ... down to the min (PR 1514)
    ngram_tilt_min_order: int = 8  # n-gram tilt: shortest context in tokens
    ngram_tilt_beta: float = 2.0  # n-gram tilt: log-boost of the hint = beta * the hint's confidence (PR 1514)

    def batch_rows(self, world_size: int = 1) -> int:
        """Rows of EVAL_SEQ_LEN per forward on one rank (EVAL_BATCH_TOKENS counts all ranks)."""
        return max(1, self.eval_batch_tokens // (world_size * self.eval_seq_len))


@dataclass
class Hyperparameters:
    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Hyperparameters":
        """Defaults < PRESET < explicit env vars; then validate. Raises ValueError naming the env var."""
        environ = os.environ if environ is None else environ
        knobs = knob_fields()
        preset = environ.get("PRESET", RunSettings.preset)
        if preset not in PRESETS:
            raise ValueError(f"PRESET={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        values = {"preset": preset, **resolve_preset(preset)}
        for name, (_, kind) in knobs.items():
            if name.upper() in environ:
                values[name] = parse_env_value(name.upper(), environ[name.upper()], kind)
        refuse_unknown_env(environ, values.get("ignore_env", ""))
        sections = {section: {} for section in SECTIONS}
        for name, value in values.items():
            sections[knobs[name][0]][name] = value
        h = cls(**{section: SECTIONS[section](**fields) for section, fields in sections.items()})
        h.validate()
        return h

    def validate(self) -> None:
        """Raise ValueError naming the env var of the first setting that is out of range."""
        self._validate_choices_and_signs()
        self._validate_shapes_and_schedules()

    def _validate_choices_and_signs(self) -> None:
        run, data, model, optim, quant, eval = self.run, self.data, self.model, self.optim, self.quant, self.eval
        choices = [(run, "device", "auto cpu cuda"), (run, "compile", "auto 0 1"),
                   (run, "compile_backend", "inductor aot_eager eager"),
                   (run, "attn_backend", "auto fa3 flex sdpa plain varlen"), (run, "autocast", "auto bf16 fp32"),
                   (run, "fused_mlp", "auto 0 1"), (run, "fused_ce", "auto 0 1"), (data, "train_packing", "rows flat"),
                   (model, "mlp_act", "leaky_relu2 relu2"), (quant, "quant_scheme", "gptq int8"),
                   (quant, "gptq_calibration_source", "windows train generated"),
                   (quant, "quant_compressor", "rans brotli lzma zlib"), (quant, "lqer_scheme", "pr1855 hessian"),
                   (optim, "grad_clip_scope", "local global"),
                   (eval, "ttt_mode", "phased chunked")]
        for section, name, allowed in choices:
            allowed = allowed.split()
            value = getattr(section, name)
            require(value in allowed, f"{name.upper()}={value!r} is not one of {', '.join(allowed)}")
        for section, names in ((data, "train_seq_len train_batch_tokens"), (optim, "iterations muon_backend_steps"),
                               (model, "vocab_size num_layers model_dim num_heads num_kv_heads mlp_mult num_loops"),
                               (optim, "matrix_lr embed_lr scalar_lr adam_eps"),
                               (eval, "eval_seq_len eval_batch_tokens sliding_stride ttt_chunk_tokens ttt_batch_seqs "
                                      "phased_ttt_chunk_tokens phased_ttt_docs_per_batch phased_ttt_lora_rank "
                                      "phased_ttt_global_chunk_tokens")):
            for name in names.split():
                require(getattr(section, name) > 0, f"{name.upper()} must be positive, got {getattr(section, name)}")
        for section, names in ((run, "cpu_threads"), (data, "grad_accum_steps val_max_docs"),
                               (optim, "warmup_steps muon_momentum_warmup_steps checkpoint_every muon_weight_decay "
                                       "embed_weight_decay scalar_weight_decay grad_clip_norm ema_decay"),
                               (quant, "gptq_calibration_batches gptq_reserve_seconds gptq_damp awq_lite_top_k"),
                               (eval, "ttt_lr ttt_epochs ttt_grad_clip phased_ttt_prefix_docs phased_ttt_lr "
                                      "phased_ttt_weight_decay phased_ttt_global_lr phased_ttt_global_epochs "
                                      "phased_ttt_local_lr_mult"), (model, "mlp_leaky_slope")):
            for name in names.split():
                require(getattr(section, name) >= 0, f"{name.upper()}={getattr(section, name)} must be >= 0")
        for section, name in ((model, "enable_looping_at"), (optim, "warmdown_frac"), (optim, "min_lr"),
                              (optim, "muon_momentum"), (optim, "muon_momentum_warmup_start"), (optim, "adam_beta1"),
                              (optim, "muon_momentum_warmup_frac"), (optim, "ema_horizon_frac"),
                              (optim, "adam_beta2"), (eval, "ttt_momentum"), (eval, "phased_ttt_beta1"),
                              (eval, "phased_ttt_beta2"), (eval, "phased_ttt_global_momentum")):
            require(0.0 <= getattr(section, name) <= 1.0, f"{name.upper()}={getattr(section, name)} must be in [0, 1]")

    def _validate_shapes_and_schedules(self) -> None:
        model, optim, quant, eval = self.model, self.optim, self.quant, self.eval
        require(quant.gptq_generated_seq_len >= 2 and quant.gptq_generated_temperature > 0,
                f"GPTQ_GENERATED_SEQ_LEN={quant.gptq_generated_seq_len} must be >= 2 and GPTQ_GENERATED_TEMPERATURE="
                f"{quant.gptq_generated_temperature} > 0")
        chunk_schedule_rules(eval.phased_ttt_chunk_schedule)  # raises naming the variable
        optim.weight_decay_points()  # raises naming the variable
        sites = [site.strip() for site in eval.phased_ttt_lora_sites.split(",") if site.strip()]
        require(bool(sites) and all(site in LORA_SITES for site in sites),
                f"PHASED_TTT_LORA_SITES={eval.phased_ttt_lora_sites!r}: use a comma-separated subset of "
                f"{','.join(LORA_SITES)}")
        require(eval.phased_ttt_chunk_tokens <= eval.eval_seq_len,
                f"PHASED_TTT_CHUNK_TOKENS={eval.phased_ttt_chunk_tokens} must be <= EVAL_SEQ_LEN={eval.eval_seq_len}")
        require(quant.lqer_scheme != "pr1855" or 2 <= quant.lqer_bits <= 4,
                f"LQER_BITS={quant.lqer_bits} must be 2..4 with LQER_SCHEME=pr1855")
        require(model.vocab_size <= 65536, f"VOCAB_SIZE={model.vocab_size} does not fit the uint16 shard format")
        require(model.vocab_size > BOS_ID, f"VOCAB_SIZE={model.vocab_size} must include the BOS id {BOS_ID}")
        require(model.model_dim % model.num_heads == 0,
                f"MODEL_DIM={model.model_dim} is not divisible by NUM_HEADS={model.num_heads}")
        require(model.num_heads % model.num_kv_heads == 0,
                f"NUM_HEADS={model.num_heads} is not divisible by NUM_KV_HEADS={model.num_kv_heads}")
        require(model.head_dim % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={model.head_dim} must be even (RoPE)")
        require(0 <= model.rope_dims <= model.head_dim and model.rope_dims % 2 == 0,
                f"ROPE_DIMS={model.rope_dims} must be even and within the head dim {model.head_dim}")
        if model.recurrence_enabled:
            require(0 <= model.loop_start <= model.loop_end < model.num_layers,
                    f"LOOP_START={model.loop_start}..LOOP_END={model.loop_end} must lie within 0..NUM_LAYERS-1="
                    f"{model.num_layers - 1}")
            require(model.parallel_start_layer < 0 or model.parallel_start_layer > model.loop_end,
                    f"PARALLEL_START_LAYER={model.parallel_start_layer} must come after LOOP_END={model.loop_end}")
        require(model.parallel_start_layer < model.num_layers,
                f"PARALLEL_START_LAYER={model.parallel_start_layer} must be < NUM_LAYERS={model.num_layers} or -1")
        require(optim.ema_decay < 1.0, f"EMA_DECAY={optim.ema_decay} must be < 1")
        require(optim.max_wallclock_seconds >= 0, f"MAX_WALLCLOCK_SECONDS={optim.max_wallclock_seconds} must be >= 0")
        require(optim.max_wallclock_seconds == 0 or quant.gptq_reserve_seconds < optim.max_wallclock_seconds,
                f"GPTQ_RESERVE_SECONDS={quant.gptq_reserve_seconds} leaves no training time within "
                f"MAX_WALLCLOCK_SECONDS={optim.max_wallclock_seconds}")
        require(2 <= quant.awq_lite_bits <= 8 and quant.awq_lite_group_size > 0,
                f"AWQ_LITE_BITS={quant.awq_lite_bits} must be in 2..8 and AWQ_LITE_GROUP_SIZE="
                f"{quant.awq_lite_group_size} positive")
        if len(self.data.seq_schedule()) > 1:
            require(self.optim.warmup_steps == 0 or self.optim.warmup_steps >= 2 * len(self.data.seq_schedule()),
                    f"WARMUP_STEPS={self.optim.warmup_steps} must cover every TRAIN_SEQ_SCHEDULE length with "
                    f"recurrence off and on (>= {2 * len(self.data.seq_schedule())})")
        if model.sparse_attn_gate:
            require(model.gated_attn, "SPARSE_ATTN_GATE=1 needs GATED_ATTN=1 (it changes the gate's input)")
            require(0 < model.sparse_attn_gate_dims <= model.model_dim,
                    f"SPARSE_ATTN_GATE_DIMS={model.sparse_attn_gate_dims} must be in 1..MODEL_DIM")
        if model.smear_gate:
            require(0 < model.smear_gate_dims <= model.model_dim,
                    f"SMEAR_GATE_DIMS={model.smear_gate_dims} must be in 1..MODEL_DIM")
        require(not model.asym_logit_rescale or model.logit_softcap > 0,
                "ASYM_LOGIT_RESCALE=1 needs LOGIT_SOFTCAP > 0 (its initial value)")
        require(1 <= eval.ngram_tilt_min_order <= eval.ngram_tilt_max_order and eval.ngram_tilt_beta >= 0,
                f"NGRAM_TILT_MIN_ORDER={eval.ngram_tilt_min_order} must be in 1..NGRAM_TILT_MAX_ORDER="
                f"{eval.ngram_tilt_max_order} and NGRAM_TILT_BETA={eval.ngram_tilt_beta} >= 0")

    def as_dict(self) -> dict[str, Any]:
        """Every setting by its field name (one flat namespace: names are unique across sections)."""
        return {name: value for section in SECTIONS
                for name, value in dataclasses.asdict(getattr(self, section)).items()}


SECTIONS = {"run": RunSettings, "data": DataSettings, "model": ModelSettings, "optim": OptimSettings,
            "quant": QuantSettings, "eval": EvalSettings}


def knob_fields() -> dict[str, tuple[str, type]]:
    """Field name -> (section, type) of every knob; its env var is the name in upper case."""
    return {f.name: (section, type(f.default)) for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)}


def parse_env_value(key: str, raw: str, kind: type) -> Any:
    """Parse one env var by the field's type; the error names the variable."""
    text = raw.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected 0/1/true/false")
        if kind is int:
            number = float(text)  # accepts 786432, 786_432 and 1e6
            if not number.is_integer():
                raise ValueError("expected an integer")
            return int(number)
        if kind is float:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        return text
    except ValueError as error:
        raise ValueError(f"{key}={raw!r} is not a valid {kind.__name__}: {error}") from None


def refuse_unknown_env(environ: Mapping[str, str], ignored: str) -> None:
    """A variable that looks like one of our knobs but is none (a typo such as NUM_LAYER or
    MAX_WALLCLOK_SECONDS) would silently run the defaults: refuse it, naming it and its nearest knob.
    "Looks like": it starts with the first word shared by three or more knobs (QUANT_, GPTQ_, TTT_, ...)
    or is within a few edits of a knob name. IGNORE_ENV lists the ones that are meant."""
    import difflib

    names = [name.upper() for name in knob_fields()]
    first_words = [name.split("_")[0] for name in names]
    prefixes = {word + "_" for word in first_words if first_words.count(word) >= 3}
    allowed = {name.strip() for name in ignored.split(",")}
    for key in environ:
        if key in names or key in allowed:
            continue
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
        if close or any(key.startswith(prefix) for prefix in prefixes):
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"environment variable {key} is not a train_gpt.py setting{hint} (list it in "
                             f"IGNORE_ENV to pass it anyway)")


# Published systems as (parent preset, field overrides). The dataclass defaults are the record line
# (PR 1855), so `pr1855` has no overrides; the others undo or change its settings.
PRESETS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "pr1855": (None, {}),
    "pr1736": ("pr1855", dict(  # without PR 1855's SmearGate, sparse gate, Polar-Express, MIN_LR, LQER
        smear_gate=False, sparse_attn_gate=False, muon_polar_express=False, min_lr=0.0, warmdown_frac=0.75,
        adam_beta2=0.95, quant_mlp_clip_sigmas=12.0, quant_embed_clip_sigmas=15.0, lqer_enabled=False,
        quant_compressor="brotli", fused_ce="0",
        phased_ttt_prefix_docs=2000, phased_ttt_lora_rank=96, phased_ttt_lora_alpha=96.0, phased_ttt_beta2=0.999)),
    "pr1493": ("pr1736", dict(  # SP8192 (no CaseOps), parallel from layer 7, QK-gain 5.25, chunked SGD TTT
        data_path="./data/datasets/fineweb10B_sp8192", parallel_start_layer=7, qk_gain_init=5.25,
        gated_attn=False, matrix_lr=0.022, warmdown_frac=0.72, quant_mlp_clip_sigmas=12.85,
        quant_attn_clip_sigmas=12.85, quant_embed_bits=8, quant_embed_clip_sigmas=20.0, ttt_mode="chunked",
        ttt_epochs=3, ttt_chunk_tokens=32768, sliding_window_enabled=True, gptq_calibration_source="train",
        grad_clip_scope="global",  # DDP averages during backward: its clip sees the averaged gradient
        train_packing="rows")),  # fixed rows: varlen document packing came after it (PR 1354's line)
    "pr1812": ("pr1493", dict(  # 4 TTT epochs on 64K chunks, split MLP weight decay, Adam wd 0.005
        ttt_epochs=4, ttt_chunk_tokens=65536, muon_weight_decay_mlp=0.115, embed_weight_decay=0.005,
        scalar_weight_decay=0.005, muon_momentum_warmup_steps=1000)),  # 22% of ~4,550 steps
    "pr1755": ("pr1493", dict(  # PR 1493 on the CaseOps tokenizer with the byte sidecar
        data_path="./data/datasets/fineweb10B_sp8192_caseops")),
    "pr1274": ("pr1493", dict(  # ~1K-entry tokenizer, mini recurrence, mixed int5/int6 GPTQ, generated calibration
        data_path="./data/datasets/fineweb10B_scylla", vocab_size=1024, loop_start=4, loop_end=5, num_loops=2,
        quant_mlp_bits=5, gptq_calibration_source="generated", gptq_calibration_batches=4,
        gptq_generated_seq_len=256, gptq_reserve_seconds=16.0)),  # sampling costs 256 forwards per batch
    "baseline": ("pr1493", dict(  # the challenge's naive 9x512 baseline (1.2244)
        data_path="./data/datasets/fineweb10B_sp1024", vocab_size=1024, num_layers=9, mlp_mult=2,
        mlp_act="relu2", train_seq_len=1024, train_batch_tokens=524288, qk_gain_init=1.5, rope_dims=64,
        ln_scale=False, xsa=False, skip_gates=False, num_loops=1, parallel_start_layer=-1, orthogonal_init=False,
        matrix_lr=0.04, muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500,
        muon_row_normalize=False, muon_weight_decay=0.0, embed_lr=0.05, embed_weight_decay=0.0,
        scalar_lr=0.04, scalar_weight_decay=0.0, grad_clip_norm=0.0, ema_decay=0.0, warmdown_frac=0.1,
        quant_scheme="int8", quant_compressor="zlib", quant_byte_shuffle=False, sliding_window_enabled=False,
        ttt_enabled=False, gptq_reserve_seconds=0.0)),
    # PR 2130 (1.05670): the eval-time n-gram tilt and logit rescale, one global-SGD phase, Muon lr 0.028
    # (PR 2060). Not in our code: its other PR 2060 levers (LQER retune, per-group lrzip) and its
    # hints over the whole stream prefix; GPTQ reserve kept at ours (it used 0.5 s)
    "pr2130": ("pr1855", dict(
        ngram_tilt=True, asym_logit_rescale=True, phased_ttt_num_phases=1, matrix_lr=0.028)),
    # PR 2135 (1.05651): PR 2130 with 32 GPTQ calibration batches
    "pr2135": ("pr2130", dict(
        gptq_calibration_batches=32)),
    # PR 2020 (1.05957, one seed): PR 1855's settings on PR 1851's graph with its "wd_strong" weight-decay
    # schedule and an 8 s GPTQ reserve; its all-rank Hessian average is what collect_hessians always does
    "pr2020": ("pr1855", dict(
        weight_decay_schedule="0.4,0.85,0.5,1.75", gptq_reserve_seconds=8.0)),
    # Open record candidates after PR 1855 (3-seed means on 8xH100), with the asymmetric logit rescale of
    # their PR 1945 base
    "pr1953": ("pr1855", dict(  # 1.05855: eval at 2560 (trained at 2048), TTT LoRA without Q/V, local lr x0.75
        eval_seq_len=2560, phased_ttt_lora_sites="k,o,mlp,head", phased_ttt_local_lr_mult=0.75, asym_logit_rescale=True,
        qk_gain_init=5.25, awq_lite_enabled=True)),  # AWQ-lite: one int8 group of 64 per matrix (PR 1945)
    "pr1965": ("pr1953", dict(  # 1.05875: the TTT budget moved from LoRA rank to a longer global-SGD prefix
        phased_ttt_lora_rank=56, phased_ttt_prefix_docs=3000)),
    "pr2014": ("pr1953", dict(  # 1.05759: train context 1024 -> 2048 -> 3072 at fixed tokens/step, eval at 3072, 1 phase
        train_seq_len=3072, train_seq_schedule="1024@0.1,2048@0.7,3072@1", eval_seq_len=3072,
        phased_ttt_num_phases=1, phased_ttt_docs_per_batch=24,
        phased_ttt_chunk_schedule="256:8,2000:24")),  # its short-document steps, read by position in the document
    "pr2119": ("pr1953", dict(  # 1.05858 (non-record): TTT adapters on K and O only, eval at 2688, QK-gain 5.35
        phased_ttt_lora_sites="k,o", eval_seq_len=2688, qk_gain_init=5.35)),
    "tiny": ("pr1855", dict(  # every record feature at CPU scale; about a minute on 2 cores
        vocab_size=1024, num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, loop_start=2,
        loop_end=3,
        parallel_start_layer=4, train_seq_len=128, train_batch_tokens=4096, iterations=150,
        max_wallclock_seconds=45.0, gptq_reserve_seconds=2.0, warmup_steps=2, muon_momentum_warmup_steps=30,
        ema_decay=0.9, cpu_threads=1,
        train_log_every=10, gptq_calibration_batches=2, val_max_docs=64, eval_seq_len=128,
        eval_batch_tokens=8192, eval_max_seconds=120.0, ttt_chunk_tokens=2048, phased_ttt_prefix_docs=16,
        phased_ttt_lora_rank=4, phased_ttt_lora_alpha=7.2, phased_ttt_docs_per_batch=8,
        phased_ttt_global_chunk_tokens=2048,
        sliding_stride=32, quant_small_tensor_numel=1024)),
    # the record stack at the tiny shape with every schedule relative to the run's length, for CPU and
    # single-GPU proxies: PR 1855's 1,500 momentum warm-up steps and its EMA's 286-step horizon (0.9965)
    # are 30% and 6% of its ~4,930 steps; warmdown and recurrence switch-on were fractions already
    "small": ("tiny", dict(
        muon_momentum_warmup_frac=0.3, ema_horizon_frac=0.058, ema_decay=0.9965, iterations=200,
        max_wallclock_seconds=0.0, grad_accum_steps=1)),
}


def resolve_preset(name: str) -> dict[str, Any]:
    """Field overrides of a preset, parents first."""
    parent, overrides = PRESETS[name]
    resolved = resolve_preset(parent) if parent else {}
    resolved.update(overrides)
    return resolved


# -----------------------------------------------------------------------------
# Data
#
# Shards are the challenge format: 256 int32 header [20240520, 1, n_tokens, ...] then uint16 tokens.
# Every error names the file. The train loader reads the stream in a seeded shard order and hands each
# rank a disjoint slice of one global batch, so a step sees the same tokens for any world size; document
# boundaries (BOS) are kept and the model masks attention at them.
# -----------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


def shard_token_count(path: str) -> int:
    """Tokens in a shard, after checking its header (magic, version) against the file's size; reads 1 KB."""
    header_bytes = SHARD_HEADER_INTS * 4
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise FileNotFoundError(f"shard {path}: cannot be read ({error})") from None
    if size < header_bytes:
        raise ValueError(f"shard {path}: {size} bytes is shorter than the {header_bytes}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"shard {path}: magic {header[0]} != {SHARD_MAGIC} (not a token shard)")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"shard {path}: version {header[1]} != {SHARD_VERSION}")
    declared = int(header[2])
    actual = (size - header_bytes) // 2
    if declared != actual or (size - header_bytes) % 2:
        raise ValueError(f"shard {path}: header declares {declared} tokens but the file holds "
                         f"{(size - header_bytes) / 2:g}")
    return declared


def read_shard(path: str) -> np.ndarray:
    """Return the uint16 tokens of one shard, checking magic, version and declared vs actual size."""
    return np.fromfile(path, dtype="<u2", count=shard_token_count(path), offset=SHARD_HEADER_INTS * 4)


def shard_paths(pattern: str, env_var: str) -> list[str]:
    """Sorted files matching a glob; a missing or empty glob is an error naming the env var."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"{env_var}: no shard matches {pattern!r}")
    return paths


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"shard {path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")


class TrainLoader:
    """Deterministic document-preserving train stream: yields (input_ids, target_ids) [seqs, seq_len].

    Each optimizer step consumes one contiguous global span of TRAIN_BATCH_TOKENS (+1 for the shifted
    targets); micro-step m of rank r gets slice r*accum + m of it, so the set of sequences in a step, and
    hence the averaged gradient, does not depend on the world size. Shard order is a SEED permutation
    per epoch. Tokens are never reordered, so documents stay whole and BOS-delimited.
    """

    def __init__(self, paths: list[str], vocab_size: int, seq_len: int, seqs_per_micro: int, accum: int,
                 rank: int, world_size: int, seed: int, device: torch.device | str = "cpu"):
        self.paths, self.vocab_size, self.seq_len = paths, vocab_size, seq_len
        self.seqs_per_micro, self.accum, self.rank, self.world_size = seqs_per_micro, accum, rank, world_size
        self.seed, self.device = seed, torch.device(device)
        self.micro_tokens = seqs_per_micro * seq_len
        self.step_tokens = self.micro_tokens * accum * world_size
        if sum(shard_token_count(path) for path in paths) <= 1:
            raise ValueError(f"TRAIN_FILES: the shards {paths[0]}... hold no training tokens")
        self.epoch, self.order, self.shard_index, self.pos = 0, self._order(0), 0, 0
        self.tokens = self._load(self.order[0])

    def _order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.paths)).tolist()

    def _load(self, index: int) -> np.ndarray:
        tokens = read_shard(self.paths[index])
        check_token_ids(tokens, self.vocab_size, self.paths[index])
        return tokens

    def _take(self, count: int) -> np.ndarray:
        """Next `count` tokens of the stream (crossing shards and epochs); the stream advances count-1
        so that the last token of one step is the first input of the next."""
        parts, need = [], count
        while need > 0:
            available = self.tokens[self.pos: self.pos + need]
            parts.append(available)
            need -= len(available)
            if need > 0:
                self.shard_index += 1
                if self.shard_index == len(self.order):
                    self.epoch, self.shard_index = self.epoch + 1, 0
                    self.order = self._order(self.epoch)
                self.tokens, self.pos = self._load(self.order[self.shard_index]), 0
            else:
                self.pos += len(available)
        self.pos -= 1
        return np.concatenate(parts)

    def skip_step(self) -> None:
        """Advance past one optimizer step's tokens without building its batches (resume)."""
        self._take(self.step_tokens + 1)

    def next_step(self, seq_len: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All micro-batches of this rank for one optimizer step, as rows of `seq_len` (default: the
        loader's). The same tokens either way: a step always spans TRAIN_BATCH_TOKENS (PR 2014's schedule)."""
        seq_len = seq_len or self.seq_len
        span = self._take(self.step_tokens + 1)
        batches = []
        for micro in range(self.accum):
            start = (self.rank * self.accum + micro) * self.micro_tokens
            chunk = torch.from_numpy(span[start: start + self.micro_tokens + 1].astype(np.int64))
            inputs = chunk[:-1].view(self.micro_tokens // seq_len, seq_len)
            targets = chunk[1:].view(self.micro_tokens // seq_len, seq_len)
            batches.append((inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)))
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.next_step()


class PrefetchingLoader:
    """A TrainLoader read ahead by a background thread: the next steps' tokens are read from disk, cut
    into micro-batches and (for a GPU) pinned while the current step computes, so `next_step()` only
    starts their asynchronous copies to the device. The thread calls nothing but the wrapped loader's
    own `next_step()`, one step after another, so the batches and their order are exactly the
    loader's. `skip_step()` (resume) works until the first `next_step()` starts the thread."""

    def __init__(self, loader: TrainLoader, device: torch.device | str, depth: int = 2):
        self.loader, self.device = loader, torch.device(device)
        self.ready: queue.Queue = queue.Queue(maxsize=depth)  # steps read ahead (an exception ends it)
        self.thread: threading.Thread | None = None

    def skip_step(self) -> None:
        if self.thread is not None:
            raise RuntimeError("skip_step after the prefetch thread started")
        self.loader.skip_step()

    def _read_ahead(self) -> None:
        pin = self.device.type == "cuda"
        try:
            while True:  # blocks on a full queue; a daemon thread, so an abandoned loader just sleeps
                batches = self.loader.next_step()
                self.ready.put([(x.pin_memory(), y.pin_memory()) for x, y in batches] if pin else batches)
        except BaseException as error:  # a bad shard: raised in the training thread at its step
            self.ready.put(error)

    def next_step(self, seq_len: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """As TrainLoader.next_step: a step's tokens do not depend on the row length, so the rows read
        ahead at the loader's length are only re-cut to `seq_len` (TRAIN_SEQ_SCHEDULE)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._read_ahead, name="train-prefetch", daemon=True)
            self.thread.start()
        batches = self.ready.get()
        if isinstance(batches, BaseException):
            raise batches
        seq_len = seq_len or self.loader.seq_len
        return [(x.to(self.device, non_blocking=True).view(-1, seq_len), y.to(self.device, non_blocking=True).view(-1, seq_len))
                for x, y in batches]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.next_step()


# -----------------------------------------------------------------------------
# Model
#
# A GPT with tied embeddings and the record line's additions, each one switch.
# One forward implementation (`GPT.hidden_states`) serves training, evaluation and TTT; adapters
# (LoRA) enter through the `lora` argument at every adaptable linear. Attention is causal and never
# crosses a document: a document starts at each BOS and at position 0 of every row; in a flat training
# row (TRAIN_PACKING=flat) attention also restarts every TRAIN_SEQ_LEN tokens into a document.
# -----------------------------------------------------------------------------

ATTENTION_BACKENDS = ("fa3", "flex", "sdpa", "plain", "varlen")
CU_SEQLENS_BUCKET = 64  # cu_seqlens is padded to a multiple of this, so batches share compiled graphs (PR 1855)


def select_attention_backend(requested: str, device: torch.device) -> str:
    """Pick the attention kernel once at start: FA3 varlen on Hopper when importable, else FlexAttention
    (compiled kernels on CUDA), else SDPA with a document mask; plain masked matmuls are the reference."""
    if requested != "auto":
        if requested == "fa3" and not fa3_available(device):
            raise ValueError("ATTN_BACKEND=fa3 needs a Hopper GPU and the flash_attn_interface module")
        return requested
    if fa3_available(device):
        return "fa3"
    if device.type == "cuda":
        return "flex"
    return "sdpa"  # on CPU: the same math as "plain" through one fused call


def fa3_available(device: torch.device) -> bool:
    return not fa3_problem(device)


def fa3_problem(device: torch.device) -> str:
    """"" when FA3 imports and runs here, else why not (for the log line of the fallback). Hopper and
    a real call: a wheel built for another torch can import but fail at its first call, so one tiny
    varlen call decides."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "not a Hopper GPU"
    try:
        from flash_attn_interface import flash_attn_varlen_func
        q = torch.zeros(4, 1, 64, device=device, dtype=torch.bfloat16)
        cu_seqlens = torch.tensor([0, 4], device=device, dtype=torch.int32)
        flash_attn_varlen_func(q, q, q, cu_seqlens, cu_seqlens, 4, 4, causal=True)
        return ""
    except Exception as error:  # missing module, ABI mismatch, unsupported GPU: fall back to flex
        return f"{type(error).__name__}: {str(error)[:120]}"


@dataclass
class DocumentLayout:
    """Where documents start in a [B, T] batch, shared by every layer. Built OUTSIDE the compiled model
    (by the caller, from the input ids) so that data-dependent work (nonzero, block masks) never enters
    a compiled graph; its tensors have shapes fixed by [B, T] (cu_seqlens: by a bucket of 64)."""
    doc_start: torch.Tensor          # [B, T] bool: token starts a document (BOS or row start; SmearGate)
    backend: str
    dense_mask: torch.Tensor | None = None   # [B, 1, T, T] bool, for sdpa / plain
    block_mask: Any = None                   # FlexAttention BlockMask
    cu_seqlens: torch.Tensor | None = None   # [k * 64] int32 document starts of the flattened batch, for
    max_seqlen: int = 0                      # FA3 varlen / its reference; padded with B*T (empty documents)

    @classmethod
    def build(cls, input_ids: torch.Tensor, backend: str, max_seqlen: int = 0) -> "DocumentLayout":
        """Attention segments: each document, cut every `max_seqlen` tokens from its own start (PR 1855's
        `_build_cu_seqlens`); 0 = the row length, which never cuts (a row start already starts one)."""
        batch, seq_len = input_ids.shape
        max_seqlen = min(max_seqlen or seq_len, seq_len)
        doc_start = input_ids == BOS_ID
        doc_start[:, 0] = True
        layout = cls(doc_start=doc_start, backend=backend)
        positions = torch.arange(seq_len, device=input_ids.device)
        last_doc_start = torch.cummax(torch.where(doc_start, positions, 0), dim=1).values  # [B, T]
        segment_start = (positions - last_doc_start) % max_seqlen == 0  # [B, T]
        doc_ids = torch.cumsum(segment_start.long(), dim=1)  # [B, T]: index of each token's segment in its row
        if backend in ("sdpa", "plain"):
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()
            layout.dense_mask = (same_doc & causal)[:, None]  # [B, 1, T, T]
        elif backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            def document_causal(b, h, q_idx, kv_idx):
                return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

            layout.block_mask = create_block_mask(document_causal, batch, None, seq_len, seq_len,
                                                  device=input_ids.device)
        else:  # fa3 and its reference "varlen"
            starts = torch.nonzero(segment_start.flatten(), as_tuple=False).flatten()
            padded = -(-(starts.numel() + 1) // CU_SEQLENS_BUCKET) * CU_SEQLENS_BUCKET
            layout.cu_seqlens = torch.full((padded,), batch * seq_len, dtype=torch.int32, device=input_ids.device)
            layout.cu_seqlens[: starts.numel()] = starts.to(torch.int32)
            layout.max_seqlen = max_seqlen  # an upper bound is enough for the kernel's grid
        return layout


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout) -> torch.Tensor:
    """Document-causal attention. q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]."""
    batch, seq_len, heads, head_dim = q.shape
    # under autocast the normed q/k may be fp32 while v is bf16: every kernel wants one dtype
    dtype = torch.bfloat16 if layout.backend == "fa3" and v.dtype == torch.float32 else v.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if layout.backend == "fa3":
        from flash_attn_interface import flash_attn_varlen_func
        out = flash_attn_varlen_func(q.reshape(batch * seq_len, heads, head_dim),
                                     k.reshape(batch * seq_len, k.size(2), head_dim),
                                     v.reshape(batch * seq_len, v.size(2), head_dim),
                                     layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen,
                                     causal=True)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        return out.view(batch, seq_len, heads, head_dim)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, D]
    if layout.backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        out = flex_attention(q, k, v, block_mask=layout.block_mask, enable_gqa=True)
    elif layout.backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask, enable_gqa=True)
    elif layout.backend == "varlen":  # FA3's inputs (cu_seqlens) through plain math: proves the layout on CPU
        positions = torch.arange(batch * seq_len, device=q.device, dtype=torch.int32)
        segment = torch.searchsorted(layout.cu_seqlens, positions, right=True).view(batch, seq_len)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
        mask = (segment[:, :, None] == segment[:, None, :]) & causal  # [B, T, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    else:  # plain: the reference the others must match
        group = heads // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(head_dim)  # [B, H, T, T]
        scores = scores.masked_fill(~layout.dense_mask, float("-inf"))
        out = (torch.softmax(scores, dim=-1).to(v.dtype) @ v)
    return out.transpose(1, 2)  # [B, T, H, D]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without weights (the record line learns no norm gains)."""
    return F.rms_norm(x, (x.size(-1),))


def add_lora(y: torch.Tensor, site: str, layer_index: int, x: torch.Tensor, lora: Any) -> torch.Tensor:
    """y (+ lora(site, layer_index, x) when an adapter is given and returns a delta for this site)."""
    if lora is not None:
        delta = lora(site, layer_index, x)
        if delta is not None:
            y = y + delta
    return y


def apply_lora(linear: nn.Module, site: str, layer_index: int, x: torch.Tensor, lora: Any) -> torch.Tensor:
    """linear(x), adapted at `site` by a LoRA that reads the same input x."""
    return add_lora(linear(x), site, layer_index, x, lora)


class MatrixLinear(nn.Linear):
    """A bias-free projection trained by Muon and quantized by GPTQ (the optimizer routes by this class)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False, orthogonal: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:  # output projections start at zero: every block begins as the identity
            nn.init.zeros_(self.weight)
        elif orthogonal:  # every singular value 1 (the record line's init of its q/k/v/MLP-up banks)
            nn.init.orthogonal_(self.weight)


class Rotary(nn.Module):
    """Partial RoPE: rotates the first `rope_dims` dims of each head (16 of 64 in the record line).
    Angles are computed for every position of the row, so an EVAL_SEQ_LEN above TRAIN_SEQ_LEN simply
    extrapolates (no frequency rescaling), as PR 1953 evaluated at 2560 a model trained at 2048; q.k
    depends only on the offset between two positions, which is what the longer context adds. A flat
    training row (TRAIN_PACKING=flat) numbers its positions over the whole row, as PR 1855 does."""

    def __init__(self, rope_dims: int, base: float):
        super().__init__()
        self.rope_dims = rope_dims
        inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / max(rope_dims, 1)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, H, D]
        if self.rope_dims == 0:
            return x
        positions = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)  # [T, rope_dims/2]
        cos, sin = angles.cos()[None, :, None, :].to(x.dtype), angles.sin()[None, :, None, :].to(x.dtype)
        rotated, rest = x[..., : self.rope_dims], x[..., self.rope_dims:]
        x1, x2 = rotated.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return torch.cat([rotated, rest], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelSettings, layer_index: int):
        super().__init__()
        self.layer_index, self.num_heads, self.num_kv_heads, self.head_dim = (
            layer_index, config.num_heads, config.num_kv_heads, config.head_dim)
        orthogonal = config.orthogonal_init
        self.q_proj = MatrixLinear(config.model_dim, config.num_heads * config.head_dim, orthogonal=orthogonal)
        self.k_proj = MatrixLinear(config.model_dim, config.num_kv_heads * config.head_dim, orthogonal=orthogonal)
        self.v_proj = MatrixLinear(config.model_dim, config.num_kv_heads * config.head_dim, orthogonal=orthogonal)
        self.out_proj = MatrixLinear(config.num_heads * config.head_dim, config.model_dim, zero_init=True)
        # q and k are RMS-normed per head, so attention sharpness is this learned per-head gain
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init))
        self.rotary = Rotary(config.rope_dims, config.rope_base)
        self.xsa = config.xsa
        # Gated attention (PR 1736): sigmoid(W x) per head scales the head's output before out_proj.
        # The sparse variant (PR 1855) feeds the gate only the first SPARSE_ATTN_GATE_DIMS input dims.
        self.gate_dims = config.sparse_attn_gate_dims if config.sparse_attn_gate else config.model_dim
        self.gate_scale = config.sparse_attn_gate_scale if config.sparse_attn_gate else 1.0
        self.gate = None
        if config.gated_attn:
            self.gate = nn.Linear(self.gate_dims, config.num_heads, bias=False)
            if config.sparse_attn_gate:  # zeros: every head starts at gate 0.5 (PR 1855)
                nn.init.zeros_(self.gate.weight)
            else:
                nn.init.normal_(self.gate.weight, std=config.gated_attn_init_std)

    def forward(self, x: torch.Tensor, layout: DocumentLayout, lora: Any = None, slot: int = 0) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        layer = slot  # LoRA slot: one per layer pass, so a looped layer adapts each pass on its own (PR 1855)
        q = apply_lora(self.q_proj, "q", layer, x, lora).view(batch, seq_len, self.num_heads, self.head_dim)
        k = apply_lora(self.k_proj, "k", layer, x, lora).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = apply_lora(self.v_proj, "v", layer, x, lora).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        q = self.rotary(rms_norm(q)) * self.q_gain.to(q.dtype)[None, None, :, None]
        k = self.rotary(rms_norm(k))
        y = attention(q, k, v, layout)  # [B, T, H, D]
        if self.xsa:
            # XSA: drop the part of each head's output along its own position's (normalized) value,
            # so attention carries context rather than copying the token itself back.
            value_dir = F.normalize(v, dim=-1).repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)
            y = y - (y * value_dir).sum(dim=-1, keepdim=True) * value_dir
        if self.gate is not None:
            gate_logits = self.gate(x[..., : self.gate_dims]) * self.gate_scale  # [B, T, H]
            y = y * torch.sigmoid(gate_logits)[..., None]
        y = y.reshape(batch, seq_len, self.num_heads * self.head_dim)
        # the "o" adapter reads the normed block input x, not y, and is added after out_proj (PR 1855)
        return add_lora(self.out_proj(y), "o", layer, x, lora)


# --- optional Triton kernels (PR 1736 / PR 1855), each beside the PyTorch reference it must match ---
# Chosen once at start (`select_fused_kernels`); triton is imported only when one is used, so the script
# runs without it. Tests run both kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1).


def leaky_relu2(pre: torch.Tensor, slope: float = 0.5) -> torch.Tensor:
    """LeakyReLU(slope)^2 (PR 1274 line: 0.5; PR 1945/1967: 0.3): keeps a gradient for negative inputs."""
    return F.leaky_relu(pre, negative_slope=slope).square()


def softcap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) in float32; cap 0 = no cap."""
    logits = logits.float()
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def softcapped_nll_reference(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token NLL [N] of raw head logits [N, V] after the softcap (the fused kernel's reference)."""
    return F.cross_entropy(softcap_logits(logits, cap), targets, reduction="none")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # missing, or a build that does not import next to this torch
        return False


def select_fused_kernels(run: RunSettings, model: ModelSettings, device: torch.device) -> tuple[bool, bool]:
    """(fused MLP, fused CE): auto = on with CUDA and triton where the model uses the op; 1 = required."""
    available = device.type == "cuda" and triton_available()
    chosen = []
    fused_mlp_applies = model.mlp_act == "leaky_relu2" and model.mlp_leaky_slope == 0.5  # the kernel's slope
    for name, applies in (("fused_mlp", fused_mlp_applies), ("fused_ce", model.logit_softcap > 0)):
        value = getattr(run, name)
        if value == "1":
            require(available or os.environ.get("TRITON_INTERPRET") == "1", f"{name.upper()}=1 needs CUDA and triton")
            require(applies, f"{name.upper()}=1 needs MLP_ACT=leaky_relu2 with MLP_LEAKY_SLOPE=0.5, LOGIT_SOFTCAP>0")
        chosen.append(value == "1" or (value == "auto" and available and applies))
    return chosen[0], chosen[1]


def fused_ops() -> Any:
    """torch.ops.pgolf with the Triton kernels registered as custom ops (once per process), so that
    torch.compile treats each launch as one opaque op with a known output shape. Called eagerly (by
    GPT.__init__), never inside a compiled graph."""
    if not hasattr(torch.ops.pgolf, "softcapped_ce"):
        register_fused_ops()
    return torch.ops.pgolf


def triton_kernels() -> tuple:
    """Define the Triton kernels: (softcapped CE forward, its backward, matmul + LeakyReLU(0.5)^2).
    Longer than 60 lines: three kernels, defined together inside one function so that triton is
    imported only when a kernel is wanted (runs without it never import it)."""
    # module globals, imported only now: Triton (and its interpreter) resolve `tl` in a kernel's globals
    global triton, tl
    import triton
    import triton.language as tl

    # Triton reads each kernel's source; the packed script execs its text, so there is no file to read:
    # give linecache the unpacked text under the exec'd code's file name
    filename = triton_kernels.__code__.co_filename
    if not os.path.exists(filename) and filename not in linecache.cache:
        with open(__file__, encoding="utf-8") as handle:
            lines = unpack_code(handle.read()).splitlines(keepends=True)
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)

    # Block sizes are literals, not `tl.constexpr` arguments: the packed script's minifier drops
    # argument annotations, and Triton knows a constexpr argument only by its annotation.
    @triton.jit
    def softcapped_ce_forward_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, row_stride, vocab, cap):
        # one program per row: an online log-sum-exp over vocabulary blocks of 1024; the capped row is
        # never stored
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, vocab, 1024):
            cols = start + tl.arange(0, 1024)
            raw = tl.load(row_ptr + cols, mask=cols < vocab, other=0.0).to(tl.float32)
            capped = cap * (2.0 * tl.sigmoid(2.0 * raw / cap) - 1.0)  # = cap * tanh(raw / cap)
            capped = tl.where(cols < vocab, capped, -float("inf"))
            block_max = tl.maximum(running_max, tl.max(capped, axis=0))
            running_sum = running_sum * tl.exp(running_max - block_max) + tl.sum(tl.exp(capped - block_max), axis=0)
            running_max = block_max
        lse = running_max + tl.log(running_sum)
        target_raw = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, lse - cap * (2.0 * tl.sigmoid(2.0 * target_raw / cap) - 1.0))

    @triton.jit
    def softcapped_ce_backward_kernel(logits_ptr, targets_ptr, lse_ptr, grad_loss_ptr, grad_ptr, row_stride, vocab,
                                      cap):
        # d loss / d raw = (softmax(capped) - onehot(target)) * (1 - tanh^2), with tanh = 2 s - 1 and
        # 1 - tanh^2 = 4 s (1 - s), s = sigmoid(2 raw / cap); recomputed from the raw logits
        row = tl.program_id(0).to(tl.int64)
        lse = tl.load(lse_ptr + row)
        grad_loss = tl.load(grad_loss_ptr + row)
        target = tl.load(targets_ptr + row)
        for start in range(0, vocab, 1024):
            cols = start + tl.arange(0, 1024)
            mask = cols < vocab
            raw = tl.load(logits_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(2.0 * raw / cap)
            probs = tl.exp(cap * (2.0 * s - 1.0) - lse)
            grad = grad_loss * (probs - tl.where(cols == target, 1.0, 0.0)) * 4.0 * s * (1.0 - s)
            tl.store(grad_ptr + row * row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def linear_leaky_relu2_kernel(a_ptr, b_ptr, out_ptr, pre_ptr, rows, cols, inner, stride_am, stride_ak,
                                  stride_bn, stride_bk, forward):
        # acc = A [rows, inner] @ B[cols, inner]^T for one 64 x 64 output tile (inner steps of 32).
        # Forward: write pre = acc and post = leaky_relu2(pre). Backward (A = grad of the MLP output,
        # B = down weight^T): write acc * leaky_relu2'(pre), the gradient at the up-projection's output.
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * 64 + tl.arange(0, 64)
        offs_n = pid_n * 64 + tl.arange(0, 64)
        offs_k = tl.arange(0, 32)
        acc = tl.zeros((64, 64), dtype=tl.float32)
        for k_start in range(0, inner, 32):
            ks = k_start + offs_k
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=(offs_m[:, None] < rows) & (ks[None, :] < inner), other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + ks[None, :] * stride_bk,
                        mask=(offs_n[:, None] < cols) & (ks[None, :] < inner), other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
        tile = offs_m[:, None] * cols + offs_n[None, :]
        mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
        if forward:
            pre = acc.to(pre_ptr.dtype.element_ty)  # rounded like F.linear's output, then activated
            tl.store(pre_ptr + tile, pre, mask=mask)
            leaky = tl.where(pre > 0, pre.to(tl.float32), 0.5 * pre.to(tl.float32))
            tl.store(out_ptr + tile, (leaky * leaky).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            pre = tl.load(pre_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            slope = tl.where(pre > 0, 2.0 * pre, 0.5 * pre)  # d/dpre of leaky_relu(pre, 0.5)^2
            tl.store(out_ptr + tile, (acc * slope).to(out_ptr.dtype.element_ty), mask=mask)

    return softcapped_ce_forward_kernel, softcapped_ce_backward_kernel, linear_leaky_relu2_kernel


def register_fused_ops() -> None:
    """Register the kernels as torch custom ops (forward, autograd, fake tensors for compile), so a
    compiled graph keeps them whole. Longer than 60 lines: two ops, each with its autograd and fake
    implementations, which torch.library wants registered together."""
    softcapped_ce_forward_kernel, softcapped_ce_backward_kernel, linear_leaky_relu2_kernel = triton_kernels()

    @torch.library.custom_op("pgolf::softcapped_ce", mutates_args=())
    def softcapped_ce(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits, targets = logits.contiguous(), targets.contiguous()
        loss = logits.new_empty(logits.size(0), dtype=torch.float32)
        lse = torch.empty_like(loss)
        softcapped_ce_forward_kernel[(logits.size(0),)](logits, targets, loss, lse, logits.stride(0), logits.size(1),
                                                        cap)
        return loss, lse

    @softcapped_ce.register_fake
    def _(logits, targets, cap):
        return logits.new_empty(logits.size(0), dtype=torch.float32), logits.new_empty(logits.size(0), dtype=torch.float32)

    @torch.library.custom_op("pgolf::softcapped_ce_backward", mutates_args=())
    def softcapped_ce_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                               cap: float) -> torch.Tensor:
        logits = logits.contiguous()
        grad = torch.empty_like(logits)
        softcapped_ce_backward_kernel[(logits.size(0),)](logits, targets.contiguous(), lse.contiguous(),
                                                         grad_loss.float().contiguous(), grad, logits.stride(0),
                                                         logits.size(1), cap)
        return grad

    @softcapped_ce_backward.register_fake
    def _(logits, targets, lse, grad_loss, cap):
        return torch.empty_like(logits)

    def ce_setup_context(ctx, inputs, output):
        logits, targets, cap = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.cap = cap

    def ce_backward(ctx, grad_loss, grad_lse):
        logits, targets, lse = ctx.saved_tensors
        return torch.ops.pgolf.softcapped_ce_backward(logits, targets, lse, grad_loss, ctx.cap), None, None

    softcapped_ce.register_autograd(ce_backward, setup_context=ce_setup_context)

    def launch_linear_leaky_relu2(a, b, pre, forward):  # b is read through its strides: no transposed copy
        rows, cols = a.size(0), b.size(0)
        out = a.new_empty(rows, cols)
        grid = (triton.cdiv(rows, 64), triton.cdiv(cols, 64))  # the kernel's tile
        linear_leaky_relu2_kernel[grid](a, b, out, pre, rows, cols, a.size(1), a.stride(0), a.stride(1),
                                        b.stride(0), b.stride(1), int(forward))
        return out

    @torch.library.custom_op("pgolf::linear_leaky_relu2", mutates_args=())
    def linear_leaky_relu2(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = x.new_empty(x.size(0), weight.size(0))
        return pre, launch_linear_leaky_relu2(x, weight, pre, True)

    @linear_leaky_relu2.register_fake
    def _(x, weight):
        return x.new_empty(x.size(0), weight.size(0)), x.new_empty(x.size(0), weight.size(0))

    @torch.library.custom_op("pgolf::linear_leaky_relu2_backward", mutates_args=())
    def linear_leaky_relu2_backward(grad_out: torch.Tensor, down_weight: torch.Tensor,
                                    pre: torch.Tensor) -> torch.Tensor:
        return launch_linear_leaky_relu2(grad_out, down_weight.mT, pre.contiguous(), False)

    @linear_leaky_relu2_backward.register_fake
    def _(grad_out, down_weight, pre):
        return torch.empty_like(pre)


def fused_softcapped_nll(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """`softcapped_nll_reference` by the Triton kernel: logits [N, V] in their own dtype (bf16 under
    autocast); no [N, V] float32 copy is made or kept; the backward recomputes from the raw logits."""
    return torch.ops.pgolf.softcapped_ce(logits, targets, cap)[0]


class FusedLeakyReLU2MLP(torch.autograd.Function):
    """leaky_relu2(x W_up^T) W_down^T with the activation fused into the up-projection's matmul, and in
    the backward into the matmul that brings the output gradient back to the hidden layer (PR 1736)."""

    @staticmethod
    def forward(ctx, x, up_weight, down_weight):  # x [N, D], up [H, D], down [D, H]
        pre, post = torch.ops.pgolf.linear_leaky_relu2(x, up_weight)  # [N, H] each
        ctx.save_for_backward(x, up_weight, down_weight, pre, post)
        return post @ down_weight.mT

    @staticmethod
    def backward(ctx, grad_out):
        x, up_weight, down_weight, pre, post = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_pre = torch.ops.pgolf.linear_leaky_relu2_backward(grad_out, down_weight, pre)  # [N, H]
        return grad_pre @ up_weight, grad_pre.mT @ x, grad_out.mT @ post


class MLP(nn.Module):
    def __init__(self, config: ModelSettings, layer_index: int, fused: bool = False):
        super().__init__()
        self.layer_index, self.act, self.fused = layer_index, config.mlp_act, fused
        self.leaky_slope = config.mlp_leaky_slope
        self.fc = MatrixLinear(config.model_dim, config.mlp_mult * config.model_dim, orthogonal=config.orthogonal_init)
        self.proj = MatrixLinear(config.mlp_mult * config.model_dim, config.model_dim, zero_init=True)

    def forward(self, x: torch.Tensor, lora: Any = None, slot: int = 0) -> torch.Tensor:
        if self.fused:  # the Triton kernel (slope 0.5 only: select_fused_kernels)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            out = FusedLeakyReLU2MLP.apply(x.reshape(-1, x.size(-1)).to(dtype), self.fc.weight.to(dtype),
                                           self.proj.weight.to(dtype)).view(*x.shape[:-1], -1)
        else:
            hidden = self.fc(x)
            if self.act == "leaky_relu2":  # LeakyReLU(slope)^2 (PR 1274 line): keeps gradient for negatives
                hidden = leaky_relu2(hidden, self.leaky_slope)
            else:  # ReLU^2 (baseline)
                hidden = F.relu(hidden).square()
            out = self.proj(hidden)
        # the "mlp" adapter bypasses the whole MLP: model_dim -> model_dim from its normed input (PR 1855)
        return add_lora(out, "mlp", slot, x, lora)


class Block(nn.Module):
    """One transformer block acting on a stack of residual lanes x [lanes, B, T, D].

    Sequential blocks have one lane. From PARALLEL_START_LAYER there are two lanes (PR 1855's form of
    the PR 1493 parallel residuals): attention reads lane 0 mixed with the embedding stream, the MLP
    reads the raw lane 1; both outputs are written into both lanes with learned scalars (init 1), on
    top of each raw lane times a learned residual scale (init 1.1); the model output is the lanes' mean.
    """

    def __init__(self, config: ModelSettings, layer_index: int, fused_mlp: bool = False):
        super().__init__()
        self.attn, self.mlp = CausalSelfAttention(config, layer_index), MLP(config, layer_index, fused_mlp)
        self.attn_scale = nn.Parameter(torch.ones(config.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(config.model_dim))
        # LN scale (PR 1493 line): deeper blocks see a smaller normed input, 1/sqrt(layer+1)
        self.ln_scale = 1.0 / math.sqrt(layer_index + 1) if config.ln_scale else 1.0
        # resid mix: x <- m0 * x + m1 * x0, a learned re-injection of the embedding stream
        self.resid_mix = None
        if config.resid_mix:
            self.resid_mix = nn.Parameter(torch.stack([torch.ones(config.model_dim), torch.zeros(config.model_dim)]))
        self.parallel = 0 <= config.parallel_start_layer <= layer_index
        if self.parallel:
            self.lane_mix = nn.Parameter(torch.ones(2, 2))    # [target lane, (attn, mlp)]
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))  # per-lane residual scale (PR 1855: 1.1)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, layout: DocumentLayout, lora: Any = None,
                slot: int = 0) -> torch.Tensor:
        def mixed(lane: torch.Tensor) -> torch.Tensor:  # m0 * lane + m1 * x0
            if self.resid_mix is None:
                return lane
            mix = self.resid_mix.to(lane.dtype)
            return mix[0] * lane + mix[1] * x0

        if not self.parallel:
            lane = mixed(x[0])
            lane = lane + self.attn_scale.to(x.dtype) * self.attn(rms_norm(lane) * self.ln_scale, layout, lora, slot)
            lane = lane + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(lane) * self.ln_scale, lora, slot)
            return lane[None]
        if x.size(0) == 1:
            x = x.expand(2, *x.shape[1:])
        # only attention's read is mixed with x0; the MLP reads lane 1 and the residuals carry the lanes raw
        attn_out = self.attn_scale.to(x.dtype) * self.attn(rms_norm(mixed(x[0])) * self.ln_scale, layout, lora, slot)
        mlp_out = self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x[1]) * self.ln_scale, lora, slot)
        mix, resid = self.lane_mix.to(x.dtype), self.lane_resid.to(x.dtype)
        return (resid[:, None, None, None] * x + mix[:, 0, None, None, None] * attn_out
                + mix[:, 1, None, None, None] * mlp_out)


def asymmetric_softcap(logits: torch.Tensor, cap_pos: torch.Tensor, cap_neg: torch.Tensor) -> torch.Tensor:
    """c*tanh(z/c) with its own c for positive and for negative logits (PR 1923, from modded-nanogpt)."""
    cap = torch.where(logits > 0, cap_pos, cap_neg)  # one tanh per logit, not two
    return cap * torch.tanh(logits / cap)


class SmearGate(nn.Module):
    """x_t += lambda * sigmoid(W x_t[:dims]) * x_{t-1} (PR 1855): a cheap bigram-like previous-token
    signal. Masked to zero where a document starts, so nothing leaks across a BOS."""

    def __init__(self, config: ModelSettings):
        super().__init__()
        self.dims = config.smear_gate_dims
        self.gate = nn.Linear(config.smear_gate_dims, 1, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.smear_lambda = nn.Parameter(torch.zeros(1))  # starts as the identity

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:  # x [B, T, D]
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        gate = torch.sigmoid(self.gate(x[..., : self.dims])) * self.smear_lambda.to(x.dtype)  # [B, T, 1]
        gate = gate.masked_fill(doc_start[..., None], 0.0)
        return x + gate * previous


class GPT(nn.Module):
    """Tied-embedding GPT with U-Net skips, depth recurrence and two-lane parallel residuals.

    The interface used by quantization and evaluation (docs/INTERFACES.md): forward (mean CE),
    forward_logits, per_token_nll, set_recurrence; `lora` hooks at every adaptable linear.
    """

    def __init__(self, config: ModelSettings, attn_backend: str = "sdpa", fused_mlp: bool = False,
                 fused_ce: bool = False):
        super().__init__()
        if attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {attn_backend!r} is not one of {ATTENTION_BACKENDS}")
        self.config, self.attn_backend = config, attn_backend
        self.fused_ce = fused_ce and config.logit_softcap > 0  # Triton softcapped CE (PR 1855)
        if fused_mlp or fused_ce:
            fused_ops()
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=config.tied_embed_init_std)
        self.smear = SmearGate(config) if config.smear_gate else None
        self.blocks = nn.ModuleList([Block(config, index, fused_mlp) for index in range(config.num_layers)])
        self.recurrence_active = False
        # skip parameters are sized for the longest layer order (recurrence on); fewer are used when off
        encoder, decoder = self.layer_order(looping=config.recurrence_enabled)
        num_skips = min(len(encoder), len(decoder)) if config.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(num_skips, config.model_dim)) if num_skips else None
        self.skip_gates = None
        if num_skips and config.skip_gates:
            self.skip_gates = nn.Parameter(torch.zeros(num_skips, config.model_dim))
        # asymmetric logit rescale (PR 1923/1945): identity at init; frozen in training (requires_grad off,
        # so it keeps the symmetric cap), fitted by the TTT weight updates on already-scored tokens only
        self.softcap_pos = self.softcap_neg = None
        if config.asym_logit_rescale:
            self.softcap_pos = nn.Parameter(torch.full((1,), float(config.logit_softcap)), requires_grad=False)
            self.softcap_neg = nn.Parameter(torch.full((1,), float(config.logit_softcap)), requires_grad=False)

    def set_recurrence(self, active: bool) -> None:
        """Turn depth recurrence on/off (switched on at ENABLE_LOOPING_AT of training)."""
        self.recurrence_active = bool(active) and self.config.recurrence_enabled

    def layer_order(self, looping: bool | None = None) -> tuple[list[int], list[int]]:
        """Physical block indices of the encoder and decoder halves, e.g. for 11 layers with loop 3-5 run
        3 times: encoder 0,1,2,3,4,5,3,4 and decoder 5,3,4,5,6,7,8,9,10 (PR 1493)."""
        config = self.config
        looping = self.recurrence_active if looping is None else looping
        order = list(range(config.num_layers))
        if looping:
            loop = list(range(config.loop_start, config.loop_end + 1))
            order = (list(range(config.loop_start)) + loop * config.num_loops
                     + list(range(config.loop_end + 1, config.num_layers)))
        middle = len(order) // 2
        return order[:middle], order[middle:]

    def hidden_states(self, input_ids: torch.Tensor, lora: Any = None,
                      layout: DocumentLayout | None = None) -> torch.Tensor:
        """The one block stack: input_ids [B, T] -> final normed hidden states [B, T, D]. A compiled
        caller passes the `layout` it built outside the graph; eager callers may leave it to us."""
        if layout is None:
            layout = DocumentLayout.build(input_ids, self.attn_backend)
        x = self.tok_emb(input_ids)  # [B, T, D]
        if self.smear is not None:  # on the raw embedding, before the norm (PR 1855)
            x = self.smear(x, layout.doc_start)
        x = rms_norm(x)
        x0 = x
        x = x[None]  # [lanes=1, B, T, D]
        encoder, decoder = self.layer_order()
        skips = []
        for slot, index in enumerate(encoder):  # slot: the pass, for LoRA (index: the physical block)
            x = self.blocks[index](x, x0, layout, lora, slot)
            skips.append(x)
        for position, index in enumerate(decoder):
            if self.blocks[index].parallel and x.size(0) == 1:
                x = x.expand(2, *x.shape[1:])  # lanes split before the skip: lane 1 keeps the stream as it was
            if self.skip_weights is not None and position < len(encoder) and skips:
                # the skip enters lane 0 (attention's lane) only (PR 1855); an encoder output with two
                # lanes is sent as their mean
                scaled_skip = self.skip_weights[position].to(x.dtype) * skips.pop().mean(dim=0)
                if self.skip_gates is not None:  # sigmoid gate between stream and skip (init: half/half)
                    gate = torch.sigmoid(self.skip_gates[position].to(x.dtype))
                    lane0 = gate * x[0] + (1 - gate) * scaled_skip
                else:
                    lane0 = x[0] + scaled_skip
                x = torch.cat([lane0[None], x[1:]])
            x = self.blocks[index](x, x0, layout, lora, len(encoder) + position)
        return rms_norm(x.mean(dim=0))  # mean of the lanes

    def head_logits(self, input_ids: torch.Tensor, lora: Any = None,
                    layout: DocumentLayout | None = None) -> torch.Tensor:
        """Raw logits [B, T, V] before the softcap, in the compute dtype; the head is the tied embedding."""
        hidden = self.hidden_states(input_ids, lora, layout)
        return apply_lora(lambda z: F.linear(z, self.tok_emb.weight.to(z.dtype)), "head", -1, hidden, lora)

    def forward_logits(self, input_ids: torch.Tensor, lora: Any = None,
                       layout: DocumentLayout | None = None) -> torch.Tensor:
        """Softcapped float32 logits [B, T, V]: one cap, or separate caps for positive and negative
        logits (ASYM_LOGIT_RESCALE)."""
        logits = self.head_logits(input_ids, lora, layout)
        if self.softcap_pos is not None:
            return asymmetric_softcap(logits.float(), self.softcap_pos.float(), self.softcap_neg.float())
        return softcap_logits(logits, self.config.logit_softcap)

    def per_token_nll(self, input_ids: torch.Tensor, target_ids: torch.Tensor, lora: Any = None,
                      layout: DocumentLayout | None = None) -> torch.Tensor:
        """Negative log-likelihood in nats (float32, full softmax over the vocabulary) of target_ids
        [B, T] -> [B, T], or of K candidate next tokens per position [B, T, K] -> [B, T, K] (the n-gram
        tilt scores the target and needs its hint's probability from the same forward)."""
        if target_ids.dim() == 3 or self.softcap_pos is not None:
            logits = self.forward_logits(input_ids, lora, layout)
            if target_ids.dim() == 3:
                return logits.logsumexp(-1, keepdim=True) - logits.gather(-1, target_ids)
            nll = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none")
        else:
            logits = self.head_logits(input_ids, lora, layout).flatten(0, 1)  # [B*T, V]
            cap = self.config.logit_softcap
            nll = (fused_softcapped_nll(logits, target_ids.flatten(), cap) if self.fused_ce
                   else softcapped_nll_reference(logits, target_ids.flatten(), cap))
        return nll.view_as(target_ids)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor,
                layout: DocumentLayout | None = None) -> torch.Tensor:
        """Mean cross-entropy over all targets (training)."""
        return self.per_token_nll(input_ids, target_ids, layout=layout).mean()


# -----------------------------------------------------------------------------
# Optimizers
#
# Muon (momentum + Newton-Schulz orthogonalization) for the matrices of every block, AdamW for the tied
# embedding and for the small scalars/gates. Gradients are averaged across ranks here (there is no DDP
# wrapper): Muon's stacked matrix gradients are reduce-scattered so each rank orthogonalizes only its
# share, and the updates are all-gathered. Schedules run on the fraction of the training budget used.
# -----------------------------------------------------------------------------

# Newton-Schulz quintic coefficients (a, b, c): X <- a X + (b A + c A^2) X with A = X X^T.
NEWTON_SCHULZ_STANDARD = ((3.4445, -4.7750, 2.0315),)  # Keller Jordan's Muon, reused every iteration
# Polar Express (Amsel et al. 2025, arXiv:2505.16932), one tuned triple per iteration; adopted in PR 1855
NEWTON_SCHULZ_POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz(grad: torch.Tensor, steps: int = 5, polar_express: bool = False,
                  compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of grad [..., rows, cols] (pure function)."""
    x = grad.to(compute_dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.mT
    # scale so every singular value is <= 1 (Polar Express adds a 1% safety margin)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * (1.01 if polar_express else 1.0) + 1e-7)
    coefficients = NEWTON_SCHULZ_POLAR_EXPRESS if polar_express else NEWTON_SCHULZ_STANDARD
    for step in range(steps):
        a, b, c = coefficients[min(step, len(coefficients) - 1)]
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(grad.dtype)


def lr_multiplier(progress: float, warmdown_frac: float, min_lr: float) -> float:
    """Flat at 1, then a linear warmdown over the last `warmdown_frac` of training that stops at the
    floor `min_lr` and stays there: max((1 - f) / warmdown_frac, min_lr) (PR 1787/1855; MIN_LR 0.1 was
    tuned with this shape)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmdown_frac <= 0 or progress <= 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - progress) / warmdown_frac, min_lr)


def muon_momentum_at(step: int, progress: float, config: OptimSettings) -> float:
    """Muon momentum warmed up linearly from MUON_MOMENTUM_WARMUP_START over the first steps, or over
    the first MUON_MOMENTUM_WARMUP_FRAC of training (the `small` preset: same shape at any run length)."""
    if config.muon_momentum_warmup_frac > 0:
        frac = min(progress / config.muon_momentum_warmup_frac, 1.0)
    elif config.muon_momentum_warmup_steps > 0:
        frac = min(step / config.muon_momentum_warmup_steps, 1.0)
    else:
        frac = 1.0
    return (1 - frac) * config.muon_momentum_warmup_start + frac * config.muon_momentum


def weight_decay_multiplier(progress: float, points: tuple[float, float, float, float] | None) -> float:
    """Factor on every group's weight decay (WEIGHT_DECAY_SCHEDULE, PR 2020): 1 until `hold`, linear to
    `low` at `ramp`, linear to `high` at the end of training; 1 throughout without a schedule."""
    if points is None:
        return 1.0
    hold, ramp, low, high = points
    progress = min(max(progress, 0.0), 1.0)
    if progress <= hold:
        return 1.0
    if progress <= ramp:
        return 1.0 + (low - 1.0) * (progress - hold) / (ramp - hold)
    return low + (high - low) * (progress - ramp) / (1.0 - ramp)


def relative_ema_decay(horizon_frac: float, step: int, progress: float, iterations: int) -> float:
    """EMA decay whose horizon 1/(1-decay) is `horizon_frac` of the run's expected steps: ITERATIONS, or
    under a wallclock cap step/progress (the pace so far), whichever is smaller. A fixed decay (0.9965 =
    a 286-step horizon, 6% of PR 1855's ~4,930 steps) keeps ~70% of the initial weights after 100 steps."""
    expected = min(step / progress, iterations) if step > 0 and progress > 0 else iterations
    return 1.0 - 1.0 / max(horizon_frac * expected, 1.0)


def distributed_info() -> tuple[int, int]:
    """(rank, world_size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_flat_(tensors: list[torch.Tensor], average: bool) -> None:
    """Sum (or average) same-dtype tensors across ranks in place, as one flat all-reduce."""
    _, world = distributed_info()
    if world == 1 or not tensors:
        return
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if average:
        flat /= world
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset: offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def rank0_decides(values: list[float], device: torch.device, host_group: Any = None) -> list[float]:
    """Rank 0's values on every rank, so that all ranks take the same decision (stop, skip, ...).
    With `host_group` (a Gloo group, see `host_process_group`) they travel host to host, with no device
    round trip."""
    if distributed_info()[1] == 1:
        return values
    shared = torch.tensor(values, dtype=torch.float64, device="cpu" if host_group is not None else device)
    dist.broadcast(shared, src=0, group=host_group)
    return shared.tolist()


def host_process_group() -> Any:
    """A Gloo group over all ranks when the default group is NCCL (host values need no GPU copy);
    None otherwise (a Gloo world already works on host tensors). Every rank must call it."""
    if distributed_info()[1] > 1 and dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return None


class Muon(torch.optim.Optimizer):
    """Muon: SGD-Nesterov momentum, optional row normalization (MuonEq-R), Newton-Schulz
    orthogonalization, update scale sqrt(max(1, rows/cols)), decoupled weight decay.

    Parameters are grouped by (shape, weight decay); within a group rank r owns every matrix whose
    index falls in its contiguous shard and keeps momentum only for those. `step(grad_scale)` expects
    the gradients of this rank (not yet averaged): it reduces them across ranks itself.
    """

    def __init__(self, groups: list[dict], lr: float, momentum: float, nesterov: bool, backend_steps: int,
                 polar_express: bool, row_normalize: bool):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        super().__init__(groups, defaults)
        self.backend_steps, self.polar_express, self.row_normalize = backend_steps, polar_express, row_normalize

    def reduce_gradients(self) -> list[torch.Tensor]:
        """Average gradients across ranks; returns, per group, this rank's shard [n_owned, rows, cols]
        (float32). On GPUs the gradients travel in bf16, half the bytes (PR 1855 does the same)."""
        rank, world = distributed_info()
        shards = []
        for group in self.param_groups:
            params = group["params"]
            per_rank = math.ceil(len(params) / world)
            stacked = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            if world > 1 and stacked.is_cuda:
                stacked = stacked.bfloat16()
            if per_rank * world > len(params):  # pad so the stack splits evenly across ranks
                padding = stacked.new_zeros(per_rank * world - len(params), *stacked.shape[1:])
                stacked = torch.cat([stacked, padding])
            if world == 1:
                shards.append(stacked)
            elif dist.get_backend() == "nccl":
                shard = stacked.new_empty(per_rank, *stacked.shape[1:])
                dist.reduce_scatter_tensor(shard, stacked, op=dist.ReduceOp.AVG)
                shards.append(shard.float())
            else:  # Gloo has no reduce-scatter: all-reduce, then keep this rank's slice
                dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
                shards.append(stacked[rank * per_rank: (rank + 1) * per_rank] / world)
        return shards

    @torch.no_grad()
    def apply_updates(self, shards: list[torch.Tensor], grad_scale: float | torch.Tensor = 1.0) -> None:
        """Momentum + orthogonalization on this rank's shard, all-gather, apply to every parameter. The
        owned matrices of a group share a shape: momentum runs as one foreach op over them and
        Newton-Schulz as one batched call on their stack [n, rows, cols], not one call per matrix."""
        rank, world = distributed_info()
        for group, shard in zip(self.param_groups, shards):
            params = group["params"]
            per_rank = shard.size(0)
            owned = params[rank * per_rank: (rank + 1) * per_rank]  # the rest of the shard is padding
            updates = torch.zeros_like(shard) if world > 1 and len(owned) < per_rank else None
            if owned:
                grads = list((shard[: len(owned)] * grad_scale).unbind(0))
                for param, grad in zip(owned, grads):
                    if "momentum_buffer" not in self.state[param]:
                        self.state[param]["momentum_buffer"] = torch.zeros_like(grad)
                buffers = [self.state[param]["momentum_buffer"] for param in owned]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, grads)
                stacked = torch.stack(torch._foreach_add(grads, buffers, alpha=group["momentum"])
                                      if group["nesterov"] else buffers)  # [n, rows, cols]
                if self.row_normalize:  # MuonEq-R: equalize row norms before orthogonalizing
                    stacked = stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                compute_dtype = torch.bfloat16 if stacked.is_cuda else torch.float32
                stacked = newton_schulz(stacked, self.backend_steps, self.polar_express, compute_dtype)
                stacked = stacked * math.sqrt(max(1.0, stacked.size(1) / stacked.size(2)))
                if updates is None:
                    updates = stacked
                else:
                    updates[: len(owned)] = stacked
            if world > 1:
                if shard.is_cuda:
                    updates = updates.bfloat16()  # the all-gather carries bf16 updates (PR 1855)
                gathered = updates.new_empty(per_rank * world, *updates.shape[1:])
                if dist.get_backend() == "nccl":
                    dist.all_gather_into_tensor(gathered, updates)
                else:
                    dist.all_gather(list(gathered.chunk(world)), updates)
                updates = gathered
            for param, update in zip(params, updates):
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"])


class TrainingOptimizer:
    """Muon for block matrices + AdamW for the embedding and scalars, with cross-rank gradient
    averaging, global gradient clipping and the schedules. One `step()` per optimizer step."""

    def __init__(self, model: GPT, config: OptimSettings):
        self.config = config
        matrices, scalars = [], []
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if module is model.tok_emb:
                    continue
                (matrices if isinstance(module, MatrixLinear) else scalars).append((f"{module_name}.{name}", param))
        # Muon groups share a shape (so they stack) and a weight decay (MLP may differ, PR 1812)
        mlp_wd = config.muon_weight_decay_mlp if config.muon_weight_decay_mlp >= 0 else config.muon_weight_decay
        muon_groups: dict[tuple, list[nn.Parameter]] = {}
        for name, param in matrices:
            decay = mlp_wd if ".mlp." in name else config.muon_weight_decay
            muon_groups.setdefault((tuple(param.shape), decay), []).append(param)
        self.muon = Muon([dict(params=params, weight_decay=decay, base_lr=config.matrix_lr, base_weight_decay=decay)
                          for (_, decay), params in muon_groups.items()],
                         lr=config.matrix_lr, momentum=config.muon_momentum, nesterov=config.muon_nesterov,
                         backend_steps=config.muon_backend_steps, polar_express=config.muon_polar_express,
                         row_normalize=config.muon_row_normalize)
        adam_groups = [dict(params=[model.tok_emb.weight], lr=config.embed_lr, base_lr=config.embed_lr,
                            weight_decay=config.embed_weight_decay, base_weight_decay=config.embed_weight_decay),
                       dict(params=[param for _, param in scalars], lr=config.scalar_lr, base_lr=config.scalar_lr,
                            weight_decay=config.scalar_weight_decay, base_weight_decay=config.scalar_weight_decay)]
        fused = model.tok_emb.weight.is_cuda
        self.adam = torch.optim.AdamW(adam_groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                                      fused=fused)
        self.adam_params = [p for group in adam_groups for p in group["params"]]

    def zero_grad(self) -> None:
        self.muon.zero_grad(set_to_none=True)
        self.adam.zero_grad(set_to_none=True)

    def set_schedule(self, lr_scale: float, momentum: float, weight_decay_scale: float = 1.0) -> None:
        for group in self.muon.param_groups:
            group["lr"], group["momentum"] = group["base_lr"] * lr_scale, momentum
        for group in self.muon.param_groups + self.adam.param_groups:
            group["weight_decay"] = group["base_weight_decay"] * weight_decay_scale  # PR 2020 scales every group
        for group in self.adam.param_groups:
            group["lr"] = group["base_lr"] * lr_scale

    def step(self) -> torch.Tensor:
        """Clip (GRAD_CLIP_SCOPE=local: this rank's own gradient, before averaging), average gradients
        across ranks, clip (global: by the norm of the averaged gradient), update. Returns the norm of
        the averaged gradient before a global clip as a 0-dim tensor: clipping runs on the device, with no
        host sync."""
        _, world = distributed_info()
        clip = self.config.grad_clip_norm
        if clip > 0 and self.config.grad_clip_scope == "local":  # PR 1736/1855 clip before their all-reduce
            params = [p for group in self.muon.param_groups for p in group["params"]] + self.adam_params
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
            clip = 0.0
        shards = self.muon.reduce_gradients()
        adam_grads = [p.grad for p in self.adam_params if p.grad is not None]
        all_reduce_flat_(adam_grads, average=True)
        # global norm of the averaged gradient: Muon shards are disjoint across ranks, Adam grads replicated
        muon_sq = torch.zeros((), device=self.adam_params[0].device)
        for shard in shards:
            muon_sq = muon_sq + shard.float().square().sum()
        if world > 1:
            dist.all_reduce(muon_sq, op=dist.ReduceOp.SUM)
        adam_sq = sum(g.float().square().sum() for g in adam_grads) if adam_grads else 0.0
        norm = torch.sqrt(muon_sq + adam_sq)
        scale = 1.0
        if clip > 0:
            scale = torch.where(norm > clip, clip / (norm + 1e-6), torch.ones_like(norm))
            if adam_grads:
                torch._foreach_mul_(adam_grads, scale)
        self.muon.apply_updates(shards, grad_scale=scale)
        self.adam.step()
        return norm

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])


# -----------------------------------------------------------------------------
# Training loop
#
# Compile warm-up (then an exact restore), the timed loop with gradient accumulation, the schedules,
# EMA, step logs, NaN/inf stop and atomic checkpoints. The wallclock cap is absolute: a step starts
# only if it is predicted to end within MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS, so training plus
# GPTQ calibration (which the challenge counts as training) stays within MAX_WALLCLOCK_SECONDS.
# -----------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf; `step` is the step that produced it."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped training between two steps (after saving interrupted.pt)."""


@dataclass
class TrainResult:
    steps: int
    train_time_s: float       # timed training only (compile warm-up excluded, as in the challenge)
    warmup_time_s: float
    tokens: int               # training tokens consumed by all ranks
    tokens_per_s: float
    stop_reason: str          # "iterations" or "wallclock"
    final_train_loss: float


@dataclass
class RunContext:
    """What a run's sections share besides `h` and the model: where to write, how to log, which
    device and rank; the training fields are filled in once training has run."""
    artifact_dir: str
    log: Callable[[str], None]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast: str = "fp32"
    compile_backend: str = ""  # torch.compile backend of training and eval forwards; "" = eager
    make_train_loader: Callable[[], Any] | None = None  # fresh training stream (GPTQ calibration data)
    clock: Callable[[], float] = time.perf_counter
    training_start: float | None = None  # clock() at the start of timed training (None: not trained here)
    train_time_s: float = 0.0
    micro_step_seconds: float = 0.0  # mean training micro-batch (forward + backward) time
    stop_signals: list[int] = field(default_factory=list)  # SIGTERM/SIGINT received; training stops at the next step


class ExponentialMovingAverage:
    """fp32 EMA of every floating tensor of the model's state; its weights are what gets quantized."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: tensor.detach().float().clone()
                       for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
        # the live tensors, kept once: weights change in place (optimizers, warm-up restore), so these stay valid
        live = model.state_dict()
        self.pairs = [(self.shadow[name], live[name]) for name in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One fused lerp over every tensor (one kernel launch per group, not ~150)."""
        shadows = [shadow for shadow, _ in self.pairs]
        torch._foreach_lerp_(shadows, [tensor.float() for _, tensor in self.pairs], 1.0 - self.decay)

    @torch.no_grad()
    def load(self, shadow: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in self.shadow.items():
            tensor.copy_(shadow[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for name, tensor in self.shadow.items():
            state[name].copy_(tensor.to(state[name].dtype))


def training_budget_seconds(h: Hyperparameters) -> float | None:
    """Seconds of timed training allowed: the cap minus the GPTQ calibration reserve (None: no cap)."""
    if h.optim.max_wallclock_seconds <= 0:
        return None
    return h.optim.max_wallclock_seconds - h.quant.gptq_reserve_seconds


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a reader never
    sees a half-written file. The file gets the usual permissions (umask), not mkstemp's 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def checkpoint_digest(payload: Any) -> str:
    """sha256 over everything a checkpoint holds: keys in order, and each tensor's shape, dtype and raw
    bytes (weights, optimizer state, EMA), so any edit or damage shows."""
    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                digest.update(repr(key).encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            digest.update(repr(value).encode())

    walk(payload)
    return digest.hexdigest()


def save_checkpoint(path: str, model: nn.Module, h: Hyperparameters, step: int,
                    resume: dict | None = None) -> None:
    """Model weights + step + resolved hyperparameters (+ `resume`: what continuing training needs) +
    `checkpoint_digest`; loadable with torch.load(weights_only=True)."""
    payload = {"model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
               "step": step, "hyperparameters": h.as_dict()}
    if resume is not None:
        payload["resume"] = resume
    payload["sha256"] = checkpoint_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str) -> dict:
    """A checkpoint written by `save_checkpoint` (no pickle of arbitrary objects), after checking its
    sha256, so a damaged or edited file is refused naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        intact = checkpoint.pop("sha256") == checkpoint_digest(checkpoint)
    except Exception as error:
        raise ValueError(f"checkpoint {path}: unreadable ({error})") from None
    if not intact:
        raise ValueError(f"checkpoint {path}: sha256 mismatch (damaged or edited)")
    return checkpoint


def load_checkpoint(path: str, model: nn.Module) -> int:
    """Load the weights of a checkpoint into `model`; returns its step."""
    checkpoint = read_checkpoint(path)
    model.load_state_dict(checkpoint["model"])
    return int(checkpoint["step"])


def configure_compile(backend: str) -> None:
    """Graphs are compiled once per shape: one per cu_seqlens bucket and recurrence state in training
    (PR 1855 allows 64), a few for eval. Hitting the limit must be an error, never a silent fall back to
    eager, which would run the rest of the record slowly without a word."""
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def compile_eval_forward(model: GPT, backend: str) -> None:
    """Compile `model.per_token_nll` in place for evaluation and TTT. Shapes are dynamic (windows and
    TTT chunks vary in width); the document layout is built outside the graph, as in training."""
    compiled = torch.compile(model.per_token_nll, dynamic=True, fullgraph=True, backend=backend)

    def per_token_nll(input_ids: torch.Tensor, target_ids: torch.Tensor, lora: Any = None,
                      layout: DocumentLayout | None = None) -> torch.Tensor:
        layout = DocumentLayout.build(input_ids, model.attn_backend) if layout is None else layout
        return compiled(input_ids, target_ids, lora, layout)

    model.per_token_nll = per_token_nll


def compute_context(device: torch.device, autocast: str) -> Any:
    """bf16 autocast where the run asked for it, else a no-op context."""
    if autocast == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def packs_flat(packing: str, backend: str) -> bool:
    """TRAIN_PACKING=flat takes effect with the cu_seqlens backends (fa3 and its reference varlen) only:
    sdpa/plain would build a dense [N, N] mask over the whole micro-batch, and flex is unmeasured at that
    size, so those keep rows (the `kernels:` log line says which packing runs)."""
    return packing == "flat" and backend in ("fa3", "varlen")


def forward_backward(forward: Callable, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     optimizer: TrainingOptimizer, backend: str, autocast: str, flat: bool = False) -> torch.Tensor:
    """Gradients of the mean loss over this rank's micro-batches; returns the loss averaged over all
    ranks as a 0-dim device tensor (reading it is the caller's one host sync of the step; the optimizer
    is not stepped here). The document layout is built here, outside `forward` (which may be
    compiled), so its data-dependent parts never enter the graph. `flat` (PR 1855's packing): a
    micro-batch's rows are one contiguous span of the stream, so they are joined into one row
    [1, rows * T] with the same tokens and targets; attention restarts at every BOS and every T tokens
    into a document, so a document of up to T tokens is seen whole. RoPE positions then run over the
    whole row, as in PR 1855: q.k depends only on the offset, and segments never span more than T."""
    optimizer.zero_grad()
    device = batches[0][0].device
    total = torch.zeros((), device=device)
    for inputs, targets in batches:
        seq_len = inputs.size(1)
        if flat:
            inputs, targets = inputs.reshape(1, -1), targets.reshape(1, -1)  # [1, rows * T]
        layout = DocumentLayout.build(inputs, backend, max_seqlen=seq_len)
        with compute_context(device, autocast):
            loss = forward(inputs, targets, layout)
        (loss / len(batches)).backward()
        total += loss.detach().float()
    total /= len(batches)
    all_reduce_flat_([total], average=True)
    return total


CU_SEQLENS_WARMUP_BUCKETS = (64, 128, 192, 256)  # compiled before the timed run for every batch shape (PR 1855)


def with_documents_for_bucket(batches: list[tuple[torch.Tensor, torch.Tensor]], bucket: int,
                              flat: bool) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Warm-up only: the micro-batches with BOS ids spread evenly so that each one's cu_seqlens has
    `bucket` entries, or None where no batch of this shape can (rows or TRAIN_SEQ_LEN cuts force more
    segments). Each bucket is its own compiled graph; a bucket first met in the timed run would compile
    there."""
    bucketed = []
    for inputs, targets in batches:
        rows, seq_len = inputs.shape
        # (BOS count, first BOS): aimed at the middle of the bucket with the BOS ids between row starts,
        # else the fewest segments this shape allows (flat: one document per TRAIN_SEQ_LEN)
        target = bucket - CU_SEQLENS_BUCKET // 2 - (0 if flat else rows)
        for count, first in ((target, inputs.numel() // (2 * max(target, 1))), (rows if flat else 1, 0)):
            if not 0 < count <= inputs.numel():
                continue
            ids = inputs.clone().view(-1)
            ids[torch.arange(count, device=ids.device) * ids.numel() // count + first] = BOS_ID
            ids = ids.view(rows, seq_len)
            if DocumentLayout.build(ids.view(1, -1) if flat else ids, "varlen", seq_len).cu_seqlens.numel() == bucket:
                bucketed.append((ids, targets))
                break
        else:
            return None
    return bucketed


def compile_warm_up(h: Hyperparameters, model: GPT, optimizer: TrainingOptimizer, make_loader: Callable[[], Any],
                    train_step: Callable[[list], float], log: Callable[[str], None]) -> None:
    """Run a few real steps so every kernel (recurrence off and on) is compiled, then put weights and
    optimizer state back exactly as they were (the caller restarts the data stream). The timed run is
    therefore identical to a run without warm-up: it gains nothing from it except compiled kernels."""
    if h.optim.warmup_steps <= 0:
        return
    initial_model = copy.deepcopy(model.state_dict())
    initial_optimizer = copy.deepcopy(optimizer.state_dict())
    warmup_loader = make_loader()
    lengths = [length for length, _ in h.data.seq_schedule()]
    half = h.optim.warmup_steps // 2
    for warmup_step in range(h.optim.warmup_steps):
        model.set_recurrence(h.model.recurrence_enabled and warmup_step >= half)
        # every sequence length of TRAIN_SEQ_SCHEDULE in both recurrence states: each is its own graph
        phase_step = warmup_step - half if warmup_step >= half else warmup_step
        train_step(warmup_loader.next_step(lengths[phase_step % len(lengths)]))
        optimizer.step()
    if model.attn_backend in ("fa3", "varlen"):  # one graph per cu_seqlens bucket too: compile the usual ones
        flat = packs_flat(h.data.train_packing, model.attn_backend)
        for recurrence in sorted({False, h.model.recurrence_enabled}):
            model.set_recurrence(recurrence)
            for length in lengths:
                batches = warmup_loader.next_step(length)
                for bucket in CU_SEQLENS_WARMUP_BUCKETS:
                    bucketed = with_documents_for_bucket(batches, bucket, flat)
                    if bucketed:
                        train_step(bucketed)
    model.load_state_dict(initial_model)
    optimizer.load_state_dict(initial_optimizer)
    optimizer.zero_grad()
    model.set_recurrence(False)
    log(f"warmup: {h.optim.warmup_steps} compile steps done, weights and optimizer state restored")


def train_model(h: Hyperparameters, model: GPT, optimizer: TrainingOptimizer, make_loader: Callable[[], Any],
                log: Callable[[str], None], *, forward: Callable | None = None, autocast: str = "fp32",
                clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] = lambda: None,
                ema: ExponentialMovingAverage | None = None, checkpoint_dir: str | None = None,
                stop_signals: list[int] | None = None, resume: dict | None = None) -> TrainResult:
    """Train `model` in place. `make_loader()` returns a fresh loader whose `next_step()` gives this
    rank's micro-batches; `forward` is the (possibly compiled) loss function, default `model`;
    `clock` is injectable so tests can prove the wallclock cap with a fake clock. (Longer than our usual
    60 lines on purpose: the timed loop's order, decide / schedule / step / EMA / log / checkpoint, is
    the wallclock argument and reads best in one place.) Checkpoints go to
    `checkpoint_dir`: checkpoint.pt every CHECKPOINT_EVERY steps, and interrupted.pt when a signal
    has been appended to `stop_signals` (then the run stops after the step in progress and raises
    TrainingInterrupted). final_model.pt, the finished run, is written by the caller. `resume` (from
    interrupted.pt, weights already loaded) continues at its step: optimizer and EMA state, data
    position, elapsed time and the recurrence switch as they were."""
    forward = model if forward is None else forward  # `or` would call len() on a compiled module
    device = model.tok_emb.weight.device
    rank, _ = distributed_info()
    checkpoint_path = checkpoint_dir and os.path.join(checkpoint_dir, "checkpoint.pt")

    flat = packs_flat(h.data.train_packing, model.attn_backend)

    def train_step(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return forward_backward(forward, batches, optimizer, model.attn_backend, autocast, flat)

    warmup_start = clock()
    compile_warm_up(h, model, optimizer, make_loader, train_step, log)
    synchronize()
    warmup_time = clock() - warmup_start

    loader = make_loader()
    host_group = host_process_group()  # rank 0's clock reaches the others host to host
    budget = training_budget_seconds(h)
    step_durations: list[float] = []
    stop_reason, loss_value = "iterations", float("nan")
    step, elapsed_before = restore_training_state(resume, model, optimizer, ema, loader, log) if resume else (0, 0.0)
    synchronize()
    start, first_step = clock() - elapsed_before, step
    previous_top = clock()
    schedule, previous_seq_len = h.data.seq_schedule(), h.data.train_seq_len
    weight_decay_points = h.optim.weight_decay_points()
    while step < h.optim.iterations:
        # A step starts only if the slowest recent iteration (measured top to top: step, EMA, logging,
        # checkpoint) still fits in the budget. Rank 0 decides for everyone so all ranks stop together.
        now = clock()
        if step > first_step:
            step_durations.append(now - previous_top)
        previous_top = now
        elapsed, predicted, signal_number = rank0_decides(
            [now - start, max(step_durations[-10:], default=0.0), stop_signals[0] if stop_signals else 0], device,
            host_group)
        if signal_number:  # rank 0 got SIGTERM/SIGINT: every rank stops here, between two steps
            save_interrupted_and_stop(h, model, optimizer, ema, checkpoint_dir, step, elapsed, signal_number, log)
        progress = elapsed / budget if budget is not None else step / h.optim.iterations
        if h.model.recurrence_enabled and not model.recurrence_active and progress >= h.model.enable_looping_at:
            slowdown = switch_on_recurrence(model, step, progress, log)
            step_durations = [duration * slowdown for duration in step_durations]
            predicted *= slowdown
        if budget is not None and elapsed + predicted > budget:
            stop_reason = "wallclock"
            break
        optimizer.set_schedule(lr_multiplier(progress, h.optim.warmdown_frac, h.optim.min_lr),
                               muon_momentum_at(step, progress, h.optim),
                               weight_decay_multiplier(progress, weight_decay_points))
        if ema is not None and h.optim.ema_horizon_frac > 0:
            ema.decay = relative_ema_decay(h.optim.ema_horizon_frac, step, progress, h.optim.iterations)
        seq_len = seq_len_at(schedule, progress)
        if seq_len != previous_seq_len:
            log(f"train_seq_len: {seq_len} from step {step} (progress {progress:.3f})")
            previous_seq_len = seq_len
        # the step's one device-to-host transfer: the loss, read before the update so that a NaN is
        # never applied. The update and the EMA are queued behind it without waiting (no synchronize)
        loss_value = train_step(loader.next_step(seq_len)).item()
        stop_if_diverged(loss_value, step + 1, checkpoint_path, log)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        step += 1
        log_step(h, step, loss_value, clock() - start, log)
        if checkpoint_path and h.optim.checkpoint_every > 0 and step % h.optim.checkpoint_every == 0 and rank == 0:
            save_checkpoint(checkpoint_path, model, h, step)
    synchronize()
    elapsed = clock() - start
    cap = f" of a {budget:.1f}s budget (+{h.quant.gptq_reserve_seconds:.1f}s GPTQ reserve)" if budget is not None else ""
    log(f"training stopped ({stop_reason}) after {step} steps, train_time:{elapsed * 1000:.0f}ms{cap}")
    tokens = step * h.data.train_batch_tokens
    return TrainResult(steps=step, train_time_s=elapsed, warmup_time_s=warmup_time, tokens=tokens,
                       tokens_per_s=tokens / max(elapsed, 1e-9), stop_reason=stop_reason,
                       final_train_loss=loss_value)


def save_interrupted_and_stop(h: Hyperparameters, model: GPT, optimizer: TrainingOptimizer,
                              ema: ExponentialMovingAverage | None, checkpoint_dir: str | None, step: int,
                              elapsed: float, signal_number: float, log: Callable[[str], None]) -> None:
    """Write interrupted.pt with everything `RESUME=1` needs (rank 0), log the stop, raise."""
    interrupted_path = checkpoint_dir and os.path.join(checkpoint_dir, "interrupted.pt")
    if interrupted_path and distributed_info()[0] == 0:
        state = dict(step=step, elapsed_s=elapsed, optimizer=optimizer.state_dict(),
                     ema=ema.shadow if ema is not None else {}, recurrence=model.recurrence_active)
        save_checkpoint(interrupted_path, model, h, step, resume=state)
    log(f"stopping: signal {signal_number:.0f} after step {step}; checkpoint: {interrupted_path}")
    raise TrainingInterrupted(f"signal {signal_number:.0f} after step {step}")


def restore_training_state(resume: dict, model: GPT, optimizer: TrainingOptimizer,
                           ema: ExponentialMovingAverage | None, loader: Any,
                           log: Callable[[str], None]) -> tuple[int, float]:
    """Put back what interrupted.pt saved (weights are already loaded); returns (step, elapsed seconds)."""
    step, elapsed_before = resume["step"], resume["elapsed_s"]
    optimizer.load_state_dict(resume["optimizer"])
    if ema is not None:
        ema.load(resume["ema"])
    model.set_recurrence(resume["recurrence"])
    for _ in range(step):  # the data stream is deterministic: skip what the interrupted run used
        loader.skip_step()
    log(f"resume: from step {step} ({elapsed_before:.1f}s of training done)")
    return step, elapsed_before


def stop_if_diverged(loss_value: float, step: int, checkpoint_path: str | None, log: Callable[[str], None]) -> None:
    """A NaN/inf loss stops the run before the optimizer applies it; the last checkpoint on disk is kept."""
    if math.isfinite(loss_value):
        return
    kept = checkpoint_path if checkpoint_path and os.path.exists(checkpoint_path) else "none"
    message = f"stopping: non-finite train loss {loss_value} at step {step}; last good checkpoint: {kept}"
    log(message)
    raise TrainingDiverged(step, message)


def switch_on_recurrence(model: GPT, step: int, progress: float, log: Callable[[str], None]) -> float:
    """Turn depth recurrence on; returns the slowdown of a step (ratio of layer passes), by which the
    measured step durations are rescaled so the wallclock prediction stays honest."""
    passes_before = sum(map(len, model.layer_order()))
    model.set_recurrence(True)
    log(f"recurrence: on at step {step} (progress {progress:.3f}), layer order {model.layer_order()}")
    return sum(map(len, model.layer_order())) / passes_before


def log_step(h: Hyperparameters, step: int, loss_value: float, elapsed: float, log: Callable[[str], None]) -> None:
    if step % h.optim.train_log_every == 0 or step == 1 or step == h.optim.iterations:
        log(f"step:{step}/{h.optim.iterations} train_loss:{loss_value:.4f} train_time:{elapsed * 1000:.0f}ms "
            f"step_avg:{elapsed * 1000 / step:.2f}ms tok/s:{step * h.data.train_batch_tokens / max(elapsed, 1e-9):.0f}")


# -----------------------------------------------------------------------------
# Quantization and artifact
#
# The submission is counted code + compressed model, at most 16,000,000 bytes. After training, the
# EMA weights are quantized with GPTQ (Frantar et al. 2022, arXiv:2210.17323): Hessians
# H = E[x x^T] of each matrix's inputs come from a few TRAINING batches (never validation data),
# and each row is rounded column by column while the rounding error is pushed onto the columns not
# yet rounded. Per-row scales are "SDClip" (clip_sigmas * row_std / clip_range). An optional LQER
# low-rank term (arXiv:2402.02446; PR 1855) corrects the largest errors. The container is stored as
# a small JSON header + raw arrays (no pickle, so loading runs no code), byte-shuffled and
# compressed with brotli-11; the code is minified, brotli'd and base85-wrapped into a 2-line script.
# -----------------------------------------------------------------------------

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal, as in the challenge rules
TIED_EMBEDDING = "tok_emb.weight"  # the embedding that is also the output head


def _dtype_name(tensor):
    return str(tensor.dtype).removeprefix("torch.")  # "float16", ...: the name stored in the artifact


# --- Hessian collection --------------------------------------------------------------------------


class _HeadInputTap:
    """Passed as the model's `lora` argument: records the input of the output head (site "head")
    and adds nothing (returns None), so the tied embedding gets the Hessian of its output use."""

    def __init__(self, record: Callable[[torch.Tensor], None]):
        self.record = record

    def __call__(self, site: str, layer_index: int, x: torch.Tensor) -> None:
        if site == "head":
            self.record(x)


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable, call_counts: dict | None = None) -> dict[str, torch.Tensor]:
    """Hessians H = mean over tokens of x x^T for the input x of every nn.Linear (key: the module's
    weight name in model.state_dict()) and of the output head of the tied embedding, read through
    the model's `lora` hook at site "head".

    `batches` must be TRAINING batches (LongTensor[B, T] input ids, or (input_ids, targets) pairs):
    calibration on validation tokens would leak them before they are scored. Pass the uncompiled
    module: hooks fire on every call, so a looped layer accumulates every pass (its count of calls
    is written to `call_counts[name]` if a dict is given). Under torch.distributed the sums are
    all-reduced, so every rank returns the same Hessians."""
    sums, rows, calls = {}, {}, {}

    def accumulate(key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in_features)
        if key not in sums:
            sums[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            rows[key], calls[key] = 0, 0
        sums[key].addmm_(x.t(), x)
        rows[key] += x.shape[0]
        calls[key] += 1

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            key = f"{name}.weight" if name else "weight"
            handles.append(module.register_forward_pre_hook(
                lambda mod, inputs, key=key: accumulate(key, inputs[0])))
    head_tap = _HeadInputTap(lambda x: accumulate(TIED_EMBEDDING, x))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
            model.forward_logits(input_ids.to(device), lora=head_tap)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    hessians = {}
    for key in sorted(sums):  # same order on every rank, so the all-reduces pair up
        total = sums[key]
        count = torch.tensor([float(rows[key])], dtype=torch.float64, device=total.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        hessians[key] = (total / count.item()).float()
    if call_counts is not None:
        call_counts.update(calls)
    return hessians


# --- GPTQ on one matrix --------------------------------------------------------------------------


def sdclip_scales(weight, bits, clip_sigmas):
    """Per-row step size "SDClip": clip_sigmas * row_std / clip_range, stored as fp16 (floored at
    2^-24, the smallest fp16 subnormal, so an all-zero row still has a usable step)."""
    clip_range = 2 ** (bits - 1) - 1
    row_std = weight.float().std(dim=1)
    return (clip_sigmas * row_std / clip_range).clamp_min(2.0 ** -24).to(torch.float16)


def rtn_quantize(weight, bits, clip_sigmas, scales=None):
    """Round-to-nearest with the same SDClip scales: codes int8 [rows, cols], scales fp16 [rows]."""
    clip_range = 2 ** (bits - 1) - 1
    if scales is None:
        scales = sdclip_scales(weight, bits, clip_sigmas)
    step = scales.float()[:, None]
    codes = torch.clamp(torch.round(weight.float() / step), -clip_range, clip_range)
    return codes.to(torch.int8), scales


def absmax_quantize(weight, bits):
    """Per-row symmetric quantization with scale max|w| / clip_range (attention-gate weights:
    tiny matrices whose largest entries matter, so nothing is clipped)."""
    clip_range = 2 ** (bits - 1) - 1
    scales = (weight.float().abs().amax(dim=1) / clip_range).clamp_min(2.0 ** -24).to(torch.float16)
    return rtn_quantize(weight, bits, 0.0, scales=scales)


def quantile_int8_quantize(weight, percentile=99.99984):
    """The challenge baseline's scheme: per-row int8, scale = (row's |w| percentile) / 127."""
    clip = torch.quantile(weight.float().abs(), percentile / 100.0, dim=1)
    scales = (clip / 127.0).clamp_min(2.0 ** -24).to(torch.float16)
    return rtn_quantize(weight, 8, 0.0, scales=scales)


def _propagation_matrix(hessian, damp):
    """GPTQ's error propagation without inverting H. The textbook form rounds column j and then
    subtracts e_j * U[j, j+1:] from the later columns, e_j = (w_j - q_j) / U[j, j], where U is the
    upper Cholesky factor of H^-1 = U^T U. With R = U^-1 (upper, H = R R^T) the same update is
    w_i += (w0_j - q_j) * R[j, i] / R[i, i] with w0 the ORIGINAL weights (expand w0 - q = E U
    column by column), and R is one
    Cholesky factorization of H with rows and columns reversed: about 6x cheaper than cholesky +
    cholesky_inverse + cholesky for 2048 columns. Returns R / diag(R) (column-scaled), upper.
    Damping (fraction of mean(diag H)) grows tenfold until H is positive definite."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean().clamp_min(1e-12)
    reversed_hessian = hessian.flip(0, 1)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(reversed_hessian + (damp * 10 ** attempt) * mean_diag * eye)
        if info.item() == 0:
            upper = lower.flip(0, 1)  # R, with R R^T = H + damping
            return upper / upper.diagonal()[None, :]
    raise RuntimeError("GPTQ: Hessian is not positive definite even with 1e5x damping")


_SUB_BLOCK = 16  # columns per rank-1 panel inside a GPTQ block; the rest of the block gets one matmul


@torch.no_grad()
def gptq_quantize(weight, hessian, bits, clip_sigmas, block_size=128, damp=0.01, scales=None, promoted=None,
                  promoted_bits=8):
    """GPTQ with SDClip scales. weight [rows, cols], hessian [cols, cols] -> (codes int8
    [rows, cols] in [-clip_range, clip_range], scales fp16 [rows]); dequant = codes * scales[:, None].
    `promoted` (bool [cols], AWQ-lite): those columns get `promoted_bits` with their own SDClip scales
    (same clip sigmas, finer steps) inside the same solve; then returns (codes, scales, promoted_scales).

    Columns go in descending order of diag(H) (most-used inputs first, the "act-order" of the GPTQ
    code), with 1% damping. The rounding residual of a column is pushed by rank-1 updates within its
    panel of 16 columns, by one matrix product onto the rest of its block of `block_size` columns,
    and by one matrix product per block onto the later columns; the same arithmetic as the
    column-by-column algorithm, with less memory traffic. We work on W^T so that a column is a
    contiguous vector."""
    rows, cols = weight.shape
    clip_range = 2 ** (bits - 1) - 1
    if scales is None:
        scales = sdclip_scales(weight, bits, clip_sigmas)
    step = scales.float().to(weight.device)  # (rows,)
    column_step, column_clip = [step] * cols, [clip_range] * cols
    if promoted is not None:
        promoted_scales = sdclip_scales(weight, promoted_bits, clip_sigmas)
        for column in torch.nonzero(promoted).flatten().tolist():
            column_step[column], column_clip[column] = promoted_scales.float().to(weight.device), 2 ** (promoted_bits - 1) - 1
    hessian = hessian.detach().to(device=weight.device, dtype=torch.float32).clone()
    dead = hessian.diagonal() <= 0  # inputs never seen in calibration: their weights are free
    hessian.diagonal()[dead] = 1.0
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    propagate = _propagation_matrix(hessian[order][:, order], damp)  # (cols, cols) upper
    column_step = [column_step[c] for c in order.tolist()]  # in processing order
    column_clip = [column_clip[c] for c in order.tolist()]
    work = weight.detach().float()[:, order].t().contiguous()  # (cols, rows), column j = work[j]
    work[dead[order]] = 0.0
    original = work.clone()  # (cols, rows): residuals are taken against the original weights
    codes_t = torch.empty_like(work)  # (cols, rows)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        residuals = torch.empty_like(work[start:end])  # (B, rows): w0 - q * s of each column
        for sub_start in range(start, end, _SUB_BLOCK):  # rank-1 updates stay inside a cache-sized panel
            sub_end = min(sub_start + _SUB_BLOCK, end)
            panel = work[sub_start:sub_end]  # (b, rows) view
            for j in range(sub_end - sub_start):
                column, code, residual = panel[j], codes_t[sub_start + j], residuals[sub_start - start + j]
                step_j, clip_j = column_step[sub_start + j], column_clip[sub_start + j]
                torch.div(column, step_j, out=code)
                code.round_().clamp_(-clip_j, clip_j)
                torch.addcmul(original[sub_start + j], code, step_j, value=-1.0, out=residual)
                if j + 1 < sub_end - sub_start:
                    panel[j + 1:].addr_(propagate[sub_start + j, sub_start + j + 1:sub_end], residual)
            if sub_end < end:
                work[sub_end:end].addmm_(propagate[sub_start:sub_end, sub_end:end].t(),
                                         residuals[sub_start - start:sub_end - start])
        if end < cols:
            work[end:].addmm_(propagate[start:end, end:].t(), residuals)
    codes = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    codes[:, order] = codes_t.t().to(torch.int8)
    if promoted is not None:
        return codes, scales, promoted_scales
    return codes, scales


def awq_salient_groups(weight, hessian, group_size, top_k):
    """AWQ-lite (PR 1908/1945): the `top_k` groups of `group_size` adjacent input columns with the largest
    saliency sum_c rms(x_c) * mean_r |W[r, c]|, where rms(x_c) = sqrt(H[c, c]) (H = mean x x^T). Returns
    the bool column mask [cols]: the inputs that carry most signal through large weights get more bits."""
    cols = weight.shape[1]
    saliency = hessian.diagonal().float().clamp_min(0).sqrt().to(weight.device) * weight.float().abs().mean(0)
    groups = -(-cols // group_size)
    padded = torch.zeros(groups * group_size, device=weight.device)
    padded[:cols] = saliency
    chosen = torch.topk(padded.view(groups, group_size).sum(1), min(top_k, groups)).indices
    mask = torch.zeros(groups, dtype=torch.bool, device=weight.device)
    mask[chosen] = True
    return mask.repeat_interleave(group_size)[:cols]


def entry_weight(entry):
    """A quantized entry's matrix before LQER: codes * scales per row; AWQ-lite columns use their own scales."""
    weight = dequantize_codes(entry["codes"], entry["scales"])
    if "awq_scales" in entry:
        columns = _awq_columns(entry["awq_groups"], entry["awq_group_size"], weight.shape[1])
        weight[:, columns] = dequantize_codes(entry["codes"][:, columns], entry["awq_scales"])
    return weight


def _awq_columns(groups, group_size, cols):
    return torch.cat([torch.arange(g * group_size, min((g + 1) * group_size, cols)) for g in groups])


def dequantize_codes(codes, scales):
    return codes.float() * scales.float()[:, None]


def hessian_weighted_error(weight, approx, hessian, relative=True):
    """tr(E H E^T), E = weight - approx: the squared error of the layer's output summed over
    features, averaged over calibration inputs; divided by tr(W H W^T) when relative (0 for an
    all-zero weight quantized exactly)."""
    hessian = hessian.float().to(weight.device)
    error = weight.float() - approx.float().to(weight.device)
    absolute = ((error @ hessian) * error).sum().item()
    if not relative:
        return absolute
    reference = ((weight.float() @ hessian) * weight.float()).sum().item()
    return absolute / reference if reference > 0 else (0.0 if absolute == 0 else float("inf"))


# --- LQER: low-rank correction of the quantization error -----------------------------------------


def quantize_groups_asymmetric(values, bits=4, group_size=64):
    """Asymmetric per-group quantization of a flattened tensor: code = round((x - min) / scale) in
    [0, 2^bits - 1], scale = (max - min) / (2^bits - 1), both fp16; two 4-bit codes per byte."""
    levels = 2 ** bits - 1
    flat = values.detach().float().reshape(-1)
    groups = F.pad(flat, (0, (-flat.numel()) % group_size)).view(-1, group_size)  # (G, group)
    low = groups.amin(dim=1).to(torch.float16)
    scale = ((groups.amax(dim=1) - low.float()) / levels).clamp_min(2.0 ** -24).to(torch.float16)
    codes = ((groups - low.float()[:, None]) / scale.float()[:, None]).round().clamp(0, levels)
    codes = codes.to(torch.uint8)
    if bits <= 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)  # group_size is even
    return codes.contiguous(), scale, low


def dequantize_groups_asymmetric(codes, scale, low, bits, numel):
    if bits <= 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
    values = codes.float() * scale.float()[:, None] + low.float()[:, None]
    return values.reshape(-1)[:numel]


def quantize_groups_signed(values, bits=4, group_size=64, scale_levels=None):
    """PR 1855's signed per-group quantization of a flattened tensor: q = clamp(round(x / s), -2^(b-1),
    2^(b-1) - 1) with s = max|x| / (2^(b-1) - 0.5) per group (fp16; `scale_levels` overrides the
    divisor). Stored in the asymmetric layout of `quantize_groups_asymmetric` (code q + 2^(b-1),
    low = -2^(b-1) s, exact in fp16), so one dequantizer serves both."""
    half = 2 ** (bits - 1)
    flat = values.detach().float().reshape(-1)
    groups = F.pad(flat, (0, (-flat.numel()) % group_size)).view(-1, group_size)  # (G, group)
    divisor = half - 0.5 if scale_levels is None else scale_levels
    scale = (groups.abs().amax(dim=1) / divisor).clamp_min(2.0 ** -24).to(torch.float16)
    codes = ((groups / scale.float()[:, None]).round().clamp(-half, half - 1) + half).to(torch.uint8)
    if bits <= 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)  # group_size is even
    return codes.contiguous(), scale, (-half * scale.float()).to(torch.float16)


def lqer_factors(error, rank, hessian=None, damp=0.01):
    """Rank-r A [rows, r], B [r, cols] with A @ B ~ error. With a Hessian the fit minimizes the
    output error ||(E - AB) L||_F where H = L L^T (SVD of E L, then B <- B L^-1); sqrt of the
    singular values goes to each factor so both have similar ranges for int4."""
    error = error.float()
    lower = None
    if hessian is not None:
        hessian = hessian.float().to(error.device)
        eye = torch.eye(hessian.shape[0], device=error.device)
        lower, info = torch.linalg.cholesky_ex(hessian + damp * hessian.diagonal().mean().clamp_min(1e-12) * eye)
        if info.item() != 0:
            lower = None
    target = error @ lower if lower is not None else error
    left, singular, right_t = torch.linalg.svd(target, full_matrices=False)
    root = singular[:rank].sqrt()
    factor_a = left[:, :rank] * root[None, :]  # (rows, r)
    factor_b = root[:, None] * right_t[:rank]  # (r, cols)
    if lower is not None:
        factor_b = torch.linalg.solve_triangular(lower, factor_b, upper=False, left=False)
    return factor_a, factor_b


# --- Whole-model quantization --------------------------------------------------------------------


def classify_tensor(name: str, tensor: torch.Tensor, config: QuantSettings) -> tuple[str, int, float]:
    """-> (kind, bits, clip_sigmas): "raw" (non-float, stored as is), "float" (fp16), "gate"
    (int8 per-row absmax) or "matrix" (GPTQ with SDClip; per-row int8 under QUANT_SCHEME=int8)."""
    if not tensor.is_floating_point():
        return "raw", 0, 0.0
    if config.quant_gate_bits and tensor.ndim == 2 and "attn.gate" in name:
        return "gate", config.quant_gate_bits, 0.0
    if tensor.ndim < 2 or tensor.numel() <= config.quant_small_tensor_numel:
        return "float", 16, 0.0
    if config.quant_scheme == "int8":
        return "matrix", 8, 0.0
    if name == TIED_EMBEDDING:
        return "matrix", config.quant_embed_bits, config.quant_embed_clip_sigmas
    if "mlp" in name:
        return "matrix", config.quant_mlp_bits, config.quant_mlp_clip_sigmas
    if "attn" in name:
        return "matrix", config.quant_matrix_bits, config.quant_attn_clip_sigmas
    return "matrix", config.quant_matrix_bits, config.quant_matrix_clip_sigmas


def _quantize_matrix(weight: torch.Tensor, hessian: torch.Tensor | None, bits: int, clip: float,
                     config: QuantSettings) -> tuple[torch.Tensor, torch.Tensor]:
    if config.quant_scheme == "int8":
        return quantile_int8_quantize(weight)
    if hessian is None:
        return rtn_quantize(weight, bits, clip)
    return gptq_quantize(weight, hessian, bits, clip, config.gptq_block_size, config.gptq_damp)


@torch.no_grad()
def quantize_model_state(state_dict: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                         config: QuantSettings, log: Callable[[str], None] | None = None) -> dict:
    """state_dict (name -> tensor) + Hessians (name -> [cols, cols]) -> container
    {"entries": {name: entry}}; each entry is a flat dict of attributes (str/int/float/list) and
    tensors. Matrices without a Hessian fall back to round-to-nearest (logged)."""
    entries, errors = {}, {}
    use_lqer = config.quant_scheme == "gptq" and config.lqer_enabled and config.lqer_rank > 0
    hessian_lqer = config.lqer_scheme == "hessian"  # else PR 1855's plain weight-error LQER
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        kind, bits, clip = classify_tensor(name, tensor, config)
        dtype_name = _dtype_name(tensor)
        if kind == "raw":
            entries[name] = {"kind": "raw", "tensor": tensor.cpu().contiguous()}
        elif kind == "float":
            entries[name] = {"kind": "float", "dtype": dtype_name, "tensor": tensor.cpu().to(torch.float16)}
        else:
            shape = list(tensor.shape)
            weight = tensor.float().reshape(shape[0], -1)
            hessian = hessians.get(name) if kind == "matrix" else None
            if kind == "matrix" and hessian is None and config.quant_scheme == "gptq" and log is not None:
                log(f"quant: no Hessian for {name}, using round-to-nearest")
            awq = None
            if kind == "gate":
                codes, scales = absmax_quantize(weight, bits)
            elif config.awq_lite_enabled and config.quant_scheme == "gptq" and hessian is not None:
                promoted = awq_salient_groups(weight, hessian, config.awq_lite_group_size, config.awq_lite_top_k)
                codes, scales, awq_scales = gptq_quantize(weight, hessian, bits, clip, config.gptq_block_size,
                                                          config.gptq_damp, promoted=promoted,
                                                          promoted_bits=config.awq_lite_bits)
                groups = torch.nonzero(promoted[::config.awq_lite_group_size]).flatten().tolist()
                awq = {"awq_groups": groups, "awq_group_size": config.awq_lite_group_size,
                       "awq_bits": config.awq_lite_bits, "awq_scales": awq_scales.cpu()}
            else:
                codes, scales = _quantize_matrix(weight, hessian, bits, clip, config)
            entries[name] = {"kind": "quant", "dtype": dtype_name, "shape": shape, "bits": bits,
                             "codes": codes.cpu(), "scales": scales.cpu(), **(awq or {})}
            if kind == "matrix" and use_lqer:
                approx = entry_weight(entries[name])
                errors[name] = (hessian_weighted_error(weight, approx, hessian, relative=False)
                                if hessian is not None and hessian_lqer else (weight - approx).square().sum().item())
    for name in sorted(errors, key=errors.get, reverse=True)[:config.lqer_top_k]:
        add_lqer_correction(entries[name], state_dict[name], hessians.get(name) if hessian_lqer else None, config)
        if log is not None:
            log(f"quant: LQER rank {config.lqer_rank} on {name}")
    return {"entries": entries}


def add_lqer_correction(entry: dict, tensor: torch.Tensor, hessian: torch.Tensor | None,
                        config: QuantSettings) -> None:
    """Store int-quantized low-rank factors of the entry's quantization error in the entry. PR 1855:
    A = U_r S_r, B = V_r^T of the plain SVD; A int2 with one scale per matrix, B signed int4 in groups
    (the hessian scheme: the output-error fit of `lqer_factors`, both factors asymmetric int4)."""
    weight = tensor.detach().float().reshape(entry["shape"][0], -1)
    error = weight - entry_weight(entry).to(weight.device)
    if config.lqer_scheme == "pr1855":
        left, singular, right_t = torch.linalg.svd(error, full_matrices=False)
        factor_a, factor_b = left[:, :config.lqer_rank] * singular[:config.lqer_rank], right_t[:config.lqer_rank]
        packed = {"a": quantize_groups_signed(factor_a.t(), 2, factor_a.numel() + factor_a.numel() % 2, 1.5),
                  "b": quantize_groups_signed(factor_b, config.lqer_bits, config.lqer_group_size)}
    else:
        factor_a, factor_b = lqer_factors(error, config.lqer_rank, hessian, config.gptq_damp)
        packed = {label: quantize_groups_asymmetric(factor, config.lqer_bits, config.lqer_group_size)
                  for label, factor in (("a", factor_a.t()), ("b", factor_b))}  # groups run along rows/cols
    for label, (codes, scale, low) in packed.items():
        entry[f"lqer_{label}_codes"] = codes.cpu()
        entry[f"lqer_{label}_scale"] = scale.cpu()
        entry[f"lqer_{label}_low"] = low.cpu()
    entry.update(lqer_rank=config.lqer_rank, lqer_bits=config.lqer_bits)


def _dequantize_entry(entry):
    if entry["kind"] == "raw":
        return entry["tensor"].clone()
    if entry["kind"] == "float":
        return entry["tensor"].to(_DTYPES[entry["dtype"]])
    weight = entry_weight(entry)  # (rows, cols) float32
    if entry.get("lqer_rank"):
        rank, bits = entry["lqer_rank"], entry["lqer_bits"]
        rows, cols = weight.shape
        factor_a = dequantize_groups_asymmetric(entry["lqer_a_codes"], entry["lqer_a_scale"], entry["lqer_a_low"],
                                                bits, rank * rows).view(rank, rows).t()  # (rows, r)
        factor_b = dequantize_groups_asymmetric(entry["lqer_b_codes"], entry["lqer_b_scale"], entry["lqer_b_low"],
                                                bits, rank * cols).view(rank, cols)  # (r, cols)
        weight = weight + factor_a @ factor_b
    return weight.reshape(entry["shape"])


def dequantize_state(container):
    """Container -> state_dict of float tensors (quantized matrices as float32, fp16-stored tensors
    back in their original dtype, raw tensors unchanged)."""
    return {name: _dequantize_entry(entry) for name, entry in container["entries"].items()}


@torch.no_grad()
def load_quantized_into(model, container):
    """Dequantize and copy into `model` in place (dtype and device of its own tensors). The key sets
    and every tensor's shape must match the model exactly, checked before anything is dequantized
    (ArtifactError), so an artifact cannot make this allocate more than the model's own size."""
    entries, own = container["entries"], model.state_dict()
    missing, unexpected = sorted(set(own) - set(entries)), sorted(set(entries) - set(own))
    if missing or unexpected:
        raise ArtifactError(f"quantized state does not match the model: missing {missing}, unexpected {unexpected}")
    for name, tensor in own.items():
        entry = entries[name]
        stored = entry["shape"] if entry["kind"] == "quant" else list(entry["tensor"].shape)
        if list(stored) != list(tensor.shape):
            raise ArtifactError(f"quantized {name} has shape {stored}, the model's is {list(tensor.shape)}")
    for name, tensor in own.items():
        tensor.copy_(_dequantize_entry(entries[name]).reshape(tensor.shape))
    return model


# --- Serialization: JSON header + raw arrays, one coder per stream ------------------------------
#
# Frame: header (magic, version, scheme, stream table: coder, shuffle stride, raw length, compressed
# length, crc32 of the raw bytes; then crc32 of the header) + the compressed streams. Stream 0 is the
# JSON description of every entry and array (dtype, shape, stream, offset, bytes); arrays follow.
# The reader trusts nothing in the file: declared sizes are capped before anything is decompressed,
# no stream may decompress past its declared length, and every array is checked against its entry
# (and, when loading, against the model) before anything is dequantized. Malformed input of any
# kind raises ArtifactError.

ARTIFACT_MAGIC = b"PGQZ"
ARTIFACT_VERSION = 2  # 2: a coder per stream, "rans"; version 1 (one codec for all streams) is still read
# int6 codes of a 16 MB artifact take ~40 MB as int8; 8x the limit leaves ample slack, and a file
# declaring more is refused before anything is decompressed
ARTIFACT_MAX_RAW_BYTES = 8 * ARTIFACT_LIMIT_BYTES
CODECS = {"brotli": 0, "lzma": 1, "zlib": 2, "rans": 3}
_HEADER = struct.Struct("<4sBBBB")  # magic, version, scheme (codec id), number of streams, reserved
_STREAM = struct.Struct("<BBQQI")  # coder, shuffle stride, raw length, compressed length, crc32 of raw
_STREAM_V1 = struct.Struct("<BQQI")  # version 1: no coder byte (the header's codec for every stream)
_CODES_STREAM = 4  # "rans": stream of the int8 code matrices, after JSON and the three width groups
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
           "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "float64": np.float64,
                  "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
                  "bool": np.bool_}  # numpy has no bfloat16: its bytes travel as int16


class ArtifactError(ValueError):
    """A model artifact that is not ours, of another version, truncated, corrupted or malformed."""


def _require(condition, message):
    if not condition:
        raise ArtifactError(message)


def byte_shuffle(data, stride):
    """Byte i*stride+k goes to plane k: the high and low bytes of fp16 values end up in separate
    runs, which compress better. A tail shorter than `stride` stays in place."""
    if stride <= 1:
        return bytes(data)
    body = len(data) - len(data) % stride
    array = np.frombuffer(data, dtype=np.uint8, count=body)
    return array.reshape(-1, stride).T.tobytes() + bytes(data[body:])


def byte_unshuffle(data, stride):
    if stride <= 1:
        return bytes(data)
    body = len(data) - len(data) % stride
    array = np.frombuffer(data, dtype=np.uint8, count=body)
    return array.reshape(stride, -1).T.tobytes() + bytes(data[body:])


def _compress(data, codec):
    if codec == "brotli":
        return brotli.compress(data, quality=11, lgwin=24)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=9 | lzma.PRESET_EXTREME)
    return zlib.compress(data, 9)


def _inflate(body, coder, size, what):
    """Decompress a brotli/lzma/zlib stream that must give exactly `size` bytes (the declared
    length). Output stops just past `size`, so a small hostile file cannot expand into gigabytes."""
    try:
        if coder == CODECS["brotli"]:
            decoder = brotli.Decompressor()
            out = decoder.process(body, output_buffer_limit=size + 1)  # may overshoot by one 32 KB block
            finished = decoder.is_finished()
        elif coder == CODECS["lzma"]:
            decoder = lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=1 << 27)  # dictionary size is in the data
            out = decoder.decompress(body, max_length=size + 1)
            finished = decoder.eof
        else:
            decoder = zlib.decompressobj()
            out = decoder.decompress(body, size + 1)
            finished = decoder.eof
    except (brotli.error, lzma.LZMAError, zlib.error) as exc:
        raise ArtifactError(f"{what} does not decompress: {exc}") from exc
    _require(len(out) == size and finished,
             f"{what} decompresses to {'more' if len(out) > size else 'fewer'} bytes than the {size} declared")
    return out


def _tensor_bytes(tensor):
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)  # numpy has no bfloat16; same bytes
    return tensor.numpy().tobytes()


def _array_group(dtype_name):
    """Per-group mode: one stream per element width (int8 codes, fp16 scales, ...)."""
    return {"int8": 0, "uint8": 0, "bool": 0, "float16": 1, "bfloat16": 1, "int16": 1}.get(dtype_name, 2)


# --- rANS coder for the quantized codes ----------------------------------------------------------
#
# Quantized codes are nearly i.i.d. within a matrix, so what beats brotli is coding each code with
# the right probabilities, not finding repeats. Each code is coded with a static table of its
# matrix's role (the tensor name without layer numbers, plus the bit width: every layer's attn.c_q
# shares tables), refined by a row class and a column class: equal-size bins of the rows (columns)
# ranked by mean |code| within the matrix, 1-8 bins each, chosen per role by the estimated size
# with the classes and tables counted. Up to 1024 interleaved rANS states (Duda 2013,
# arXiv:1311.2540; 32-bit state, 16-bit words, 15-bit probabilities) decode one code each per numpy
# step. Nothing here is a new dependency: numpy only.

_RANS_LANES = 1024  # at most; fewer for short streams (4 bytes of final state each)
_RANS_BITS = 15
_RANS_LOW = 1 << 16  # a state lives in [2^16, 2^32)
_RANS_CLASSES = ((1, 1), (1, 4), (4, 1), (4, 4), (2, 8), (8, 8))  # (row bins, column bins) tried per role
_RANS_MAX_CONTEXTS = 1024


def _rans_frequencies(counts):
    """counts [contexts, 256] -> integer frequencies, each row summing to 2^15 with every seen
    symbol >= 1 (an unused context puts all its mass on symbol 0)."""
    total = counts.sum(1, keepdims=True)
    freqs = np.where(counts > 0, np.maximum(1, counts * (1 << _RANS_BITS) // np.maximum(total, 1)), 0)
    freqs[total[:, 0] == 0, 0] = 1 << _RANS_BITS
    freqs[np.arange(len(freqs)), freqs.argmax(1)] += (1 << _RANS_BITS) - freqs.sum(1)  # rounding slack
    return freqs


def _rans_lanes(n):
    return max(1, min(_RANS_LANES, n >> 12))


def _rans_encode(symbols, contexts, freqs):
    """symbols uint8 [n], contexts [n] (the table of each symbol), freqs [contexts, 256] ->
    (final states uint32 [min(n, lanes)], words uint16). Symbol i is in lane i % lanes, step
    i // lanes; encoding runs backwards so that decoding runs forwards."""
    freq_flat = freqs.astype(np.uint64).ravel()
    cum_flat = (np.cumsum(freqs, 1) - freqs).astype(np.uint64).ravel()
    n = len(symbols)
    lanes = _rans_lanes(n)
    state = np.full(min(n, lanes), _RANS_LOW, dtype=np.uint64)
    emitted = []
    for start in range((n - 1) // lanes * lanes, -1, -lanes):
        index = contexts[start:start + lanes].astype(np.int64) * 256 + symbols[start:start + lanes]
        freq, x = freq_flat[index], state[:len(index)]
        full = x >= freq << np.uint64(32 - _RANS_BITS)  # would overflow: move 16 bits out first
        emitted.append((x[full] & 0xFFFF).astype(np.uint16))
        x[full] >>= np.uint64(16)
        state[:len(index)] = (x // freq << np.uint64(_RANS_BITS)) + x % freq + cum_flat[index]
    return state.astype(np.uint32), np.concatenate(emitted[::-1] or [np.zeros(0, np.uint16)])


def _rans_decode(states, words, contexts, freqs):
    """Inverse of _rans_encode. The words must be used up exactly and every state must end at its
    start value: that is the stream's own integrity check."""
    n, mask = len(contexts), (1 << _RANS_BITS) - 1
    lanes = _rans_lanes(n)
    symbol_of_slot = np.repeat(np.tile(np.arange(256, dtype=np.uint8), len(freqs)), freqs.ravel())
    freq_flat = freqs.astype(np.uint64).ravel()
    cum_flat = (np.cumsum(freqs, 1) - freqs).astype(np.uint64).ravel()
    x, out, position = states.astype(np.uint64), np.empty(n, dtype=np.uint8), 0
    for start in range(0, n, lanes):
        context = contexts[start:start + lanes].astype(np.int64)
        k = len(context)
        slot = x[:k] & mask
        symbol = symbol_of_slot[(context << _RANS_BITS) + slot.astype(np.int64)]
        index = context * 256 + symbol
        y = freq_flat[index] * (x[:k] >> np.uint64(_RANS_BITS)) + slot - cum_flat[index]
        low = y < _RANS_LOW
        count = int(low.sum())
        _require(position + count <= len(words), "artifact codes stream checksum mismatch (ran out of data)")
        y[low] = (y[low] << np.uint64(16)) | words[position:position + count]
        x[:k], out[start:start + k] = y, symbol
        position += count
    _require(position == len(words) and bool((x == _RANS_LOW).all()),
             "artifact codes stream checksum mismatch (corrupted data)")
    return out


def _rank_bins(values, bins):
    """Bin 0..bins-1 of each value by its rank (equal-size bins, ties by position)."""
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return (ranks * bins // max(len(values), 1)).astype(np.uint16)


def _rans_pack(codes, layout):
    """codes uint8 [n]: the int8 codes of the matrices in `layout` ((rows, cols, role) each), one
    after another -> stream body: u32 side-info length, u32 its brotli length, brotli(side info),
    u32 states, u16 words. Side info (uint16, byte-shuffled): number of roles; (row bins, column
    bins) of each role; the role of each matrix; the bins of its rows, then of its columns; the
    frequency tables (256 per context, role by role, row bin major)."""
    names = sorted({role for _, _, role in layout})
    if len(names) > _RANS_MAX_CONTEXTS:  # absurdly many roles: one table per bit width instead
        layout = [(rows, cols, role.rsplit("/", 1)[-1]) for rows, cols, role in layout]
        names = sorted({role for _, _, role in layout})
    matrices, offset = [], 0
    for rows, cols, role in layout:
        matrix = codes[offset:offset + rows * cols].reshape(rows, cols)
        magnitude = np.abs(matrix.view(np.int8).astype(np.int16))
        matrices.append((names.index(role), matrix, magnitude.mean(1), magnitude.mean(0)))
        offset += rows * cols

    def contexts_of(bins, row_means, col_means):
        row_bins, col_bins = _rank_bins(row_means, bins[0]), _rank_bins(col_means, bins[1])
        return row_bins, col_bins, row_bins[:, None].astype(np.int64) * bins[1] + col_bins[None, :]

    choice = []
    for role in range(len(names)):
        costs = []
        for bins in _RANS_CLASSES:
            counts = np.zeros(bins[0] * bins[1] * 256, dtype=np.int64)
            side_bits = 0.0
            for index, matrix, row_means, col_means in matrices:
                if index == role:
                    context = contexts_of(bins, row_means, col_means)[2]
                    counts += np.bincount((context * 256 + matrix).ravel(), minlength=len(counts))
                    side_bits += len(row_means) * math.log2(bins[0]) + len(col_means) * math.log2(bins[1])
            counts = counts.reshape(-1, 256)
            shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
            bits = -(counts * np.log2(np.where(counts > 0, shares, 1))).sum() + side_bits + 12 * (counts > 0).sum()
            costs.append(bits)
        choice.append(_RANS_CLASSES[int(np.argmin(costs))])
    if sum(r * c for r, c in choice) > _RANS_MAX_CONTEXTS:
        choice = [(1, 1)] * len(names)
    bases = np.cumsum([0] + [r * c for r, c in choice])
    side = [np.array([len(names)] + [v for bins in choice for v in bins] + [m[0] for m in matrices])]
    contexts, counts = [], np.zeros((bases[-1], 256), dtype=np.int64)
    for index, matrix, row_means, col_means in matrices:
        row_bins, col_bins, context = contexts_of(choice[index], row_means, col_means)
        side += [row_bins, col_bins]
        context = (context + bases[index]).ravel()
        counts += np.bincount(context * 256 + matrix.ravel(), minlength=counts.size).reshape(counts.shape)
        contexts.append(context.astype(np.uint16))
    freqs = _rans_frequencies(counts)
    contexts = np.concatenate(contexts or [np.zeros(0, np.uint16)])
    states, words = _rans_encode(codes, contexts, freqs)
    side = byte_shuffle(np.concatenate(side + [freqs.ravel()]).astype("<u2").tobytes(), 2)
    packed = _compress(side, "brotli")
    return (struct.pack("<II", len(side), len(packed)) + packed + states.astype("<u4").tobytes()
            + words.astype("<u2").tobytes())


def _rans_unpack(body, shapes):
    """Stream body -> codes uint8, for matrices of the given (rows, cols); every field of the side
    info is checked before it is used (ArtifactError)."""
    n, count = sum(rows * cols for rows, cols in shapes), len(shapes)
    _require(len(body) >= 8, "artifact codes stream truncated")
    side_length, packed_length = struct.unpack_from("<II", body)
    # the largest honest side info: a role per matrix, every row and column binned, full tables
    limit = 2 * (1 + 3 * count + sum(rows + cols for rows, cols in shapes) + 256 * _RANS_MAX_CONTEXTS)
    lanes = min(n, _rans_lanes(n))
    _require(side_length <= limit and 8 + packed_length + 4 * lanes <= len(body)
             and (len(body) - 8 - packed_length) % 2 == 0, "artifact codes stream has a malformed header")
    side = np.frombuffer(byte_unshuffle(_inflate(body[8:8 + packed_length], CODECS["brotli"], side_length,
                                                 "artifact codes side info"), 2), dtype="<u2").astype(np.int64)
    roles = int(side[0]) if len(side) else 0
    _require(len(side) >= 1 + 2 * roles + count, "artifact codes side info truncated")
    bins = side[1:1 + 2 * roles].reshape(roles, 2)
    matrix_roles = side[1 + 2 * roles:1 + 2 * roles + count]
    _require(bool((bins >= 1).all() and (bins <= 64).all() and (matrix_roles < roles).all()),
             "artifact codes side info has bad roles or bins")
    bases = np.concatenate([[0], np.cumsum(bins[:, 0] * bins[:, 1])])
    position = 1 + 2 * roles + count
    _require(bases[-1] <= _RANS_MAX_CONTEXTS and len(side) == position + sum(rows + cols for rows, cols in shapes)
             + 256 * bases[-1], "artifact codes side info has the wrong length")
    contexts = np.empty(n, dtype=np.uint16)
    offset = 0
    for (rows, cols), role in zip(shapes, matrix_roles):
        row_bins, col_bins = side[position:position + rows], side[position + rows:position + rows + cols]
        position += rows + cols
        _require(bool((row_bins < bins[role, 0]).all() and (col_bins < bins[role, 1]).all()),
                 "artifact codes side info has a bin out of range")
        contexts[offset:offset + rows * cols] = (bases[role] + row_bins[:, None] * bins[role, 1]
                                                 + col_bins[None, :]).ravel()
        offset += rows * cols
    freqs = side[position:].reshape(-1, 256)
    _require(bool((freqs.sum(1) == 1 << _RANS_BITS).all()), "artifact codes tables do not sum to 2^15")
    states = np.frombuffer(body, dtype="<u4", count=lanes, offset=8 + packed_length)
    _require(bool((states >= _RANS_LOW).all()), "artifact codes stream has an invalid state")
    words = np.frombuffer(body, dtype="<u2", offset=8 + packed_length + 4 * lanes)
    return _rans_decode(states, words, contexts, freqs).tobytes()


# --- Artifact frame: writing and (hostile-input safe) reading ------------------------------------


def _array_stream(key, value, codec, per_group):
    if codec == "rans" and key == "codes" and value.dtype == torch.int8 and value.ndim == 2:
        return _CODES_STREAM
    return 1 + _array_group(_dtype_name(value)) if per_group or codec == "rans" else 1


def _frame(codec_id, streams):
    """(coder id, shuffle stride, raw length, crc32 of raw, body) per stream -> artifact bytes."""
    table = b"".join(_STREAM.pack(coder, stride, raw_length, len(body), crc)
                     for coder, stride, raw_length, crc, body in streams)
    header = _HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, codec_id, len(streams), 0) + table
    return header + struct.pack("<I", zlib.crc32(header)) + b"".join(stream[4] for stream in streams)


def serialize_artifact(container, codec="rans", per_group=False, shuffle=True):
    """Container -> bytes (frame above). "rans" (default): the int8 codes of every quantized matrix
    go through the rANS coder above; every other array through brotli, one stream per element width
    (1, 2, 4+ bytes, byte-shuffled with stride = width). "brotli" / "lzma" / "zlib": all arrays in
    one stream byte-shuffled with stride 2, or with per_group=True one stream per element width;
    shuffle=False (baseline) stores the bytes as they are."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    grouped = per_group or codec == "rans"
    payloads = [bytearray() for _ in range(1 + (3 if grouped else 1) + (codec == "rans"))]
    arrays = [(name, key, value) for name, entry in container["entries"].items()
              for key, value in entry.items() if isinstance(value, torch.Tensor)]
    # like with like: all codes together, then all scales, ...; helps the compressor's context
    arrays.sort(key=lambda item: (_array_group(_dtype_name(item[2])), item[1], item[0]))
    placement, layout = {}, []
    for name, key, value in arrays:
        stream = _array_stream(key, value, codec, per_group)
        raw = _tensor_bytes(value)
        placement[(name, key)] = [key, _dtype_name(value), list(value.shape), stream, len(payloads[stream]), len(raw)]
        payloads[stream] += raw
        if stream == _CODES_STREAM and codec == "rans":  # role: name without layer numbers, + bits
            role = "".join(c for c in name if not c.isdigit()) + f"/{container['entries'][name].get('bits')}"
            layout.append((value.shape[0], value.shape[1], role))
    described = [{"name": name, "attrs": {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)},
                  "arrays": [placement[(name, k)] for k, v in entry.items() if isinstance(v, torch.Tensor)]}
                 for name, entry in container["entries"].items()]
    payloads[0] = json.dumps({"entries": described}, separators=(",", ":")).encode()
    strides = [1] + ([1, 2, 4] if grouped else [2]) + [1] * (codec == "rans")
    general = "brotli" if codec == "rans" else codec
    streams = []
    for index, raw in enumerate(map(bytes, payloads)):
        stride = strides[index] if shuffle else 1
        if index == _CODES_STREAM and codec == "rans":
            body, coder = _rans_pack(np.frombuffer(raw, dtype=np.uint8), layout), CODECS["rans"]
        else:
            body, coder = _compress(byte_shuffle(raw, stride), general), CODECS[general]
        streams.append((coder, stride, len(raw), zlib.crc32(raw), body))
    return _frame(CODECS[codec], streams)


def _read_frame(blob):
    """Header checks -> (codec id, [(coder id, stride, raw length, crc32, body)]); the declared raw
    lengths are capped here, before anything is decompressed."""
    blob = memoryview(blob)
    _require(len(blob) >= _HEADER.size, f"artifact truncated: {len(blob)} bytes, the header alone needs {_HEADER.size}")
    magic, version, codec_id, n_streams, _ = _HEADER.unpack_from(blob, 0)
    _require(magic == ARTIFACT_MAGIC,
             f"not a quantized model artifact: magic {bytes(magic)!r}, expected {ARTIFACT_MAGIC!r}")
    _require(version in (1, ARTIFACT_VERSION),
             f"unsupported artifact version {version} (this code reads versions 1 and {ARTIFACT_VERSION})")
    row = _STREAM if version == ARTIFACT_VERSION else _STREAM_V1
    header_size = _HEADER.size + n_streams * row.size
    _require(len(blob) >= header_size + 4, f"artifact truncated: {len(blob)} bytes, its header needs {header_size + 4}")
    (header_crc,) = struct.unpack_from("<I", blob, header_size)
    _require(zlib.crc32(blob[:header_size]) == header_crc, "artifact header checksum mismatch (corrupted header)")
    table = [row.unpack_from(blob, _HEADER.size + i * row.size) for i in range(n_streams)]
    if version == 1:
        table = [(codec_id,) + entry for entry in table]
    _require(codec_id in CODECS.values() and all(entry[0] in CODECS.values() for entry in table),
             f"unknown codec id {codec_id} in artifact header")
    declared = sum(entry[2] for entry in table)
    _require(declared <= ARTIFACT_MAX_RAW_BYTES, f"artifact declares {declared} decompressed bytes, more than the "
             f"{ARTIFACT_MAX_RAW_BYTES} any artifact under the size limit needs")
    expected = header_size + 4 + sum(entry[3] for entry in table)
    _require(len(blob) == expected, f"artifact length {len(blob)} bytes, header says {expected}: "
             + ("truncated" if len(blob) < expected else "trailing bytes"))
    streams, offset = [], header_size + 4
    for coder, stride, raw_length, body_length, crc in table:
        streams.append((coder, stride, raw_length, crc, bytes(blob[offset:offset + body_length])))
        offset += body_length
    return codec_id, streams


def _is_count(value):
    return type(value) is int and value >= 0


def _parse_description(raw):
    """Stream 0 -> [(name, attrs, [(key, dtype, shape, stream, offset, nbytes)])], every field's
    type checked (the JSON is as untrusted as the rest of the file)."""
    try:
        described = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"artifact description is not valid JSON: {str(exc)[:200]}") from exc
    _require(type(described) is dict and type(described.get("entries")) is list,
             "artifact description has no list of entries")
    items = []
    for number, item in enumerate(described["entries"]):
        _require(type(item) is dict and type(item.get("name")) is str and type(item.get("attrs")) is dict
                 and type(item.get("arrays")) is list, f"artifact entry {number} is malformed")
        for array in item["arrays"]:
            _require(type(array) is list and len(array) == 6 and type(array[0]) is str and type(array[1]) is str
                     and array[1] in _DTYPES and type(array[2]) is list and len(array[2]) <= 8
                     and all(map(_is_count, array[2]))
                     and all(map(_is_count, array[3:])), f"an array of artifact entry {item['name']!r} is malformed")
        items.append((item["name"], item["attrs"], [tuple(array) for array in item["arrays"]]))
    _require(len({item[0] for item in items}) == len(items), "artifact entries have duplicate names")
    return items


def _check_entry(name, entry):
    """An entry's arrays against its attributes, so dequantizing allocates exactly prod(shape)
    values (codes [1, n] with scales [n] would otherwise broadcast to n x n)."""
    kind = entry.get("kind")
    arrays = {key: value for key, value in entry.items() if isinstance(value, torch.Tensor)}

    def need(condition, what):
        _require(condition, f"artifact entry {name!r} (kind {str(kind)[:20]!r}): {what}")

    def is_array(tensor, dtype, shape):
        return tensor is not None and tensor.dtype == dtype and list(tensor.shape) == shape

    if kind == "raw" or kind == "float":
        need(set(arrays) == {"tensor"}, "needs exactly one array, 'tensor'")
        need(kind == "raw" or (arrays["tensor"].dtype == torch.float16 and entry.get("dtype") in _FLOAT_DTYPES),
             "needs a float16 tensor and a float dtype")
        return
    shape, bits = entry.get("shape"), entry.get("bits")
    need(kind == "quant", "unknown kind")
    need(type(shape) is list and len(shape) >= 1 and all(type(v) is int and v > 0 for v in shape)
         and type(bits) is int and 2 <= bits <= 8 and entry.get("dtype") in _FLOAT_DTYPES,
         "needs a positive integer shape, bits in 2..8 and a float dtype")
    rows, cols = shape[0], math.prod(shape[1:])
    need(is_array(arrays.get("codes"), torch.int8, [rows, cols]), f"needs int8 codes of shape [{rows}, {cols}]")
    need(is_array(arrays.get("scales"), torch.float16, [rows]), f"needs float16 scales of shape [{rows}]")
    expected = {"codes", "scales"}
    if "awq_groups" in entry:
        groups, group_size, awq_bits = entry.get("awq_groups"), entry.get("awq_group_size"), entry.get("awq_bits")
        need(type(group_size) is int and group_size > 0 and type(awq_bits) is int and 2 <= awq_bits <= 8
             and type(groups) is list and 0 < len(groups) == len(set(groups))
             and all(type(g) is int and 0 <= g * group_size < cols for g in groups)
             and is_array(arrays.get("awq_scales"), torch.float16, [rows]),
             "needs distinct AWQ groups within the columns, a group size, bits in 2..8 and float16 awq_scales")
        expected.add("awq_scales")
    rank, lqer_bits = entry.get("lqer_rank"), entry.get("lqer_bits")
    if rank:
        need(type(rank) is int and rank > 0 and type(lqer_bits) is int and 1 <= lqer_bits <= 8,
             "needs a positive LQER rank and LQER bits in 1..8")
        for label, values in (("a", rank * rows), ("b", rank * cols)):
            codes, scale, low = (arrays.get(f"lqer_{label}_{part}") for part in ("codes", "scale", "low"))
            need(codes is not None and codes.dtype == torch.uint8 and codes.ndim == 2 and codes.shape[1] > 0,
                 f"needs 2-D uint8 LQER codes for factor {label}")
            group = codes.shape[1] * (2 if lqer_bits <= 4 else 1)
            groups = -(-values // group)
            need(codes.shape[0] == groups and is_array(scale, torch.float16, [groups])
                 and is_array(low, torch.float16, [groups]),
                 f"LQER factor {label} needs {groups} groups of {group} codes (rank {rank}) with float16 scale and low")
            expected |= {f"lqer_{label}_codes", f"lqer_{label}_scale", f"lqer_{label}_low"}
    need(set(arrays) == expected, f"has unexpected arrays {sorted(set(arrays) - expected)}")


def deserialize_artifact(blob):
    """Bytes -> container. Raises ArtifactError naming what is wrong (magic, version, codec,
    truncation, sizes, checksums, malformed description, array shapes); memory use is bounded by
    the declared sizes, which are capped. Never unpickles anything."""
    _, streams = _read_frame(blob)
    _require(len(streams) >= 1 and streams[0][0] != CODECS["rans"], "artifact has no description stream")
    raws = []
    for index, (coder, stride, raw_length, crc, body) in enumerate(streams):
        what = f"artifact stream {index}"
        if coder != CODECS["rans"]:
            raw = byte_unshuffle(_inflate(body, coder, raw_length, what), stride)
        else:  # the matrices placed in this stream, in order, must tile it exactly
            placed = sorted((offset, nbytes, dtype, shape) for _, _, arrays in items
                            for _, dtype, shape, stream, offset, nbytes in arrays if stream == index)
            end = 0
            for offset, nbytes, dtype, shape in placed:
                _require(offset == end and dtype == "int8" and len(shape) == 2 and nbytes == shape[0] * shape[1],
                         f"{what} (rans) is not tiled by int8 matrices")
                end += nbytes
            _require(end == raw_length, f"{what} (rans) is not tiled by int8 matrices")
            raw = _rans_unpack(body, [tuple(shape) for *_, shape in placed])
        _require(len(raw) == raw_length and zlib.crc32(raw) == crc, f"{what} checksum mismatch (corrupted data)")
        if index == 0:
            items = _parse_description(raw)
        raws.append(raw)
    entries = {}
    for name, attrs, arrays in items:
        entry = dict(attrs)
        for key, dtype_name, shape, stream, start, nbytes in arrays:
            storage = np.dtype(_NUMPY_STORAGE[dtype_name])
            numel = math.prod(shape)
            _require(0 < stream < len(raws) and numel * storage.itemsize == nbytes
                     and start + nbytes <= len(raws[stream]),
                     f"array {name}.{key}: shape {shape} does not fit {nbytes} bytes at {start} of stream {stream}")
            array = np.frombuffer(raws[stream], dtype=storage, count=numel, offset=start).copy()
            entry[key] = torch.from_numpy(array).view(_DTYPES[dtype_name]).reshape(shape)  # int16 bits -> bfloat16
        _check_entry(name, entry)
        entries[name] = entry
    return {"entries": entries}


# --- Counted code and the artifact files ---------------------------------------------------------


def _reads_docstrings(source):
    """True if the code reads __doc__ (e.g. as --help text); a mention in a string does not count."""
    import ast

    return any((isinstance(node, ast.Name) and node.id == "__doc__")
               or (isinstance(node, ast.Attribute) and node.attr == "__doc__") for node in ast.walk(ast.parse(source)))


def minify_source(source):
    import python_minifier  # only needed when packing; keeps import of this script light

    return python_minifier.minify(
        source,
        # annotations are not behaviour, except class-level ones: @dataclass fields are annotations
        remove_annotations=python_minifier.RemoveAnnotationsOptions(
            remove_variable_annotations=True, remove_return_annotations=True,
            remove_argument_annotations=True, remove_class_attribute_annotations=False),
        # docstrings are prose; kept only if the script reads __doc__ (e.g. as --help text)
        remove_literal_statements=not _reads_docstrings(source),
        # off: lzma already shares repeated strings; hoisting them into names made the stream larger
        hoist_literals=False,
        # function-local names only; keyword-callable argument names and class attributes (dataclass
        # fields, looked up by string from env names) are never renamed
        rename_locals=True,
        # module-level names too: the packed script is only ever executed, never imported (tests and
        # tools import this file). Kept: SECTIONS (docs/env_table.knob_names finds the settings of a
        # packed script through it) and triton_kernels (a test runs the packed script's kernels)
        rename_globals=True, preserve_globals=["SECTIONS", "triton_kernels"],
        # off: asserts and `if __debug__` checks are behaviour
        remove_asserts=False,
        remove_debug=False,
        # safe rewrites with identical behaviour (`class A(object)` -> `class A`, `return None`
        # -> `return`, `raise E()` -> `raise E`, constant folding, `pass` removal, import merging)
        remove_pass=True, combine_imports=True, remove_object_base=True, convert_posargs_to_args=True,
        remove_explicit_return_none=True, remove_builtin_exception_brackets=True, constant_folding=True,
        # the wrapper is exec'd, a shebang in it would be dead text
        preserve_shebang=False,
    )


PACKED_PREFIX = "import brotli as _R,base64 as _B\nexec(_R.decompress(_B.b85decode(\""


def pack_code(source):
    """Counted form of a script: minified, brotli-11 (its built-in dictionary of English and code words
    makes it ~4% smaller than lzma on this source; the artifact needs brotli anyway), base85, in a
    two-line file that execs it. exec runs in the wrapper's own globals, so `__name__ == "__main__"` and
    module-level names behave as in the original. A script that is already packed is returned
    unchanged, so a run of the packed script reports (and writes) the same counted code as the run that
    produced it."""
    if source.startswith(PACKED_PREFIX) and source.count("\n") == 2:
        return source
    compressed = brotli.compress(minify_source(source).encode(), quality=11, lgwin=24)
    encoded = base64.b85encode(compressed).decode("ascii")  # alphabet has no quote or backslash
    # underscore aliases: the wrapper adds no public name to the module's namespace
    return f'{PACKED_PREFIX}{encoded}")))\n'


def unpack_code(text):
    """The source a packed script runs (`pack_code`'s inverse); any other text is returned as it is."""
    if not (text.startswith(PACKED_PREFIX) and text.count("\n") == 2):
        return text
    return brotli.decompress(base64.b85decode(text[len(PACKED_PREFIX): text.rindex('")))')])).decode()


def counted_code_bytes(path):
    with open(path, encoding="utf-8") as handle:
        return len(pack_code(handle.read()).encode("utf-8"))


def write_artifact(artifact_dir, container, code_path, *, codec="rans", per_group=False, shuffle=True,
                   model_filename="final_model.ptz", code_filename="train_gpt_packed.py",
                   limit_bytes=ARTIFACT_LIMIT_BYTES, log=print):
    """Writes the compressed model and the packed code (rank 0 only: the caller decides) and returns
    the summary.json fields code_bytes, model_bytes, artifact_bytes, artifact_limit_ok."""
    blob = serialize_artifact(container, codec=codec, per_group=per_group, shuffle=shuffle)
    with open(code_path, encoding="utf-8") as handle:
        packed = pack_code(handle.read()).encode("utf-8")
    atomic_write_bytes(os.path.join(artifact_dir, model_filename), blob)
    atomic_write_bytes(os.path.join(artifact_dir, code_filename), packed)
    sizes = {"code_bytes": len(packed), "model_bytes": len(blob), "artifact_bytes": len(packed) + len(blob)}
    sizes["artifact_limit_ok"] = sizes["artifact_bytes"] <= limit_bytes
    if log is not None:
        log(f"Code size (minified+brotli+base85): {sizes['code_bytes']} bytes")
        log(f"Serialized model quantized+{codec}: {sizes['model_bytes']} bytes")
        log(f"Total submission size quantized+{codec}: {sizes['artifact_bytes']} bytes"
            + ("" if sizes["artifact_limit_ok"] else f" EXCEEDS LIMIT {limit_bytes}"))
    return sizes


def read_artifact_timed(path):
    """(container, seconds spent reading, decompressing and checking the file): the decompression
    time a run adds to its reported evaluation time."""
    start = time.perf_counter()
    with open(path, "rb") as handle:
        container = deserialize_artifact(handle.read())
    return container, time.perf_counter() - start


def read_artifact(path):
    return read_artifact_timed(path)[0]


# --- The quantization step of a run --------------------------------------------------------------


@torch.no_grad()
def sample_sequences(model: GPT, rows: int, length: int, temperature: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Model-generated calibration text (PR 1274): `rows` sequences of `length` tokens sampled from
    the model itself, each starting with BOS. Uses no data at all, so it cannot leak validation tokens.
    Every step re-runs the prefix (no KV cache): calibration is short, the forward stays the shared one."""
    device = next(model.parameters()).device
    tokens = torch.full((rows, 1), BOS_ID, dtype=torch.long, device=device)
    for _ in range(length - 1):
        logits = model.forward_logits(tokens)[:, -1].float()
        probabilities = torch.softmax(logits / temperature, dim=-1)
        following = torch.multinomial(probabilities.cpu(), 1, generator=generator).to(device)
        tokens = torch.cat([tokens, following], dim=1)
    return tokens


class CalibrationWindows:
    """GPTQ calibration rows as PR 1736/1855 draw them (GPTQ_CALIBRATION_SOURCE=windows): windows of
    seq_len + 1 tokens from this rank's share of the training shards (paths[rank::world]; a rank left
    without one takes paths[rank % len]). Each shard is cut into windows at a random phase, in random
    order; a row comes from a shard drawn with probability proportional to the windows it has left, and
    when all are used every shard is cut again. numpy PCG64 seeded with the rank, as PR 1855."""

    def __init__(self, paths: list[str], vocab_size: int, seq_len: int, rank: int, world_size: int):
        self.paths = paths[rank::world_size] or [paths[rank % len(paths)]]
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.token_counts = [shard_token_count(path) for path in self.paths]
        self.shards: dict[int, np.ndarray] = {}  # memory maps, opened on first use
        self.starts = [self._cut(count) for count in self.token_counts]
        if not any(self.starts):
            raise ValueError(f"TRAIN_FILES: no shard of rank {rank} holds a calibration window of "
                             f"TRAIN_SEQ_LEN={seq_len} + 1 tokens")

    def _cut(self, token_count: int) -> list[int]:
        """Window starts of one shard, in the order they are popped (from the end)."""
        max_phase = min(self.seq_len - 1, max(0, token_count - self.seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        windows = max((token_count - 1 - phase) // self.seq_len, 0)
        return (phase + self.rng.permutation(windows) * self.seq_len).tolist()

    def batch(self, rows: int) -> torch.Tensor:
        """[rows, seq_len] input ids (the window's last token is only a target, unused by calibration)."""
        left = np.array([len(starts) for starts in self.starts], dtype=np.float64)
        out = np.empty((rows, self.seq_len), dtype=np.int64)
        for row in range(rows):
            if left.sum() <= 0:
                self.starts = [self._cut(count) for count in self.token_counts]
                left = np.array([len(starts) for starts in self.starts], dtype=np.float64)
            shard = int(self.rng.choice(len(self.paths), p=left / left.sum()))
            start = self.starts[shard].pop()
            left[shard] -= 1
            if shard not in self.shards:
                self.shards[shard] = np.memmap(self.paths[shard], dtype="<u2", mode="r",
                                               offset=SHARD_HEADER_INTS * 4, shape=(self.token_counts[shard],))
            window = np.asarray(self.shards[shard][start: start + self.seq_len], dtype=np.int64)
            check_token_ids(window, self.vocab_size, self.paths[shard])
            out[row] = window
        return torch.from_numpy(out)


def calibration_batches(h: Hyperparameters, model: GPT, context: RunContext,
                        time_left: Callable[[], float]) -> Iterator[torch.Tensor]:
    """Yield GPTQ calibration inputs of a micro-batch's rows each: random windows of this rank's training
    shards (GPTQ_CALIBRATION_SOURCE=windows), the first TRAINING micro-batches (train), or
    model-sampled sequences (generated); validation data is never read here. Stops early, before a batch that would not fit `time_left()`, so
    training plus calibration never exceeds MAX_WALLCLOCK_SECONDS (the challenge counts calibration as
    training). Every rank yields the same number of batches, because collect_hessians all-reduces."""
    rank, world = distributed_info()
    config = h.quant
    if config.gptq_calibration_source == "generated":
        generator = torch.Generator().manual_seed(h.run.seed * 1000 + rank)
        rows = h.data.batch_layout(world)[1]

        def produce() -> torch.Tensor:
            return sample_sequences(model, rows, config.gptq_generated_seq_len, config.gptq_generated_temperature,
                                    generator)
    elif config.gptq_calibration_source == "windows":
        windows = CalibrationWindows(shard_paths(h.data.train_glob, "TRAIN_FILES"), h.model.vocab_size,
                                     h.data.train_seq_len, rank, world)
        rows = h.data.batch_layout(world)[1]

        def produce() -> torch.Tensor:
            return windows.batch(rows).to(context.device)
    else:
        loader = context.make_train_loader()
        pending = []

        def produce() -> torch.Tensor:
            if not pending:
                pending.extend(inputs for inputs, _ in loader.next_step())
            return pending.pop(0)
    # before the first batch is timed, a training micro-batch (forward + backward, same size) stands in
    # for its cost; a generated batch costs more and is timed from the first one on
    slowest = context.micro_step_seconds
    for index in range(config.gptq_calibration_batches):
        remaining, = rank0_decides([time_left()], context.device)  # all ranks take part in the same all-reduces
        if remaining < 2 * slowest:  # `slowest` spans producing a batch and its Hessian forward; 2x margin
            context.log(f"quant: calibration stopped after {index} of {config.gptq_calibration_batches} batches "
                        f"(wallclock cap)")
            return
        started = context.clock()
        batch = produce()
        yield batch
        slowest = max(slowest, context.clock() - started)


def calibrate(h: Hyperparameters, model: GPT, context: RunContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """GPTQ Hessians within what the timed training left of MAX_WALLCLOCK_SECONDS (compile warm-up is not
    timed, as upstream), and the summary fields that prove the cap held."""
    start = context.clock()
    deadline = math.inf
    if h.optim.max_wallclock_seconds > 0 and context.training_start is not None:
        deadline = start + h.optim.max_wallclock_seconds - context.train_time_s
    hessians, call_counts = {}, {}
    if h.quant.quant_scheme == "gptq":
        batches = calibration_batches(h, model, context, lambda: deadline - context.clock())
        hessians = collect_hessians(model, batches, call_counts=call_counts)
    calibration_time = context.clock() - start
    context.log(f"quant: {h.quant.gptq_calibration_source} calibration, {len(hessians)} Hessians from up to "
                f"{max(call_counts.values(), default=0)} forward calls in {calibration_time:.2f}s")
    fields = {"gptq_calibration_time_s": round(calibration_time, 3)}
    if context.training_start is not None:
        total = context.train_time_s + calibration_time
        cap = h.optim.max_wallclock_seconds
        budget_ok = cap <= 0 or total <= cap
        fields.update(train_plus_calibration_s=round(total, 3), train_time_ok=budget_ok)
        context.log(f"train_time + calibration: {total:.2f}s (cap {cap:.0f}s, ok:{budget_ok})")
    return hessians, fields


def quantize_and_write_artifact(h: Hyperparameters, model: GPT, context: RunContext) -> tuple[dict[str, Any], GPT]:
    """Collect Hessians, quantize the (EMA) weights, write the artifact (rank 0), then load the model
    back FROM THE WRITTEN FILE on every rank: what is evaluated is exactly what is submitted.
    Returns the summary fields and the quantized model."""
    model.set_recurrence(h.model.recurrence_enabled)  # looped layers must see their looped inputs
    hessians, fields = calibrate(h, model, context)
    sizes = [None]
    if context.rank == 0:
        quant_start = context.clock()
        container = quantize_model_state(model.state_dict(), hessians, h.quant, log=context.log)
        sizes[0] = write_artifact(context.artifact_dir, container, os.path.abspath(__file__),
                                  codec=h.quant.quant_compressor, shuffle=h.quant.quant_byte_shuffle,
                                  limit_bytes=h.quant.artifact_limit_bytes, log=context.log)
        sizes[0]["quantize_time_s"] = round(context.clock() - quant_start, 3)
    if context.world_size > 1:
        dist.broadcast_object_list(sizes, src=0)  # also a barrier: the file exists once this returns
    quantized = copy.deepcopy(model)
    container, decode_s = read_artifact_timed(os.path.join(context.artifact_dir, "final_model.ptz"))
    load_quantized_into(quantized, container)
    quantized.set_recurrence(h.model.recurrence_enabled)
    context.log(f"artifact decode: {decode_s:.2f}s (counted in eval_time)")
    return dict(fields, **sizes[0], artifact_decode_s=round(decode_s, 3)), quantized


# -----------------------------------------------------------------------------
# Evaluation and test-time training (TTT)
#
# The score is bits per byte of the ORIGINAL text, so tokenizers of any vocabulary compare fairly:
# sum of per-token NLL (nats) over scored tokens / ln 2 / sum of those tokens' original UTF-8 bytes.
# Every document starts with BOS (id 1). Every token of the stream after its first is a target and is
# scored exactly once, in every mode; that includes each BOS that starts the next document (its target
# means "the previous document ended") at 0 bytes, as the challenge's flat-stream eval and the
# phased-TTT records score it. The stream's first token is never a target. Four modes share one model
# forward (`per_token_nll`): plain rows, sliding windows, chunked score-first SGD TTT (PR 1493/1812)
# and phased per-document LoRA TTT (PR 1736). The TTT drivers are written so that the order "score a
# token, then (maybe) train on it" is visible in one short loop and can be recorded through an
# `audit(event, positions)` callback; the tests use it: ("score", stream positions whose NLL was just
# recorded), ("update", every stream position the update's forward read), and with NGRAM_TILT
# ("ngram_update" / "ngram_own_update", targets entering the n-gram counts).
# Work is split across ranks with torch.distributed (sums all-reduced); no files are shared.
# -----------------------------------------------------------------------------

LORA_SITES = ("q", "k", "v", "o", "mlp", "head")


# --- validation data: tokens, byte counts per token, document boundaries ---------------------


def val_sidecar_path(shard_path: str) -> str:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin (same folder)."""
    folder, name = os.path.split(shard_path)
    if not name.startswith("fineweb_val_"):
        raise ValueError(f"{shard_path}: val shards must be named fineweb_val_%06d.bin")
    return os.path.join(folder, "fineweb_val_bytes_" + name[len("fineweb_val_"):])


def piece_byte_tables(sentencepiece_model, vocab_size: int):
    """Per-token byte tables of the SentencePiece byte rule, for shards without a sidecar.

    Returns (base_bytes int64[V], has_leading_space bool[V], is_boundary bool[V]): a token counts
    base_bytes (piece UTF-8 length without the leading "\u2581"; byte-fallback pieces 1), plus 1
    if it has a leading space and the previous token is not a boundary (control/unknown/unused,
    which includes BOS). `sentencepiece_model` is a path or a SentencePieceProcessor.
    """
    if isinstance(sentencepiece_model, (str, os.PathLike)):
        import sentencepiece  # lazy: only needed for challenge shards without a byte sidecar

        sentencepiece_model = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    processor = sentencepiece_model
    if processor.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer has {processor.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    base_bytes = np.zeros(vocab_size, dtype=np.int64)
    has_leading_space = np.zeros(vocab_size, dtype=bool)
    is_boundary = np.ones(vocab_size, dtype=bool)
    for token_id in range(vocab_size):
        if processor.is_control(token_id) or processor.is_unknown(token_id) or processor.is_unused(token_id):
            continue  # boundary token, 0 bytes
        is_boundary[token_id] = False
        if processor.is_byte(token_id):
            base_bytes[token_id] = 1
            continue
        piece = processor.id_to_piece(token_id)
        if piece.startswith("\u2581"):
            has_leading_space[token_id] = True
            piece = piece[1:]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return base_bytes, has_leading_space, is_boundary


def piece_byte_counts(tokens: np.ndarray, tables) -> np.ndarray:
    """Bytes attributed to each token of a stream by the piece rule (the first token's predecessor
    counts as a boundary)."""
    base_bytes, has_leading_space, is_boundary = tables
    tokens = np.asarray(tokens, dtype=np.int64)
    previous_is_boundary = np.ones(tokens.shape, dtype=bool)
    previous_is_boundary[1:] = is_boundary[tokens[:-1]]
    return base_bytes[tokens] + (has_leading_space[tokens] & ~previous_is_boundary)


def find_documents(tokens: np.ndarray):
    """(starts, lengths) of the documents of a stream; each starts at a BOS and includes it."""
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == BOS_ID)
    if starts.size == 0:
        raise ValueError(
            "validation stream has no BOS (id 1) markers: documents cannot be found. Rebuild the val "
            "shards with a BOS before every document (prepare_caseops_data.py does this).")
    if starts[0] != 0:
        raise ValueError(f"validation stream must start with BOS (id 1); first token is {int(tokens[0])}")
    lengths = np.diff(np.append(starts, tokens.size))
    return starts.astype(np.int64), lengths.astype(np.int64)


@dataclass
class ValData:
    tokens: torch.Tensor  # int64 [N], the concatenated documents
    byte_counts: torch.Tensor  # int64 [N], original UTF-8 bytes attributed to each token (BOS: 0)
    doc_starts: np.ndarray  # int64 [D], stream position of each document's BOS
    doc_lengths: np.ndarray  # int64 [D], tokens per document including its BOS

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts.size)

    def to(self, device) -> "ValData":
        return ValData(self.tokens.to(device), self.byte_counts.to(device), self.doc_starts, self.doc_lengths)

    def target_ends(self, doc_ids: np.ndarray) -> np.ndarray:
        """Stream position just after each document's last target. A document's targets are its own
        tokens after its BOS, then the BOS that starts the next document (the last document has none)."""
        return np.minimum(self.doc_starts[doc_ids] + self.doc_lengths[doc_ids] + 1, self.num_tokens)


def make_val_data(tokens, byte_counts, vocab_size: int | None = None, max_docs: int | None = None) -> ValData:
    """Validate a token stream and its per-token byte counts; optionally keep only the first max_docs."""
    tokens = np.asarray(tokens, dtype=np.int64)
    byte_counts = np.asarray(byte_counts, dtype=np.int64)
    if tokens.shape != byte_counts.shape:
        raise ValueError(f"{tokens.size} tokens but {byte_counts.size} byte counts")
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"val token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")
    doc_starts, doc_lengths = find_documents(tokens)
    if max_docs is not None and max_docs < doc_starts.size:
        end = int(doc_starts[max_docs])
        tokens, byte_counts = tokens[:end], byte_counts[:end]
        doc_starts, doc_lengths = doc_starts[:max_docs], doc_lengths[:max_docs]
    return ValData(torch.from_numpy(tokens.copy()), torch.from_numpy(byte_counts.copy()), doc_starts, doc_lengths)


def user_defined_piece_count(model_proto: bytes) -> int:
    """How many pieces of a SentencePiece model are USER_DEFINED (the CaseOps operators are), read from
    the ModelProto bytes: the Python API has no is_user_defined. The pieces are the proto's first
    fields (field 1, one message each); a piece's type (field 3, varint; USER_DEFINED = 4) is serialized
    last in its message, so a user-defined piece ends with the bytes 0x18 0x04."""
    def varint(position: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = model_proto[position]
            value, shift, position = value | (byte & 0x7F) << shift, shift + 7, position + 1
            if byte < 0x80:
                return value, position

    count, position = 0, 0
    while position < len(model_proto) and model_proto[position] == 0x0A:  # field 1, length-delimited
        length, position = varint(position + 1)
        position += length
        count += model_proto[position - 2: position] == b"\x18\x04"
    return count


def check_manifest_sha256(path: str) -> None:
    """A file in a folder with a prepare_caseops_data.py manifest.json must be listed there with this
    sha256 (the manifest records every shard and sidecar it wrote), so an edited or swapped val file is
    refused instead of silently changing val_bpb. Folders without a manifest are not checked."""
    manifest_path = os.path.join(os.path.dirname(path), "manifest.json")
    if not os.path.exists(manifest_path):
        return
    with open(manifest_path) as handle:
        expected = {record["name"]: record["sha256"] for record in json.load(handle).get("files", [])}
    with open(path, "rb") as handle:
        if expected and expected.get(os.path.basename(path)) != hashlib.sha256(handle.read()).hexdigest():
            raise ValueError(f"{path}: sha256 differs from {manifest_path}")


def load_val_data(pattern: str, vocab_size: int, tokenizer_path: str | None = None,
                  max_docs: int | None = None) -> ValData:
    """Load val shards (sorted glob) with their byte sidecars, or the piece rule when none exists.
    Every file is checked against the folder's manifest.json if there is one. The piece rule is refused
    for a tokenizer with user-defined pieces: it would count each CaseOps operator as its 3 UTF-8 bytes,
    though an operator stands for no original byte (val_bpb ~7% too low)."""
    shard_paths = sorted(glob.glob(pattern))
    if not shard_paths:
        raise FileNotFoundError(f"no validation shards match {pattern!r} (DATA_PATH)")
    sidecars = [val_sidecar_path(path) for path in shard_paths]
    present = [os.path.exists(path) for path in sidecars]
    if any(present) and not all(present):
        missing = [path for path, ok in zip(sidecars, present) if not ok]
        raise FileNotFoundError(f"byte sidecar missing for some val shards: {missing}")
    token_parts, byte_parts = [], []
    for path in shard_paths + sidecars:
        if os.path.exists(path):
            check_manifest_sha256(path)
    for shard_path, sidecar_path, has_sidecar in zip(shard_paths, sidecars, present):
        shard_tokens = read_shard(shard_path)
        token_parts.append(shard_tokens)
        if has_sidecar:
            shard_bytes = read_shard(sidecar_path)
            if shard_bytes.size != shard_tokens.size:
                raise ValueError(f"{sidecar_path}: {shard_bytes.size} byte entries but its shard "
                                 f"{shard_path} has {shard_tokens.size} tokens")
            byte_parts.append(shard_bytes)
    tokens = np.concatenate(token_parts).astype(np.int64)
    if all(present):
        byte_counts = np.concatenate(byte_parts).astype(np.int64)
    elif tokenizer_path:
        with open(tokenizer_path, "rb") as handle:
            if user_defined_piece_count(handle.read()):
                raise ValueError(f"TOKENIZER_PATH={tokenizer_path}: the piece rule miscounts its user-defined "
                                 f"pieces (CaseOps operators); use val byte sidecars")
        byte_counts = piece_byte_counts(tokens, piece_byte_tables(tokenizer_path, vocab_size))
    else:
        raise FileNotFoundError("val shards have no byte sidecar and no TOKENIZER_PATH was given for the piece rule")
    try:
        return make_val_data(tokens, byte_counts, vocab_size=vocab_size, max_docs=max_docs)
    except ValueError as error:
        raise ValueError(f"val shards {pattern}: {error}") from None


# --- score accounting: float64 sums, all-reduced across ranks ---------------------------------


def bits_per_byte(nll_sum_nats: float, byte_sum: float) -> float:
    return float(nll_sum_nats) / math.log(2.0) / float(byte_sum)


def _all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _all_gather_1d(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank (rank order)."""
    rank, world = distributed_info()
    if world == 1:
        return tensor
    length = torch.tensor([tensor.numel()], device=tensor.device, dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(x) for x in lengths))
    padded = torch.zeros(longest, device=tensor.device, dtype=tensor.dtype)
    padded[: tensor.numel()] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths)])


class TokenScores:
    """The NLL of every token this rank scored, keyed by stream position (the target's index)."""

    def __init__(self, val: ValData):
        self.val = val
        self.positions: list[torch.Tensor] = []
        self.nlls: list[torch.Tensor] = []

    def add(self, positions: torch.Tensor, nll: torch.Tensor) -> None:
        self.positions.append(positions.detach().reshape(-1))
        self.nlls.append(nll.detach().reshape(-1).float())

    def summarize(self, mode: str, started_at: float, keep_token_scores: bool = False, **extra) -> dict:
        """All-reduce (nll_sum, tokens, bytes) in float64 and return the mode's result dict."""
        device = self.val.tokens.device
        positions = torch.cat(self.positions) if self.positions else torch.zeros(0, dtype=torch.int64, device=device)
        nll = torch.cat(self.nlls) if self.nlls else torch.zeros(0, dtype=torch.float32, device=device)
        sums = torch.stack([
            nll.to(torch.float64).sum(),
            torch.tensor(float(positions.numel()), dtype=torch.float64, device=device),
            self.val.byte_counts[positions].to(torch.float64).sum(),
            (self.val.tokens[positions] == BOS_ID).to(torch.float64).sum(),
        ])
        _all_reduce_(sums)
        nll_sum, token_count, byte_sum, bos_targets = (float(x) for x in sums.tolist())
        if token_count == 0 or byte_sum == 0:
            raise ValueError(f"{mode}: nothing was scored ({int(token_count)} tokens, {int(byte_sum)} bytes)")
        result = {
            "mode": mode,
            "val_loss": nll_sum / token_count,
            "val_bpb": bits_per_byte(nll_sum, byte_sum),
            "scored_tokens": int(token_count),
            "scored_bytes": int(byte_sum),
            "bos_targets": int(bos_targets),
            "eval_time_s": time.perf_counter() - started_at,
            **extra,
        }
        if keep_token_scores:  # every rank receives every rank's tokens (for SAVE_TOKEN_NLL and audits)
            result["token_positions"] = _all_gather_1d(positions).cpu().numpy()
            result["token_nll"] = _all_gather_1d(nll).cpu().numpy()
        return result


def _time_is_up(deadline: float | None, device) -> bool:
    """True once the eval budget is spent; all ranks agree (any rank over -> all stop)."""
    if deadline is None:
        return False
    over = torch.tensor([1.0 if time.perf_counter() > deadline else 0.0], device=device)
    return bool(_all_reduce_(over, dist.ReduceOp.MAX) > 0)


# --- causal token n-gram tilt (PR 1514 / 2130 / 2135; token channel only) ----------------------
# Each scored distribution p is tilted toward one hint token h of a token n-gram model:
# p'(a) = p(a) exp(beta [a == h]) / Z, Z = sum over all V of p(a) exp(beta [a == h]) = 1 + p(h)(e^beta - 1).
# The n-gram counts hold ONLY targets whose scores were already recorded: a scoring call looks up
# the state as it was before the call, and its targets are added after their scores (audit event
# "ngram_update"). With several ranks, each rank adds its own targets at once and the other ranks'
# at the end of the round (one scoring call, or one document batch, per rank), by all_gather; the
# counts do not depend on the order of additions, so every rank holds the same state and the scores
# do not depend on timing. Contexts never reach back past the document that precedes the target.
# The within-word and word-start channels of PR 1420 are left out: they read the target (review of
# PR 1420/1967).

NGRAM_HASH_BASE, NGRAM_HASH_MOD = 1_000_003, 2**31 - 1  # polynomial hash of a context, mod a prime
NGRAM_KEY_SCALE = 65536  # best_key = count * 65536 + (65535 - token): argmax count, ties -> smallest id


def ngram_tilt(log_probs: torch.Tensor, hints: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """log p [N, V] -> log p' [N, V]: add betas[n] to the hint's entry (hint -1: none) and
    renormalize with a logsumexp over all V entries."""
    has_hint = hints >= 0
    bonus = torch.zeros_like(log_probs)
    rows = torch.arange(log_probs.shape[0], device=log_probs.device)[has_hint]
    bonus[rows, hints[has_hint]] = betas[has_hint].to(bonus.dtype)
    tilted = log_probs + bonus
    return tilted - torch.logsumexp(tilted, dim=-1, keepdim=True)


def tilted_nll(target_nll: torch.Tensor, hint_nll: torch.Tensor, hit: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """-log p'(target) from the model's NLL of the target and of the hint (any shape; beta 0 where
    there is no hint): the closed form of `ngram_tilt`, log Z = log(1 + p(h)(e^beta - 1)), exact
    because the model's p sums to 1 over the vocabulary."""
    log_z = torch.log1p(torch.exp(-hint_nll) * torch.expm1(betas))
    return target_nll - betas * hit.to(betas.dtype) + log_z


def ngram_hint_rule(order: int) -> tuple[float, int]:
    """(least confidence, least context count) for a hint from a context of this order: longer
    contexts are trusted sooner (PR 1514's schedule)."""
    if order <= 10:
        return 0.70, 3
    return (0.60, 2) if order <= 13 else (0.50, 2)


def ngram_context_hashes(tokens: torch.Tensor, positions: torch.Tensor, orders: list[int]) -> list[torch.Tensor]:
    """For each order k, the hash of tokens[p - k : p] at each target position p (any shape), built
    newest token first so that every order extends the shorter one; callers mask the positions whose
    context is not available."""
    hashes, power, by_order = torch.zeros_like(positions), 1, {}
    for back in range(1, max(orders) + 1):
        token = tokens[(positions - back).clamp_min(0)]
        hashes = (hashes + (token + 1) * power) % NGRAM_HASH_MOD
        power = power * NGRAM_HASH_BASE % NGRAM_HASH_MOD
        by_order[back] = hashes
    return [by_order[order] for order in orders]


class NgramCounts:
    """Hashed token n-gram counts, one table per context order, over `slots` independent tables
    (the shared counts: 1 slot; a document batch's own counts: one slot per document). Counts are
    sums, so the tables are a function of the SET of targets added, not of the order of additions."""

    def __init__(self, num_orders: int, slots: int, table_bits: int, device):
        self.size = 1 << table_bits
        shape = (num_orders, slots * self.size)
        self.context_count = torch.zeros(shape, dtype=torch.int32, device=device)
        self.pair_count = torch.zeros(shape, dtype=torch.int32, device=device)
        self.best_key = torch.zeros(shape, dtype=torch.int64, device=device)  # argmax count, ties -> smallest id

    def add(self, index: int, hashes: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor) -> None:
        context_buckets, pair_buckets = self.buckets(hashes, tokens, slots)
        ones = torch.ones(context_buckets.shape, dtype=torch.int32, device=context_buckets.device)
        self.context_count[index].index_add_(0, context_buckets, ones)
        self.pair_count[index].index_add_(0, pair_buckets, ones)
        keys = self.pair_count[index][pair_buckets].long() * NGRAM_KEY_SCALE + (NGRAM_KEY_SCALE - 1 - tokens)
        self.best_key[index].scatter_reduce_(0, context_buckets, keys, reduce="amax")

    def buckets(self, hashes: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor):
        pair_hashes = (hashes * NGRAM_HASH_BASE + tokens + 1) % NGRAM_HASH_MOD
        return hashes % self.size + slots * self.size, pair_hashes % self.size + slots * self.size

    def lookup(self, index: int, hashes: torch.Tensor, slots: torch.Tensor):
        """(context count, best next token or -1) of each context."""
        context_buckets = hashes % self.size + slots * self.size
        key = self.best_key[index][context_buckets]
        best = torch.where(key > 0, NGRAM_KEY_SCALE - 1 - key % NGRAM_KEY_SCALE, -1)
        return self.context_count[index][context_buckets], best

    def pair(self, index: int, hashes: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Count of (context, token); 0 where token is -1."""
        _, pair_buckets = self.buckets(hashes, tokens.clamp_min(0), slots)
        return torch.where(tokens >= 0, self.pair_count[index][pair_buckets], 0)


class NgramTilt:
    """The tilt's n-gram state. Two kinds of counts, both holding only targets already scored, and
    filled at points fixed by the data, not by timing (so a score never depends on how fast a rank ran):
    - shared: every target scored before the last `barrier()`, identical on all ranks (all_gather).
      Plain / sliding / chunked-TTT scoring: a barrier after each round (rounds are stream-contiguous
      blocks of windows, so the counts also hold only earlier tokens). Phased TTT: a barrier at each
      phase pause, when every document before it in the longest-first queue is scored on every rank
      (those documents may lie anywhere in the stream; each was scored before any score that uses it);
    - per document (phased TTT): a document's own targets, added right after each chunk is scored
      (`add_own`), one table per document of the batch, so documents never see each other's.
    A hint is the best next token of the longest confident context (PR 1514's schedule); with both
    kinds, the better of the two tables' best tokens by their summed counts."""

    def __init__(self, val: ValData, max_order: int, min_order: int, beta: float, audit: Callable | None = None,
                 table_bits: int | None = None):
        self.val, self.beta, self.audit = val, beta, audit
        self.orders = list(range(max_order, min_order - 1, -2))
        # buckets per order: about four per val token, 2^16..2^26 (PR 1514: 2^26); a collision merges two
        # contexts' counts (still causal, only a weaker hint)
        self.fixed_bits = table_bits  # tests fix the size of every table (no collisions)
        table_bits = table_bits or min(26, max(16, math.ceil(math.log2(4 * val.num_tokens))))
        self.doc_starts = torch.as_tensor(val.doc_starts, dtype=torch.int64, device=val.tokens.device)
        self.shared = NgramCounts(len(self.orders), 1, table_bits, val.tokens.device)
        self.own: NgramCounts | None = None
        self.pending: list[torch.Tensor] = []  # this rank's scored targets since the last barrier
        self.hinted = 0  # scored targets that got a hint (callers count them)

    @classmethod
    def from_config(cls, config: EvalSettings, val: ValData, audit: Callable | None = None) -> "NgramTilt | None":
        if not config.ngram_tilt:
            return None
        return cls(val, config.ngram_tilt_max_order, config.ngram_tilt_min_order, config.ngram_tilt_beta, audit)

    def _context_lengths(self, positions: torch.Tensor) -> torch.Tensor:
        """Tokens available as context of target p: back to the BOS of the document holding p - 1."""
        doc = torch.searchsorted(self.doc_starts, positions - 1, right=True) - 1
        return positions - self.doc_starts[doc.clamp_min(0)]

    def begin_documents(self, num_docs: int, longest: int) -> None:
        """Fresh per-document tables for a batch of documents (row b of later calls = document b)."""
        bits = self.fixed_bits or min(16, max(10, math.ceil(math.log2(8 * max(longest, 1)))))
        self.own = NgramCounts(len(self.orders), num_docs, bits, self.doc_starts.device)

    def hints(self, positions: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hint id or -1, beta or 0) for target positions [N] of batch rows [N] (= documents, for
        their own counts) from the counts as they are now."""
        available = self._context_lengths(positions)
        zero = torch.zeros_like(positions)
        hint = torch.full_like(positions, -1)
        beta = torch.zeros(positions.shape, dtype=torch.float32, device=positions.device)
        all_hashes = ngram_context_hashes(self.val.tokens, positions, self.orders)
        for index, (order, hashes) in enumerate(zip(self.orders, all_hashes)):
            min_confidence, min_count = ngram_hint_rule(order)
            total, best = self.shared.lookup(index, hashes, zero)
            count = self.shared.pair(index, hashes, best, zero)
            if self.own is not None:
                own_total, own_best = self.own.lookup(index, hashes, rows)
                total = total + own_total
                count = count + self.own.pair(index, hashes, best, rows)
                other = self.shared.pair(index, hashes, own_best, zero) + self.own.pair(index, hashes, own_best, rows)
                better = (other > count) | ((other == count) & (own_best >= 0) & ((best < 0) | (own_best < best)))
                best, count = torch.where(better, own_best, best), torch.where(better, other, count)
            confidence = count.float() / total.clamp_min(1).float()
            use = (hint < 0) & (best >= 0) & (available >= order) & (total >= min_count) & (confidence >= min_confidence)
            hint = torch.where(use, best, hint)
            beta = torch.where(use, self.beta * confidence, beta)
        return hint, beta

    def _add(self, counts: NgramCounts, positions: torch.Tensor, slots: torch.Tensor, event: str) -> None:
        if self.audit is not None and positions.numel():
            self.audit(event, positions.cpu().numpy())
        available = self._context_lengths(positions)
        tokens = self.val.tokens[positions]
        all_hashes = ngram_context_hashes(self.val.tokens, positions, self.orders)
        for index, (order, hashes) in enumerate(zip(self.orders, all_hashes)):
            use = available >= order
            counts.add(index, hashes[use], tokens[use], slots[use])

    def scored(self, positions: torch.Tensor) -> None:
        """Targets whose scores this rank just recorded: they join the shared counts at the next barrier."""
        self.pending.append(positions.reshape(-1))

    def add_own(self, positions: torch.Tensor, in_chunk: torch.Tensor) -> None:
        """A just-scored chunk [B, W] (mask `in_chunk`) joins its own document's counts."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        self._add(self.own, positions[in_chunk], rows[in_chunk], "ngram_own_update")

    def barrier(self) -> None:
        """Collective: every rank's targets scored since the last barrier join the shared counts."""
        mine = torch.cat(self.pending) if self.pending else torch.zeros(0, dtype=torch.int64,
                                                                         device=self.doc_starts.device)
        self.pending = []
        every = _all_gather_1d(mine) if distributed_info()[1] > 1 else mine
        self._add(self.shared, every, torch.zeros_like(every), "ngram_update")


def _model_and_scored_nll(model: GPT, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor,
                          scored: torch.Tensor, lora: Any = None,
                          ngram: NgramTilt | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(model NLL, scored NLL), each [B, W]: the same tensor without the tilt; with it, the scored
    NLL is the tilted one (from the counts before this call) and training keeps the model's.
    `scored` [B, W] marks the targets that will be recorded (the only ones tilted)."""
    if ngram is None:
        nll = model.per_token_nll(inputs, targets, lora=lora)
        return nll, nll
    rows = torch.nonzero(scored, as_tuple=True)[0]
    hints = torch.full_like(positions, -1)
    betas = torch.zeros(positions.shape, dtype=torch.float32, device=positions.device)
    hints[scored], betas[scored] = ngram.hints(positions[scored], rows)  # only the targets that are scored
    ngram.hinted += int((hints >= 0).sum())
    both = model.per_token_nll(inputs, torch.stack([targets, hints.clamp_min(0)], dim=-1), lora=lora)  # [B, W, 2]
    nll = both[..., 0]
    return nll, tilted_nll(nll.detach(), both[..., 1].detach(), hints == targets, betas)


def _tilt_extra(ngram: NgramTilt | None) -> dict:
    """Result fields of the n-gram tilt: scored targets that got a hint, all ranks (collective)."""
    if ngram is None:
        return {}
    hinted = _all_reduce_(torch.tensor([float(ngram.hinted)], dtype=torch.float64, device=ngram.doc_starts.device))
    return {"ngram_tilt_hinted": int(hinted.item())}


# --- windows: which tokens a forward sees, and which of its targets it scores -----------------
# A window is (input_start, input_length, first_scored): inputs tokens[s : s+n], targets
# tokens[s+1 : s+n+1]; targets at window index >= first_scored are scored (BOS targets too).


def plain_windows(num_tokens: int, seq_len: int) -> np.ndarray:
    """Non-overlapping rows of seq_len inputs; every target scored with the context before it in its row."""
    starts = np.arange(0, num_tokens - 1, seq_len, dtype=np.int64)
    lengths = np.minimum(seq_len, num_tokens - 1 - starts)
    return np.stack([starts, lengths, np.zeros_like(starts)], axis=1)


def sliding_windows(first_target: int, end_target: int, context: int, stride: int) -> np.ndarray:
    """Windows scoring targets [first_target, end_target) in blocks of `stride`, each block seen
    with up to `context` tokens of left context (the first block grows to use all of it)."""
    if end_target <= first_target:
        return np.zeros((0, 3), dtype=np.int64)
    first_end = min(max(first_target + stride, context + 1), end_target)
    block_ends = np.append(np.arange(first_end, end_target, stride, dtype=np.int64), end_target)
    block_ends = np.unique(block_ends)
    block_starts = np.concatenate([[first_target], block_ends[:-1]])
    input_starts = np.maximum(0, block_ends - 1 - context)
    return np.stack([input_starts, block_ends - 1 - input_starts, block_starts - 1 - input_starts], axis=1)


def _window_positions(windows: np.ndarray) -> np.ndarray:
    """All stream positions (inputs and targets) that a set of windows reads."""
    return np.unique(np.concatenate([np.arange(s, s + n + 1) for s, n, _ in windows]))


def _rank_slice(items, rank: int, world: int):
    """Contiguous share of a sequence for one rank."""
    count = len(items)
    return items[count * rank // world: count * (rank + 1) // world]


def padded_batch(windows: np.ndarray, rows: int) -> np.ndarray:
    """`windows` with empty windows (length 0: all BOS, nothing scored or trained) appended up to `rows`:
    with batches padded to a fixed [rows, width], a compiled eval sees one shape per mode, the one its
    warm-up compiled (a short last batch would otherwise compile inside the timed eval)."""
    padding = np.zeros((max(rows - len(windows), 0), windows.shape[1]), dtype=windows.dtype)
    padding[:, 0] = 1  # any valid start; the length of 0 keeps every position outside the window
    return np.concatenate([windows, padding])


def ttt_step_rows(chunk_tokens: int, seq_len: int, rows_per_step: int, world_size: int) -> int:
    """Rows of one rank's forward in a weight-training step on chunks of chunk_tokens targets (chunked
    TTT, global SGD): every trained chunk is full-size (the last chunk is never trained)."""
    return -(-min(rows_per_step, -(-chunk_tokens // seq_len)) // world_size)


def gather_windows(val: ValData, windows: np.ndarray, width: int | None = None):
    """Windows [B, 3] -> (inputs, targets, target positions, inside, scored), each [B, W], padded with
    BOS past each window's length; W = `width` or the longest window."""
    device = val.tokens.device
    windows_t = torch.as_tensor(windows, dtype=torch.int64, device=device)
    starts, lengths, first_scored = windows_t[:, 0:1], windows_t[:, 1:2], windows_t[:, 2:3]
    width = int(lengths.max()) if width is None else width
    offsets = torch.arange(width, device=device).unsqueeze(0)  # [1, W]
    inside = offsets < lengths  # [B, W]
    input_positions = (starts + offsets).clamp(max=val.num_tokens - 2)
    inputs = torch.where(inside, val.tokens[input_positions], BOS_ID)
    targets = torch.where(inside, val.tokens[input_positions + 1], BOS_ID)
    return inputs, targets, input_positions + 1, inside, inside & (offsets >= first_scored)


@torch.no_grad()
def _score_windows(model: GPT, val: ValData, windows: np.ndarray, batch_size: int, width: int,
                   scores: TokenScores, audit: Callable | None = None, ngram: NgramTilt | None = None) -> None:
    """Score all `windows` (in stream order) in rounds of batch_size windows per rank: a round is a
    stream-contiguous block, rank r taking its r-th batch, padded to [batch_size, width]; the n-gram
    counts grow between rounds."""
    rank, world = distributed_info()
    for round_start in range(0, len(windows), batch_size * world):
        batch = windows[round_start + rank * batch_size: round_start + (rank + 1) * batch_size]
        if len(batch):
            inputs, targets, positions, _, scored = gather_windows(val, padded_batch(batch, batch_size), width)
            _, nll = _model_and_scored_nll(model, inputs, targets, positions, scored, ngram=ngram)  # [B, W] nats
            scores.add(positions[scored], nll[scored])
            if audit is not None:
                audit("score", positions[scored].cpu().numpy())
            if ngram is not None:
                ngram.scored(positions[scored])
        if ngram is not None:  # the whole round is scored: its targets join the counts
            ngram.barrier()


# --- plain and sliding-window evaluation ------------------------------------------------------


def eval_stream(model: GPT, val: ValData, seq_len: int, batch_size: int, stride: int = 0,
                audit: Callable | None = None, keep_token_scores: bool = False,
                config: EvalSettings | None = None) -> dict:
    """stride 0 ("plain"): rows of seq_len tokens packed back to back, each target scored with the
    context before it in its row. stride > 0 ("sliding"): windows of seq_len tokens advancing by
    stride, only the new targets scored. Either way every target is scored once. `config`: its
    n-gram tilt settings apply (NGRAM_TILT)."""
    started_at = time.perf_counter()
    model.eval()
    scores = TokenScores(val)
    if stride:
        windows, mode, extra = sliding_windows(1, val.num_tokens, seq_len, stride), "sliding", {"stride": stride}
    else:
        windows, mode, extra = plain_windows(val.num_tokens, seq_len), "plain", {}
    ngram = NgramTilt.from_config(config, val, audit) if config is not None else None
    _score_windows(model, val, windows, batch_size, seq_len, scores, audit, ngram)
    return scores.summarize(mode, started_at, keep_token_scores, context=seq_len, **extra, **_tilt_extra(ngram))


# --- weight training on already-scored tokens (chunked TTT and the phase boundaries) ----------


def select_parameters(model: nn.Module, which: str = "all") -> list:
    """"all", or comma-separated substrings of parameter names (e.g. "blocks.9,blocks.10")."""
    named = list(model.named_parameters())
    if which.strip() == "all":
        return [param for _, param in named]
    patterns = [pattern.strip() for pattern in which.split(",") if pattern.strip()]
    chosen = [param for name, param in named if any(pattern in name for pattern in patterns)]
    if not chosen:
        raise ValueError(f"TTT_PARAMS={which!r} matches no parameter name")
    return chosen


def _cosine(base_lr: float, index: int, count: int) -> float:
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * index / max(count, 1)))


def _train_on_targets(model: GPT, val: ValData, first_target: int, end_target: int, seq_len: int,
                      rows_per_step: int, params: list, optimizer: torch.optim.Optimizer, epochs: int = 1,
                      grad_clip: float = 0.0, audit: Callable | None = None) -> None:
    """SGD steps on the targets [first_target, end_target), rows of seq_len. A step's loss is the
    mean over the global batch of rows (each rank's share summed, gradients all-reduced), so any
    number of ranks takes the same steps as one process. A rank's rows are padded to
    [ttt_step_rows, seq_len], the same shape for every step of a full-size chunk."""
    rank, world = distributed_info()
    windows = plain_windows(end_target - first_target + 1, seq_len)
    windows[:, 0] += first_target - 1
    rank_rows = ttt_step_rows(end_target - first_target, seq_len, rows_per_step, world)
    for _ in range(epochs):
        for begin in range(0, len(windows), rows_per_step):
            step_windows = windows[begin: begin + rows_per_step]
            token_count = max(int(step_windows[:, 1].sum()), 1)  # every target of a training row counts
            my_windows = _rank_slice(step_windows, rank, world)
            optimizer.zero_grad(set_to_none=True)
            if len(my_windows):
                inputs, targets, _, _, used = gather_windows(val, padded_batch(my_windows, rank_rows), seq_len)
                with torch.enable_grad():
                    nll = model.per_token_nll(inputs, targets)
                    (nll[used].sum() / token_count).backward()
                if audit is not None:  # every stream position this step's forward read
                    audit("update", _window_positions(my_windows))
            for param in params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            all_reduce_flat_([param.grad for param in params], average=False)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()


class _WeightsRestored:
    """Context: TTT changes weights in place; put them (and requires_grad) back afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(param, param.requires_grad) for param in self.model.parameters()]
        self.saved = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        return self

    def __exit__(self, *exc):
        self.model.load_state_dict(self.saved)
        for param, flag in self.flags:
            param.requires_grad_(flag)
            param.grad = None


# --- chunked score-first SGD TTT (PR 1493 / 1812 / 1755) ---------------------------------------


def eval_ttt_chunked(model: GPT, val: ValData, config: EvalSettings, audit: Callable | None = None,
                     time_budget_s: float | None = None, keep_token_scores: bool = False) -> dict:
    """Score chunk c with sliding windows (no_grad), THEN train on chunk c; the last chunk is
    never trained on. The learning rate follows a cosine across chunks."""
    started_at = time.perf_counter()
    deadline = None if time_budget_s is None else started_at + time_budget_s
    scores = TokenScores(val)
    chunk_starts = list(range(1, val.num_tokens, config.ttt_chunk_tokens))
    score_rows = config.batch_rows(distributed_info()[1])
    ngram = NgramTilt.from_config(config, val, audit)
    updates, stopped_early = 0, False
    with _WeightsRestored(model):
        model.eval()
        params = select_parameters(model, config.ttt_params)
        for param in model.parameters():
            param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=config.ttt_lr, momentum=config.ttt_momentum)
        for chunk_index, first_target in enumerate(chunk_starts):
            end_target = min(first_target + config.ttt_chunk_tokens, val.num_tokens)
            # 1) score every target of the chunk with the weights trained on earlier chunks only
            windows = sliding_windows(first_target, end_target, config.eval_seq_len, config.sliding_stride)
            _score_windows(model, val, windows, score_rows, config.eval_seq_len, scores, audit, ngram)
            # 2) then adapt on the chunk just scored (not the last one, and not past the budget)
            if chunk_index == len(chunk_starts) - 1 or config.ttt_epochs <= 0:
                continue
            if _time_is_up(deadline, val.tokens.device):
                stopped_early = True
                continue
            for group in optimizer.param_groups:
                group["lr"] = _cosine(config.ttt_lr, chunk_index, len(chunk_starts) - 1)
            _train_on_targets(model, val, first_target, end_target, config.eval_seq_len, config.ttt_batch_seqs,
                              params, optimizer, config.ttt_epochs, config.ttt_grad_clip, audit)
            updates += 1
    return scores.summarize("ttt_chunked", started_at, keep_token_scores, ttt_chunks=len(chunk_starts),
                            ttt_chunks_trained=updates, ttt_stopped_by_budget=stopped_early, **_tilt_extra(ngram))


# --- phased per-document LoRA TTT (PR 1736) ----------------------------------------------------


def lora_site_dims(model, sites=LORA_SITES) -> dict:
    """{(site, layer_index): (in_dim, out_dim)} of the model's adaptable sites, found by one probe
    forward on a short random row: in_dim from the hook's input, out_dim from the output of the last
    module with a 2-D weight that ran before the hook (the delta is added to that output; the head:
    the logits' width)."""
    device = next(model.parameters()).device
    last_output_width = []

    def remember(module, args, output):
        if isinstance(output, torch.Tensor):
            last_output_width[:] = [output.shape[-1]]

    handles = [module.register_forward_hook(remember) for module in model.modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2]
    dims = {}

    def probe(site, layer_index, x):
        if site in sites:
            dims[(site, layer_index)] = (x.shape[-1], last_output_width[0] if last_output_width else None)
        last_output_width.clear()
        return None

    try:
        with torch.no_grad():
            row = torch.full((1, 8), 2, dtype=torch.int64, device=device)
            row[0, 0] = BOS_ID
            logits = model.forward_logits(row, lora=probe)
    finally:
        for handle in handles:
            handle.remove()
    for key, (in_dim, out_dim) in dims.items():
        if key[0] == "head":
            dims[key] = (in_dim, logits.shape[-1])
        elif out_dim is None:
            raise RuntimeError(f"cannot infer the output width of LoRA site {key}; pass site dims explicitly")
    return dims


class BatchedLoRA(nn.Module):
    """One rank-r adapter per batch element (= per document) at every site: delta = x A_b B_b * alpha/r.
    B starts at zero, so a fresh adapter leaves the model unchanged. A ~ U(-1/sqrt(in), 1/sqrt(in)),
    seeded: the same draw for every document, or one draw per document slot (`per_slot_init`, as
    PR 1855 draws its warm-started A factors). Allocated once per rank and batch size: `reset()` makes
    it fresh again in place, `restart()` keeps A for the warm start."""

    def __init__(self, batch_size: int, site_dims: dict, rank: int, alpha: float, seed: int = 0,
                 per_slot_init: bool = False):
        super().__init__()
        self.batch_size = batch_size
        self.scale = alpha / rank  # decouples the adapter's magnitude from its rank (PR 1767)
        self.index = {key: str(i) for i, key in enumerate(sorted(site_dims, key=str))}
        generator = torch.Generator().manual_seed(seed)
        draws = batch_size if per_slot_init else 1
        down_init = {key: (torch.rand(draws, dims[0], rank, generator=generator) * 2 - 1) / math.sqrt(dims[0])
                     for key, dims in sorted(site_dims.items(), key=lambda item: str(item[0]))}
        self.down = nn.ParameterDict({
            self.index[key]: nn.Parameter(init.expand(batch_size, -1, -1).clone()) for key, init in down_init.items()})
        self.up = nn.ParameterDict({
            self.index[key]: nn.Parameter(torch.zeros(batch_size, rank, dims[1])) for key, dims in site_dims.items()})
        for key, init in down_init.items():  # [in, r], kept on the device for reset()
            self.register_buffer("down_init_" + self.index[key], init, persistent=False)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the freshly built state without allocating: A = the seeded init, B = 0."""
        for name, down in self.down.items():
            down.copy_(getattr(self, "down_init_" + name).expand_as(down))
        for up in self.up.values():
            up.zero_()

    def restart(self) -> None:
        """Warm start for the next batch (PR 1767): B back to zero (the model is unchanged again), A keeps
        the directions it learned."""
        with torch.no_grad():
            for up in self.up.values():
                up.zero_()

    def forward(self, site: str, layer_index: int, x: torch.Tensor) -> torch.Tensor | None:
        # x: [B, T, in] -> [B, T, out], or None where this site has no adapter
        name = self.index.get((site, layer_index))
        if name is None:
            return None
        return torch.bmm(torch.bmm(x, self.down[name].to(x.dtype)), self.up[name].to(x.dtype)) * self.scale


def reset_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Zero every state tensor in place (Adam's step and moments): the next step equals a fresh
    optimizer's first step, with no allocation."""
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()


class AdapterSlots:
    """This rank's LoRA and its AdamW, one pair per batch size (the last batch may be smaller), built on
    the device at first use and reset in place for every later batch: no per-batch host allocation and
    copy of the (record shape: ~2 GB) adapter. With PHASED_TTT_WARM_START_A (PR 1855) the full-size
    batches of a phase share one adapter whose A factors carry over from batch to batch (B restarts at
    zero, Adam restarts fresh); `new_phase` draws its A again, one draw per document slot."""

    def __init__(self, site_dims: dict, config: EvalSettings, device):
        self.site_dims, self.config, self.device, self.slots, self.warm = site_dims, config, device, {}, None

    def _build(self, batch_size: int, seed: int = 0, per_slot_init: bool = False) -> tuple:
        config = self.config
        lora = BatchedLoRA(batch_size, self.site_dims, config.phased_ttt_lora_rank, config.phased_ttt_lora_alpha,
                           seed=seed, per_slot_init=per_slot_init).to(self.device)
        # the "local" (per-document) lr has its own multiplier; the global SGD keeps PHASED_TTT_GLOBAL_LR (PR 1953)
        optimizer = torch.optim.AdamW(lora.parameters(), lr=config.phased_ttt_lr * config.phased_ttt_local_lr_mult,
                                      eps=1e-10, betas=(config.phased_ttt_beta1, config.phased_ttt_beta2),
                                      weight_decay=config.phased_ttt_weight_decay)
        return lora, optimizer

    def new_phase(self, phase: int, rank: int, world: int) -> None:
        if self.config.phased_ttt_warm_start_a:  # one warm adapter per rank and phase (PR 1855)
            self.warm = self._build(self.config.phased_ttt_docs_per_batch, seed=phase * world + rank,
                                    per_slot_init=True)

    def fresh(self, num_docs: int) -> tuple:
        """The adapter for a batch of num_docs documents, with at least PHASED_TTT_DOCS_PER_BATCH rows (a
        short last batch is padded to the compiled shape): the warm one (A kept) for a full batch, else a
        fresh one (as PR 1855 gives the odd-sized last batch)."""
        batch_size = max(num_docs, self.config.phased_ttt_docs_per_batch)
        if self.warm is not None and self.warm[0].batch_size == num_docs:
            lora, optimizer = self.warm
            lora.restart()
        elif batch_size not in self.slots:
            self.slots[batch_size] = self._build(batch_size)
            return self.slots[batch_size]
        else:
            lora, optimizer = self.slots[batch_size]
            lora.reset()
        reset_optimizer_state_(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return lora, optimizer


def _document_batches(doc_ids: np.ndarray, doc_lengths: np.ndarray, docs_per_batch: int) -> list:
    """Longest documents first (so a batch's documents have similar lengths), docs_per_batch each."""
    order = doc_ids[np.argsort(-doc_lengths[doc_ids], kind="stable")]
    return [order[i: i + docs_per_batch] for i in range(0, len(order), docs_per_batch)]


def phase_pauses(batch_sizes: list, prefix_docs: int, num_phases: int) -> list:
    """[(queue index of the last batch before the pause, documents its global SGD trains on)] per phase.
    Phases are counted in SCORED order, i.e. queue order, longest documents first (PR 1855): phase k
    pauses once the batch holding the (prefix_docs * (k+1) / num_phases)-th queued document is scored.
    Unlike PR 1855 (which pauses whenever a shared counter passes the boundary, so the in-flight batches
    of other ranks, ~460 documents on 8 GPUs, slip in before it) the pause point depends only on the
    queue, so any number of ranks gives the same scores."""
    ends = np.cumsum(batch_sizes)
    pauses = []
    for phase in range(num_phases if prefix_docs > 0 and len(ends) else 0):
        docs = min(prefix_docs * (phase + 1) // num_phases, int(ends[-1]))
        if docs > 0:
            pauses.append((int(np.searchsorted(ends, docs)), docs))
    return pauses


class TTTWorkQueue:
    """Queue indices 0, 1, 2, ... handed to whichever rank asks first, so a slow rank simply takes fewer
    batches (PR 1855 shares a counter file in /tmp; here an atomic add on the process group's key-value
    store, the same under NCCL and Gloo). Each rank also publishes its measured seconds per scored
    token, adapted and fast path, for the other ranks' time projections."""

    def __init__(self, store=None, rank: int = 0, world: int = 1):
        self.store = store if store is not None else dist.HashStore()  # in memory: one process
        self.rank, self.world = rank, world
        # all ranks call this once per eval, and an eval ends with a collective: a fresh key prefix per eval
        self.prefix = f"ttt_queue/{(self.store.add('ttt_queue/calls', 1) - 1) // world}/"

    @classmethod
    def for_process_group(cls) -> "TTTWorkQueue":
        rank, world = distributed_info()
        if world == 1:
            return cls()
        return cls(dist.distributed_c10d._get_default_store(), rank, world)

    def claim(self) -> int:
        return int(self.store.add(self.prefix + "next", 1)) - 1

    def publish_costs(self, adapt_cost: float, fast_cost: float) -> None:
        self.store.set(f"{self.prefix}cost/{self.rank}", f"{adapt_cost!r} {fast_cost!r}")

    def costs(self) -> list:
        """[(adapt, fast) seconds per token] per rank; nan where not measured yet."""
        result = []
        for rank in range(self.world):
            key = f"{self.prefix}cost/{rank}"
            text = self.store.get(key).decode() if self.store.check([key]) else "nan nan"
            result.append(tuple(float(value) for value in text.split()))
        return result


def ttt_rank_schedule(queue: TTTWorkQueue, num_batches: int, pause_after: list) -> Iterator[tuple]:
    """What one rank does, in order: ("batch", queue index) and ("pause", phase). A batch is claimed
    only when the rank is free; a rank that claims a batch beyond a pause (or finds the queue empty)
    first joins that pause, so every rank joins every pause in the same order (their collectives match),
    and every batch before a pause is scored before its global SGD starts."""
    phase = 0
    while True:
        index = queue.claim()
        while phase < len(pause_after) and index > pause_after[phase]:
            yield "pause", phase
            phase += 1
        if index >= num_batches:
            return
        yield "batch", index


def projected_ttt_seconds(elapsed_s: float, batch_tokens: int, remaining_tokens: int, rank_costs: list,
                          rank: int) -> float:
    """Projected end of the TTT eval if this rank adapts the next batch (batch_tokens targets) and every
    later batch (remaining_tokens, all ranks together) is scored on the fast path. rank_costs: measured
    (adapt, fast) seconds per token of each rank (nan: not yet measured; the fast path falls back to the
    adapted cost, an upper bound, an unmeasured rank to this rank's costs, and this rank before its first
    batch to the slowest adapted cost measured). The remaining tokens
    take their share of all ranks' throughput, plus one batch on the slowest rank (the last one)."""
    measured_adapt = [adapt for adapt, _ in rank_costs if not math.isnan(adapt)]
    if not measured_adapt:
        return elapsed_s  # nothing measured anywhere yet: the first batches adapt
    mine_adapt, mine_fast = rank_costs[rank]
    if math.isnan(mine_adapt):  # this rank's first batch: assume it is as slow as the slowest rank so far
        mine_adapt = max(measured_adapt)
    fast_costs = []
    for adapt, fast in rank_costs:
        fast_costs.append(next(cost for cost in (fast, adapt, mine_fast, mine_adapt) if not math.isnan(cost)))
    throughput = sum(1.0 / max(cost, 1e-12) for cost in fast_costs)  # tokens per second, all ranks
    return elapsed_s + batch_tokens * mine_adapt + remaining_tokens / throughput + batch_tokens * max(fast_costs)


def chunk_schedule_rules(text: str) -> list[tuple[int, int]]:
    """PHASED_TTT_CHUNK_SCHEDULE "until:chunk,..." -> [(until, chunk)] sorted by until."""
    try:
        rules = sorted((int(until), int(chunk)) for until, chunk in
                       (item.split(":") for item in text.split(",") if item.strip()))
    except ValueError:
        raise ValueError(f"PHASED_TTT_CHUNK_SCHEDULE={text!r}: use until:chunk,... (e.g. 256:8,2000:24)") from None
    require(all(until > 0 and chunk > 0 for until, chunk in rules),
            f"PHASED_TTT_CHUNK_SCHEDULE={text!r}: positions and chunks must be positive")
    return rules


def chunk_ends(total: int, rules: list[tuple[int, int]], default: int) -> list[int]:
    """Ends of a document's LoRA chunks over its targets 1..total: chunks of `chunk` tokens while below a
    rule's `until` (a chunk never crosses it), then `default`. They depend on positions only, never on
    the document's length (a length-dependent chunk size would let where the document ends, a later
    token, change earlier scores; the compliance tests catch that)."""
    ends, end = [], 0
    while end < total:
        rule = next(((until, chunk) for until, chunk in rules if end < until), None)
        end = min(end + rule[1], rule[0]) if rule else end + default
        ends.append(end)
    return ends


def phased_ttt_widths(config: EvalSettings) -> tuple[list[int], list[int]]:
    """Row widths of phased TTT's forwards (a chunk's window: its end, capped at the context): of the
    adapted batches (with a LoRA) and of the fast path (scoring only, chunks of half the context)."""
    context = config.eval_seq_len
    adapted = chunk_ends(context, chunk_schedule_rules(config.phased_ttt_chunk_schedule), config.phased_ttt_chunk_tokens)
    scoring = chunk_ends(context, [], max(config.phased_ttt_chunk_tokens, context // 2))
    return sorted({min(end, context) for end in adapted}), sorted({min(end, context) for end in scoring})


def _score_and_adapt_documents(model: GPT, val: ValData, doc_ids: np.ndarray, config: EvalSettings,
                               scores: TokenScores, audit: Callable | None, adapter: tuple | None,
                               ngram: NgramTilt | None = None) -> None:
    """Score a batch of documents chunk by chunk, each with its own fresh LoRA (adapter = (lora, AdamW));
    after scoring a chunk, take one Adam step per document on that chunk (documents never share an
    adapter). Without an adapter (the fast path past the time budget) only scoring, in chunks of half
    the context: every target still sees at least that much of its document before it. With the n-gram
    tilt, a chunk's targets enter their own document's counts right after they are scored (and the
    shared counts at the next phase pause)."""
    context = config.eval_seq_len
    chunk = config.phased_ttt_chunk_tokens if adapter else max(config.phased_ttt_chunk_tokens, context // 2)
    starts = val.doc_starts[doc_ids]
    target_counts = val.target_ends(doc_ids) - 1 - starts  # [B]: own tokens after BOS + the next BOS
    # A short last batch is padded with empty documents (no targets: never scored, never trained on), so
    # every batch has PHASED_TTT_DOCS_PER_BATCH rows, the shape the compile warm-up compiled
    padding = max(0, config.phased_ttt_docs_per_batch - len(doc_ids))
    starts = np.concatenate([starts, np.repeat(starts[:1], padding)])
    target_counts = np.concatenate([target_counts, np.zeros(padding, dtype=target_counts.dtype)])
    if ngram is not None:
        ngram.begin_documents(len(starts), int(target_counts.max()))
    lora, optimizer = adapter if adapter else (None, None)
    # chunk bounds by position in the document (PHASED_TTT_CHUNK_SCHEDULE, PR 2014; adapted batches only)
    rules = chunk_schedule_rules(config.phased_ttt_chunk_schedule) if adapter else []
    bounds = chunk_ends(int(target_counts.max()), rules, chunk)
    for chunk_start, chunk_end in zip([0] + bounds[:-1], bounds):  # targets chunk_start+1..chunk_end of each
        # the window ends at the chunk's end even when the document ends sooner: PR 1855 ends a short last
        # chunk's window at the document's end, so its context length would reveal where the document ends
        window_start = max(0, chunk_end - context)  # document-relative index of the first input
        windows = np.stack([starts + window_start, np.clip(target_counts - window_start, 0, chunk_end - window_start),
                            np.full_like(starts, chunk_start - window_start)], axis=1)
        inputs, targets, positions, inside, in_chunk = gather_windows(val, windows, width=chunk_end - window_start)
        more_chunks_follow = torch.as_tensor(target_counts > chunk_end, device=inputs.device)  # [B]: train on it
        train_now = lora is not None and bool(more_chunks_follow.any())
        with torch.set_grad_enabled(train_now):
            nll, scored_nll = _model_and_scored_nll(model, inputs, targets, positions, in_chunk, lora, ngram)  # [B, W]
        # 1) score: the chunk's NLL is recorded before any update that sees these tokens
        scores.add(positions[in_chunk], scored_nll[in_chunk])
        if audit is not None:
            audit("score", positions[in_chunk].cpu().numpy())
        if ngram is not None:
            ngram.scored(positions[in_chunk])
            ngram.add_own(positions, in_chunk)
        # 2) update: one step per document on the chunk it just scored
        if train_now:
            chunk_mask = in_chunk.to(nll.dtype)
            per_doc = (nll * chunk_mask).sum(1) / chunk_mask.sum(1).clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            (per_doc * more_chunks_follow.to(nll.dtype)).sum().backward()
            optimizer.step()
            if audit is not None:
                read = inside & more_chunks_follow.unsqueeze(1)
                audit("update", torch.cat([positions[read], positions[read] - 1]).unique().cpu().numpy())


def _global_sgd(model: GPT, val: ValData, doc_ids: np.ndarray, config: EvalSettings, audit: Callable | None) -> None:
    """All weights, SGD with momentum, over the given (already scored) documents concatenated in that
    order, each with its targets (its own tokens, then the next document's BOS), in chunks of
    PHASED_TTT_GLOBAL_CHUNK_TOKENS, one step per chunk; the learning rate follows a cosine from
    PHASED_TTT_GLOBAL_LR at the first chunk to 0 at the last, which is therefore skipped (PR 1855)."""
    spans = [np.arange(start, end) for start, end in zip(val.doc_starts[doc_ids], val.target_ends(doc_ids) - 1)]
    source = np.concatenate(spans)  # stream position of each token of the concatenation
    last = int(doc_ids[-1])
    if last + 1 < val.num_docs:  # the last document's final target: the BOS of the document after it
        source = np.append(source, val.doc_starts[last + 1])
    source_t = torch.as_tensor(source, device=val.tokens.device)
    docs = ValData(val.tokens[source_t], val.byte_counts[source_t], np.zeros(1, dtype=np.int64),
                   np.array([source.size], dtype=np.int64))
    mapped = None if audit is None else (lambda event, positions: audit(event, source[positions]))
    params = list(model.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=config.phased_ttt_global_lr, momentum=config.phased_ttt_global_momentum)
    chunk_starts = list(range(1, docs.num_tokens, config.phased_ttt_global_chunk_tokens))
    for chunk_index, first_target in enumerate(chunk_starts[:-1]):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(config.phased_ttt_global_lr, chunk_index, len(chunk_starts) - 1)
        chunk_end = min(first_target + config.phased_ttt_global_chunk_tokens, docs.num_tokens)
        _train_on_targets(model, docs, first_target, chunk_end, config.eval_seq_len, rows_per_step=10**9,
                          params=params, optimizer=optimizer, epochs=config.phased_ttt_global_epochs,
                          grad_clip=config.phased_ttt_global_grad_clip, audit=mapped)
    for param in params:
        param.requires_grad_(False)


def eval_ttt_phased(model: GPT, val: ValData, config: EvalSettings, audit: Callable | None = None,
                    time_budget_s: float | None = None, keep_token_scores: bool = False,
                    clock: Callable[[], float] = time.perf_counter, queue: TTTWorkQueue | None = None) -> dict:
    """All documents in one queue of length-sorted batches, longest first, claimed by whichever rank is
    free (TTTWorkQueue). Each batch is scored with per-document LoRA TTT; after the first
    PHASED_TTT_PREFIX_DOCS * k / PHASED_TTT_NUM_PHASES documents of the queue are scored, all weights are
    trained with SGD on them (phase_pauses). A batch adapts only while the projected end of the eval
    (projected_ttt_seconds) stays within the time budget; otherwise it is only scored (fast path)."""
    started_at, clock_start = time.perf_counter(), clock()
    rank, world = distributed_info()
    device = val.tokens.device
    queue = queue or TTTWorkQueue.for_process_group()
    scores = TokenScores(val)
    batches = _document_batches(np.arange(val.num_docs), val.doc_lengths, config.phased_ttt_docs_per_batch)
    batch_tokens = [int((val.target_ends(ids) - 1 - val.doc_starts[ids]).sum()) for ids in batches]
    tokens_after = np.cumsum(batch_tokens[::-1])[::-1].tolist()[1:] + [0]  # targets in later batches
    pauses = phase_pauses([len(ids) for ids in batches], config.phased_ttt_prefix_docs,
                          max(1, config.phased_ttt_num_phases)) if config.phased_ttt_global_epochs > 0 else []
    scored_order = np.concatenate(batches)
    sites = tuple(site.strip() for site in config.phased_ttt_lora_sites.split(",") if site.strip())
    spent = {True: [0.0, 0], False: [0.0, 0]}  # adapted / fast path: [seconds, tokens] on this rank
    global_updates, stopped_early, adapted_batches = 0, False, 0
    ngram = NgramTilt.from_config(config, val, audit)
    with _WeightsRestored(model):
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        slots = AdapterSlots(lora_site_dims(model, sites=sites), config, device)
        slots.new_phase(0, rank, world)
        for event, index in ttt_rank_schedule(queue, len(batches), [after for after, _ in pauses]):
            if event == "pause":  # global SGD on the first documents of the queue, all of them scored
                slots.new_phase(index + 1, rank, world)
                if ngram is not None:  # every document before the pause is scored, on every rank
                    ngram.barrier()
                stopped_early |= time_budget_s is not None and clock() - clock_start >= time_budget_s
                stopped = _all_reduce_(torch.tensor([float(stopped_early)], device=device), dist.ReduceOp.MAX)
                if bool(stopped > 0):  # all ranks agree: no global SGD once any rank stopped adapting
                    continue
                _global_sgd(model, val, scored_order[: pauses[index][1]], config, audit)
                global_updates += 1
                continue
            began = clock()
            adapt = time_budget_s is None or projected_ttt_seconds(
                began - clock_start, batch_tokens[index], tokens_after[index], queue.costs(), rank) <= time_budget_s
            stopped_early |= not adapt
            adapted_batches += adapt
            doc_ids = batches[index]
            _score_and_adapt_documents(model, val, doc_ids, config, scores, audit,
                                       slots.fresh(len(doc_ids)) if adapt else None, ngram)
            if device.type == "cuda":  # the clock reads finished work
                torch.cuda.synchronize(device)
            spent[adapt][0] += clock() - began
            spent[adapt][1] += batch_tokens[index]
            queue.publish_costs(*(seconds / tokens if tokens else math.nan for seconds, tokens in
                                  (spent[True], spent[False])))
    stopped_early = bool(_all_reduce_(torch.tensor([float(stopped_early)], device=device), dist.ReduceOp.MAX) > 0)
    adapted_batches = int(_all_reduce_(torch.tensor([float(adapted_batches)], device=device)).item())
    return scores.summarize("ttt_phased", started_at, keep_token_scores, ttt_phases_trained=global_updates,
                            ttt_prefix_docs=min(config.phased_ttt_prefix_docs, val.num_docs),
                            ttt_stopped_by_budget=stopped_early, ttt_batches=len(batches),
                            ttt_batches_adapted=adapted_batches, **_tilt_extra(ngram))


def eval_ttt(config: EvalSettings, model: GPT, val: ValData, time_budget_s: float | None = None,
             audit: Callable | None = None, keep_token_scores: bool = False) -> dict:
    """The TTT mode TTT_MODE selects (phased | chunked)."""
    driver = eval_ttt_phased if config.ttt_mode == "phased" else eval_ttt_chunked
    return driver(model, val, config, audit, time_budget_s, keep_token_scores)


# --- compile warm-up, per-token output, log lines and summary ----------------------------------


def warm_up_on_random_tokens(model: GPT, vocab_size: int, seq_len: int, batch_size: int = 2,
                             lora: nn.Module | None = None, seed: int = 0, backward: bool = True,
                             candidates: int = 1, score: bool = True) -> None:
    """Run the eval forward without gradients (`score`) and/or with a backward (for TTT steps) on
    random tokens, never val data; gradients are discarded and no weight changes. candidates 2: the
    n-gram tilt's [B, T, 2] targets."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    # two fresh row-major tensors, like the evals' gathered batches: strides are part of a graph's guards
    # too (a slice of one [B, T+1] tensor keeps stride T+1, which a single row's guard would check)
    inputs, targets = (torch.randint(2, vocab_size, (batch_size, seq_len), generator=generator).to(device)
                       for _ in range(2))
    inputs[:, 0] = BOS_ID
    if candidates > 1:  # [B, T, K]: a fresh row-major tensor as well
        targets = torch.stack([targets] * candidates, dim=-1)
    if score:
        with torch.no_grad():
            model.per_token_nll(inputs, targets, lora=lora)
    if backward:
        with torch.enable_grad():
            model.per_token_nll(inputs, targets, lora=lora).mean().backward()
    model.zero_grad(set_to_none=True)
    if lora is not None:
        lora.zero_grad(set_to_none=True)


def save_token_nll(path: str, result: dict, val: ValData) -> None:
    """Write each scored token of a result (run with keep_token_scores=True) as .npz: stream
    position, token id, NLL (nats), original bytes, document index, position in the document."""
    positions = np.asarray(result["token_positions"], dtype=np.int64)
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    # a BOS target ends the document before it: attribute it there (position_in_doc = that length)
    doc_index = np.searchsorted(val.doc_starts, positions - 1, side="right") - 1
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, mode=np.array(result["mode"]), stream_position=positions,
        token_id=val.tokens.cpu().numpy()[positions], nll=np.asarray(result["token_nll"], dtype=np.float32)[order],
        byte_count=val.byte_counts.cpu().numpy()[positions], doc_index=doc_index,
        position_in_doc=positions - val.doc_starts[doc_index],
        reported=np.array([result["val_loss"], result["val_bpb"], result["scored_tokens"], result["scored_bytes"]]))
    atomic_write_bytes(path, buffer.getvalue())


def format_eval_line(label: str, result: dict) -> str:
    """Upstream-style log line, e.g. `quantized_ttt_phased val_loss:... val_bpb:... eval_time:...ms`."""
    return (f"{label} val_loss:{result['val_loss']:.8f} val_bpb:{result['val_bpb']:.8f} "
            f"scored_tokens:{result['scored_tokens']} scored_bytes:{result['scored_bytes']} "
            f"bos_targets:{result['bos_targets']} eval_time:{1000.0 * result['eval_time_s']:.0f}ms")


def eval_summary(results: dict, eval_time_limit_s: float = 600.0, decode_s: float = 0.0) -> dict:
    """summary.json fields from {label: result} with labels pre_quant, quantized,
    quantized_sliding_window, quantized_ttt_chunked / quantized_ttt_phased (any may be absent).
    eval_time_s counts what the challenge times: the quantized evals that produce the final score."""
    def bpb(label):
        return results[label]["val_bpb"] if label in results else None

    ttt_label = next((label for label in ("quantized_ttt_phased", "quantized_ttt_chunked") if label in results), None)
    timed = [label for label in ("quantized", "quantized_sliding_window", ttt_label) if label in results]
    eval_time_s = decode_s + sum(results[label]["eval_time_s"] for label in timed)  # decoding the artifact counts
    return {
        "pre_quant_val_bpb": bpb("pre_quant"), "quant_val_bpb": bpb("quantized"),
        "sliding_val_bpb": bpb("quantized_sliding_window"), "ttt_val_bpb": bpb(ttt_label) if ttt_label else None,
        "ttt_mode": ttt_label.removeprefix("quantized_ttt_") if ttt_label else None,
        "eval_time_s": eval_time_s, "eval_time_ok": eval_time_s <= eval_time_limit_s,
        "evals": {label: {key: value for key, value in result.items() if not key.startswith("token_")}
                  for label, result in results.items()},
    }


# --- post-training entry point -----------------------------------------------------------------


def evaluate_after_training(h: Hyperparameters, model: GPT, quantized: GPT, context: RunContext,
                            decode_s: float = 0.0) -> dict:
    """Report pre-quant (`model`, the float EMA weights), quantized, sliding-window and TTT val_bpb (the
    rest on `quantized`, the weights read back from the artifact) in that order; return the
    summary.json fields. TTT adapts only while EVAL_MAX_SECONDS, minus the quantized evals' time,
    lasts; it scores every token regardless. SAVE_TOKEN_NLL=1 writes the last mode's tokens."""
    config, log = h.eval, context.log
    val = load_val_data(h.data.val_glob, h.model.vocab_size, h.data.tokenizer_path or None, h.data.val_max_docs)
    val = val.to(context.device)
    log(f"val: {val.num_docs} documents, {val.num_tokens} tokens, {int(val.byte_counts.sum())} bytes")
    batch_rows = config.batch_rows(context.world_size)
    planned = ["pre_quant", "quantized"] + (["quantized_sliding_window"] if config.sliding_window_enabled else [])
    planned += [f"quantized_ttt_{config.ttt_mode}"] if config.ttt_enabled else []
    evals, warmup_time_s = {}, 0.0
    use_bf16 = context.autocast == "bf16" and context.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
        if context.compile_backend:  # under the evals' own autocast: it is part of a graph's guards
            warmup_time_s = compile_and_warm_up_eval(h, model, quantized, context)
        for label in planned:
            keep = config.save_token_nll and label == planned[-1]
            if label == "pre_quant":
                result = eval_stream(model, val, config.eval_seq_len, batch_rows, keep_token_scores=keep,
                                     config=config)
            elif label == "quantized":
                result = eval_stream(quantized, val, config.eval_seq_len, batch_rows, keep_token_scores=keep,
                                     config=config)
            elif label == "quantized_sliding_window":
                result = eval_stream(quantized, val, config.eval_seq_len, batch_rows, config.sliding_stride,
                                     keep_token_scores=keep, config=config)
            else:
                spent = decode_s + sum(evals[name]["eval_time_s"] for name in evals if name != "pre_quant")
                result = eval_ttt(config, quantized, val, config.eval_max_seconds - spent, keep_token_scores=keep)
            evals[label] = result
            log(format_eval_line(label, result))
            if result.get("ttt_stopped_by_budget"):
                adapted = (f"{result['ttt_batches_adapted']} of {result['ttt_batches']} batches adapted, "
                           if "ttt_batches" in result else "")
                log(f"{label}: EVAL_MAX_SECONDS={config.eval_max_seconds:g} would be passed, TTT adaptation stopped "
                    f"early ({adapted}every token was still scored)")
    if config.save_token_nll and context.rank == 0:
        path = os.path.join(context.artifact_dir, "token_nll.npz")
        save_token_nll(path, evals[planned[-1]], val.to("cpu"))
        log(f"token_nll: {path} ({planned[-1]}; recompute with records/audit_tokens.py)")
    return dict(eval_summary(evals, config.eval_max_seconds, decode_s), eval_warmup_time_s=round(warmup_time_s, 3))


def compile_and_warm_up_eval(h: Hyperparameters, model: GPT, quantized: GPT, context: RunContext) -> float:
    """Compile both eval forwards and run the timed one on random tokens (never val data) in every way
    and at every shape the evals will: no-grad scoring, TTT steps into the weights (chunked; global
    SGD) and through a LoRA with the base weights frozen (phased). Returns its seconds, reported apart
    from the scored eval time."""
    started = time.perf_counter()
    config = h.eval
    for m in (model, quantized):
        compile_eval_forward(m, context.compile_backend)
    vocab, seq_len, world = h.model.vocab_size, config.eval_seq_len, distributed_info()[1]
    # graphs differ by grad mode, by requires_grad of the weights, by the LoRA being there, and by shape
    # (inductor adds guards on sizes): the evals pad every batch to the fixed shapes warmed up here
    candidates = 2 if config.ngram_tilt else 1  # tilted scoring: [B, T, 2] targets (target and hint)
    score_rows = config.batch_rows(world)
    quantized.eval()  # the mode every eval driver runs in (a module's mode is part of a graph's guards)
    with _WeightsRestored(quantized):
        # plain and sliding scoring, weights trainable as the model comes
        warm_up_on_random_tokens(quantized, vocab, seq_len, score_rows, backward=False, candidates=candidates)
        if config.ttt_enabled and config.ttt_mode == "chunked":  # scoring and SGD steps, TTT_PARAMS trainable
            trained = set(select_parameters(quantized, config.ttt_params))
            for param in quantized.parameters():
                param.requires_grad_(param in trained)
            warm_up_on_random_tokens(quantized, vocab, seq_len, score_rows, backward=False, candidates=candidates)
            warm_up_on_random_tokens(quantized, vocab, seq_len, score=False, batch_size=ttt_step_rows(
                config.ttt_chunk_tokens, seq_len, config.ttt_batch_seqs, world))
        if config.ttt_enabled and config.ttt_mode == "phased":
            for param in quantized.parameters():  # global SGD steps: all weights
                param.requires_grad_(True)
            warm_up_on_random_tokens(quantized, vocab, seq_len, score=False, batch_size=ttt_step_rows(
                config.phased_ttt_global_chunk_tokens, seq_len, 10**9, world))
            # frozen weights: scoring with and without a LoRA, LoRA steps (its batch dim is static)
            for param in quantized.parameters():
                param.requires_grad_(False)
            # at every chunk width: shapes are dynamic, but inductor guards on sizes it made choices for
            rows, (adapted_widths, scoring_widths) = config.phased_ttt_docs_per_batch, phased_ttt_widths(config)
            for width in scoring_widths:
                warm_up_on_random_tokens(quantized, vocab, width, rows, backward=False, candidates=candidates)
            sites = tuple(site.strip() for site in config.phased_ttt_lora_sites.split(",") if site.strip())
            lora = BatchedLoRA(rows, lora_site_dims(quantized, sites), config.phased_ttt_lora_rank,
                               config.phased_ttt_lora_alpha).to(context.device)
            for width in adapted_widths:
                warm_up_on_random_tokens(quantized, vocab, width, rows, lora=lora, candidates=candidates)
    seconds = time.perf_counter() - started
    context.log(f"eval compile warm-up: {seconds:.1f}s on random tokens ({context.compile_backend}; not scored, "
                f"not in eval_time)")
    return seconds


# -----------------------------------------------------------------------------
# Main
#
# Resolve the config, set up devices and torch.distributed, check every input the run will need
# (preflight: seconds, instead of an error after training), train, save the EMA checkpoint, quantize
# and write the artifact, evaluate, and write summary.json. With POST_TRAINING_ONLY=1 a run
# re-quantizes and re-evaluates its saved checkpoint without retraining. Errors are logged before they
# propagate; SIGTERM/SIGINT during training stop it after the current step with interrupted.pt.
# -----------------------------------------------------------------------------


class RunLogger:
    """Prints and appends to the run's log file, on rank 0 only."""

    def __init__(self, path: str | None, enabled: bool):
        self.path, self.enabled = path, enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(message + "\n")


def resolve_device(h: Hyperparameters, local_rank: int) -> torch.device:
    if h.run.device == "cuda" or (h.run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("DEVICE=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_tokenizer(h: Hyperparameters) -> None:
    """A tokenizer whose vocabulary differs from VOCAB_SIZE is an error (ids would not line up)."""
    path = h.data.tokenizer_path
    if not path:
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"TOKENIZER_PATH={path!r} does not exist")
    import sentencepiece
    size = sentencepiece.SentencePieceProcessor(model_file=path).vocab_size()
    if size != h.model.vocab_size:
        raise ValueError(f"TOKENIZER_PATH={path!r} has {size} tokens but VOCAB_SIZE={h.model.vocab_size}")


def preflight(h: Hyperparameters) -> list[str]:
    """Check, before the model is built, the files the run will read, so that a bad one fails in
    seconds rather than after training and GPTQ: the tokenizer; every train shard's header and size;
    that no train file is a val shard or byte sidecar (all are named fineweb_val_*, which
    `val_sidecar_path` enforces); and, when the run evaluates, the val data loaded exactly as evaluation
    will load it (shard headers, sidecar lengths, manifest sha256s, BOS first, token ids), then dropped.
    (The artifact folder was already written to by `start_run`.) Returns the train shard paths."""
    check_tokenizer(h)
    train_env = "TRAIN_FILES" if h.data.train_files else "DATA_PATH"
    train_paths = shard_paths(h.data.train_glob, train_env)
    for path in train_paths:
        shard_token_count(path)
        if os.path.basename(path).startswith("fineweb_val_"):
            raise ValueError(f"{train_env}: {path} is a validation file")
    if h.run.post_training_enabled:
        load_val_data(h.data.val_glob, h.model.vocab_size, h.data.tokenizer_path or None, h.data.val_max_docs)
    return train_paths


@contextlib.contextmanager
def signal_handlers(handler: Callable) -> Iterator[None]:
    """Route SIGTERM (what a cluster sends before it kills a job) and SIGINT to `handler` inside the
    block; the previous handlers come back after it."""
    previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def stop_after_step(received: list[int]) -> Callable:
    """A signal handler for training: the first signal is appended to `received`, and `train_model`
    stops after the step in progress, saving interrupted.pt; a second one stops at once."""
    def handler(number: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(number)
    return handler


def start_run(h: Hyperparameters, environ: Mapping[str, str]) -> RunContext:
    """Device, process group, one run id for all ranks, the artifact folder and its log; the log opens
    with the run's own source code (saved next to it) and environment, so it is a complete record."""
    world_size = int(environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", "0"))
    device = resolve_device(h, local_rank)
    if h.run.cpu_threads > 0:
        torch.set_num_threads(h.run.cpu_threads)
    if world_size > 1:
        # explicit timeout: a rank that waits at a phase boundary must not abort the run at NCCL's default
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=1800))
    run_id = [h.run.run_id or f"{h.run.preset}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"]
    if world_size > 1:
        dist.broadcast_object_list(run_id, src=0)
    h.run.run_id = run_id[0]
    artifact_dir = h.run.artifact_dir or os.path.join("runs", h.run.run_id)
    autocast = h.run.autocast if h.run.autocast != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    context = RunContext(artifact_dir=artifact_dir, log=RunLogger(os.path.join(artifact_dir, "train.log"), rank == 0),
                         device=device, rank=rank, world_size=world_size, autocast=autocast)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with open(os.path.abspath(__file__), "rb") as handle:
        source = handle.read()
    if rank == 0:  # this first write (temporary file + rename, like every later one) is the writability check
        try:
            atomic_write_bytes(os.path.join(artifact_dir, "train_gpt_source.py"), source)
        except OSError as error:
            raise OSError(f"ARTIFACT_DIR={artifact_dir}: not writable ({error})") from None
    context.log(f"run_id:{h.run.run_id} preset:{h.run.preset} artifact_dir:{artifact_dir} code:{len(source)} bytes "
                f"sha256:{hashlib.sha256(source).hexdigest()} (saved as train_gpt_source.py)")
    context.log(f"env: python {platform.python_version()} torch {torch.__version__} device:{device} "
                f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'} "
                f"world_size:{world_size} autocast:{autocast} cpu_threads:{torch.get_num_threads()}")
    for name, value in h.as_dict().items():
        context.log(f"hparam {name.upper()}={value}")
    return context


def train_run(h: Hyperparameters, model: GPT, context: RunContext, checkpoint_path: str) -> dict[str, Any]:
    """Timed training, then the EMA weights become the model and are checkpointed; summary fields."""
    optimizer = TrainingOptimizer(model, h.optim)
    # one graph per (cu_seqlens bucket, recurrence on/off); fullgraph: a graph break is an error, not a
    # silent eager fallback
    backend = context.compile_backend
    forward = torch.compile(model, dynamic=False, fullgraph=True, backend=backend) if backend else model
    ema = (ExponentialMovingAverage(model, h.optim.ema_decay)
           if h.optim.ema_decay > 0 or h.optim.ema_horizon_frac > 0 else None)
    synchronize = torch.cuda.synchronize if context.device.type == "cuda" else (lambda: None)
    resume = None
    if h.run.resume:
        path = os.path.join(context.artifact_dir, "interrupted.pt")
        checkpoint = read_checkpoint(path)
        if "resume" not in checkpoint:
            raise ValueError(f"RESUME=1: {path} holds no training state to continue from")
        model.load_state_dict(checkpoint["model"])
        resume = checkpoint["resume"]
    context.training_start = context.clock()
    result = train_model(h, model, optimizer, context.make_train_loader, context.log, forward=forward,
                         autocast=context.autocast, clock=context.clock, synchronize=synchronize, ema=ema,
                         checkpoint_dir=context.artifact_dir, stop_signals=context.stop_signals, resume=resume)
    if ema is not None:
        ema.copy_to(model)  # the EMA weights are the model from here on (quantized and evaluated)
    context.train_time_s = result.train_time_s
    context.micro_step_seconds = result.train_time_s / max(1, result.steps * h.data.batch_layout(context.world_size)[0])
    if context.rank == 0:
        save_checkpoint(checkpoint_path, model, h, result.steps)
        context.log(f"checkpoint: {checkpoint_path}")
    budget = training_budget_seconds(h)
    return dict(steps=result.steps, train_time_s=round(result.train_time_s, 3),
                warmup_time_s=round(result.warmup_time_s, 3), tokens_per_s=round(result.tokens_per_s, 1),
                stop_reason=result.stop_reason, final_train_loss=result.final_train_loss,
                train_time_ok=budget is None or result.train_time_s <= budget)


def main(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    h = Hyperparameters.from_env(environ)
    context = start_run(h, environ)
    # From here every error, and SIGTERM like Ctrl-C, ends with a line in train.log before it propagates.
    with signal_handlers(signal.default_int_handler):
        try:
            return run_stages(h, context)
        except BaseException as error:
            context.log(f"error: {type(error).__name__}: {error}")
            raise


def run_stages(h: Hyperparameters, context: RunContext) -> dict[str, Any]:
    """Preflight, model, training (or the saved checkpoint), artifact, evaluation, summary.json."""
    device, log = context.device, context.log
    started = time.perf_counter()
    train_paths = preflight(h)
    log(f"preflight: ok ({time.perf_counter() - started:.2f}s)")
    attn_backend = select_attention_backend(h.run.attn_backend, device)
    if h.run.compile == "1" or (h.run.compile == "auto" and device.type == "cuda"):
        context.compile_backend = h.run.compile_backend
        configure_compile(context.compile_backend)
    fa3_missing = fa3_problem(device) if device.type == "cuda" and attn_backend != "fa3" else ""
    fused_mlp, fused_ce = select_fused_kernels(h.run, h.model, device)
    log(f"kernels: attention:{attn_backend}{f' (FA3 not used: {fa3_missing})' if fa3_missing else ''} "
        f"compile:{context.compile_backend or 'off (eager)'} fused_mlp:{int(fused_mlp)} fused_ce:{int(fused_ce)} "
        f"train_packing:{'flat' if packs_flat(h.data.train_packing, attn_backend) else 'rows'}")
    torch.manual_seed(h.run.seed)
    model = GPT(h.model, attn_backend, fused_mlp, fused_ce).to(device)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, layer order with recurrence "
        f"{model.layer_order(looping=h.model.recurrence_enabled)}")
    accum, seqs_per_micro = h.data.batch_layout(context.world_size)
    for length, _ in h.data.seq_schedule():  # every scheduled length must split the step evenly too
        h.data.batch_layout(context.world_size, length)
    context.make_train_loader = lambda: PrefetchingLoader(TrainLoader(
        train_paths, h.model.vocab_size, h.data.train_seq_len, seqs_per_micro, accum, context.rank,
        context.world_size, h.run.seed), device)
    summary: dict[str, Any] = dict(
        run_id=h.run.run_id, preset=h.run.preset, steps=None, train_time_s=None, tokens_per_s=None,
        pre_quant_val_bpb=None, quant_val_bpb=None, sliding_val_bpb=None, ttt_val_bpb=None,
        ttt_mode=h.eval.ttt_mode if h.eval.ttt_enabled else None, code_bytes=None, model_bytes=None,
        artifact_bytes=None, artifact_limit_ok=None, train_time_ok=None, eval_time_s=None, eval_time_ok=None,
        device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        world_size=context.world_size, seed=h.run.seed)
    checkpoint_path = os.path.join(context.artifact_dir, "final_model.pt")
    if h.run.post_training_only:
        summary.update(steps=load_checkpoint(checkpoint_path, model))
        log(f"post_training_only: loaded {checkpoint_path} (step {summary['steps']})")
    else:
        log(f"data: {len(train_paths)} train shards, grad_accum:{accum} seqs_per_micro_step:{seqs_per_micro} "
            f"seq_len:{h.data.train_seq_len} tokens_per_step:{h.data.train_batch_tokens}")
        with signal_handlers(stop_after_step(context.stop_signals)):
            summary.update(train_run(h, model, context, checkpoint_path))
        if context.stop_signals:  # arrived after the last step: final_model.pt is complete, stop here
            raise KeyboardInterrupt
    model.set_recurrence(h.model.recurrence_enabled)
    if h.run.post_training_enabled:
        fields, quantized = quantize_and_write_artifact(h, model, context)
        summary.update(fields)
        summary.update(evaluate_after_training(h, model, quantized, context, fields["artifact_decode_s"]))
    summary["hyperparameters"] = h.as_dict()
    if context.rank == 0:
        path = os.path.join(context.artifact_dir, "summary.json")
        atomic_write_bytes(path, (json.dumps(summary, indent=2, default=str) + "\n").encode())
        log(f"summary: {path}")
    if context.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
