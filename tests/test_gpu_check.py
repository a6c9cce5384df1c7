"""benchmarks/gpu_check.py cannot rot: its --cpu-smoke mode runs every section of the GPU check at a
tiny shape on CPU (varlen attention, torch.compile with the eager backend) and must write the same
JSON, with sane values, that a GPU run writes. The GPU run itself needs a GPU and is not part of CI."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def run_check(out, *extra, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, SCRIPT, "--cpu-smoke", "--out", str(out), *extra], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("gpu_check") / "check.json")


def finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_run_completes_every_section_and_prints_the_summary(smoke):
    report, stdout = smoke
    assert report["mode"] == "cpu-smoke" and report["complete"] is True
    for key in ("environment", "agreement", "compile", "training", "eval"):
        assert report[key]["status"] == "ok", (key, report[key]["status"])
    assert report["triton_kernels"] == {"status": "skipped: needs CUDA and triton"}  # CPU: interpreter tests
    assert set(report["sections"]) == {"environment", "agreement", "training", "eval"}
    assert 0 < report["elapsed_s"] <= report["budget_s"] + 60
    assert "gpu check (cpu-smoke)" in stdout and "projected 8 GPUs" in stdout and "written:" in stdout


def test_environment_names_the_versions_and_the_kernels_chosen(smoke):
    import torch
    environment = smoke[0]["environment"]
    assert environment["torch"] == torch.__version__ and environment["gpu"] is None
    assert environment["fa3_available"] is False and environment["attention_backend"] == "varlen"
    assert environment["attention_backend_auto"] == "sdpa"  # what a CPU run would pick
    assert environment["compile"]["backend"] == "eager" and environment["compile"]["recompile_limit"] == 64
    assert environment["compile"]["fail_on_recompile_limit_hit"] is True


def test_every_available_backend_agrees_with_the_plain_reference_in_bf16(smoke):
    agreement = smoke[0]["agreement"]
    assert agreement["reference"] == "plain" and agreement["dtype"] == "bf16" and agreement["documents"] > 2
    assert agreement["backends"]["fa3"]["status"].startswith("unavailable")
    for backend in ("flex", "sdpa", "varlen"):
        values = agreement["backends"][backend]
        assert values["status"] == "ok" and values["within_tolerance"] is True, (backend, values)
        # bf16 outputs of magnitude ~1 agree to a few bf16 ulps; a masking error would be O(1)
        assert 0 <= values["attention_max_abs_diff"] < 0.05 * max(1.0, agreement["reference_attention_max_abs"])
        assert 0 <= values["logits_max_abs_diff"] < 0.05 * max(1.0, agreement["reference_logits_max_abs"])
    assert 0 <= agreement["backends"]["flex"]["attention_compiled_max_abs_diff"] < 0.05


def test_training_compiles_one_graph_per_bucket_and_recurrence_state_without_graph_breaks(smoke):
    compiled = smoke[0]["compile"]
    seen = compiled["buckets_and_recurrence_seen"]
    assert len({bucket for bucket, _ in seen}) >= 2, seen  # the smoke's micro-batches span two cu_seqlens buckets
    assert {recurrence for _, recurrence in seen} == {False, True}
    assert compiled["unique_graphs"] == compiled["expected_graphs"] == len(seen)
    assert compiled["graph_breaks"] == 0 and compiled["ok"] is True
    # every graph after the first comes from one of the two guards that should change: bucket or recurrence
    assert any("cu_seqlens" in reason for reason in compiled["recompile_reasons"])
    assert any("recurrence_active" in reason for reason in compiled["recompile_reasons"])


def test_training_times_both_recurrence_states_and_projects_steps_from_them(smoke):
    training = smoke[0]["training"]
    assert training["tokens_per_step"] == training["grad_accum"] * training["micro_rows"] * training["seq_len"]
    for name in ("recurrence_off", "recurrence_on"):
        state = training[name]
        assert state["status"] == "ok" and finite_positive(state["step_s"]) and finite_positive(state["loss"])
        assert state["micro_step_s"] * training["grad_accum"] <= state["step_s"] + 1e-9
        assert state["graphs_compiled_while_timing"] == 0
    projection = training["projection_8gpu"]
    off, on = projection["step_s_recurrence_off"], projection["step_s_recurrence_on"]
    assert off == pytest.approx(training["recurrence_off"]["micro_step_s"]
                                + training["recurrence_off"]["optimizer_step_s"] / 8)
    steps = 0.35 * projection["training_budget_s"] / off + 0.65 * projection["training_budget_s"] / on
    assert projection["projected_steps"] == int(steps)
    assert projection["pr1855_steps"] == 4945 and projection["pr1855_step_ms"] == 121.7


def test_eval_measures_each_mode_and_projects_the_50000_document_split(smoke):
    evaluation = smoke[0]["eval"]
    distribution = evaluation["val_distribution"]
    assert distribution["documents"] == 50000
    assert distribution["tokens"] == pytest.approx(50000 * distribution["mean"])
    assert distribution["median"] < distribution["mean"] < distribution["max"]  # a long tail
    assert evaluation["warm_up"]["unique_graphs"] >= 2 and evaluation["warm_up"]["graph_breaks"] == 0
    for mode in ("plain", "ttt_phased"):
        values = evaluation[mode]
        assert values["status"] == "ok" and finite_positive(values["tokens_per_s"])
        projected = values["seconds"] * 50000 / values["documents"] / 8  # sample time scaled to the split, 8 ranks
        assert values["projected_split_seconds_8gpu"] == pytest.approx(projected)
        assert isinstance(values["graphs_compiled"], int) and isinstance(values["recompile_reasons"], list)
        # the projection uses the second pass, after every graph the eval needs has been compiled
        assert values["steady_state"] is True and values["graphs_compiled_in_second_pass"] == 0
        assert values["compile_seconds_inside_eval"] == pytest.approx(values["first_seconds"] - values["seconds"])
    assert evaluation["ttt_phased"]["phases_trained"] >= 1
    batch = evaluation["ttt_full_batch"]
    assert batch["status"] == "ok" and batch["documents"] == 2 and batch["lora_rank"] == 4 and batch["context"] == 96
    assert batch["peak_memory_gib"] is None  # CPU: not measured
    total = evaluation["projected_eval_seconds_8gpu"]["plain_plus_ttt_phased"]
    assert total == pytest.approx(evaluation["plain"]["projected_split_seconds_8gpu"]
                                  + evaluation["ttt_phased"]["projected_split_seconds_8gpu"])


def test_a_spent_budget_still_writes_every_key_with_the_sections_marked_skipped(tmp_path):
    report, stdout = run_check(tmp_path / "check.json", "--budget-s", "0", timeout=120)
    assert report["complete"] is False and report["triton_kernels"]["status"].startswith("skipped")
    for key in ("environment", "agreement", "compile", "training", "eval"):
        assert report[key]["status"] == "skipped: time budget spent", key
    assert "complete: False" in stdout


def test_runs_without_brotli_as_on_the_gpu_machine(tmp_path):
    """The device machine has no brotli, which train_gpt imports at its top: the check stubs it (it never
    packs an artifact) and says so. Simulated here by making `import brotli` fail."""
    out = tmp_path / "check.json"
    code = ("import runpy, sys; sys.modules['brotli'] = None; "
            f"sys.argv = [{SCRIPT!r}, '--cpu-smoke', '--sections', 'environment', '--out', {str(out)!r}]; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["status"] == "ok" and report["environment"]["brotli"].startswith("stub")
    assert report["agreement"]["status"] == "not run (--sections)" and report["complete"] is False
