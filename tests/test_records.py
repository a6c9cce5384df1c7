"""Tests for records/make_record.py: statistics, parsing, assembling and validating folders.

Run directories are faked in tmp_path: a summary.json as train_gpt.py writes it (SPEC section 9),
a train.log with step and eval lines, the counted train_gpt.py and a data manifest.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_record", ROOT / "records" / "make_record.py")
make_record = importlib.util.module_from_spec(_spec)
sys.modules["make_record"] = make_record
_spec.loader.exec_module(make_record)

PR1736 = make_record.Reference()
# The fake runs score SCORED_TOKENS tokens holding SCORED_BYTES bytes, so val_loss / val_bpb =
# ln 2 * bytes / tokens = 2.1883, the ratio of PR 1736 (2.33168 / 1.06549).
SCORED_TOKENS, SCORED_BYTES = 1_000_000, 3_157_047
NATS_PER_BPB = math.log(2) * SCORED_BYTES / SCORED_TOKENS

HYPERPARAMETERS = {
    "num_layers": 11,
    "model_dim": 512,
    "matrix_lr": 0.026,
    "ttt_enabled": True,
    "run_id": "placeholder",
    "seed": 0,
}


# -----------------------------------------------------------------------------
# Fake runs
# -----------------------------------------------------------------------------

CODE_TEXT = "import lzma as L,base64 as B\nexec(L.decompress(B.b85decode('placeholder-packed-code')))\n"


def _log_text(seed, bpb, loss, steps, train_time_s, eval_time_s, total_bytes, hyperparameters, code_bytes=None):
    # the format train_gpt.py writes: one `hparam NAME=value` line per resolved setting
    scored = f"scored_tokens:{SCORED_TOKENS} scored_bytes:{SCORED_BYTES}"
    lines = [f"hparam {key.upper()}={value}" for key, value in sorted(hyperparameters.items())]
    lines.append("model_params:1234")
    for step in range(100, steps + 1, 100):
        train_ms = train_time_s * 1000.0 * step / steps
        lines.append(
            f"step:{step}/{steps} train_loss:{4.0 - step / steps:.4f} train_time:{train_ms:.0f}ms "
            f"step_avg:{train_ms / step:.1f}ms tok/s:1000"
        )
    lines.append(f"stopping_early: wallclock_cap train_time:{train_time_s * 1000:.0f}ms step:{steps}/{steps}")
    lines.append(
        f"pre_quant val_loss:{loss - 0.01:.8f} val_bpb:{(loss - 0.01) / NATS_PER_BPB:.8f} {scored} eval_time:5000ms"
    )
    if code_bytes is not None:
        lines.append(f"Code size (minified+lzma+base85): {code_bytes} bytes")
        lines.append(f"Serialized model quantized+brotli: {total_bytes - code_bytes} bytes")
    lines.append(f"Total submission size quantized+brotli: {total_bytes} bytes")
    lines.append(
        f"quantized val_loss:{loss + 0.02:.8f} val_bpb:{(loss + 0.02) / NATS_PER_BPB:.8f} {scored} eval_time:9000ms"
    )
    lines.append(
        f"quantized_ttt_phased val_loss:{loss:.8f} val_bpb:{bpb:.8f} {scored} eval_time:{eval_time_s * 1000:.0f}ms"
    )
    return "\n".join(lines) + "\n"


def make_run(
    root,
    seed,
    bpb,
    *,
    device="cpu",
    world_size=1,
    model_bytes=150_000,
    train_time_s=300.0,
    eval_time_s=200.0,
    hyperparameters=None,
    manifest=None,
    with_val_loss=True,
):
    """A run directory as train_gpt.py leaves it; returns its path."""
    run_dir = Path(root) / f"run_seed{seed}"
    run_dir.mkdir(parents=True)
    # the raw script and the packed (counted) code, as the quantization section writes it
    (run_dir / "train_gpt.py").write_text("# the raw training script\n" * 50)
    code_path = run_dir / "train_gpt_packed.py"
    code_path.write_text(CODE_TEXT)
    code_bytes = code_path.stat().st_size
    loss = round(bpb * NATS_PER_BPB, 8)
    hyperparameters = dict(hyperparameters or HYPERPARAMETERS, seed=seed, run_id=f"run_{seed}")
    manifest_path = Path(root) / "data" / "manifest.json"
    manifest_path.parent.mkdir(exist_ok=True)
    if manifest is None:  # what prepare_caseops_data.py records
        manifest = {
            "train_val_duplicates": {"count": 0, "allowed": False, "first": []},
            "verification": {"val_sidecar_mismatch_docs": 0},
        }
    manifest_path.write_text(json.dumps(manifest))
    artifact_bytes = code_bytes + model_bytes
    summary = {
        "steps": 1000,
        "train_time_s": train_time_s,
        "tokens_per_s": 1000.0,
        "pre_quant_val_bpb": (loss - 0.01) / NATS_PER_BPB,
        "quant_val_bpb": (loss + 0.02) / NATS_PER_BPB,
        "sliding_val_bpb": None,
        "ttt_val_bpb": bpb,
        "ttt_mode": "phased",
        "code_bytes": code_bytes,
        "model_bytes": model_bytes,
        "artifact_bytes": artifact_bytes,
        "artifact_limit_ok": artifact_bytes <= 16_000_000,
        "train_time_ok": train_time_s <= 600,
        "eval_time_s": eval_time_s,
        "eval_time_ok": eval_time_s <= 600,
        "device": device,
        "world_size": world_size,
        "seed": seed,
        "hyperparameters": hyperparameters,
        "data_manifest": str(manifest_path),
    }
    if with_val_loss:
        summary["evals"] = {"quantized_ttt_phased": {"val_loss": loss, "val_bpb": bpb, "eval_time_s": eval_time_s}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    log = _log_text(seed, bpb, loss, 1000, train_time_s, eval_time_s, artifact_bytes, hyperparameters, code_bytes)
    if not with_val_loss:
        log = log.replace(f"quantized_ttt_phased val_loss:{loss:.8f} ", "quantized_ttt_phased ")
    (run_dir / "train.log").write_text(log)
    return run_dir


def three_runs(root, bpbs=(1.10, 1.101, 1.099), **kwargs):
    return [make_run(root, seed, bpb, **kwargs) for seed, bpb in zip((42, 0, 1234), bpbs)]


def assemble_folder(runs, out, plot=False, **kwargs):
    """make_record.assemble, without the plot unless a test asks for it (matplotlib is slow)."""
    return make_record.assemble(runs, out, plot=plot, **kwargs)


def by_name(checks):
    return {check.name: check for check in checks}


def rewrite_submission(folder, change):
    path = folder / "submission.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# -----------------------------------------------------------------------------
# Statistics
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 1.0, 3.0, 12.0, 250.0])
def test_builtin_t_survival_matches_closed_forms_for_one_and_two_dof(t):
    cauchy = 0.5 - math.atan(t) / math.pi  # df = 1
    two_dof = 0.5 - t / (2.0 * math.sqrt(2.0 + t * t))  # df = 2
    assert make_record.student_t_sf_builtin(t, 1.0) == pytest.approx(cauchy, rel=1e-10, abs=1e-14)
    assert make_record.student_t_sf_builtin(t, 2.0) == pytest.approx(two_dof, rel=1e-10, abs=1e-14)


def test_builtin_t_survival_agrees_with_scipy_including_fractional_dof():
    import scipy.stats as scipy_stats
    for df in (1.0, 2.0, 2.37, 3.9, 4.0, 7.5, 30.0, 300.0):
        for t in (-8.0, -1.5, -0.01, 0.0, 0.4, 1.96, 2.9, 6.0, 40.0):
            expected = scipy_stats.t.sf(t, df)
            assert make_record.student_t_sf_builtin(t, df) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_t_survival_of_infinite_t_is_zero_or_one():
    assert make_record.student_t_sf_builtin(math.inf, 3.0) == 0.0
    assert make_record.student_t_sf_builtin(-math.inf, 3.0) == 1.0


def test_t_survival_falls_back_to_the_builtin_without_scipy(monkeypatch):
    calls = []
    builtin = make_record.student_t_sf_builtin
    monkeypatch.setattr(make_record, "student_t_sf_builtin", lambda t, df: calls.append((t, df)) or builtin(t, df))
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `from scipy import stats` raise ImportError
    assert make_record.student_t_sf(1.5, 2.0) == pytest.approx(0.5 - 1.5 / (2.0 * math.sqrt(2.0 + 2.25)))
    assert calls == [(1.5, 2.0)]


def test_welch_test_agrees_with_scipy_ttest_ind_from_stats():
    import scipy.stats as scipy_stats
    new = (1.0600, 0.0008, 3)
    ref = (1.06549, 0.00070, 3)
    result = make_record.welch_improvement_test(*new, *ref, margin=0.0)
    # H1: ref mean > new mean, i.e. the reference minus the new run is positive.
    expected = scipy_stats.ttest_ind_from_stats(*ref, *new, equal_var=False, alternative="greater")
    assert result["t"] == pytest.approx(expected.statistic, rel=1e-12)
    assert result["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
    # A margin in the null hypothesis is the same test with the reference shifted down by it.
    margin = 0.002
    shifted = make_record.welch_improvement_test(*new, *ref, margin=margin)
    expected = scipy_stats.ttest_ind_from_stats(
        ref[0] - margin, ref[1], ref[2], *new, equal_var=False, alternative="greater"
    )
    assert shifted["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)


def test_welch_degrees_of_freedom_by_hand():
    # Equal variances and sizes: Welch-Satterthwaite gives n1 + n2 - 2.
    result = make_record.welch_improvement_test(1.0, 0.1, 3, 1.2, 0.1, 3)
    assert result["df"] == pytest.approx(4.0)
    assert result["t"] == pytest.approx(0.2 / math.sqrt(2 * 0.01 / 3))
    assert result["improvement"] == pytest.approx(0.2)


def test_mean_and_std_use_sample_std():
    mean, std = make_record.mean_and_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
    assert make_record.mean_and_std([5.0]) == (5.0, None)


def test_improvement_below_the_margin_fails_threshold_and_significance():
    # 0.0015 bpb * 2.1883 = 0.0033 nats < 0.005, however tight the seeds are.
    result = make_record.significance_analysis([1.06399, 1.06400, 1.06401], NATS_PER_BPB, PR1736)
    assert result["improvement_nats"] == pytest.approx(0.00149 * NATS_PER_BPB, rel=1e-3)
    assert result["threshold_ok"] is False
    assert result["significant"] is False
    assert result["p_value"] > 0.5
    assert result["p_value_vs_zero"] < 0.05  # better than the reference, just not by enough


def test_clear_improvement_passes_threshold_and_significance():
    result = make_record.significance_analysis([1.0570, 1.0575, 1.0565], NATS_PER_BPB, PR1736)
    assert result["improvement_nats"] > 0.005
    assert result["threshold_ok"] is True
    assert result["significant"] is True
    assert result["p_value"] < 0.01


def test_improvement_above_margin_but_noisy_is_not_significant():
    result = make_record.significance_analysis([1.050, 1.070, 1.055], NATS_PER_BPB, PR1736)
    assert result["threshold_ok"] is True
    assert result["significant"] is False


def test_threshold_is_in_nats_so_the_conversion_ratio_matters():
    bpbs = [1.0625, 1.0626, 1.0624]  # 0.00299 bpb better
    in_tokens = make_record.significance_analysis(bpbs, NATS_PER_BPB, PR1736)
    per_byte = make_record.significance_analysis(bpbs, math.log(2), PR1736)
    assert in_tokens["threshold_ok"] is True  # 0.0065 nats per token
    assert per_byte["threshold_ok"] is False  # 0.0021 nats per byte


def test_one_seed_gives_no_p_value():
    result = make_record.significance_analysis([1.05], NATS_PER_BPB, PR1736)
    assert result["p_value"] is None and result["significant"] is None


# -----------------------------------------------------------------------------
# Parsing
# -----------------------------------------------------------------------------


def test_parse_our_log_format():
    text = _log_text(1, 1.05, 2.3, 300, 100.0, 250.0, 15_000_000, {"a": 1, "seed": 1})
    parsed = make_record.parse_train_log(text)
    assert parsed.train_points == [(100, pytest.approx(3.6667)), (200, pytest.approx(3.3333)), (300, 3.0)]
    assert parsed.evals["ttt"]["val_bpb"] == 1.05
    assert parsed.evals["ttt"]["label"] == "quantized_ttt_phased"
    assert set(parsed.evals) == {"pre_quant", "quant", "ttt"}
    assert parsed.max_train_time_s == pytest.approx(100.0)
    assert parsed.max_eval_time_s == pytest.approx(250.0)
    assert parsed.total_submission_bytes == 15_000_000
    assert parsed.hyperparameters == {"a": "1", "seed": "1"}  # `hparam A=1` lines, keys lowercased


def test_parse_upstream_log_format():
    text = (
        "Hyperparameters:\n  matrix_lr: 0.026\n  seed: 42\ntrain_shards: 80\n"
        "0/20000 val_loss: 9.0177 val_bpb: 4.1205\n"
        "500/20000 train_loss: 2.5859 train_time: 0.8m tok/s: 8111933\n"
        "4854/20000 val_loss: 2.3408 val_bpb: 1.0696\n"
        "stopping_early: wallclock_cap train_time: 596176ms step: 4854/20000\n"
        "diagnostic pre-quantization post-ema val_loss:2.33966453 val_bpb:1.06906597 eval_time:6721ms\n"
        "Total submission size quantized+brotli: 15978834 bytes\n"
        "diagnostic quantized val_loss:2.36024930 val_bpb:1.07847179 eval_time:10116ms\n"
        "quantized_ttt_phased val_loss:2.33302 val_bpb:1.06610 eval_time:397000ms\n"
    )
    parsed = make_record.parse_train_log(text)
    assert parsed.train_points == [(500, 2.5859)]
    assert parsed.max_train_time_s == pytest.approx(596.176)
    assert parsed.evals["pre_quant"]["val_bpb"] == 1.06906597
    assert parsed.evals["quant"]["val_bpb"] == 1.07847179
    assert parsed.evals["ttt"]["val_bpb_text"] == "1.06610"
    assert parsed.hyperparameters == {"matrix_lr": "0.026", "seed": "42"}
    assert parsed.total_submission_bytes == 15978834


def test_parse_hyperparameters_as_json_line():
    parsed = make_record.parse_train_log('hyperparameters: {"seed": 3, "lr": 0.1}\n')
    assert parsed.hyperparameters == {"seed": 3, "lr": 0.1}


def test_summary_val_loss_comes_from_the_field_or_the_evals_entry():
    assert make_record.summary_val_loss({"ttt_val_loss": 2.5}, "ttt") == 2.5
    evals = {"evals": {"quantized_sliding_window": {"val_loss": 2.4}, "quantized_ttt_chunked": {"val_loss": 2.3}}}
    assert make_record.summary_val_loss(evals, "ttt") == 2.3
    assert make_record.summary_val_loss(evals, "sliding") == 2.4
    assert make_record.summary_val_loss(evals, "quant") is None


def test_printed_tolerance_is_half_the_last_digit():
    assert make_record.printed_tolerance("1.06610") == pytest.approx(5e-6)
    assert make_record.printed_tolerance("1.07") == pytest.approx(5e-3)
    assert make_record.printed_tolerance("2") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "manifest, status",
    [
        ({"val_overlap_docs": 0}, "PASS"),
        ({"verification": {"val_train_overlap": 3}}, "FAIL"),
        ({"checks": {"val_train_disjoint": True}}, "PASS"),
        ({"val_overlap": True}, "FAIL"),
        ({"no_val_overlap": True}, "PASS"),
        ({"val_duplicate_doc_ids": []}, "PASS"),
        ({"val_overlap_docs": 0, "val_overlap_docs_checked": 50000}, "PASS"),
        ({"docs": 10, "sidecar_mismatch_docs": 0}, "UNKNOWN"),
        (None, "UNKNOWN"),
    ],
)
def test_manifest_overlap_status(manifest, status):
    assert make_record.manifest_overlap_status(manifest)[0] == status


def test_manifest_overlap_status_reads_the_prepare_script_manifest():
    manifest = {"train_val_duplicates": {"count": 0, "allowed": True, "first": []},
                "overrides": {"allow_train_val_duplicates": True}}
    assert make_record.manifest_overlap_status(manifest)[0] == "PASS"  # allowed, but none found
    manifest["train_val_duplicates"].update(count=2, first=[{"train_line": 9, "val_doc": 1}])
    assert make_record.manifest_overlap_status(manifest)[0] == "FAIL"


def test_manifest_sidecar_status():
    assert make_record.manifest_sidecar_status({"verification": {"val_sidecar_mismatch_docs": 0}})[0] == "PASS"
    assert make_record.manifest_sidecar_status({"verification": {"val_sidecar_mismatch_docs": 4}})[0] == "FAIL"
    assert make_record.manifest_sidecar_status({"docs": 3})[0] == "UNKNOWN"
    assert make_record.manifest_sidecar_status(None)[0] == "UNKNOWN"


def test_config_differences_ignore_seed_and_run_id_only():
    base = {"lr": 0.1, "layers": 11, "seed": 1, "run_id": "a"}
    same = dict(base, seed=2, run_id="b")
    assert make_record.config_differences([base, same], ("seed", "run_id")) == {}
    other = dict(same, lr=0.2)
    assert make_record.config_differences([base, other], ("seed", "run_id")) == {"lr": [0.1, 0.2]}
    fewer = {k: v for k, v in same.items() if k != "layers"}
    assert make_record.config_differences([base, fewer], ("seed", "run_id")) == {"layers": [11, "<missing>"]}


def test_hardware_status_requires_eight_h100():
    assert make_record.hardware_status("NVIDIA H100 80GB HBM3", 8)[0] is True
    assert make_record.hardware_status("NVIDIA H100 80GB HBM3", 1)[0] is False
    assert make_record.hardware_status("cpu", 8)[0] is False


# -----------------------------------------------------------------------------
# Assembling and validating folders
# -----------------------------------------------------------------------------


def test_assemble_writes_a_challenge_folder_that_passes_its_own_checks(tmp_path):
    runs = three_runs(tmp_path)
    out = tmp_path / "records" / "demo"
    checks = assemble_folder(runs, out, plot=True, name="CPU demo", date="2026-01-01")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "README.md", "submission.json", "train_gpt.py", "loss_curve.png", "data_manifest.json",
        "train_seed42.log", "train_seed0.log", "train_seed1234.log",
        "summary_seed42.json", "summary_seed0.json", "summary_seed1234.json",
    ])
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "train_gpt.py").read_text() == CODE_TEXT
    submission = json.loads((out / "submission.json").read_text())
    for key in ("author", "github_id", "name", "date", "track", "val_bpb", "val_bpb_std", "val_loss",
                "seeds", "seed_results", "bytes_total", "bytes_code", "p_value", "compliance"):
        assert key in submission
    assert submission["compliance"]["artifact_under_16mb"] is True
    assert submission["compliance"]["no_val_overlap"] is True
    assert submission["checks"]["code_bytes"] == "PASS"
    assert submission["seeds"] == [42, 0, 1234]
    assert submission["val_bpb"] == pytest.approx(1.100)
    assert submission["val_bpb_std"] == pytest.approx(0.001)
    assert submission["seed_results"]["42"]["val_bpb"] == 1.10
    assert submission["bytes_code"] == len(CODE_TEXT.encode())
    assert submission["nats_per_bpb"] == pytest.approx(NATS_PER_BPB, rel=1e-6)
    # A CPU demo is not a record attempt, and says why.
    assert submission["record_attempt"] is False
    assert submission["track"] == "non_record_16mb"
    assert "not 8xH100" in submission["non_record_reason"]
    readme = (out / "README.md").read_text()
    assert readme.startswith("# Non-record: CPU demo")
    assert "| 42 | 1000 | 1.09543 | 1.10914 | - | **1.10000** |" in readme
    assert "Welch" in readme and "![train loss](loss_curve.png)" in readme
    assert "## Configuration" in readme and "matrix_lr=0.026" in readme
    # Every gating check passes; the record bar is reported but informational.
    assert make_record.failed(checks) == []
    status = {c.name: c.status for c in checks}
    assert status["val_overlap"] == "PASS" and status["same_config"] == "PASS"
    assert status["val_byte_sidecars"] == "PASS"
    assert status["significance"] == "FAIL" and not by_name(checks)["significance"].gating
    assert make_record.main(["validate", str(out)]) == 0


def test_record_attempt_on_8xh100_passes_when_it_beats_the_reference(tmp_path):
    runs = three_runs(tmp_path, bpbs=(1.0570, 1.0575, 1.0565), device="NVIDIA H100 80GB HBM3", world_size=8)
    out = tmp_path / "rec"
    checks = assemble_folder(runs, out, name="better", date="2026-01-01")
    submission = json.loads((out / "submission.json").read_text())
    assert submission["record_attempt"] is True and submission["track"] == "10min_16mb"
    assert (out / "README.md").read_text().startswith("# Record: better")
    assert submission["p_value"] < 0.01
    assert make_record.failed(checks) == []
    assert by_name(checks)["significance"].gating


def test_record_attempt_that_does_not_clear_the_margin_fails_validation(tmp_path):
    runs = three_runs(tmp_path, bpbs=(1.0640, 1.0641, 1.0639), device="NVIDIA H100 80GB HBM3", world_size=8)
    out = tmp_path / "rec"
    checks = assemble_folder(runs, out, name="close", date="2026-01-01")
    assert {c.name for c in make_record.failed(checks)} == {"improvement_threshold", "significance"}
    assert make_record.main(["validate", str(out)]) == 1


def test_non_record_flag_labels_the_folder_with_the_reason(tmp_path):
    runs = three_runs(tmp_path, bpbs=(1.0570, 1.0575, 1.0565), device="NVIDIA H100 80GB HBM3", world_size=8)
    out = tmp_path / "nr"
    assemble_folder(runs, out, name="ablation", non_record=True, non_record_reason="ablation study")
    submission = json.loads((out / "submission.json").read_text())
    assert submission["record_attempt"] is False
    assert submission["non_record_reason"] == "ablation study"
    assert "**Non-record submission.** ablation study" in (out / "README.md").read_text()


def test_validation_fails_on_an_oversized_artifact(tmp_path):
    runs = three_runs(tmp_path, model_bytes=15_999_990)
    out = tmp_path / "big"
    checks = assemble_folder(runs, out, name="big")
    assert by_name(checks)["artifact_size"].status == "FAIL"
    assert "> 16,000,000" in by_name(checks)["artifact_size"].detail
    assert make_record.main(["validate", str(out)]) == 1


def test_validation_fails_on_a_train_time_over_600_seconds(tmp_path):
    runs = three_runs(tmp_path, train_time_s=612.5)
    checks = assemble_folder(runs, tmp_path / "slow", name="slow")
    assert by_name(checks)["train_time"].status == "FAIL"
    assert "612.5 s > 600 s" in by_name(checks)["train_time"].detail


def test_validation_fails_on_an_eval_time_over_600_seconds(tmp_path):
    runs = three_runs(tmp_path, eval_time_s=601.0)
    checks = assemble_folder(runs, tmp_path / "slow_eval", name="slow eval")
    assert by_name(checks)["eval_time"].status == "FAIL"


def test_validation_fails_on_mismatched_configs(tmp_path):
    runs = [
        make_run(tmp_path, 1, 1.10),
        make_run(tmp_path, 2, 1.10, hyperparameters=dict(HYPERPARAMETERS, matrix_lr=0.03)),
        make_run(tmp_path, 3, 1.10),
    ]
    checks = assemble_folder(runs, tmp_path / "mixed", name="mixed")
    check = by_name(checks)["same_config"]
    assert check.status == "FAIL" and "matrix_lr" in check.detail
    assert "seed" not in check.detail.split("differ: ")[1].split("=")[0]


@pytest.mark.parametrize(
    "tamper, failing_check",
    [
        (lambda s: s["seed_results"]["42"].update(val_bpb=1.05), "scores_match_logs"),
        (lambda s: s.update(val_bpb=1.05), "reported_statistics"),
        (lambda s: s.update(p_value=0.001), "reported_statistics"),
        (lambda s: s.update(bytes_code=100), "code_bytes"),
        (lambda s: s["seed_results"]["0"].update(artifact_bytes=15_000_000), "artifact_size"),
        (lambda s: s["seed_results"]["0"].update(train_time_s=700.0), "train_time"),
    ],
)
def test_validation_fails_on_a_tampered_submission_json(tmp_path, tamper, failing_check):
    out = tmp_path / "folder"
    assert make_record.failed(assemble_folder(three_runs(tmp_path), out, name="t")) == []
    rewrite_submission(out, tamper)
    checks = make_record.validate_folder(out)
    assert by_name(checks)[failing_check].status == "FAIL"
    assert make_record.main(["validate", str(out)]) == 1


def test_a_log_renamed_to_another_seed_fails(tmp_path):
    out = tmp_path / "folder"
    make_record.assemble(three_runs(tmp_path), out, name="t", plot=False)
    (out / "train_seed0.log").write_text((out / "train_seed42.log").read_text().replace("1.10000000", "1.10100000"))
    check = by_name(make_record.validate_folder(out))["same_config"]
    assert check.status == "FAIL" and "train_seed0.log / summary ran seed 42" in check.detail


def test_seed_list_must_match_seed_results(tmp_path):
    out = tmp_path / "folder"
    make_record.assemble(three_runs(tmp_path), out, name="t", plot=False)
    rewrite_submission(out, lambda s: s.update(seeds=[42, 0]))
    assert make_record.validate_folder(out)[0].status == "FAIL"


def test_code_bytes_are_recomputed_from_the_counted_file(tmp_path):
    out = tmp_path / "folder"
    assemble_folder(three_runs(tmp_path), out, name="t")
    with open(out / "train_gpt.py", "a") as code:
        code.write("# one more line\n")
    checks = by_name(make_record.validate_folder(out))
    assert checks["code_bytes"].status == "FAIL"
    assert checks["artifact_size"].status == "FAIL"  # code + model no longer equals the claim


def test_counted_code_must_be_valid_python(tmp_path):
    out = tmp_path / "folder"
    make_record.assemble(three_runs(tmp_path), out, name="t", plot=False)
    code = (out / "train_gpt.py").read_text()
    (out / "train_gpt.py").write_text(code.replace("exec(", "exec(("))  # same size + 1, broken
    check = by_name(make_record.validate_folder(out))["code_bytes"]
    assert check.status == "FAIL" and "not valid Python" in check.detail


def test_log_total_size_must_agree_with_code_plus_model(tmp_path):
    out = tmp_path / "folder"
    assemble_folder(three_runs(tmp_path), out, name="t")
    log = out / "train_seed42.log"
    size_line = "Total submission size quantized+brotli: "
    log.write_text(log.read_text().replace(size_line, size_line + "9"))
    check = by_name(make_record.validate_folder(out))["artifact_size"]
    assert check.status == "FAIL" and "log total" in check.detail


def test_missing_manifest_is_unknown_not_pass(tmp_path):
    runs = three_runs(tmp_path, manifest={"docs": 10})
    checks = by_name(assemble_folder(runs, tmp_path / "folder", name="t"))
    assert checks["val_overlap"].status == "UNKNOWN"
    assert make_record.main(["validate", str(tmp_path / "folder")]) == 0
    assert make_record.main(["validate", "--strict", str(tmp_path / "folder")]) == 1


def test_manifest_is_found_in_data_path_when_the_summary_does_not_name_it(tmp_path):
    runs = three_runs(tmp_path)
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        summary["hyperparameters"]["data_path"] = str(Path(summary.pop("data_manifest")).parent)
        (run / "summary.json").write_text(json.dumps(summary))
    checks = by_name(assemble_folder(runs, tmp_path / "folder", name="t"))
    assert checks["val_overlap"].status == "PASS" and checks["same_data"].status == "PASS"


def test_val_overlap_in_manifest_fails(tmp_path):
    runs = three_runs(tmp_path, manifest={"val_overlap_docs": 2})
    checks = by_name(assemble_folder(runs, tmp_path / "folder", name="t"))
    assert checks["val_overlap"].status == "FAIL"


def test_without_val_loss_the_ln2_assumption_is_recorded(tmp_path):
    runs = three_runs(tmp_path, with_val_loss=False)
    out = tmp_path / "folder"
    assemble_folder(runs, out, name="t")
    submission = json.loads((out / "submission.json").read_text())
    assert submission["nats_per_bpb"] == pytest.approx(math.log(2))
    assert "assumed ln 2" in submission["nats_per_bpb_source"]
    assert "assumed ln 2" in (out / "README.md").read_text()


def test_force_reassembly_leaves_no_stale_seed_files(tmp_path):
    out = tmp_path / "folder"
    assemble_folder(three_runs(tmp_path / "first"), out, name="t", plot=True)
    runs = [make_run(tmp_path / "second", seed, 1.1) for seed in (7, 8, 9)]
    checks = assemble_folder(runs, out, name="t", force=True)
    logs = sorted(p.name for p in out.glob("train_seed*.log"))
    assert logs == ["train_seed7.log", "train_seed8.log", "train_seed9.log"]
    assert not (out / "loss_curve.png").exists()
    assert make_record.failed(checks) == []


def test_assemble_refuses_duplicate_seeds_and_a_non_empty_folder(tmp_path):
    first = make_run(tmp_path / "a", 7, 1.1)
    second = make_run(tmp_path / "b", 7, 1.1)
    with pytest.raises(ValueError, match="duplicate seeds"):
        assemble_folder([first, second], tmp_path / "out", name="dup")
    out = tmp_path / "out2"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        assemble_folder([first], out, name="one")


def test_cli_assemble_then_validate(tmp_path, capsys):
    runs = three_runs(tmp_path)
    out = tmp_path / "cli"
    argv = ["assemble", *map(str, runs), "--name", "cli run", "--out", str(out), "--ref-mean", "1.2",
            "--ref-std", "0.001", "--ref-n", "3", "--no-plot"]
    assert make_record.main(argv) == 0
    printed = capsys.readouterr().out
    assert "PASS     artifact_size" in printed and "all gating checks pass" in printed
    assert not (out / "loss_curve.png").exists()
    submission = json.loads((out / "submission.json").read_text())
    assert submission["reference"]["val_bpb"] == 1.2
    assert submission["significance"]["improvement_bpb"] == pytest.approx(0.1)
    assert make_record.main(["validate", str(out)]) == 0


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    run = make_run(tmp_path, 5, 1.1)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(ttt_val_bpb=None, quant_val_bpb=None)
    (run / "summary.json").write_text(json.dumps(summary))
    assert make_record.main(["assemble", str(run), "--name", "x", "--out", str(tmp_path / "o")]) == 2
    assert "no quantized eval ran" in capsys.readouterr().err
    assert make_record.main(["validate", str(tmp_path / "nothing_here")]) == 1


# -----------------------------------------------------------------------------
# val_bpb recomputed from each eval line's own fields; sizes; JSON types
# -----------------------------------------------------------------------------


def test_bpb_is_recomputed_from_the_fields_within_the_printed_digits():
    # a line of the example record folder: 4.11625938 * 136672 / ln 2 / 306639 = 2.646850622...
    fields = {"val_loss": "4.11625938", "val_bpb": "2.64685062", "scored_tokens": "136672", "scored_bytes": "306639"}
    assert make_record.bpb_arithmetic_status(fields)[0] == "PASS"
    assert make_record.bpb_arithmetic_status(dict(fields, val_bpb="2.64685070"))[0] == "FAIL"  # 8e-8 off
    assert make_record.bpb_arithmetic_status(dict(fields, scored_bytes="306640"))[0] == "FAIL"
    # a coarsely printed val_loss widens the tolerance by its half-digit times tokens / (ln 2 bytes)
    coarse = dict(fields, val_loss="4.116", val_bpb="2.6468")
    assert make_record.bpb_arithmetic_status(coarse)[0] == "PASS"
    assert make_record.bpb_arithmetic_status(dict(coarse, val_bpb="2.6480"))[0] == "FAIL"
    status, why = make_record.bpb_arithmetic_status(dict(fields, scored_tokens="12x"))
    assert status == "FAIL" and "scored_tokens:12x" in why
    assert make_record.bpb_arithmetic_status(dict(fields, scored_bytes="0"))[0] == "FAIL"
    assert make_record.bpb_arithmetic_status({"val_loss": "2.3", "val_bpb": "1.05"})[0] == "UNKNOWN"


def test_eval_line_fields_are_read_by_name_and_extra_fields_are_kept():
    line = ("quantized_ttt_phased val_loss:4.07003550 val_bpb:2.61712759 scored_tokens:136672 bos_targets:64 "
            "scored_bytes:306639 eval_time:121844ms")
    parsed = make_record.parse_train_log(line + "\n")
    assert parsed.evals["ttt"]["val_bpb"] == 2.61712759
    [entry] = parsed.eval_lines
    assert entry["line"] == 1 and entry["label"] == "quantized_ttt_phased"
    assert entry["fields"] == {"val_loss": "4.07003550", "val_bpb": "2.61712759", "scored_tokens": "136672",
                               "bos_targets": "64", "scored_bytes": "306639", "eval_time": "121844ms"}
    assert make_record.bpb_arithmetic_status(entry["fields"])[0] == "PASS"


def test_validation_recomputes_every_eval_line_and_names_the_one_that_does_not_add_up(tmp_path):
    out = tmp_path / "folder"
    checks = by_name(assemble_folder(three_runs(tmp_path), out, name="t"))
    assert checks["bpb_arithmetic"].status == "PASS" and "9 eval results" in checks["bpb_arithmetic"].detail
    log = out / "train_seed0.log"
    lines = log.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.startswith("quantized val_loss"))
    lines[number - 1] = lines[number - 1].replace(f"scored_bytes:{SCORED_BYTES}", "scored_bytes:3000000")
    log.write_text("\n".join(lines) + "\n")
    check = by_name(make_record.validate_folder(out))["bpb_arithmetic"]
    assert check.status == "FAIL"
    assert f"train_seed0.log line {number} (quantized): val_bpb" in check.detail
    assert make_record.main(["validate", str(out)]) == 1


def test_new_fields_on_eval_lines_do_not_disturb_validation(tmp_path):
    out = tmp_path / "folder"
    assemble_folder(three_runs(tmp_path), out, name="t")
    for log in out.glob("train_seed*.log"):
        log.write_text(log.read_text().replace(" scored_bytes:", " bos_targets:250 scored_bytes:"))
    checks = make_record.validate_folder(out)
    assert make_record.failed(checks, strict=False) == []
    assert by_name(checks)["bpb_arithmetic"].status == "PASS"


def test_summary_eval_results_are_recomputed_too(tmp_path):
    runs = three_runs(tmp_path)
    summary_path = runs[1] / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["evals"]["quantized_ttt_phased"].update(scored_tokens=SCORED_TOKENS, scored_bytes=SCORED_BYTES + 5000)
    summary_path.write_text(json.dumps(summary))
    check = by_name(assemble_folder(runs, tmp_path / "folder", name="t"))["bpb_arithmetic"]
    assert check.status == "FAIL" and "summary_seed0.json evals.quantized_ttt_phased" in check.detail


def test_log_without_scored_tokens_and_bytes_leaves_the_arithmetic_unknown(tmp_path):
    out = tmp_path / "folder"
    assemble_folder(three_runs(tmp_path), out, name="t")
    for log in out.glob("train_seed*.log"):
        log.write_text(log.read_text().replace(f" scored_tokens:{SCORED_TOKENS} scored_bytes:{SCORED_BYTES}", ""))
    assert by_name(make_record.validate_folder(out))["bpb_arithmetic"].status == "UNKNOWN"
    assert make_record.main(["validate", "--strict", str(out)]) == 1


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda folder: rewrite_submission(folder, lambda s: s.update(bytes_total=s["bytes_total"] - 1)),
         "submission bytes_total"),
        (lambda folder: _rewrite_json(folder / "summary_seed0.json", lambda s: s.update(artifact_bytes=1)),
         "summary_seed0.json artifact_bytes 1 !="),
        (lambda folder: _rewrite_json(folder / "summary_seed1234.json", lambda s: s.update(model_bytes=7)),
         "summary_seed1234.json model_bytes 7 !="),
        (lambda folder: _replace_in(folder / "train_seed42.log", "Serialized model quantized+brotli: ",
                                    "Serialized model quantized+brotli: 1"), "train_seed42.log serialized model"),
        (lambda folder: _replace_in(folder / "train_seed42.log", "Code size (minified+lzma+base85): ",
                                    "Code size (minified+lzma+base85): 1"), "train_seed42.log code size"),
    ],
)
def test_bytes_total_and_every_reported_size_must_agree(tmp_path, tamper, expected):
    out = tmp_path / "folder"
    checks = by_name(assemble_folder(three_runs(tmp_path), out, name="t"))
    assert checks["bytes_total"].status == "PASS"
    submission = json.loads((out / "submission.json").read_text())
    largest = max(entry["model_bytes"] for entry in submission["seed_results"].values()) + len(CODE_TEXT)
    assert submission["bytes_total"] == largest
    tamper(out)
    check = by_name(make_record.validate_folder(out))["bytes_total"]
    assert check.status == "FAIL" and expected in check.detail
    assert make_record.main(["validate", str(out)]) == 1


def _rewrite_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _replace_in(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    "file_name, change, expected",
    [
        ("submission.json", lambda s: s["seed_results"]["42"].update(val_bpb="1.10"),
         'submission.json: seed_results.42.val_bpb is a string ("1.10"), expected a number'),
        ("submission.json", lambda s: s.update(seed_results=[1, 2, 3]),
         "submission.json: seed_results is a list ([1, 2, 3]), expected an object"),
        ("submission.json", lambda s: s["seed_results"].update({"0": [1.1]}),
         "submission.json: seed_results.0 is a list, expected an object"),
        ("submission.json", lambda s: s.update(bytes_total=1.5e6),
         "submission.json: bytes_total is a number (1500000.0), expected an integer"),
        ("submission.json", lambda s: s.update(record_attempt="false"),
         'submission.json: record_attempt is a string ("false"), expected true/false'),
        ("submission.json", lambda s: s["reference"].update(val_bpb="1.06549"),
         "submission.json: reference.val_bpb is a string"),
        ("submission.json", lambda s: s.update(seeds=[42, {"seed": 0}, 1234]),
         "submission.json: seeds[1] is an object, expected an integer"),
        ("summary_seed0.json", lambda s: s.update(model_bytes="150000"),
         'summary_seed0.json: model_bytes is a string ("150000"), expected an integer'),
        ("summary_seed0.json", lambda s: s.update(evals={"quantized_ttt_phased": [2.4]}),
         "summary_seed0.json: evals.quantized_ttt_phased is a list, expected an object"),
        ("summary_seed0.json", lambda s: s.update(hyperparameters=["seed", 0]),
         "summary_seed0.json: hyperparameters is a list"),
    ],
)
def test_wrong_json_types_fail_naming_the_file_and_key(tmp_path, capsys, file_name, change, expected):
    out = tmp_path / "folder"
    assemble_folder(three_runs(tmp_path), out, name="t")
    _rewrite_json(out / file_name, change)
    checks = make_record.validate_folder(out)
    assert [(check.name, check.status) for check in checks] == [("json_types", "FAIL")]
    assert expected in checks[0].detail
    assert make_record.main(["validate", str(out)]) == 1
    assert "FAIL     json_types" in capsys.readouterr().out


@pytest.mark.parametrize("file_name", ["submission.json", "summary_seed42.json", "data_manifest.json"])
def test_a_json_file_that_is_not_an_object_fails_naming_the_file(tmp_path, file_name):
    out = tmp_path / "folder"
    assemble_folder(three_runs(tmp_path), out, name="t")
    (out / file_name).write_text("[1, 2]\n")
    [check] = make_record.validate_folder(out)
    assert check.status == "FAIL" and f"{file_name}: the top level is a list, expected an object" in check.detail


def test_a_json_file_that_does_not_parse_is_a_failed_check(tmp_path):
    out = tmp_path / "folder"
    assemble_folder(three_runs(tmp_path), out, name="t")
    (out / "summary_seed0.json").write_text('{"seed": 0,')
    [check] = make_record.validate_folder(out)
    assert check.name == "files" and check.status == "FAIL" and "summary_seed0.json: not valid JSON" in check.detail
