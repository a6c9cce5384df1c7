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
# compressed with brotli-11; the code is minified, lzma'd and base85-wrapped into a 2-line script.
# -----------------------------------------------------------------------------

import base64
import dataclasses
import json
import lzma
import os
import struct
import tempfile
import zlib

import brotli
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal, as in the challenge rules


def _dtype_name(tensor):
    return str(tensor.dtype).removeprefix("torch.")  # "float16", ...: the name stored in the artifact


# --- Hessian collection --------------------------------------------------------------------------


class _HeadInputTap:
    """Passed as the model's `lora` argument: records the input of the output head (site "head")
    and adds nothing (returns None), so the tied embedding gets the Hessian of its output use."""

    def __init__(self, record):
        self.record = record

    def __call__(self, site, layer_index, x):
        if site == "head":
            self.record(x)
        return None


def _default_forward(model, input_ids, head_tap):
    model.forward_logits(input_ids, lora=head_tap)


@torch.no_grad()
def collect_hessians(model, batches, *, tied_head_name="tok_emb.weight", head_input_module=None,
                     run_forward=None, accumulate_dtype=torch.float32, call_counts=None):
    """Hessians H = mean over tokens of x x^T for the input x of every nn.Linear (key: the module's
    weight name in model.state_dict()) and of the output head of the tied embedding.

    `batches` must be TRAINING batches (LongTensor[B, T] input ids, or (input_ids, targets) pairs):
    calibration on validation tokens would leak them before they are scored. Pass the uncompiled
    module: hooks fire on every call, so a looped layer accumulates every pass (its count of calls
    is written to `call_counts[name]` if a dict is given). The head input is read either from the
    output of the module named `head_input_module`, or (default) through the model's `lora` hook at
    site "head" via `run_forward(model, input_ids, head_tap)`. Under torch.distributed the sums are
    all-reduced, so every rank returns the same Hessians."""
    sums, rows, calls = {}, {}, {}

    def accumulate(key, x):
        x = x.detach().reshape(-1, x.shape[-1]).to(accumulate_dtype)  # (tokens, in_features)
        if key not in sums:
            sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=accumulate_dtype, device=x.device)
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
    if head_input_module is not None:
        head = dict(model.named_modules())[head_input_module]
        handles.append(head.register_forward_hook(
            lambda mod, inputs, output: accumulate(tied_head_name, output)))
        head_tap = None
    else:
        head_tap = _HeadInputTap(lambda x: accumulate(tied_head_name, x))
    run_forward = run_forward or _default_forward
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
            run_forward(model, input_ids.to(device), head_tap)
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
def gptq_quantize(weight, hessian, bits, clip_sigmas, block_size=128, damp=0.01, scales=None):
    """GPTQ with SDClip scales. weight [rows, cols], hessian [cols, cols] -> (codes int8
    [rows, cols] in [-clip_range, clip_range], scales fp16 [rows]); dequant = codes * scales[:, None].

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
    hessian = hessian.detach().to(device=weight.device, dtype=torch.float32).clone()
    dead = hessian.diagonal() <= 0  # inputs never seen in calibration: their weights are free
    hessian.diagonal()[dead] = 1.0
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    propagate = _propagation_matrix(hessian[order][:, order], damp)  # (cols, cols) upper
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
                torch.div(column, step, out=code)
                code.round_().clamp_(-clip_range, clip_range)
                torch.addcmul(original[sub_start + j], code, step, value=-1.0, out=residual)
                if j + 1 < sub_end - sub_start:
                    panel[j + 1:].addr_(propagate[sub_start + j, sub_start + j + 1:sub_end], residual)
            if sub_end < end:
                work[sub_end:end].addmm_(propagate[sub_start:sub_end, sub_end:end].t(),
                                         residuals[sub_start - start:sub_end - start])
        if end < cols:
            work[end:].addmm_(propagate[start:end, end:].t(), residuals)
    codes = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    codes[:, order] = codes_t.t().to(torch.int8)
    return codes, scales


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


@dataclasses.dataclass
class QuantSettings:
    """Per-class bit widths and SDClip sigmas; the caller fills these from Hyperparameters (presets
    included). Defaults are the PR 1736 record settings."""
    method: str = "gptq"  # "gptq" | "rtn" (round-to-nearest, same scales) | "int8" (baseline per-row)
    matrix_bits: int = 6
    matrix_clip: float = 12.85
    mlp_bits: int = 6
    mlp_clip: float = 12.0
    attn_bits: int = 6
    attn_clip: float = 13.0
    embed_bits: int = 7
    embed_clip: float = 15.0
    embed_name: str = "tok_emb.weight"
    gate_bits: int = 8  # attention-gate weights, per-row absmax; 0 = treat as any other tensor
    gate_patterns: tuple = ("attn.gate", "attn_gate")
    mlp_patterns: tuple = ("mlp",)
    attn_patterns: tuple = ("attn",)
    small_numel: int = 65_536  # float tensors up to this size are kept in fp16
    block_size: int = 128
    damp: float = 0.01
    lqer_rank: int = 0  # 0 = off; PR 1855: rank 4 on the top 3 tensors
    lqer_top_k: int = 3
    lqer_bits: int = 4
    lqer_group_size: int = 64


def quant_settings_from_hparams(h):
    """QuantSettings from the run's Hyperparameters (duck-typed: only the quant_*/gptq_*/lqer_*
    fields are read). Attention matrices use QUANT_MATRIX_BITS."""
    return QuantSettings(
        method="int8" if h.quant_scheme == "int8" else "gptq",
        matrix_bits=h.quant_matrix_bits, matrix_clip=h.quant_matrix_clip_sigmas,
        mlp_bits=h.quant_mlp_bits, mlp_clip=h.quant_mlp_clip_sigmas,
        attn_bits=h.quant_matrix_bits, attn_clip=h.quant_attn_clip_sigmas,
        embed_bits=h.quant_embed_bits, embed_clip=h.quant_embed_clip_sigmas,
        gate_bits=h.quant_gate_bits, small_numel=h.quant_small_tensor_numel,
        block_size=h.gptq_block_size, damp=h.gptq_damp,
        lqer_rank=h.lqer_rank if h.lqer_enabled else 0, lqer_top_k=h.lqer_top_k,
        lqer_bits=h.lqer_bits, lqer_group_size=h.lqer_group_size)


def classify_tensor(name, tensor, settings):
    """-> (kind, bits, clip_sigmas): "raw" (non-float, stored as is), "float" (fp16), "gate"
    (int8 per-row absmax) or "matrix" (GPTQ/RTN with SDClip)."""
    if not tensor.is_floating_point():
        return "raw", 0, 0.0
    if settings.gate_bits and tensor.ndim == 2 and any(p in name for p in settings.gate_patterns):
        return "gate", settings.gate_bits, 0.0
    if tensor.ndim < 2 or tensor.numel() <= settings.small_numel:
        return "float", 16, 0.0
    if name == settings.embed_name:
        return "matrix", settings.embed_bits, settings.embed_clip
    if any(p in name for p in settings.mlp_patterns):
        return "matrix", settings.mlp_bits, settings.mlp_clip
    if any(p in name for p in settings.attn_patterns):
        return "matrix", settings.attn_bits, settings.attn_clip
    return "matrix", settings.matrix_bits, settings.matrix_clip


def _quantize_matrix(weight, hessian, bits, clip, settings):
    if settings.method == "int8":
        return quantile_int8_quantize(weight)
    if hessian is None or settings.method == "rtn":
        return rtn_quantize(weight, bits, clip)
    return gptq_quantize(weight, hessian, bits, clip, settings.block_size, settings.damp)


@torch.no_grad()
def quantize_model_state(state_dict, hessians, settings, log=None):
    """state_dict (name -> tensor) + Hessians (name -> [cols, cols]) -> container
    {"entries": {name: entry}}; each entry is a flat dict of attributes (str/int/float/list) and
    tensors. Matrices without a Hessian fall back to round-to-nearest (logged)."""
    entries, errors = {}, {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        kind, bits, clip = classify_tensor(name, tensor, settings)
        if kind == "matrix" and settings.method == "int8":
            bits = 8
        dtype_name = _dtype_name(tensor)
        if kind == "raw":
            entries[name] = {"kind": "raw", "tensor": tensor.cpu().contiguous()}
        elif kind == "float":
            entries[name] = {"kind": "float", "dtype": dtype_name, "tensor": tensor.cpu().to(torch.float16)}
        else:
            shape = list(tensor.shape)
            weight = tensor.float().reshape(shape[0], -1)
            hessian = hessians.get(name) if kind == "matrix" else None
            if kind == "matrix" and hessian is None and settings.method == "gptq" and log is not None:
                log(f"quant: no Hessian for {name}, using round-to-nearest")
            if kind == "gate":
                codes, scales = absmax_quantize(weight, bits)
            else:
                codes, scales = _quantize_matrix(weight, hessian, bits, clip, settings)
            entries[name] = {"kind": "quant", "dtype": dtype_name, "shape": shape, "bits": bits,
                             "codes": codes.cpu(), "scales": scales.cpu()}
            if kind == "matrix" and settings.lqer_rank > 0:
                approx = dequantize_codes(codes, scales)
                errors[name] = (hessian_weighted_error(weight, approx, hessian, relative=False)
                                if hessian is not None else (weight - approx).square().sum().item())
    if settings.lqer_rank > 0:
        for name in sorted(errors, key=errors.get, reverse=True)[:settings.lqer_top_k]:
            entry = entries[name]
            weight = state_dict[name].detach().float().reshape(entry["shape"][0], -1)
            error = weight - dequantize_codes(entry["codes"], entry["scales"]).to(weight.device)
            factor_a, factor_b = lqer_factors(error, settings.lqer_rank, hessians.get(name), settings.damp)
            for label, factor in (("a", factor_a.t()), ("b", factor_b)):  # groups run along rows/cols
                codes, scale, low = quantize_groups_asymmetric(factor, settings.lqer_bits, settings.lqer_group_size)
                entry[f"lqer_{label}_codes"] = codes.cpu()
                entry[f"lqer_{label}_scale"] = scale.cpu()
                entry[f"lqer_{label}_low"] = low.cpu()
            entry.update(lqer_rank=settings.lqer_rank, lqer_bits=settings.lqer_bits)
            if log is not None:
                log(f"quant: LQER rank {settings.lqer_rank} on {name}")
    return {"entries": entries}


def _dequantize_entry(entry):
    if entry["kind"] == "raw":
        return entry["tensor"].clone()
    if entry["kind"] == "float":
        return entry["tensor"].to(_DTYPES[entry["dtype"]])
    weight = dequantize_codes(entry["codes"], entry["scales"])  # (rows, cols) float32
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
    """Dequantize and copy into `model` in place (dtype and device of its own tensors); the key sets
    must match exactly."""
    state = dequantize_state(container)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"quantized state does not match the model: missing {missing}, unexpected {unexpected}")
    for name, tensor in own.items():
        tensor.copy_(state[name].reshape(tensor.shape))
    return model


# --- Serialization: JSON header + raw arrays, byte shuffle, brotli -------------------------------

ARTIFACT_MAGIC = b"PGQZ"
ARTIFACT_VERSION = 1
CODECS = {"brotli": 0, "lzma": 1, "zlib": 2}
_HEADER = struct.Struct("<4sBBBB")  # magic, version, codec id, number of streams, reserved
_STREAM = struct.Struct("<BQQI")  # shuffle stride, raw length, compressed length, crc32 of raw
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
           "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}
_NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "float64": np.float64,
                  "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
                  "bool": np.bool_}  # numpy has no bfloat16: its bytes travel as int16


class ArtifactError(ValueError):
    """A model artifact that is not ours, of another version, truncated or corrupted."""


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


def _decompress(data, codec):
    if codec == "brotli":
        return brotli.decompress(data)
    if codec == "lzma":
        return lzma.decompress(data, format=lzma.FORMAT_ALONE)
    return zlib.decompress(data)


def _tensor_bytes(tensor):
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)  # numpy has no bfloat16; same bytes
    return tensor.numpy().tobytes()


def _array_group(dtype_name):
    """Per-group mode: one stream per element width (int8 codes, fp16 scales, ...)."""
    return {"int8": 0, "uint8": 0, "bool": 0, "float16": 1, "bfloat16": 1, "int16": 1}.get(dtype_name, 2)


def serialize_artifact(container, codec="brotli", per_group=False, shuffle=True):
    """Container -> bytes. Layout: header (magic, version, codec, stream table with lengths and
    crc32s, crc32 of the header), then the compressed streams. Stream 0 is the JSON description of
    every entry and array (dtype, shape, stream, offset); the arrays follow in one byte-shuffled
    (stride 2) stream, or with per_group=True in one stream per element width (stride = width);
    shuffle=False (baseline) stores the bytes as they are."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    n_groups = 3 if per_group else 1
    payloads = [bytearray() for _ in range(n_groups)]
    described = []
    arrays = [(name, key, value) for name, entry in container["entries"].items()
              for key, value in entry.items() if isinstance(value, torch.Tensor)]
    # like with like: all codes together, then all scales, ...; helps the compressor's context
    arrays.sort(key=lambda item: (_array_group(_dtype_name(item[2])), item[1], item[0]))
    placement = {}
    for name, key, value in arrays:
        dtype_name = _dtype_name(value)
        stream = _array_group(dtype_name) if per_group else 0
        raw = _tensor_bytes(value)
        placement[(name, key)] = [key, dtype_name, list(value.shape), stream + 1, len(payloads[stream]),
                                  len(raw)]
        payloads[stream] += raw
    for name, entry in container["entries"].items():
        attrs = {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
        described.append({"name": name, "attrs": attrs,
                          "arrays": [placement[(name, k)] for k, v in entry.items() if isinstance(v, torch.Tensor)]})
    meta = json.dumps({"entries": described}, separators=(",", ":")).encode()
    strides = [1] + ([1, 2, 4] if per_group else [2])
    if not shuffle:
        strides = [1] * len(strides)
    raws = [meta] + [bytes(p) for p in payloads]
    table, bodies = b"", []
    for stride, raw in zip(strides, raws):
        body = _compress(byte_shuffle(raw, stride), codec)
        table += _STREAM.pack(stride, len(raw), len(body), zlib.crc32(raw))
        bodies.append(body)
    header = _HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, CODECS[codec], len(raws), 0) + table
    return header + struct.pack("<I", zlib.crc32(header)) + b"".join(bodies)


def deserialize_artifact(blob):
    """Bytes -> container; raises ArtifactError naming what is wrong (magic, version, codec,
    truncation, header or stream checksum, array bounds). Never unpickles anything."""
    blob = memoryview(blob)
    if len(blob) < _HEADER.size:
        raise ArtifactError(f"artifact truncated: {len(blob)} bytes, the header alone needs {_HEADER.size}")
    magic, version, codec_id, n_streams, _ = _HEADER.unpack_from(blob, 0)
    if magic != ARTIFACT_MAGIC:
        raise ArtifactError(f"not a quantized model artifact: magic {bytes(magic)!r}, expected {ARTIFACT_MAGIC!r}")
    if version != ARTIFACT_VERSION:
        raise ArtifactError(f"unsupported artifact version {version} (this code reads version {ARTIFACT_VERSION})")
    codec = {v: k for k, v in CODECS.items()}.get(codec_id)
    if codec is None:
        raise ArtifactError(f"unknown codec id {codec_id} in artifact header")
    header_size = _HEADER.size + n_streams * _STREAM.size
    if len(blob) < header_size + 4:
        raise ArtifactError(f"artifact truncated: {len(blob)} bytes, its header needs {header_size + 4}")
    (header_crc,) = struct.unpack_from("<I", blob, header_size)
    if zlib.crc32(blob[:header_size]) != header_crc:
        raise ArtifactError("artifact header checksum mismatch (corrupted header)")
    streams = [_STREAM.unpack_from(blob, _HEADER.size + i * _STREAM.size) for i in range(n_streams)]
    expected = header_size + 4 + sum(s[2] for s in streams)
    if len(blob) != expected:
        raise ArtifactError(f"artifact length {len(blob)} bytes, header says {expected}: "
                            + ("truncated" if len(blob) < expected else "trailing bytes"))
    raws, offset = [], header_size + 4
    for index, (stride, raw_len, body_len, crc) in enumerate(streams):
        try:
            raw = byte_unshuffle(_decompress(bytes(blob[offset:offset + body_len]), codec), stride)
        except Exception as exc:  # brotli.error / lzma.LZMAError / zlib.error
            raise ArtifactError(f"artifact stream {index} does not decompress ({codec}): {exc}") from exc
        if len(raw) != raw_len or zlib.crc32(raw) != crc:
            raise ArtifactError(f"artifact stream {index} checksum mismatch (corrupted data)")
        raws.append(raw)
        offset += body_len
    try:
        described = json.loads(raws[0].decode())["entries"]
    except (UnicodeDecodeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"artifact description is not valid: {exc}") from exc
    entries = {}
    for item in described:
        entry = dict(item["attrs"])
        for key, dtype_name, shape, stream, start, nbytes in item["arrays"]:
            dtype = _DTYPES.get(dtype_name)
            if dtype is None or not 0 < stream < len(raws):
                raise ArtifactError(f"array {item['name']}.{key}: bad dtype {dtype_name!r} or stream {stream}")
            storage = np.dtype(_NUMPY_STORAGE[dtype_name])
            numel = int(np.prod(shape, dtype=np.int64))
            if numel * storage.itemsize != nbytes or start < 0 or start + nbytes > len(raws[stream]):
                raise ArtifactError(f"array {item['name']}.{key}: shape {shape} does not fit {nbytes} bytes at {start}")
            array = np.frombuffer(raws[stream], dtype=storage, count=numel, offset=start).copy()
            entry[key] = torch.from_numpy(array).view(dtype).reshape(shape)  # view: int16 bits -> bfloat16
        entries[item["name"]] = entry
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
        # off: lzma already shares repeated strings; hoisting them into names made the lzma stream
        # ~100 bytes larger on train_gpt.py (14,736 vs 14,633)
        hoist_literals=False,
        # function-local names only (saves ~600 compressed bytes on train_gpt.py); keyword-callable
        # argument names and class attributes
        # (dataclass fields, looked up by string from env names) are never renamed
        rename_locals=True,
        # off: tests, tools and the lead import module-level names (GPT, Hyperparameters, ...)
        rename_globals=False,
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


def pack_code(source):
    """Counted form of a script: minified, lzma (.lzma "alone" container: 13-byte header, ~50 bytes
    less than .xz, read back by lzma.decompress's format auto-detection), base85, in a two-line file that execs it. exec
    runs in the wrapper's own globals, so `__name__ == "__main__"` and module-level names behave
    as in the original."""
    compressed = lzma.compress(minify_source(source).encode(), format=lzma.FORMAT_ALONE,
                               preset=9 | lzma.PRESET_EXTREME)
    encoded = base64.b85encode(compressed).decode("ascii")  # alphabet has no quote or backslash
    # underscore aliases: the wrapper adds no public name to the module's namespace
    return f'import lzma as _L,base64 as _B\nexec(_L.decompress(_B.b85decode("{encoded}")))\n'


def counted_code_bytes(path):
    with open(path, encoding="utf-8") as handle:
        return len(pack_code(handle.read()).encode("utf-8"))


def atomic_write_bytes(path, data):
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a reader
    never sees a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_artifact(artifact_dir, container, code_path, *, codec="brotli", per_group=False, shuffle=True,
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
        log(f"Code size (minified+lzma+base85): {sizes['code_bytes']} bytes")
        log(f"Serialized model quantized+{codec}: {sizes['model_bytes']} bytes")
        log(f"Total submission size quantized+{codec}: {sizes['artifact_bytes']} bytes"
            + ("" if sizes["artifact_limit_ok"] else f" EXCEEDS LIMIT {limit_bytes}"))
    return sizes


def read_artifact(path):
    with open(path, "rb") as handle:
        return deserialize_artifact(handle.read())
