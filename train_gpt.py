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

import copy
import dataclasses
import glob
import hashlib
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BOS_ID = 1  # every document starts with BOS; attention, smearing and scoring never cross it


# -----------------------------------------------------------------------------
# Config
#
# Every knob is a field of `Hyperparameters` with its default, environment variable, section and a
# one-line help (`knob(...)`), so the README table is generated from this one definition.
# `Hyperparameters.from_env()` is called when a run starts (never at import): defaults, then the
# PRESET's published settings, then explicit environment variables; the result is validated.
# -----------------------------------------------------------------------------


def knob(default: Any, section: str, help: str, env: str | None = None) -> Any:
    """A hyperparameter field: default value, README section, one-line help, env name (default: NAME)."""
    return field(default=default, metadata={"section": section, "help": help, "env": env})


@dataclass
class Hyperparameters:
    # ---- run
    preset: str = knob("pr1855", "run", "published configuration to start from (see PRESETS)")
    run_id: str = knob("", "run", "run name; default: a fresh random id")
    seed: int = knob(1337, "run", "seed for initialization and data order")
    data_path: str = knob("./data/datasets/fineweb10B_sp8192_caseops", "run",
                          "folder with fineweb_{train,val}_*.bin shards")
    train_files: str = knob("", "run", "glob of train shards; default: DATA_PATH/fineweb_train_*.bin")
    val_files: str = knob("", "run", "glob of val shards; default: DATA_PATH/fineweb_val_[0-9]*.bin")
    tokenizer_path: str = knob("", "run", "SentencePiece model; its vocab size must equal VOCAB_SIZE")
    artifact_dir: str = knob("", "run", "where checkpoint, log and summary.json go; default: runs/<RUN_ID>")
    device: str = knob("auto", "run", "auto|cpu|cuda (auto: CUDA when available)")
    compile: str = knob("auto", "run", "torch.compile the model: auto (on for CUDA, off for CPU)|0|1")
    attn_backend: str = knob("auto", "run", "auto|fa3|flex|sdpa|plain attention kernel (auto: best available)")
    autocast: str = knob("auto", "run", "auto|bf16|fp32 compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    cpu_threads: int = knob(0, "run", "CPU intra-op threads; 0 = torch's default (small models run best on 1)")
    post_training_only: bool = knob(False, "run", "skip training; quantize/evaluate ARTIFACT_DIR/final_model.pt")
    post_training_enabled: bool = knob(True, "run", "run quantization and evaluation after training (0: train only)")

    # ---- model (SPEC section 5)
    vocab_size: int = knob(8192, "model", "vocabulary size (token ids must be below it)")
    num_layers: int = knob(11, "model", "physical transformer blocks")
    model_dim: int = knob(512, "model", "residual stream width")
    num_heads: int = knob(8, "model", "query heads")
    num_kv_heads: int = knob(4, "model", "key/value heads (grouped-query attention)")
    mlp_mult: int = knob(4, "model", "MLP hidden width = MLP_MULT * MODEL_DIM")
    mlp_act: str = knob("leaky_relu2", "model", "leaky_relu2 (LeakyReLU(0.5)^2, PR 1274+) | relu2 (baseline)")
    tied_embed_init_std: float = knob(0.005, "model", "init std of the tied embedding / output head")
    logit_softcap: float = knob(30.0, "model", "logits = c*tanh(z/c); 0 disables")
    rope_dims: int = knob(16, "model", "head dims that get rotary embedding (partial RoPE); 0 = none")
    rope_base: float = knob(10000.0, "model", "RoPE base frequency")
    qk_gain_init: float = knob(5.0, "model", "init of the learned per-head query gain (q, k are RMS-normed)")
    ln_scale: bool = knob(True, "model", "scale each block's normed input by 1/sqrt(layer+1)")
    xsa: bool = knob(True, "model", "exclusive self-attention on all layers (remove own-value component)")
    unet_skips: bool = knob(True, "model", "U-Net skip connections encoder -> decoder with learned weights")
    skip_gates: bool = knob(True, "model", "sigmoid gate between the stream and each U-Net skip (PR 1493)")
    resid_mix: bool = knob(True, "model", "per-block learned mix of the stream and the embedding stream")
    loop_start: int = knob(3, "model", "first physical layer of the depth-recurrence loop")
    loop_end: int = knob(5, "model", "last physical layer of the loop (inclusive)")
    num_loops: int = knob(3, "model", "passes through the loop once recurrence is on (1 = no recurrence)")
    enable_looping_at: float = knob(0.35, "model", "training fraction at which recurrence switches on")
    parallel_start_layer: int = knob(8, "model", "first layer with two-lane parallel residuals; -1 = off")
    gated_attn: bool = knob(True, "model", "per-head sigmoid gate on the attention output (PR 1736)")
    gated_attn_init_std: float = knob(0.005, "model", "init std of the attention-gate weights")
    sparse_attn_gate: bool = knob(True, "model", "feed the attention gate only the first dims of its input (PR 1855)")
    sparse_attn_gate_dims: int = knob(12, "model", "input dims the sparse attention gate sees")
    sparse_attn_gate_scale: float = knob(0.5, "model", "multiplier on the sparse gate's logits")
    smear_gate: bool = knob(True, "model", "gated previous-token smear of the embedding, masked at BOS (PR 1855)")
    smear_gate_dims: int = knob(12, "model", "embedding dims the smear gate sees")

    # ---- optimization (SPEC section 6)
    iterations: int = knob(20000, "optim", "step limit (the wallclock cap usually stops first)")
    max_wallclock_seconds: float = knob(600.0, "optim", "absolute cap for training + GPTQ calibration; 0 = none")
    train_batch_tokens: int = knob(786432, "optim", "tokens per optimizer step, all ranks together")
    train_seq_len: int = knob(2048, "optim", "tokens per training sequence")
    grad_accum_steps: int = knob(0, "optim", "micro-steps per optimizer step; 0 = 8 // WORLD_SIZE")
    warmup_steps: int = knob(20, "optim", "compile warm-up steps, undone afterwards (weights + optimizer restored)")
    warmdown_frac: float = knob(0.85, "optim", "last fraction of training with linear LR decay")
    min_lr: float = knob(0.1, "optim", "LR floor at the end of warmdown, as a fraction of the peak")
    matrix_lr: float = knob(0.026, "optim", "Muon learning rate for matrix weights")
    muon_momentum: float = knob(0.97, "optim", "Muon momentum after warm-up")
    muon_momentum_warmup_start: float = knob(0.92, "optim", "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = knob(1500, "optim", "steps to warm Muon momentum up")
    muon_nesterov: bool = knob(True, "optim", "Nesterov momentum in Muon")
    muon_backend_steps: int = knob(5, "optim", "Newton-Schulz iterations")
    muon_polar_express: bool = knob(True, "optim", "Polar-Express Newton-Schulz coefficients (PR 1855)")
    muon_row_normalize: bool = knob(True, "optim", "MuonEq-R: normalize update rows before Newton-Schulz")
    muon_weight_decay: float = knob(0.095, "optim", "decoupled weight decay of Muon matrices")
    muon_weight_decay_mlp: float = knob(-1.0, "optim",
                                        "weight decay of MLP matrices; <0 = MUON_WEIGHT_DECAY (PR 1812: 0.115)")
    embed_lr: float = knob(0.03, "optim", "AdamW learning rate of the tied embedding")
    embed_weight_decay: float = knob(0.085, "optim", "AdamW weight decay of the tied embedding")
    scalar_lr: float = knob(0.02, "optim", "AdamW learning rate of gains, gates, mixes and skip weights")
    scalar_weight_decay: float = knob(0.02, "optim", "AdamW weight decay of the scalar group")
    adam_beta1: float = knob(0.9, "optim", "AdamW beta1")
    adam_beta2: float = knob(0.99, "optim", "AdamW beta2 (0.95 before PR 1855)")
    adam_eps: float = knob(1e-8, "optim", "AdamW epsilon")
    grad_clip_norm: float = knob(0.3, "optim", "global gradient-norm clip; 0 = off")
    ema_decay: float = knob(0.9965, "optim", "EMA of weights (the EMA is what gets quantized); 0 = off")
    train_log_every: int = knob(50, "optim", "log a step line every N steps")
    checkpoint_every: int = knob(0, "optim", "also write a checkpoint every N steps; 0 = only at the end")

    # ---- quantization and artifact (SPEC section 7; read by the quantization section)
    quant_scheme: str = knob("gptq", "quant", "gptq (SDClip GPTQ) | int8 (per-row int8, baseline)")
    gptq_calibration_batches: int = knob(16, "quant", "training batches used for GPTQ Hessians")
    gptq_calibration_source: str = knob("train", "quant", "train | generated (model-sampled sequences, PR 1274)")
    gptq_reserve_seconds: float = knob(4.0, "quant", "part of MAX_WALLCLOCK_SECONDS kept for GPTQ calibration")
    gptq_damp: float = knob(0.01, "quant", "GPTQ Hessian damping (fraction of the mean diagonal)")
    gptq_block_size: int = knob(128, "quant", "GPTQ column block size")
    quant_matrix_bits: int = knob(6, "quant", "bits of attention/MLP matrices")
    quant_mlp_bits: int = knob(6, "quant", "bits of MLP matrices (PR 1274: 5)")
    quant_matrix_clip_sigmas: float = knob(12.85, "quant", "SDClip sigmas of matrices not listed below")
    quant_mlp_clip_sigmas: float = knob(11.5, "quant", "SDClip sigmas of MLP matrices")
    quant_attn_clip_sigmas: float = knob(13.0, "quant", "SDClip sigmas of attention matrices")
    quant_embed_bits: int = knob(7, "quant", "bits of the tied embedding")
    quant_embed_clip_sigmas: float = knob(14.0, "quant", "SDClip sigmas of the tied embedding")
    quant_gate_bits: int = knob(8, "quant", "bits of attention-gate weights (per row)")
    quant_small_tensor_numel: int = knob(65536, "quant", "tensors with at most this many elements stay fp16")
    quant_compressor: str = knob("brotli", "quant", "brotli | lzma | zlib")
    quant_byte_shuffle: bool = knob(True, "quant", "byte shuffle (stride 2) before compression")
    lqer_enabled: bool = knob(True, "quant", "low-rank correction of the quantization error (PR 1855)")
    lqer_rank: int = knob(4, "quant", "LQER rank")
    lqer_bits: int = knob(4, "quant", "LQER factor bits (asymmetric)")
    lqer_group_size: int = knob(64, "quant", "LQER factor quantization group size")
    lqer_top_k: int = knob(3, "quant", "tensors that get an LQER correction")
    artifact_limit_bytes: int = knob(16_000_000, "quant", "challenge cap on code + compressed model bytes")

    # ---- evaluation and test-time training (SPEC section 8; read by the evaluation section)
    val_max_docs: int = knob(50000, "eval", "validation documents scored (challenge: first 50,000)")
    eval_seq_len: int = knob(2048, "eval", "context length of evaluation")
    eval_batch_tokens: int = knob(524288, "eval", "tokens per evaluation batch, all ranks together")
    eval_max_seconds: float = knob(600.0, "eval", "evaluation time limit checked in the summary")
    sliding_window_enabled: bool = knob(True, "eval", "report quantized sliding-window val_bpb")
    sliding_stride: int = knob(64, "eval", "sliding-window stride")
    ttt_enabled: bool = knob(True, "eval", "run test-time training")
    ttt_mode: str = knob("phased", "eval", "phased (LoRA, PR 1736) | chunked (score-first SGD, PR 1493)")
    ttt_lr: float = knob(0.005, "eval", "chunked TTT: SGD learning rate")
    ttt_momentum: float = knob(0.9, "eval", "chunked TTT: SGD momentum")
    ttt_epochs: int = knob(3, "eval", "chunked TTT: epochs per chunk")
    ttt_chunk_tokens: int = knob(32768, "eval", "chunked TTT: tokens per chunk")
    ttt_grad_clip: float = knob(1.0, "eval", "chunked TTT: gradient clip")
    phased_ttt_prefix_docs: int = knob(2500, "eval", "phased TTT: scored documents split into phases")
    phased_ttt_num_phases: int = knob(3, "eval", "phased TTT: global-SGD phases")
    phased_ttt_lora_rank: int = knob(80, "eval", "phased TTT: LoRA rank")
    phased_ttt_lr: float = knob(1e-4, "eval", "phased TTT: LoRA Adam learning rate")
    phased_ttt_beta1: float = knob(0.0, "eval", "phased TTT: LoRA Adam beta1")
    phased_ttt_beta2: float = knob(0.99, "eval", "phased TTT: LoRA Adam beta2")
    phased_ttt_weight_decay: float = knob(0.5, "eval", "phased TTT: LoRA Adam weight decay")
    phased_ttt_chunk_tokens: int = knob(48, "eval", "phased TTT: tokens scored per LoRA update")
    phased_ttt_docs_per_batch: int = knob(64, "eval", "phased TTT: documents per length-sorted batch")
    phased_ttt_global_lr: float = knob(0.001, "eval", "phased TTT: global SGD learning rate")
    phased_ttt_global_momentum: float = knob(0.9, "eval", "phased TTT: global SGD momentum")
    phased_ttt_global_epochs: int = knob(1, "eval", "phased TTT: global SGD epochs per phase")
    phased_ttt_global_chunk_tokens: int = knob(32768, "eval", "phased TTT: global SGD chunk tokens")

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def recurrence_enabled(self) -> bool:
        return self.num_loops > 1

    @property
    def train_glob(self) -> str:
        return self.train_files or os.path.join(self.data_path, "fineweb_train_*.bin")

    @property
    def val_glob(self) -> str:
        return self.val_files or os.path.join(self.data_path, "fineweb_val_[0-9]*.bin")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Hyperparameters":
        """Defaults < PRESET < explicit env vars; then validate. Raises ValueError naming the env var."""
        environ = os.environ if environ is None else environ
        by_env = {env_name(f): f for f in dataclasses.fields(cls)}
        preset = environ.get("PRESET", cls.preset_default())
        if preset not in PRESETS:
            raise ValueError(f"PRESET={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        values: dict[str, Any] = {"preset": preset}
        for name, value in resolve_preset(preset).items():
            values[name] = value
        for key, f in by_env.items():
            if key in environ and key != "PRESET":
                values[f.name] = parse_env_value(key, environ[key], type(f.default))
        h = cls(**values)
        h.validate()
        return h

    @staticmethod
    def preset_default() -> str:
        return next(f.default for f in dataclasses.fields(Hyperparameters) if f.name == "preset")

    def validate(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        choices = {"device": ("auto", "cpu", "cuda"), "compile": ("auto", "0", "1"),
                   "attn_backend": ("auto", "fa3", "flex", "sdpa", "plain"), "autocast": ("auto", "bf16", "fp32"),
                   "mlp_act": ("leaky_relu2", "relu2"), "quant_scheme": ("gptq", "int8"),
                   "gptq_calibration_source": ("train", "generated"), "quant_compressor": ("brotli", "lzma", "zlib"),
                   "ttt_mode": ("phased", "chunked")}
        for name, allowed in choices.items():
            value = getattr(self, name)
            require(value in allowed, f"{name.upper()}={value!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                     "train_batch_tokens", "train_seq_len", "iterations", "num_loops", "muon_backend_steps"):
            require(getattr(self, name) > 0, f"{name.upper()} must be positive, got {getattr(self, name)}")
        require(self.cpu_threads >= 0, f"CPU_THREADS={self.cpu_threads} must be >= 0")
        require(self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size} does not fit the uint16 shard format")
        require(self.vocab_size > BOS_ID, f"VOCAB_SIZE={self.vocab_size} must include the BOS id {BOS_ID}")
        require(self.model_dim % self.num_heads == 0,
                f"MODEL_DIM={self.model_dim} is not divisible by NUM_HEADS={self.num_heads}")
        require(self.num_heads % self.num_kv_heads == 0,
                f"NUM_HEADS={self.num_heads} is not divisible by NUM_KV_HEADS={self.num_kv_heads}")
        require(self.head_dim % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={self.head_dim} must be even (RoPE)")
        require(0 <= self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0,
                f"ROPE_DIMS={self.rope_dims} must be even and within the head dim {self.head_dim}")
        if self.recurrence_enabled:
            require(0 <= self.loop_start <= self.loop_end < self.num_layers,
                    f"LOOP_START={self.loop_start}..LOOP_END={self.loop_end} must lie within 0..NUM_LAYERS-1="
                    f"{self.num_layers - 1}")
            require(self.parallel_start_layer < 0 or self.parallel_start_layer > self.loop_end,
                    f"PARALLEL_START_LAYER={self.parallel_start_layer} must come after LOOP_END={self.loop_end}")
        require(self.parallel_start_layer < self.num_layers,
                f"PARALLEL_START_LAYER={self.parallel_start_layer} must be < NUM_LAYERS={self.num_layers} or -1")
        require(0.0 <= self.enable_looping_at <= 1.0, f"ENABLE_LOOPING_AT={self.enable_looping_at} must be in [0, 1]")
        require(0.0 <= self.warmdown_frac <= 1.0, f"WARMDOWN_FRAC={self.warmdown_frac} must be in [0, 1]")
        require(0.0 <= self.min_lr <= 1.0, f"MIN_LR={self.min_lr} must be in [0, 1]")
        require(0.0 <= self.ema_decay < 1.0, f"EMA_DECAY={self.ema_decay} must be in [0, 1)")
        require(self.max_wallclock_seconds >= 0, f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds} must be >= 0")
        require(self.max_wallclock_seconds == 0 or self.gptq_reserve_seconds < self.max_wallclock_seconds,
                f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} leaves no training time within "
                f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}")
        if self.sparse_attn_gate:
            require(self.gated_attn, "SPARSE_ATTN_GATE=1 needs GATED_ATTN=1 (it changes the gate's input)")
            require(0 < self.sparse_attn_gate_dims <= self.model_dim,
                    f"SPARSE_ATTN_GATE_DIMS={self.sparse_attn_gate_dims} must be in 1..MODEL_DIM")
        if self.smear_gate:
            require(0 < self.smear_gate_dims <= self.model_dim,
                    f"SMEAR_GATE_DIMS={self.smear_gate_dims} must be in 1..MODEL_DIM")

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(grad_accum_steps, sequences per rank per micro-step) for this world size; errors name env vars."""
        accum = self.grad_accum_steps or max(1, 8 // world_size)
        per_micro = world_size * accum * self.train_seq_len
        if self.train_batch_tokens % per_micro != 0:
            raise ValueError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} is not divisible by WORLD_SIZE*"
                             f"GRAD_ACCUM_STEPS*TRAIN_SEQ_LEN={world_size}*{accum}*{self.train_seq_len}")
        return accum, self.train_batch_tokens // per_micro

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def env_name(f: dataclasses.Field) -> str:
    return f.metadata.get("env") or f.name.upper()


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
            return float(text)
        return text
    except ValueError as error:
        raise ValueError(f"{key}={raw!r} is not a valid {kind.__name__}: {error}") from None


def env_var_table() -> list[dict[str, Any]]:
    """One row per knob: env name, default, section, help. The README's env-var table is generated from it."""
    return [{"env": env_name(f), "default": f.default, "section": f.metadata["section"], "help": f.metadata["help"]}
            for f in dataclasses.fields(Hyperparameters)]


def env_var_markdown() -> str:
    """The env-var table as Markdown (`python train_gpt.py --env-table`), grouped by section."""
    rows = ["| variable | default | section | meaning |", "|---|---|---|---|"]
    for row in sorted(env_var_table(), key=lambda r: ["run", "model", "optim", "quant", "eval"].index(r["section"])):
        default = row["default"] if row["default"] != "" else '""'
        rows.append(f"| `{row['env']}` | `{default}` | {row['section']} | {row['help']} |")
    return "\n".join(rows)


# Published systems (SPEC section 11) as (parent preset, field overrides). The dataclass defaults are
# the record line (PR 1855), so `pr1855` has no overrides; the others undo or change its settings.
PRESETS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "pr1855": (None, {}),
    "pr1736": ("pr1855", dict(  # without PR 1855's SmearGate, sparse gate, Polar-Express, MIN_LR, LQER
        smear_gate=False, sparse_attn_gate=False, muon_polar_express=False, min_lr=0.0, warmdown_frac=0.75,
        adam_beta2=0.95, quant_mlp_clip_sigmas=12.0, quant_embed_clip_sigmas=15.0, lqer_enabled=False,
        phased_ttt_prefix_docs=2000, phased_ttt_lora_rank=96, phased_ttt_beta2=0.999)),
    "pr1493": ("pr1736", dict(  # SP8192 (no CaseOps), parallel from layer 7, QK-gain 5.25, chunked SGD TTT
        data_path="./data/datasets/fineweb10B_sp8192", parallel_start_layer=7, qk_gain_init=5.25,
        gated_attn=False, matrix_lr=0.022, warmdown_frac=0.72, quant_mlp_clip_sigmas=12.85,
        quant_attn_clip_sigmas=12.85, quant_embed_bits=8, quant_embed_clip_sigmas=20.0, ttt_mode="chunked",
        ttt_epochs=3, ttt_chunk_tokens=32768)),
    "pr1812": ("pr1493", dict(  # 4 TTT epochs on 64K chunks, split MLP weight decay, Adam wd 0.005
        ttt_epochs=4, ttt_chunk_tokens=65536, muon_weight_decay_mlp=0.115, embed_weight_decay=0.005,
        scalar_weight_decay=0.005, muon_momentum_warmup_steps=1000)),  # 22% of ~4,550 steps
    "pr1755": ("pr1493", dict(  # PR 1493 on the CaseOps tokenizer with the byte sidecar
        data_path="./data/datasets/fineweb10B_sp8192_caseops")),
    "pr1274": ("pr1493", dict(  # ~1K-entry tokenizer, mini recurrence, mixed int5/int6 GPTQ, generated calibration
        data_path="./data/datasets/fineweb10B_scylla", vocab_size=1024, loop_start=4, loop_end=5, num_loops=2,
        quant_mlp_bits=5, gptq_calibration_source="generated")),
    "baseline": ("pr1493", dict(  # the challenge's naive 9x512 baseline (1.2244)
        data_path="./data/datasets/fineweb10B_sp1024", vocab_size=1024, num_layers=9, mlp_mult=2,
        mlp_act="relu2", train_seq_len=1024, train_batch_tokens=524288, qk_gain_init=1.5, rope_dims=64,
        ln_scale=False, xsa=False, skip_gates=False, num_loops=1, parallel_start_layer=-1,
        matrix_lr=0.04, muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500,
        muon_row_normalize=False, muon_weight_decay=0.0, embed_lr=0.05, embed_weight_decay=0.0,
        scalar_lr=0.04, scalar_weight_decay=0.0, grad_clip_norm=0.0, ema_decay=0.0, warmdown_frac=0.1,
        quant_scheme="int8", quant_compressor="zlib", quant_byte_shuffle=False, sliding_window_enabled=False,
        ttt_enabled=False, gptq_reserve_seconds=0.0)),
    "tiny": ("pr1855", dict(  # every record feature at CPU scale; about a minute on 2 cores
        num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, loop_start=2, loop_end=3,
        parallel_start_layer=4, train_seq_len=128, train_batch_tokens=4096, iterations=150,
        max_wallclock_seconds=45.0, gptq_reserve_seconds=2.0, warmup_steps=2, muon_momentum_warmup_steps=30,
        ema_decay=0.9, cpu_threads=1,
        train_log_every=10, gptq_calibration_batches=2, val_max_docs=64, eval_seq_len=128,
        eval_batch_tokens=8192, eval_max_seconds=120.0, ttt_chunk_tokens=2048, phased_ttt_prefix_docs=16,
        phased_ttt_lora_rank=4, phased_ttt_docs_per_batch=8, phased_ttt_global_chunk_tokens=2048,
        sliding_stride=32, quant_small_tensor_numel=1024)),
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


def read_shard(path: str) -> np.ndarray:
    """Return the uint16 tokens of one shard, checking magic, version and declared vs actual size."""
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
    return np.fromfile(path, dtype="<u2", count=declared, offset=header_bytes)


def shard_token_count(path: str) -> int:
    """Tokens declared in a shard's header (cheap: reads 12 bytes)."""
    return int(np.fromfile(path, dtype="<i4", count=3)[2])


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

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All micro-batches of this rank for one optimizer step."""
        span = self._take(self.step_tokens + 1)
        batches = []
        for micro in range(self.accum):
            start = (self.rank * self.accum + micro) * self.micro_tokens
            chunk = torch.from_numpy(span[start: start + self.micro_tokens + 1].astype(np.int64))
            inputs = chunk[:-1].view(self.seqs_per_micro, self.seq_len)
            targets = chunk[1:].view(self.seqs_per_micro, self.seq_len)
            batches.append((inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)))
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.next_step()


# -----------------------------------------------------------------------------
# Model
#
# A GPT with tied embeddings and the record line's additions (SPEC section 5), each one switch.
# One forward implementation (`GPT.hidden_states`) serves training, evaluation and TTT; adapters
# (LoRA) enter through the `lora` argument at every adaptable linear. Attention is causal and never
# crosses a document: a document starts at each BOS and at position 0 of every row.
# -----------------------------------------------------------------------------

ATTENTION_BACKENDS = ("fa3", "flex", "sdpa", "plain")


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
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    return importlib.util.find_spec("flash_attn_interface") is not None


@dataclass
class DocumentLayout:
    """Where documents start in a [B, T] batch; built once per forward, shared by every layer."""
    doc_ids: torch.Tensor            # [B, T] int64: index of each token's document within its row
    doc_start: torch.Tensor          # [B, T] bool: token starts a document (BOS or row start)
    backend: str
    dense_mask: torch.Tensor | None = None   # [B, 1, T, T] bool, for sdpa / plain
    block_mask: Any = None                   # FlexAttention BlockMask
    cu_seqlens: torch.Tensor | None = None   # [n_docs + 1] int32, for FA3 varlen
    max_seqlen: int = 0

    @classmethod
    def build(cls, input_ids: torch.Tensor, backend: str) -> "DocumentLayout":
        batch, seq_len = input_ids.shape
        doc_start = input_ids == BOS_ID
        doc_start[:, 0] = True
        doc_ids = torch.cumsum(doc_start.long(), dim=1)  # [B, T]
        layout = cls(doc_ids=doc_ids, doc_start=doc_start, backend=backend)
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
        elif backend == "fa3":
            starts = torch.nonzero(doc_start.flatten(), as_tuple=False).flatten()
            total = torch.tensor([batch * seq_len], device=input_ids.device)
            layout.cu_seqlens = torch.cat([starts, total]).to(torch.int32)
            layout.max_seqlen = seq_len  # an upper bound is enough for the kernel's grid
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


def apply_lora(linear: nn.Module, site: str, layer_index: int, x: torch.Tensor, lora: Any) -> torch.Tensor:
    """y = linear(x) (+ lora(site, layer_index, x) when an adapter is given and returns a delta)."""
    y = linear(x)
    if lora is not None:
        delta = lora(site, layer_index, x)
        if delta is not None:
            y = y + delta
    return y


class MatrixLinear(nn.Linear):
    """A bias-free projection trained by Muon and quantized by GPTQ (the optimizer routes by this class)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:  # output projections start at zero: every block begins as the identity
            nn.init.zeros_(self.weight)


class Rotary(nn.Module):
    """Partial RoPE: rotates the first `rope_dims` dims of each head (16 of 64 in the record line)."""

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
    def __init__(self, h: Hyperparameters, layer_index: int):
        super().__init__()
        self.layer_index, self.num_heads, self.num_kv_heads, self.head_dim = (
            layer_index, h.num_heads, h.num_kv_heads, h.head_dim)
        self.q_proj = MatrixLinear(h.model_dim, h.num_heads * h.head_dim)
        self.k_proj = MatrixLinear(h.model_dim, h.num_kv_heads * h.head_dim)
        self.v_proj = MatrixLinear(h.model_dim, h.num_kv_heads * h.head_dim)
        self.out_proj = MatrixLinear(h.num_heads * h.head_dim, h.model_dim, zero_init=True)
        # q and k are RMS-normed per head, so attention sharpness is this learned per-head gain
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.rotary = Rotary(h.rope_dims, h.rope_base)
        self.xsa = h.xsa
        # Gated attention (PR 1736): sigmoid(W x) per head scales the head's output before out_proj.
        # The sparse variant (PR 1855) feeds the gate only the first SPARSE_ATTN_GATE_DIMS input dims.
        self.gate_dims = h.sparse_attn_gate_dims if h.sparse_attn_gate else h.model_dim
        self.gate_scale = h.sparse_attn_gate_scale if h.sparse_attn_gate else 1.0
        self.gate = None
        if h.gated_attn:
            self.gate = nn.Linear(self.gate_dims, h.num_heads, bias=False)
            nn.init.normal_(self.gate.weight, std=h.gated_attn_init_std)

    def forward(self, x: torch.Tensor, layout: DocumentLayout, lora: Any = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        layer = self.layer_index
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
        return apply_lora(self.out_proj, "o", layer, y, lora)


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters, layer_index: int):
        super().__init__()
        self.layer_index, self.act = layer_index, h.mlp_act
        self.fc = MatrixLinear(h.model_dim, h.mlp_mult * h.model_dim)
        self.proj = MatrixLinear(h.mlp_mult * h.model_dim, h.model_dim, zero_init=True)

    def forward(self, x: torch.Tensor, lora: Any = None) -> torch.Tensor:
        hidden = apply_lora(self.fc, "mlp_in", self.layer_index, x, lora)
        if self.act == "leaky_relu2":  # LeakyReLU(0.5)^2 (PR 1274 line): keeps gradient for negatives
            hidden = F.leaky_relu(hidden, negative_slope=0.5).square()
        else:  # ReLU^2 (baseline)
            hidden = F.relu(hidden).square()
        return apply_lora(self.proj, "mlp_out", self.layer_index, hidden, lora)


class Block(nn.Module):
    """One transformer block acting on a stack of residual lanes x [lanes, B, T, D].

    Sequential blocks have one lane. From PARALLEL_START_LAYER (PR 1493) there are two lanes: attention
    reads lane 0, the MLP reads lane 1, and both outputs are written into both lanes with learned
    scalars (init 1: equal lanes, i.e. a GPT-J parallel block); the model output is the lanes' mean.
    """

    def __init__(self, h: Hyperparameters, layer_index: int):
        super().__init__()
        self.attn, self.mlp = CausalSelfAttention(h, layer_index), MLP(h, layer_index)
        self.attn_scale = nn.Parameter(torch.ones(h.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(h.model_dim))
        # LN scale (PR 1493 line): deeper blocks see a smaller normed input, 1/sqrt(layer+1)
        self.ln_scale = 1.0 / math.sqrt(layer_index + 1) if h.ln_scale else 1.0
        # resid mix: x <- m0 * x + m1 * x0, a learned re-injection of the embedding stream
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(h.model_dim), torch.zeros(h.model_dim)])) \
            if h.resid_mix else None
        self.parallel = 0 <= h.parallel_start_layer <= layer_index
        if self.parallel:
            self.lane_mix = nn.Parameter(torch.ones(2, 2))    # [target lane, (attn, mlp)]
            self.lane_resid = nn.Parameter(torch.ones(2))     # per-lane residual scale

    def forward(self, x: torch.Tensor, x0: torch.Tensor, layout: DocumentLayout, lora: Any = None) -> torch.Tensor:
        if self.resid_mix is not None:
            mix = self.resid_mix.to(x.dtype)
            x = mix[0] * x + mix[1] * x0
        if not self.parallel:
            lane = x[0]
            lane = lane + self.attn_scale.to(x.dtype) * self.attn(rms_norm(lane) * self.ln_scale, layout, lora)
            lane = lane + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(lane) * self.ln_scale, lora)
            return lane[None]
        if x.size(0) == 1:
            x = x.expand(2, *x.shape[1:])
        attn_out = self.attn_scale.to(x.dtype) * self.attn(rms_norm(x[0]) * self.ln_scale, layout, lora)
        mlp_out = self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x[1]) * self.ln_scale, lora)
        mix, resid = self.lane_mix.to(x.dtype), self.lane_resid.to(x.dtype)
        return (resid[:, None, None, None] * x + mix[:, 0, None, None, None] * attn_out
                + mix[:, 1, None, None, None] * mlp_out)


class SmearGate(nn.Module):
    """x_t += lambda * sigmoid(W x_t[:dims]) * x_{t-1} (PR 1855): a cheap bigram-like previous-token
    signal. Masked to zero where a document starts, so nothing leaks across a BOS."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.dims = h.smear_gate_dims
        self.gate = nn.Linear(h.smear_gate_dims, 1, bias=False)
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

    def __init__(self, h: Hyperparameters, attn_backend: str = "sdpa"):
        super().__init__()
        if attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {attn_backend!r} is not one of {ATTENTION_BACKENDS}")
        self.h, self.attn_backend = h, attn_backend
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        self.smear = SmearGate(h) if h.smear_gate else None
        self.blocks = nn.ModuleList([Block(h, index) for index in range(h.num_layers)])
        self.recurrence_active = False
        # skip parameters are sized for the longest layer order (recurrence on); fewer are used when off
        encoder, decoder = self.layer_order(looping=h.recurrence_enabled)
        num_skips = min(len(encoder), len(decoder)) if h.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(num_skips, h.model_dim)) if num_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, h.model_dim)) if num_skips and h.skip_gates else None

    def set_recurrence(self, active: bool) -> None:
        """Turn depth recurrence on/off (switched on at ENABLE_LOOPING_AT of training)."""
        self.recurrence_active = bool(active) and self.h.recurrence_enabled

    def layer_order(self, looping: bool | None = None) -> tuple[list[int], list[int]]:
        """Physical block indices of the encoder and decoder halves, e.g. for 11 layers with loop 3-5 run
        3 times: encoder 0,1,2,3,4,5,3,4 and decoder 5,3,4,5,6,7,8,9,10 (PR 1493)."""
        h = self.h
        looping = self.recurrence_active if looping is None else looping
        order = list(range(h.num_layers))
        if looping:
            loop = list(range(h.loop_start, h.loop_end + 1))
            order = list(range(h.loop_start)) + loop * h.num_loops + list(range(h.loop_end + 1, h.num_layers))
        middle = len(order) // 2
        return order[:middle], order[middle:]

    def hidden_states(self, input_ids: torch.Tensor, lora: Any = None) -> torch.Tensor:
        """The one block stack: input_ids [B, T] -> final normed hidden states [B, T, D]."""
        layout = DocumentLayout.build(input_ids, self.attn_backend)
        x = rms_norm(self.tok_emb(input_ids))  # [B, T, D]
        if self.smear is not None:
            x = self.smear(x, layout.doc_start)
        x0 = x
        x = x[None]  # [lanes=1, B, T, D]
        encoder, decoder = self.layer_order()
        skips = []
        for index in encoder:
            x = self.blocks[index](x, x0, layout, lora)
            skips.append(x)
        for position, index in enumerate(decoder):
            if self.skip_weights is not None and position < len(encoder) and skips:
                scaled_skip = self.skip_weights[position].to(x.dtype) * skips.pop()
                if self.skip_gates is not None:  # sigmoid gate between stream and skip (init: half/half)
                    gate = torch.sigmoid(self.skip_gates[position].to(x.dtype))
                    x = gate * x + (1 - gate) * scaled_skip
                else:
                    x = x + scaled_skip
            x = self.blocks[index](x, x0, layout, lora)
        return rms_norm(x.mean(dim=0))  # mean of the lanes

    def forward_logits(self, input_ids: torch.Tensor, lora: Any = None) -> torch.Tensor:
        """Softcapped float32 logits [B, T, V]; the head is the tied embedding."""
        hidden = self.hidden_states(input_ids, lora)
        logits = apply_lora(lambda z: F.linear(z, self.tok_emb.weight.to(z.dtype)), "head", -1, hidden, lora)
        logits = logits.float()
        cap = self.h.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def per_token_nll(self, input_ids: torch.Tensor, target_ids: torch.Tensor, lora: Any = None) -> torch.Tensor:
        """Per-token negative log-likelihood in nats [B, T] (float32, full softmax over the vocabulary)."""
        logits = self.forward_logits(input_ids, lora)
        nll = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none")
        return nll.view_as(target_ids)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all targets (training)."""
        return self.per_token_nll(input_ids, target_ids).mean()


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
    """Flat at 1, then linear warmdown over the last `warmdown_frac` of training down to `min_lr`."""
    progress = min(max(progress, 0.0), 1.0)
    if warmdown_frac <= 0 or progress <= 1.0 - warmdown_frac:
        return 1.0
    remaining = (1.0 - progress) / warmdown_frac  # 1 at the start of warmdown, 0 at the end
    return min_lr + (1.0 - min_lr) * remaining


def muon_momentum_at(step: int, h: Hyperparameters) -> float:
    """Muon momentum warmed up linearly from MUON_MOMENTUM_WARMUP_START over the first steps."""
    frac = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum


def distributed_info() -> tuple[int, int]:
    """(rank, world_size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        """Average gradients across ranks; returns, per group, this rank's shard [n_owned, rows, cols]."""
        rank, world = distributed_info()
        shards = []
        for group in self.param_groups:
            params = group["params"]
            per_rank = math.ceil(len(params) / world)
            stacked = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            if per_rank * world > len(params):  # pad so the stack splits evenly across ranks
                padding = stacked.new_zeros(per_rank * world - len(params), *stacked.shape[1:])
                stacked = torch.cat([stacked, padding])
            if world == 1:
                shards.append(stacked)
            elif dist.get_backend() == "nccl":
                shard = stacked.new_empty(per_rank, *stacked.shape[1:])
                dist.reduce_scatter_tensor(shard, stacked, op=dist.ReduceOp.AVG)
                shards.append(shard)
            else:  # Gloo has no reduce-scatter: all-reduce, then keep this rank's slice
                dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
                shards.append(stacked[rank * per_rank: (rank + 1) * per_rank] / world)
        return shards

    @torch.no_grad()
    def apply_updates(self, shards: list[torch.Tensor], grad_scale: float = 1.0) -> None:
        """Momentum + orthogonalization on this rank's shard, all-gather, apply to every parameter."""
        rank, world = distributed_info()
        for group, shard in zip(self.param_groups, shards):
            params = group["params"]
            per_rank = shard.size(0)
            updates = torch.zeros_like(shard)
            for local in range(per_rank):
                index = rank * per_rank + local
                if index >= len(params):
                    break  # padding
                param = params[index]
                grad = shard[local] * grad_scale
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(grad)
                update = grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
                if self.row_normalize:  # MuonEq-R: equalize row norms before orthogonalizing
                    update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                compute_dtype = torch.bfloat16 if update.is_cuda else torch.float32
                update = newton_schulz(update, self.backend_steps, self.polar_express, compute_dtype)
                updates[local] = update * math.sqrt(max(1.0, update.size(0) / update.size(1)))
            if world > 1:
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

    def __init__(self, model: GPT, h: Hyperparameters):
        self.h = h
        matrices, scalars = [], []
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if module is model.tok_emb:
                    continue
                (matrices if isinstance(module, MatrixLinear) else scalars).append((f"{module_name}.{name}", param))
        # Muon groups share a shape (so they stack) and a weight decay (MLP may differ, PR 1812)
        mlp_wd = h.muon_weight_decay_mlp if h.muon_weight_decay_mlp >= 0 else h.muon_weight_decay
        muon_groups: dict[tuple, list[nn.Parameter]] = {}
        for name, param in matrices:
            decay = mlp_wd if ".mlp." in name else h.muon_weight_decay
            muon_groups.setdefault((tuple(param.shape), decay), []).append(param)
        self.muon = Muon([dict(params=params, weight_decay=decay, base_lr=h.matrix_lr)
                          for (_, decay), params in muon_groups.items()],
                         lr=h.matrix_lr, momentum=h.muon_momentum, nesterov=h.muon_nesterov,
                         backend_steps=h.muon_backend_steps, polar_express=h.muon_polar_express,
                         row_normalize=h.muon_row_normalize)
        adam_groups = [dict(params=[model.tok_emb.weight], lr=h.embed_lr, base_lr=h.embed_lr,
                            weight_decay=h.embed_weight_decay),
                       dict(params=[param for _, param in scalars], lr=h.scalar_lr, base_lr=h.scalar_lr,
                            weight_decay=h.scalar_weight_decay)]
        fused = model.tok_emb.weight.is_cuda
        self.adam = torch.optim.AdamW(adam_groups, betas=(h.adam_beta1, h.adam_beta2), eps=h.adam_eps, fused=fused)
        self.adam_params = [p for group in adam_groups for p in group["params"]]

    def zero_grad(self) -> None:
        self.muon.zero_grad(set_to_none=True)
        self.adam.zero_grad(set_to_none=True)

    def set_schedule(self, lr_scale: float, momentum: float) -> None:
        for group in self.muon.param_groups:
            group["lr"], group["momentum"] = group["base_lr"] * lr_scale, momentum
        for group in self.adam.param_groups:
            group["lr"] = group["base_lr"] * lr_scale

    def step(self) -> float:
        """Average gradients across ranks, clip by the global norm, update. Returns the pre-clip norm."""
        _, world = distributed_info()
        shards = self.muon.reduce_gradients()
        adam_grads = [p.grad for p in self.adam_params if p.grad is not None]
        if world > 1 and adam_grads:
            flat = torch.cat([g.flatten() for g in adam_grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world
            offset = 0
            for grad in adam_grads:
                grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        # global norm of the averaged gradient: Muon shards are disjoint across ranks, Adam grads replicated
        muon_sq = sum((shard.float().square().sum() for shard in shards), torch.zeros((), device=shards[0].device)) \
            if shards else torch.zeros(())
        if world > 1:
            dist.all_reduce(muon_sq, op=dist.ReduceOp.SUM)
        adam_sq = sum(g.float().square().sum() for g in adam_grads) if adam_grads else 0.0
        norm = float(torch.sqrt(muon_sq + adam_sq))
        scale = 1.0
        if self.h.grad_clip_norm > 0 and norm > self.h.grad_clip_norm:
            scale = self.h.grad_clip_norm / (norm + 1e-6)
            for grad in adam_grads:
                grad.mul_(scale)
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


@dataclass
class TrainResult:
    steps: int
    train_time_s: float       # timed training only (compile warm-up excluded, as in the challenge)
    warmup_time_s: float
    tokens: int               # training tokens consumed by all ranks
    tokens_per_s: float
    stop_reason: str          # "iterations" or "wallclock"
    final_train_loss: float


class ExponentialMovingAverage:
    """fp32 EMA of every floating tensor of the model's state; its weights are what gets quantized."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: tensor.detach().float().clone()
                       for name, tensor in model.state_dict().items() if tensor.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, tensor in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(tensor.float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for name, tensor in self.shadow.items():
            state[name].copy_(tensor.to(state[name].dtype))


def training_budget_seconds(h: Hyperparameters) -> float | None:
    """Seconds of timed training allowed: the cap minus the GPTQ calibration reserve (None: no cap)."""
    if h.max_wallclock_seconds <= 0:
        return None
    return h.max_wallclock_seconds - h.gptq_reserve_seconds


def atomic_torch_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: no half-written file under `path`."""
    temporary = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, temporary)
    os.replace(temporary, path)


def atomic_write_text(text: str, path: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def save_checkpoint(path: str, model: nn.Module, h: Hyperparameters, step: int) -> None:
    """Model weights + resolved hyperparameters; loadable with torch.load(weights_only=True)."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    atomic_torch_save({"model": state, "step": step, "hyperparameters": h.as_dict()}, path)


def load_checkpoint(path: str, model: nn.Module) -> int:
    """Load weights saved by `save_checkpoint` (no pickle of arbitrary objects); returns the step."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    return int(checkpoint["step"])


def compute_context(device: torch.device, autocast: str) -> Any:
    """bf16 autocast where the run asked for it, else a no-op context."""
    if autocast == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def train_model(h: Hyperparameters, model: GPT, optimizer: TrainingOptimizer, make_loader: Callable[[], Any],
                log: Callable[[str], None], *, forward: Callable | None = None, autocast: str = "fp32",
                clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] = lambda: None,
                ema: ExponentialMovingAverage | None = None, checkpoint_path: str | None = None) -> TrainResult:
    """Train `model` in place. `make_loader()` returns a fresh loader whose `next_step()` gives this
    rank's micro-batches; `forward` is the (possibly compiled) loss function, default `model`;
    `clock` is injectable so tests can prove the wallclock cap with a fake clock."""
    forward = forward or model
    device = model.tok_emb.weight.device
    rank, world = distributed_info()

    def train_step(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward/backward over the micro-batches; returns the rank-averaged loss (optimizer not stepped)."""
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for inputs, targets in batches:
            with compute_context(device, autocast):
                loss = forward(inputs, targets)
            (loss / len(batches)).backward()
            total += loss.detach().float()
        total /= len(batches)
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total /= world
        return float(total)

    # Compile warm-up: run a few real steps so every kernel (recurrence off and on) is compiled, then put
    # weights and optimizer state back exactly as they were and restart the data stream. The timed run is
    # therefore identical to a run without warm-up: it gains nothing from it except compiled kernels.
    warmup_start = clock()
    if h.warmup_steps > 0:
        initial_model = copy.deepcopy(model.state_dict())
        initial_optimizer = copy.deepcopy(optimizer.state_dict())
        warmup_loader = make_loader()
        for warmup_step in range(h.warmup_steps):
            model.set_recurrence(h.recurrence_enabled and warmup_step >= h.warmup_steps // 2)
            train_step(warmup_loader.next_step())
            optimizer.step()
        model.load_state_dict(initial_model)
        optimizer.load_state_dict(initial_optimizer)
        optimizer.zero_grad()
        model.set_recurrence(False)
        log(f"warmup: {h.warmup_steps} compile steps done, weights and optimizer state restored")
    synchronize()
    warmup_time = clock() - warmup_start

    loader = make_loader()
    budget = training_budget_seconds(h)
    step_tokens = h.train_batch_tokens
    step_durations: list[float] = []
    stop_reason, loss_value, step = "iterations", float("nan"), 0
    synchronize()
    start = clock()
    previous_top = start
    while step < h.iterations:
        # A step starts only if the slowest recent iteration (measured top to top: step, EMA, logging,
        # checkpoint) still fits in the budget. Rank 0 decides for everyone so all ranks stop together.
        now = clock()
        if step > 0:
            step_durations.append(now - previous_top)
        previous_top = now
        elapsed, predicted = now - start, max(step_durations[-10:], default=0.0)
        if world > 1:
            shared = torch.tensor([elapsed, predicted], dtype=torch.float64, device=device)
            dist.broadcast(shared, src=0)
            elapsed, predicted = shared.tolist()
        progress = elapsed / budget if budget is not None else step / h.iterations
        if h.recurrence_enabled and not model.recurrence_active and progress >= h.enable_looping_at:
            passes_before = sum(map(len, model.layer_order()))
            model.set_recurrence(True)
            # looped steps are slower: rescale the measured durations by the number of layer passes
            slowdown = sum(map(len, model.layer_order())) / passes_before
            step_durations = [duration * slowdown for duration in step_durations]
            predicted *= slowdown
            log(f"recurrence: on at step {step} (progress {progress:.3f}), layer order {model.layer_order()}")
        if budget is not None and elapsed + predicted > budget:
            stop_reason = "wallclock"
            break
        optimizer.set_schedule(lr_multiplier(progress, h.warmdown_frac, h.min_lr), muon_momentum_at(step, h))

        loss_value = train_step(loader.next_step())
        if not math.isfinite(loss_value):
            # weights were not updated with this loss; the last checkpoint on disk is left untouched
            kept = checkpoint_path if checkpoint_path and os.path.exists(checkpoint_path) else "none"
            message = f"stopping: non-finite train loss {loss_value} at step {step + 1}; last good checkpoint: {kept}"
            log(message)
            raise TrainingDiverged(step + 1, message)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        synchronize()
        step += 1
        elapsed = clock() - start

        if step % h.train_log_every == 0 or step == 1 or step == h.iterations:
            log(f"step:{step}/{h.iterations} train_loss:{loss_value:.4f} train_time:{elapsed * 1000:.0f}ms "
                f"step_avg:{elapsed * 1000 / step:.2f}ms tok/s:{step * step_tokens / max(elapsed, 1e-9):.0f}")
        if checkpoint_path and h.checkpoint_every > 0 and step % h.checkpoint_every == 0 and rank == 0:
            save_checkpoint(checkpoint_path, model, h, step)

    synchronize()
    elapsed = clock() - start
    log(f"training stopped ({stop_reason}) after {step} steps, train_time:{elapsed * 1000:.0f}ms"
        + (f" of a {budget:.1f}s budget (+{h.gptq_reserve_seconds:.1f}s GPTQ reserve)" if budget is not None else ""))
    tokens = step * step_tokens
    return TrainResult(steps=step, train_time_s=elapsed, warmup_time_s=warmup_time, tokens=tokens,
                       tokens_per_s=tokens / max(elapsed, 1e-9), stop_reason=stop_reason,
                       final_train_loss=loss_value)


# -----------------------------------------------------------------------------
# Quantization and artifact
#
# GPTQ (SDClip scales, Hessians from training batches), optional LQER, byte shuffle + brotli, and the
# self-extracting counted code (SPEC section 7). Developed in _sections/quant.py and merged here.
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# Evaluation and test-time training
#
# Pre-quant, quantized, sliding-window and TTT val_bpb on the byte sidecar (SPEC section 8), each path
# score-before-update. Developed in _sections/evaluation.py and merged here.
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# Main
#
# Resolve the config, set up devices and torch.distributed, train, save the EMA checkpoint, run the
# post-training sections, and write summary.json (SPEC section 9). With POST_TRAINING_ONLY=1 a run
# re-quantizes and re-evaluates its saved checkpoint without retraining.
# -----------------------------------------------------------------------------

POST_TRAINING_SECTIONS = ("_sections.quant", "_sections.evaluation")


@dataclass
class RunContext:
    """What post-training sections receive besides `h` and the model (the EMA weights)."""
    artifact_dir: str
    log: Callable[[str], None]
    device: torch.device
    rank: int
    world_size: int
    autocast: str
    make_train_loader: Callable[[], Any] | None   # fresh training stream (GPTQ calibration data)
    clock: Callable[[], float]
    training_start: float | None                   # clock() at the start of timed training
    train_time_s: float


def post_training(h: Hyperparameters, model: GPT, context: RunContext) -> dict[str, Any]:
    """Run quantization, then evaluation. Each section module exposes `run(h, model, context, results)
    -> dict` of summary fields; a missing module is skipped (they are merged into this file later)."""
    results: dict[str, Any] = {}
    for module_name in POST_TRAINING_SECTIONS:
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        run = getattr(importlib.import_module(module_name), "run", None) if found else None
        if run is None:
            context.log(f"post_training: {module_name}.run not present, skipped")
            continue
        results.update(run(h, model, context, results) or {})
    return results


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
    if h.device == "cuda" or (h.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("DEVICE=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_tokenizer(h: Hyperparameters) -> None:
    """A tokenizer whose vocabulary differs from VOCAB_SIZE is an error (ids would not line up)."""
    if not h.tokenizer_path:
        return
    if not os.path.exists(h.tokenizer_path):
        raise FileNotFoundError(f"TOKENIZER_PATH={h.tokenizer_path!r} does not exist")
    import sentencepiece
    size = sentencepiece.SentencePieceProcessor(model_file=h.tokenizer_path).vocab_size()
    if size != h.vocab_size:
        raise ValueError(f"TOKENIZER_PATH={h.tokenizer_path!r} has {size} tokens but VOCAB_SIZE={h.vocab_size}")


def main(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    h = Hyperparameters.from_env(environ)
    world_size = int(environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", "0"))
    device = resolve_device(h, local_rank)
    if h.cpu_threads > 0:
        torch.set_num_threads(h.cpu_threads)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size, device_id=device if device.type == "cuda" else None)
    # one run id for all ranks
    run_id = [h.run_id or f"{h.preset}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"]
    if world_size > 1:
        dist.broadcast_object_list(run_id, src=0)
    h.run_id = run_id[0]
    artifact_dir = h.artifact_dir or os.path.join("runs", h.run_id)
    if rank == 0:
        os.makedirs(artifact_dir, exist_ok=True)
    log = RunLogger(os.path.join(artifact_dir, "train.log"), enabled=rank == 0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    attn_backend = select_attention_backend(h.attn_backend, device)
    use_compile = h.compile == "1" or (h.compile == "auto" and device.type == "cuda")
    autocast = h.autocast if h.autocast != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    with open(os.path.abspath(__file__), "rb") as handle:
        source = handle.read()
    log(f"run_id:{h.run_id} preset:{h.preset} artifact_dir:{artifact_dir} code:{len(source)} bytes "
        f"sha256:{hashlib.sha256(source).hexdigest()[:16]}")
    log(f"env: python {platform.python_version()} torch {torch.__version__} device:{device} "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'} "
        f"world_size:{world_size} attention:{attn_backend} compile:{use_compile} autocast:{autocast} "
        f"cpu_threads:{torch.get_num_threads()}")
    for name, value in h.as_dict().items():
        log(f"hparam {name.upper()}={value}")

    torch.manual_seed(h.seed)
    model = GPT(h, attn_backend).to(device)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, layer order with recurrence "
        f"{model.layer_order(looping=h.recurrence_enabled)}")
    checkpoint_path = os.path.join(artifact_dir, "final_model.pt")
    clock = time.perf_counter
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    check_tokenizer(h)
    train_paths = shard_paths(h.train_glob, "TRAIN_FILES" if h.train_files else "DATA_PATH")
    accum, seqs_per_micro = h.batch_layout(world_size)

    def make_loader() -> TrainLoader:
        return TrainLoader(train_paths, h.vocab_size, h.train_seq_len, seqs_per_micro, accum, rank, world_size,
                           h.seed, device)

    summary: dict[str, Any] = dict(
        run_id=h.run_id, preset=h.preset, steps=None, train_time_s=None, tokens_per_s=None,
        pre_quant_val_bpb=None, quant_val_bpb=None, sliding_val_bpb=None, ttt_val_bpb=None,
        ttt_mode=h.ttt_mode if h.ttt_enabled else None, code_bytes=None, model_bytes=None, artifact_bytes=None,
        artifact_limit_ok=None, train_time_ok=None, eval_time_s=None, eval_time_ok=None,
        device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        world_size=world_size, seed=h.seed)
    training_start, train_time = None, 0.0
    if h.post_training_only:
        step = load_checkpoint(checkpoint_path, model)
        log(f"post_training_only: loaded {checkpoint_path} (step {step})")
        summary.update(steps=step)
    else:
        log(f"data: {len(train_paths)} train shards, grad_accum:{accum} seqs_per_micro_step:{seqs_per_micro} "
            f"seq_len:{h.train_seq_len} tokens_per_step:{h.train_batch_tokens}")
        optimizer = TrainingOptimizer(model, h)
        forward = torch.compile(model, dynamic=False) if use_compile else model
        ema = ExponentialMovingAverage(model, h.ema_decay) if h.ema_decay > 0 else None
        training_start = clock()
        result = train_model(h, model, optimizer, make_loader, log, forward=forward, autocast=autocast, clock=clock,
                             synchronize=synchronize, ema=ema, checkpoint_path=checkpoint_path)
        if ema is not None:
            ema.copy_to(model)  # the EMA weights are the model from here on (quantized and evaluated)
        model.set_recurrence(h.recurrence_enabled)
        train_time = result.train_time_s
        if rank == 0:
            save_checkpoint(checkpoint_path, model, h, result.steps)
            log(f"checkpoint: {checkpoint_path}")
        budget = training_budget_seconds(h)
        summary.update(steps=result.steps, train_time_s=round(result.train_time_s, 3),
                       warmup_time_s=round(result.warmup_time_s, 3), tokens_per_s=round(result.tokens_per_s, 1),
                       stop_reason=result.stop_reason, final_train_loss=result.final_train_loss,
                       train_time_ok=budget is None or result.train_time_s <= budget)
    model.set_recurrence(h.recurrence_enabled)
    context = RunContext(artifact_dir=artifact_dir, log=log, device=device, rank=rank, world_size=world_size,
                         autocast=autocast, make_train_loader=make_loader, clock=clock,
                         training_start=training_start, train_time_s=train_time)
    if h.post_training_enabled:
        summary.update(post_training(h, model, context))
    summary["hyperparameters"] = h.as_dict()
    if rank == 0:
        atomic_write_text(json.dumps(summary, indent=2, default=str) + "\n", os.path.join(artifact_dir, "summary.json"))
        log(f"summary: {os.path.join(artifact_dir, 'summary.json')}")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    if sys.argv[1:] == ["--env-table"]:
        print(env_var_markdown())
    else:
        main()
