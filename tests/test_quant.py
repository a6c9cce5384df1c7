"""Quantization and artifact (SPEC section 7): GPTQ core, Hessians, LQER, container, counted code."""

import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tg_helpers import spawn_gloo_ranks  # noqa: E402
from train_gpt import (ArtifactError, QuantSettings, byte_shuffle, byte_unshuffle,  # noqa: E402
                             classify_tensor, collect_hessians, counted_code_bytes, dequantize_codes,
                             dequantize_state, deserialize_artifact, gptq_quantize, hessian_weighted_error,
                             load_quantized_into, minify_source, pack_code,
                             quantize_model_state, quantile_int8_quantize, rtn_quantize, sdclip_scales,
                             serialize_artifact, write_artifact, awq_salient_groups, entry_weight)


def correlated_hessian(cols, tokens=4096, seed=0):
    """E[x x^T] of inputs with strongly correlated features (as activations are)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(cols) + 2.0 * torch.randn(cols, cols, generator=generator) / cols ** 0.5
    inputs = torch.randn(tokens, cols, generator=generator) @ mixing
    return inputs.t() @ inputs / tokens


def random_weight(rows, cols, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def reference_gptq(weight, hessian, bits, clip_sigmas, damp=0.01, promoted=None, promoted_bits=8):
    """Textbook per-column GPTQ (no blocks): Cholesky factor U of H^-1 (U^T U = H^-1), column j
    rounded, e = (w_j - q_j s) / U[j, j], later columns -= e * U[j, j+1:]. Same column order.
    `promoted` columns (AWQ-lite) are rounded with the scales and clip range of `promoted_bits`."""
    scales = sdclip_scales(weight, bits, clip_sigmas)
    high_scales = sdclip_scales(weight, promoted_bits, clip_sigmas)
    cols = weight.shape[1]
    promoted = torch.zeros(cols, dtype=torch.bool) if promoted is None else promoted
    step_of = [high_scales.float() if promoted[c] else scales.float() for c in range(cols)]
    clip_of = [2 ** ((promoted_bits if promoted[c] else bits) - 1) - 1 for c in range(cols)]
    hessian = hessian.clone().double()
    dead = hessian.diagonal() <= 0
    hessian.diagonal()[dead] = 1.0
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    hessian = hessian[order][:, order]
    hessian += damp * hessian.diagonal().mean() * torch.eye(len(order), dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    w = weight.double()[:, order].clone()
    w[:, dead[order]] = 0.0
    codes = torch.zeros_like(w)
    for j in range(w.shape[1]):
        step, clip_range = step_of[int(order[j])], clip_of[int(order[j])]
        codes[:, j] = torch.clamp(torch.round(w[:, j] / step), -clip_range, clip_range)
        error = (w[:, j] - codes[:, j] * step) / u[j, j]
        w[:, j + 1:] -= error[:, None] * u[j, j + 1:][None, :]
    result = torch.empty_like(codes)
    result[:, order] = codes
    return result.to(torch.int8), scales


# --- GPTQ core -------------------------------------------------------------------------------


def test_gptq_beats_round_to_nearest_with_same_scales_on_correlated_inputs():
    weight, hessian = random_weight(256, 192), correlated_hessian(192)
    codes, scales = gptq_quantize(weight, hessian, bits=6, clip_sigmas=12.85)
    rtn_codes, rtn_scales = rtn_quantize(weight, bits=6, clip_sigmas=12.85)
    assert torch.equal(scales, rtn_scales)
    gptq_error = hessian_weighted_error(weight, dequantize_codes(codes, scales), hessian)
    rtn_error = hessian_weighted_error(weight, dequantize_codes(rtn_codes, scales), hessian)
    assert gptq_error < 0.8 * rtn_error


@pytest.mark.parametrize("bits", [4, 6, 7, 8])
def test_codes_respect_the_clip_range_exactly(bits):
    weight = random_weight(64, 96)
    weight[::7, ::5] *= 40.0  # outliers far beyond clip_sigmas * std
    clip_range = 2 ** (bits - 1) - 1
    codes, _ = gptq_quantize(weight, correlated_hessian(96), bits=bits, clip_sigmas=3.0)
    assert codes.dtype == torch.int8
    assert codes.min().item() == -clip_range and codes.max().item() == clip_range


def test_sdclip_scale_is_clip_sigmas_times_row_std_over_clip_range():
    weight = random_weight(32, 200)
    expected = (12.85 * weight.std(dim=1) / 31).to(torch.float16)
    assert torch.equal(sdclip_scales(weight, 6, 12.85), expected)


@pytest.mark.parametrize("block_size", [128, 16, 7])
def test_blocked_gptq_matches_per_column_reference(block_size):
    weight, hessian = random_weight(96, 160), correlated_hessian(160, seed=3)
    hessian[5, :] = hessian[:, 5] = 0.0  # a dead input feature
    codes, scales = gptq_quantize(weight, hessian, bits=6, clip_sigmas=12.85, block_size=block_size)
    ref_codes, ref_scales = reference_gptq(weight, hessian, bits=6, clip_sigmas=12.85)
    assert torch.equal(scales, ref_scales)
    mismatched = (codes != ref_codes).float().mean().item()
    assert mismatched < 2e-3  # only rounding ties decided differently in float32 vs float64
    assert (codes.int() - ref_codes.int()).abs().max().item() <= 1
    assert torch.all(codes[:, 5] == 0)


# --- AWQ-lite (PR 1908/1945): salient column groups get more bits inside the same GPTQ solve ---------


def test_awq_salient_groups_rank_groups_by_activation_rms_times_mean_weight_magnitude():
    """Reference: a loop over groups of sum_c sqrt(H[c, c]) * mean_r |W[r, c]| (the last group shorter)."""
    for seed, (cols, group, top_k) in enumerate([(160, 64, 1), (160, 32, 2), (100, 16, 3)]):
        weight, hessian = random_weight(24, cols, seed=seed), correlated_hessian(cols, seed=seed)
        hessian[7, 7] = 0.0  # a dead input: no activation, no saliency
        scores = []
        for start in range(0, cols, group):
            score = sum(math.sqrt(max(float(hessian[c, c]), 0.0)) * float(weight[:, c].abs().mean())
                        for c in range(start, min(start + group, cols)))
            scores.append((score, start))
        chosen = sorted(start for _, start in sorted(scores, reverse=True)[:top_k])
        expected = torch.zeros(cols, dtype=torch.bool)
        for start in chosen:
            expected[start:start + group] = True
        assert torch.equal(awq_salient_groups(weight, hessian, group, top_k), expected)


def test_gptq_with_promoted_columns_matches_the_per_column_reference():
    weight, hessian = random_weight(48, 160, seed=2), correlated_hessian(160, seed=3)
    promoted = torch.zeros(160, dtype=torch.bool)
    promoted[64:128] = True
    codes, scales, high = gptq_quantize(weight, hessian, bits=6, clip_sigmas=12.85, block_size=32,
                                        promoted=promoted, promoted_bits=8)
    ref_codes, ref_scales = reference_gptq(weight, hessian, bits=6, clip_sigmas=12.85, promoted=promoted)
    assert torch.equal(scales, ref_scales) and torch.equal(high, sdclip_scales(weight, 8, 12.85))
    assert (codes != ref_codes).float().mean().item() < 2e-3
    assert codes[:, promoted].abs().max() > 31 and codes[:, ~promoted].abs().max() <= 31  # int8 vs int6 range


def test_awq_lite_lowers_the_error_and_round_trips_through_the_artifact():
    """AWQ_LITE_ENABLED: each matrix's most salient group at 8 bits lowers its Hessian-weighted error; the
    entry's groups and scales survive serialization and dequantize to entry_weight exactly."""
    state, hessians = toy_state(), toy_hessians()
    plain = dequantize_state(quantize_model_state(state, hessians, QuantSettings(lqer_enabled=False)))
    config = QuantSettings(lqer_rank=2, lqer_top_k=1, awq_lite_enabled=True, awq_lite_group_size=32, awq_lite_top_k=2)
    container = quantize_model_state(state, hessians, config)
    promoted = [name for name, entry in container["entries"].items() if "awq_scales" in entry]
    assert sorted(promoted) == sorted(hessians)
    without_lqer = quantize_model_state(state, hessians, dataclasses.replace(config, lqer_enabled=False))
    for name in promoted:
        entry = without_lqer["entries"][name]
        assert len(entry["awq_groups"]) == 2 and entry["awq_bits"] == 8
        after = hessian_weighted_error(state[name], entry_weight(entry), hessians[name])
        assert after < hessian_weighted_error(state[name], plain[name], hessians[name])
    expected = dequantize_state(container)
    for codec in ("rans", "brotli"):
        restored = dequantize_state(deserialize_artifact(serialize_artifact(container, codec=codec)))
        assert all(torch.equal(restored[name], expected[name]) for name in expected)


def test_an_artifact_with_awq_groups_outside_the_matrix_is_refused():
    config = QuantSettings(lqer_enabled=False, awq_lite_enabled=True)
    container = quantize_model_state(toy_state(), toy_hessians(), config)
    container["entries"]["blocks.0.mlp.fc.weight"]["awq_groups"] = [99]
    with pytest.raises(ArtifactError, match="AWQ groups"):
        deserialize_artifact(serialize_artifact(container))


# --- Hessian collection ----------------------------------------------------------------------


class LoopedToy(nn.Module):
    """The same Linear applied twice (like a looped layer), and a tied head whose input reaches the
    `lora` hook at site "head", as in the GPT interface."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(11, 8)
        self.shared = nn.Linear(8, 8, bias=False)

    def forward_logits(self, input_ids, lora=None):
        hidden = self.tok_emb(input_ids)
        first = self.shared(hidden)
        second = self.shared(torch.tanh(first))
        if lora is not None:
            lora("head", -1, second)
        return second @ self.tok_emb.weight.t()


def test_hessian_hooks_accumulate_every_pass_of_a_looped_layer_and_the_tied_head():
    torch.manual_seed(0)
    model = LoopedToy()
    batches = [torch.randint(0, 11, (2, 5)) for _ in range(3)]
    counts = {}
    hessians = collect_hessians(model, batches, call_counts=counts)
    assert counts == {"shared.weight": 6, "tok_emb.weight": 3}
    with torch.no_grad():
        firsts, seconds, heads = [], [], []
        for ids in batches:
            hidden = model.tok_emb(ids).reshape(-1, 8)
            first = model.shared(hidden)
            firsts.append(hidden)
            seconds.append(torch.tanh(first))
            heads.append(model.shared(torch.tanh(first)))
    linear_inputs = torch.cat(firsts + seconds)
    head_inputs = torch.cat(heads)
    torch.testing.assert_close(hessians["shared.weight"], linear_inputs.t() @ linear_inputs / len(linear_inputs))
    torch.testing.assert_close(hessians["tok_emb.weight"], head_inputs.t() @ head_inputs / len(head_inputs))


def test_hessians_are_all_reduced_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    model, batches = LoopedToy(), [torch.randint(0, 11, (2, 5))]
    expected = collect_hessians(model, batches)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        reduced = collect_hessians(model, batches)
    finally:
        dist.destroy_process_group()
    for name in expected:
        torch.testing.assert_close(reduced[name], expected[name])


def _toy_and_batches():
    torch.manual_seed(0)
    model = LoopedToy()
    generator = torch.Generator().manual_seed(1)
    # unequal shares: rank 0 gets 3 batches of 2 x 5, rank 1 two of 4 x 3 (a token-weighted mean is needed)
    batches = [torch.randint(0, 11, (2, 5), generator=generator) for _ in range(3)]
    batches += [torch.randint(0, 11, (4, 3), generator=generator) for _ in range(2)]
    return model, batches


def _hessian_worker(rank, world_size, port, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, batches = _toy_and_batches()
        hessians = collect_hessians(model, batches[:3] if rank == 0 else batches[3:])
        queue.put((rank, {name: value.tolist() for name, value in hessians.items()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_get_the_hessians_of_one_process_over_all_their_batches():
    """GPTQ Hessians averaged over all ranks (PR 2020): every rank ends with sum(x x^T) / tokens over the
    batches of BOTH ranks, what one process gets from all of them (not a mean of per-rank means)."""
    queue = spawn_gloo_ranks(_hessian_worker, 2)
    per_rank = dict(queue.get() for _ in range(2))
    model, batches = _toy_and_batches()
    expected = collect_hessians(model, batches)
    for rank in (0, 1):
        assert per_rank[rank].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(torch.tensor(per_rank[rank][name]), value, rtol=1e-5, atol=1e-6)
    mean_of_means = (collect_hessians(model, batches[:3])["shared.weight"]
                     + collect_hessians(model, batches[3:])["shared.weight"]) / 2
    assert not torch.allclose(mean_of_means, expected["shared.weight"], rtol=1e-3)


# --- Whole-model quantization, LQER, loading -------------------------------------------------


def toy_state():
    generator = torch.Generator().manual_seed(0)
    return {
        "tok_emb.weight": torch.randn(512, 160, generator=generator) * 0.05,
        "blocks.0.attn.c_q.weight": torch.randn(160, 480, generator=generator) * 0.02,
        "blocks.0.mlp.fc.weight": torch.randn(480, 160, generator=generator) * 0.02,
        "blocks.0.attn.gate.weight": torch.randn(8, 160, generator=generator) * 0.005,
        "blocks.0.q_gain": torch.full((8,), 5.0),
        "blocks.0.small.weight": torch.randn(64, 64, generator=generator).to(torch.bfloat16),
        "step_counter": torch.tensor([7], dtype=torch.int64),
    }


def toy_hessians():
    return {"tok_emb.weight": correlated_hessian(160, seed=4), "blocks.0.attn.c_q.weight": correlated_hessian(480, seed=5),
            "blocks.0.mlp.fc.weight": correlated_hessian(160, seed=6)}


def test_tensors_are_classified_by_role_with_configurable_bits_and_clips():
    settings = QuantSettings(quant_embed_bits=7, quant_embed_clip_sigmas=15.0, quant_mlp_clip_sigmas=11.5,
                             quant_attn_clip_sigmas=13.0)
    state = toy_state()
    kinds = {name: classify_tensor(name, tensor, settings) for name, tensor in state.items()}
    assert kinds["tok_emb.weight"] == ("matrix", 7, 15.0)
    assert kinds["blocks.0.mlp.fc.weight"] == ("matrix", 6, 11.5)
    assert kinds["blocks.0.attn.c_q.weight"] == ("matrix", 6, 13.0)
    assert kinds["blocks.0.attn.gate.weight"] == ("gate", 8, 0.0)
    assert kinds["blocks.0.q_gain"][0] == "float" and kinds["blocks.0.small.weight"][0] == "float"
    assert kinds["step_counter"][0] == "raw"


def test_baseline_int8_scheme_uses_per_row_percentile_scales():
    weight = random_weight(17, 4096)
    weight[3, 17] = 5.0  # the row's largest entry maps to the top code
    codes, scales = quantile_int8_quantize(weight)
    assert codes.abs().max().item() == 127 and codes[3, 17].item() == 127
    expected = (torch.quantile(weight.abs(), 0.9999984, dim=1) / 127).to(torch.float16)
    assert torch.equal(scales, expected)
    container = quantize_model_state({"blocks.0.mlp.fc.weight": weight}, {}, QuantSettings(quant_scheme="int8"))
    assert container["entries"]["blocks.0.mlp.fc.weight"]["bits"] == 8


def test_preset_quant_settings_follow_the_published_systems():
    import train_gpt
    settings = {name: train_gpt.Hyperparameters.from_env({"PRESET": name}).quant
                for name in ("pr1855", "pr1736", "pr1493", "pr1274", "baseline")}
    pr1855, pr1736, pr1493 = settings["pr1855"], settings["pr1736"], settings["pr1493"]
    assert (pr1855.quant_mlp_clip_sigmas, pr1855.quant_embed_bits, pr1855.quant_embed_clip_sigmas) == (11.5, 7, 14.0)
    assert (pr1855.lqer_enabled, pr1855.lqer_rank, pr1855.lqer_top_k) == (True, 4, 3)
    assert (pr1736.quant_mlp_clip_sigmas, pr1736.quant_attn_clip_sigmas, pr1736.quant_embed_clip_sigmas) == (12.0, 13.0, 15.0)
    assert not pr1736.lqer_enabled
    assert (pr1493.quant_embed_bits, pr1493.quant_embed_clip_sigmas, pr1493.quant_matrix_clip_sigmas) == (8, 20.0, 12.85)
    assert (settings["pr1274"].quant_mlp_bits, settings["pr1274"].quant_matrix_bits) == (5, 6)
    assert settings["baseline"].quant_scheme == "int8"
    pr1953 = train_gpt.Hyperparameters.from_env({"PRESET": "pr1953"}).quant  # AWQ-lite of its PR 1945 base
    assert not pr1855.awq_lite_enabled and pr1953.awq_lite_enabled
    assert (pr1953.awq_lite_bits, pr1953.awq_lite_group_size, pr1953.awq_lite_top_k) == (8, 64, 1)


def test_hessian_lqer_reduces_the_hessian_weighted_error_of_the_worst_tensors():
    state, hessians = toy_state(), toy_hessians()
    plain = dequantize_state(quantize_model_state(state, hessians, QuantSettings(quant_embed_bits=4, quant_mlp_bits=4, quant_matrix_bits=4, lqer_enabled=False)))
    container = quantize_model_state(state, hessians, QuantSettings(quant_embed_bits=4, quant_mlp_bits=4, quant_matrix_bits=4, lqer_rank=4, lqer_top_k=2, lqer_scheme="hessian"))
    corrected = dequantize_state(container)
    with_lqer = [name for name, entry in container["entries"].items() if entry.get("lqer_rank")]
    assert len(with_lqer) == 2
    for name in with_lqer:
        assert container["entries"][name]["lqer_a_codes"].dtype == torch.uint8  # int4, two per byte
        before = hessian_weighted_error(state[name], plain[name], hessians[name])
        after = hessian_weighted_error(state[name], corrected[name], hessians[name])
        assert after < 0.97 * before


def _pr1855_lqer_reference(state, container, rank, top_k, group=64):
    """PR 1855's gptq_mixed_quantize LQER step and its dequantization, written out: E = W - W_q for
    every GPTQ'd matrix, the top_k by ||E||_F; A = U_r S_r, B = V_r^T; A int2 with one scale
    max|A| / 1.5 (codes -2..1), B int4 over flattened groups of `group`, scale max|group| / 7.5
    (codes -8..7), scales rounded to fp16; W_hat = W_q + A_hat B_hat."""
    errors = {}
    for name, entry in container["entries"].items():
        if entry.get("kind") == "quant" and entry.get("bits", 8) < 8 and "gate" not in name:
            w_q = entry["codes"].float() * entry["scales"].float()[:, None]
            errors[name] = (state[name].float() - w_q, w_q)
    top = sorted(errors, key=lambda name: -float(errors[name][0].norm()))[:top_k]
    expected = {}
    for name in top:
        error, w_q = errors[name]
        u, singular, vh = torch.linalg.svd(error, full_matrices=False)
        a, b = u[:, :rank] * singular[:rank], vh[:rank]
        scale_a = (a.abs().max() / 1.5).to(torch.float16).float()
        a_hat = torch.clamp(torch.round(a / scale_a), -2, 1) * scale_a
        groups = b.reshape(-1, group)
        scale_b = (groups.abs().amax(dim=1, keepdim=True) / 7.5).to(torch.float16).float()
        b_hat = (torch.clamp(torch.round(groups / scale_b), -8, 7) * scale_b).reshape(b.shape)
        expected[name] = w_q + a_hat @ b_hat
    return expected


def test_pr1855_lqer_picks_the_largest_weight_errors_and_matches_its_int2_int4_factors():
    state, hessians = toy_state(), toy_hessians()
    settings = QuantSettings(quant_embed_bits=4, quant_mlp_bits=4, quant_matrix_bits=4, lqer_rank=4, lqer_top_k=2)
    assert settings.lqer_scheme == "pr1855"
    container = quantize_model_state(state, hessians, settings)
    plain = quantize_model_state(state, hessians, dataclasses.replace(settings, lqer_enabled=False))
    expected = _pr1855_lqer_reference(state, plain, rank=4, top_k=2)
    got = dequantize_state(container)
    assert sorted(name for name, entry in container["entries"].items() if entry.get("lqer_rank")) == sorted(expected)
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, atol=1e-6, rtol=1e-6)
        assert container["entries"][name]["lqer_a_scale"].numel() == 1  # one scale for all of A
        assert (got[name] - state[name]).norm() < (dequantize_state(plain)[name] - state[name]).norm()
    restored = dequantize_state(deserialize_artifact(serialize_artifact(container)))
    assert all(torch.equal(restored[name], got[name]) for name in got)


def test_signed_group_quantizer_round_trips_through_the_asymmetric_layout():
    """quantize_groups_signed stores q + 2^(b-1) with low = -2^(b-1) s, so the shared dequantizer gives
    exactly q * s, with q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) and s = fp16(max|x| / (2^(b-1) - 0.5))."""
    from train_gpt import dequantize_groups_asymmetric, quantize_groups_signed
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(5, 64, generator=generator) * torch.tensor([1.0, 0.01, 3.0, 1e-3, 0.2])[:, None]
    for bits in (2, 3, 4):
        half = 2 ** (bits - 1)
        packed, scales, low = quantize_groups_signed(values, bits, 64)
        scale = (values.abs().amax(dim=1, keepdim=True) / (half - 0.5)).to(torch.float16).float()
        expected = torch.clamp(torch.round(values / scale), -half, half - 1) * scale
        back = dequantize_groups_asymmetric(packed, scales, low, 4, values.numel()).view(5, 64)
        assert torch.equal(back, expected), bits
        assert packed.dtype == torch.uint8 and packed.shape == (5, 32)  # two codes per byte


def test_serialization_round_trip_is_bit_exact_for_every_codec_and_layout():
    container = quantize_model_state(toy_state(), toy_hessians(), QuantSettings(lqer_rank=2, lqer_top_k=1))
    expected = dequantize_state(container)
    for codec in ("brotli", "lzma", "zlib"):
        for per_group, shuffle in ((False, True), (True, True), (False, False)):
            restored = deserialize_artifact(serialize_artifact(container, codec=codec, per_group=per_group, shuffle=shuffle))
            got = dequantize_state(restored)
            assert got.keys() == expected.keys()
            for name in expected:
                assert got[name].dtype == expected[name].dtype
                assert torch.equal(got[name], expected[name]), (codec, per_group, name)


def test_corrupted_or_truncated_artifacts_raise_a_clear_error():
    blob = serialize_artifact(quantize_model_state(toy_state(), toy_hessians(), QuantSettings(lqer_enabled=False)))
    cases = [
        ("magic", b"XXXX" + blob[4:]),
        ("version", blob[:4] + bytes([99]) + blob[5:]),
        ("truncated", blob[: len(blob) // 2]),
        ("truncated", blob[:5]),
        ("trailing", blob + b"\0"),
        ("checksum|does not decompress", blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:]),  # decoder or CRC
        ("header checksum", blob[:15] + bytes([blob[15] ^ 1]) + blob[16:]),
    ]
    for expected_words, broken in cases:
        with pytest.raises(ArtifactError, match=expected_words):
            deserialize_artifact(broken)


def test_byte_shuffle_is_inverted_for_any_length():
    for length in (0, 1, 2, 7, 64, 1001):
        data = os.urandom(length)
        for stride in (1, 2, 4):
            assert byte_unshuffle(byte_shuffle(data, stride), stride) == data
    assert byte_shuffle(bytes([1, 2, 3, 4, 5]), 2) == bytes([1, 3, 2, 4, 5])


def test_load_quantized_into_copies_dequantized_weights_into_the_model():
    model = LoopedToy()
    with torch.no_grad():
        model.shared.weight.normal_()
    settings = QuantSettings(quant_small_tensor_numel=0, quant_embed_bits=6)
    container = quantize_model_state(model.state_dict(), {}, settings)
    load_quantized_into(model, container)
    for name, tensor in dequantize_state(container).items():
        assert torch.equal(model.state_dict()[name], tensor)
    with pytest.raises(ValueError, match="missing"):
        load_quantized_into(nn.Linear(2, 2), container)


# --- Counted code ----------------------------------------------------------------------------

SAMPLE_SCRIPT = textwrap.dedent('''
    """A sample training-like script."""
    import dataclasses
    import os
    import sys


    @dataclasses.dataclass
    class Settings:
        """Settings read by name from the environment."""
        num_layers: int = 3
        learning_rate: float = 0.5

        @classmethod
        def from_env(cls):
            values = {f.name: f.type(os.environ.get(f.name.upper(), f.default)) for f in dataclasses.fields(cls)}
            return cls(**values)


    def train(settings: Settings, *, verbose: bool = False) -> float:
        total_loss = 0.0
        for layer_index in range(settings.num_layers):
            total_loss += settings.learning_rate / (layer_index + 1)
        if verbose:
            print(f"layers={settings.num_layers} loss={total_loss:.6f}")
        return total_loss


    if __name__ == "__main__":
        assert sys.argv[1:] in ([], ["--help"])
        if sys.argv[1:] == ["--help"]:
            print("usage: fields", [f.name for f in dataclasses.fields(Settings)])
        else:
            print(train(Settings.from_env(), verbose=True))
''')


def run_python(path, *args, env=None):
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_packed_code_is_two_lines_and_behaves_like_the_original(tmp_path):
    original = tmp_path / "sample.py"
    original.write_text(SAMPLE_SCRIPT)
    packed = tmp_path / "sample_packed.py"
    packed.write_text(pack_code(SAMPLE_SCRIPT))
    assert len(packed.read_text().splitlines()) == 2
    assert counted_code_bytes(str(original)) == len(packed.read_bytes())
    for args, env in (((), {"NUM_LAYERS": "5"}), (("--help",), {})):
        want, got = run_python(str(original), *args, env=env), run_python(str(packed), *args, env=env)
        assert want.returncode == 0 and got.returncode == 0, got.stderr
        assert got.stdout == want.stdout and want.stdout


def test_docstrings_are_dropped_unless_the_code_reads_them(tmp_path):
    assert "sample training-like script" not in minify_source(SAMPLE_SCRIPT)
    reads_doc = '"""Usage: run me."""\nprint(__doc__)  # __doc__ in a comment or "__doc__" in a string does not count\n'
    assert "Usage: run me." in minify_source(reads_doc)
    packed = tmp_path / "doc_packed.py"
    packed.write_text(pack_code(reads_doc))
    assert run_python(str(packed)).stdout == "Usage: run me.\n"


def test_packed_train_gpt_has_the_same_settings_and_errors(tmp_path):
    """The packer renames module-level names, so the packed script is compared by behaviour: the same
    settings (what sweep.py and the env table read from it) and the same error for a bad setting."""
    sys.path.insert(0, os.path.join(REPO, "docs"))
    from env_table import knob_names

    script = os.path.join(REPO, "train_gpt.py")
    packed = tmp_path / "train_gpt_packed.py"
    with open(script, encoding="utf-8") as handle:
        source = handle.read()
    packed.write_text(pack_code(source))
    assert "class Hyperparameters" not in minify_source(source)  # globals were renamed
    assert knob_names(str(packed)) == knob_names(script)
    env = dict(os.environ, PRESET="tiny", NUM_HEADS="3", MODEL_DIM="64")
    outputs = [subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path) for path in (script, str(packed))]
    assert [out.returncode for out in outputs] != [0, 0]
    errors = [out.stderr.strip().splitlines()[-1] for out in outputs]
    assert "MODEL_DIM=64 is not divisible by NUM_HEADS=3" in errors[0]
    assert errors[1] == errors[0]


def test_write_artifact_reports_counted_sizes_and_upstream_log_lines(tmp_path):
    code = tmp_path / "script.py"
    code.write_text(SAMPLE_SCRIPT)
    lines = []
    container = quantize_model_state(toy_state(), toy_hessians(), QuantSettings())
    sizes = write_artifact(str(tmp_path / "run"), container, str(code), log=lines.append)
    model_path, code_path = tmp_path / "run" / "final_model.ptz", tmp_path / "run" / "train_gpt_packed.py"
    assert sizes["model_bytes"] == model_path.stat().st_size
    assert sizes["code_bytes"] == code_path.stat().st_size == counted_code_bytes(str(code))
    assert sizes["artifact_bytes"] == sizes["model_bytes"] + sizes["code_bytes"]
    assert sizes["artifact_limit_ok"] is True
    assert f"Serialized model quantized+rans: {sizes['model_bytes']} bytes" in lines
    assert f"Total submission size quantized+rans: {sizes['artifact_bytes']} bytes" in lines
    assert sorted(os.listdir(tmp_path / "run")) == ["final_model.ptz", "train_gpt_packed.py"]  # no temp files
    small = write_artifact(str(tmp_path / "run"), container, str(code), limit_bytes=100, log=None)
    assert small["artifact_limit_ok"] is False


def test_real_gpt_round_trips_through_the_artifact_with_every_matrix_calibrated():
    import train_gpt
    h = train_gpt.Hyperparameters.from_env({"PRESET": "tiny"})
    torch.manual_seed(0)
    model, fresh = train_gpt.GPT(h.model), train_gpt.GPT(h.model)
    model.set_recurrence(True)
    fresh.set_recurrence(True)
    calibration = [torch.randint(2, h.model.vocab_size, (2, 32))]  # stands in for training batches
    counts, messages = {}, []
    hessians = collect_hessians(model, calibration, call_counts=counts)
    assert counts[f"blocks.{h.model.loop_start}.mlp.fc.weight"] == h.model.num_loops  # the looped block, every pass
    assert "tok_emb.weight" in hessians  # tied head, through the lora hook at site "head"
    container = quantize_model_state(model.state_dict(), hessians, h.quant, log=messages.append)
    assert not [m for m in messages if "no Hessian" in m]
    load_quantized_into(fresh, deserialize_artifact(serialize_artifact(container)))
    with torch.no_grad():
        reference, restored = model.forward_logits(calibration[0]), fresh.forward_logits(calibration[0])
    assert (reference - restored).abs().max().item() < 0.1
