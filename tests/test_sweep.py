"""sweep.py: a 2x2 grid with 2 seeds of real tiny runs, a failing run, resuming after a killed sweep,
the table's statistics against scipy, typos in sweep files, launchers, search and folder names.

Real runs use PRESET=tiny on the synthetic vocab-512 dataset (written once for the module) with 2
training steps and 2 validation documents: a few seconds each, mostly importing torch and packing the
counted code. The launcher, kill/resume and search tests use a fake training script that declares
its settings like train_gpt.py and writes a summary.json, so they take well under a second per run.
"""

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

import sweep
from conftest import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]

FAST_ENV = """
[env]
VOCAB_SIZE = 512
DATA_PATH = "{data}"
ITERATIONS = 2
GRAD_ACCUM_STEPS = 1
TRAIN_BATCH_TOKENS = 256
MAX_WALLCLOCK_SECONDS = 0
WARMUP_STEPS = 0
VAL_MAX_DOCS = 2
TTT_ENABLED = false
SLIDING_WINDOW_ENABLED = false
GPTQ_CALIBRATION_BATCHES = 1
LQER_ENABLED = false
"""
GRID = 'preset = "tiny"\nseeds = [1, 2]\n' + FAST_ENV + "[knobs]\nMATRIX_LR = [0.02, 0.04]\nMODEL_DIM = [32, 64]\n"
GRID_CONFIGS = ["MATRIX_LR=0.02__MODEL_DIM=32", "MATRIX_LR=0.02__MODEL_DIM=64", "MATRIX_LR=0.04__MODEL_DIM=32",
                "MATRIX_LR=0.04__MODEL_DIM=64"]


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table as {column: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def mean_std_text(values):
    return f"{statistics.fmean(values):.5f} ± {statistics.stdev(values):.5f}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("sweep") / "data")


@pytest.fixture(scope="module")
def grid(data, tmp_path_factory):
    """The 2x2 grid with 2 seeds, run once (two runs at a time) for the tests that read it."""
    folder = tmp_path_factory.mktemp("grid")
    sweep_file = folder / "grid.toml"
    sweep_file.write_text(GRID.format(data=data.path))
    out = folder / "out"
    started = time.time()
    code = sweep.main([str(sweep_file), "--out", str(out), "--parallel", "2"])
    return dict(file=sweep_file, out=out, code=code, seconds=time.time() - started)


def test_grid_runs_every_configuration_and_seed_with_its_settings(grid):
    assert grid["code"] == 0
    out = grid["out"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == GRID_CONFIGS
    for name in GRID_CONFIGS:
        matrix_lr, model_dim = (float(part.split("=")[1]) for part in name.split("__"))
        for seed in (1, 2):
            summary = json.loads((out / name / f"seed{seed}" / "summary.json").read_text())
            h = summary["hyperparameters"]
            assert (h["matrix_lr"], h["model_dim"], h["seed"], h["preset"]) == (matrix_lr, model_dim, seed, "tiny")
            assert summary["steps"] == 2 and h["val_max_docs"] == 2 and not h["ttt_enabled"]
            assert h["artifact_dir"] == str((out / name / f"seed{seed}").resolve())


def test_grid_table_is_sorted_by_score_with_stats_over_seeds_and_the_first_configuration_as_baseline(grid):
    out = grid["out"]
    scores = {name: [json.loads((out / name / f"seed{s}" / "summary.json").read_text())["quant_val_bpb"]
                     for s in (1, 2)] for name in GRID_CONFIGS}
    rows = table_rows((out / "results.md").read_text())
    expected_order = sorted(GRID_CONFIGS, key=lambda name: statistics.fmean(scores[name]))
    assert [row["configuration"].split("`")[1] for row in rows] == expected_order
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    for row in rows:
        name = row["configuration"].split("`")[1]
        assert row["score"] == mean_std_text(scores[name]) + " (quantized)"
        assert row["quantized"] == mean_std_text(scores[name])
        assert ("(baseline)" in row["configuration"]) == (name == GRID_CONFIGS[0])
        if name != GRID_CONFIGS[0]:
            expected = stats.ttest_ind(scores[name], scores[GRID_CONFIGS[0]], equal_var=False, alternative="less")
            assert row["p (Welch)"] == f"{expected.pvalue:.3g}"
    assert "sliding" not in rows[0] and "TTT" not in rows[0]  # stages that did not run get no column
    with open(out / "results.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 8 and {r["status"] for r in records} == {"ok"}
    for record in records:
        assert float(record["score"]) == scores[record["configuration"]][int(record["seed"]) - 1]
        assert record["folder"] == f"{record['configuration']}/seed{record['seed']}"
    assert (out / "val_bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_invocation_skips_finished_runs_and_report_rebuilds_the_same_results(grid, capsys):
    out = grid["out"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    table, results = (out / "results.md").read_text(), (out / "results.csv").read_text()
    assert sweep.main([str(grid["file"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skip ") == 8 and "start " not in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")} == before
    for name in ("results.md", "results.csv", "val_bpb.png", "sweep.json"):
        (out / name).unlink()
    assert sweep.main(["--report", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == table and (out / "results.csv").read_text() == results
    assert (out / "val_bpb.png").exists() and not list(out.glob(".*tmp*"))


def test_changed_settings_in_the_same_folder_are_refused_before_any_run(grid, capsys):
    changed = grid["file"].parent / "changed.toml"
    changed.write_text(grid["file"].read_text().replace("ITERATIONS = 2", "ITERATIONS = 3"))
    assert sweep.main([str(changed), "--out", str(grid["out"])]) == 2
    error = capsys.readouterr().err
    assert "MATRIX_LR=0.02__MODEL_DIM=32" in error and "ITERATIONS" in error and "'2'" in error and "'3'" in error


def test_failing_run_is_recorded_with_its_log_tail_and_the_sweep_goes_on(data, tmp_path, capsys):
    sweep_file = tmp_path / "fail.toml"
    sweep_file.write_text('preset = "tiny"\nseeds = [1]\n' + FAST_ENV.format(data=data.path)
                          + "[knobs]\nMODEL_DIM = [30, 32]\n")  # 30 heads of 4: refused by train_gpt.py
    out = tmp_path / "out"
    assert sweep.main([str(sweep_file), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "FAILED MODEL_DIM=30 seed 1" in printed
    failure = json.loads((out / "MODEL_DIM=30" / "seed1" / "failed.json").read_text())
    assert failure["returncode"] != 0
    assert any("MODEL_DIM=30 is not divisible by NUM_HEADS=4" in line for line in failure["log_tail"])
    assert not (out / "MODEL_DIM=30" / "seed1" / "summary.json").exists()
    assert json.loads((out / "MODEL_DIM=32" / "seed1" / "summary.json").read_text())["steps"] == 2
    table = (out / "results.md").read_text()
    rows = table_rows(table)
    assert [(row["rank"], row["configuration"]) for row in rows] == [("1", "`MODEL_DIM=32`"),
                                                                    ("-", "`MODEL_DIM=30` (baseline)")]
    assert "1 run failed" in rows[1]["flags"] and "no finished run" in rows[1]["flags"]
    assert "MODEL_DIM=30 is not divisible" in table.split("Failed runs")[1]
    with open(out / "results.csv") as handle:
        assert {r["configuration"]: r["status"] for r in csv.DictReader(handle)} == {
            "MODEL_DIM=30": "failed", "MODEL_DIM=32": "ok"}


# --- the table from fake run folders -------------------------------------------------------------


def fake_run(out, config, seed, ttt, *, artifact_ok=True, train_ok=True, failed=False):
    folder = out / sweep.config_name(config) / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "sweep_run.json").write_text(json.dumps(dict(config=config, seed=seed, settings={})))
    if failed:
        (folder / "failed.json").write_text(json.dumps(dict(returncode=1, reason="exit code 1",
                                                            log_tail=["ValueError: boom"])))
        return
    summary = dict(pre_quant_val_bpb=ttt + 0.03, quant_val_bpb=ttt + 0.04, sliding_val_bpb=ttt + 0.01,
                   ttt_val_bpb=ttt, artifact_bytes=15_000_000 if artifact_ok else 16_500_000,
                   artifact_limit_ok=artifact_ok, train_time_s=590.0 if train_ok else 620.0, train_time_ok=train_ok,
                   eval_time_s=400.0 + seed, eval_time_ok=True, seed=seed)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_table_statistics_match_scipy_and_flagged_configurations_are_never_ranked(tmp_path):
    out = tmp_path / "out"
    runs = {
        "base": ({"LR": "1"}, [1.0712, 1.0731, 1.0698, 1.0725]),
        "better": ({"LR": "2"}, [1.0655, 1.0671, 1.0649]),
        "worse": ({"LR": "3"}, [1.0741, 1.0702]),
        "single": ({"LR": "4"}, [1.0690]),
        "too_big": ({"LR": "5"}, [1.0500, 1.0510]),  # best score, one artifact over the limit
        "too_slow": ({"LR": "6"}, [1.0520, 1.0530]),
    }
    for key, (config, scores) in runs.items():
        for seed, score in enumerate(scores, start=1):
            fake_run(out, config, seed, score, artifact_ok=not (key == "too_big" and seed == 2),
                     train_ok=key != "too_slow")
    fake_run(out, {"LR": "2"}, 9, 0.0, failed=True)  # a failed seed flags "better" too
    fake_run(out, {"LR": "7"}, 1, 0.0, failed=True)
    assert sweep.main(["--report", "--out", str(out), "--baseline", "LR=1"]) == 0
    rows = {row["configuration"].split("`")[1]: row for row in table_rows((out / "results.md").read_text())}
    base_scores = runs["base"][1]
    for key in ("worse",):
        scores = runs[key][1]
        row = rows[f"LR={runs[key][0]['LR']}"]
        assert row["TTT"] == mean_std_text(scores) and row["score"] == mean_std_text(scores) + " (TTT)"
        assert row["pre-quant"] == mean_std_text([s + 0.03 for s in scores])
        assert row["Δ vs baseline"] == f"{statistics.fmean(scores) - statistics.fmean(base_scores):+.5f}"
        expected = stats.ttest_ind(scores, base_scores, equal_var=False, alternative="less").pvalue
        assert row["p (Welch)"] == f"{expected:.3g}"
    better = runs["better"][1]
    expected = stats.ttest_ind(better, base_scores, equal_var=False, alternative="less").pvalue
    assert rows["LR=2"]["p (Welch)"] == f"{expected:.3g}" and rows["LR=2"]["runs ok"] == "3/4"
    assert rows["LR=4"]["p (Welch)"] == "-" and rows["LR=4"]["score"] == "1.06900 (TTT)"
    assert rows["LR=1"]["configuration"].endswith("(baseline)") and rows["LR=1"]["p (Welch)"] == "-"
    assert rows["LR=1"]["eval s"] == f"{statistics.fmean(400.0 + s for s in (1, 2, 3, 4)):.1f}"
    assert rows["LR=5"]["artifact bytes (max)"] == "15,750,000 (16,500,000)"
    # ranked: clean configurations by mean score; flagged ones after them, unranked, with the reason
    order = [(row["rank"], name) for name, row in rows.items()]
    assert order[:3] == [("1", "LR=4"), ("2", "LR=1"), ("3", "LR=3")]
    assert {name for rank, name in order[3:]} == {"LR=2", "LR=5", "LR=6", "LR=7"}
    assert all(rank == "-" for rank, _ in order[3:])
    assert "artifact over the size limit (1/2 runs)" in rows["LR=5"]["flags"]
    assert "training over the time cap (2/2 runs)" in rows["LR=6"]["flags"]
    assert "1 run failed" in rows["LR=2"]["flags"] and "no finished run" in rows["LR=7"]["flags"]
    with open(out / "results.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == sum(len(scores) for _, scores in runs.values()) + 2
    assert {r["status"] for r in records if r["configuration"] == "LR=7"} == {"failed"}
    # one knob varies: the plot exists
    assert (out / "val_bpb.png").read_bytes()[:4] == b"\x89PNG"


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, expected", [
    ("[knobs]\nMATIX_LR = [0.01, 0.02]\n", "[knobs] MATIX_LR: unknown environment variable (did you mean MATRIX_LR?)"),
    ("[env]\nITERATINS = 3\n", "[env] ITERATINS: unknown environment variable (did you mean ITERATIONS?)"),
    ("[env]\nSEED = 3\n", "[env] SEED: set by the sweep for each run (list the seeds in `seeds`)"),
    ("[env]\nWORLD_SIZE = 8\n", "[env] WORLD_SIZE: set by the launcher"),
    ("seed = [1, 2]\n", "unknown key 'seed' (did you mean seeds?)"),
    ("[knobs]\nMATRIX_LR = 0.02\n", "[knobs] MATRIX_LR: expected a list of values"),
    ("[knobs]\nMATRIX_LR = { low = 0.01, high = 0.1 }\n", "a grid needs values"),
    ("mode = \"random\"\n[knobs]\nMATRIX_LR = [0.01]\n", "trials (needed by mode = 'random')"),
    ("baseline = { EMBED_LR = 0.1 }\n[knobs]\nMATRIX_LR = [0.01]\n", "baseline sets EMBED_LR, which is not in [knobs]"),
    ("[launcher]\nkind = \"gpus\"\n", "kind = \"gpus\" needs gpus = [0, 1, ...]"),
    ("[env\n", "not valid TOML"),
])
def test_bad_sweep_file_is_an_error_naming_the_file_and_key_and_runs_nothing(tmp_path, capsys, body, expected):
    sweep_file = tmp_path / "typo.toml"
    sweep_file.write_text(body)
    assert sweep.main([str(sweep_file), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert str(sweep_file) in error and expected in error, error
    assert not (tmp_path / "out").exists()


def test_yaml_sweep_file_reads_like_toml(tmp_path):
    yaml = pytest.importorskip("yaml")
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"preset": "tiny", "seeds": [3], "knobs": {"MATRIX_LR": [0.01, 0.02]}}))
    args = sweep.parse_args([str(sweep_file)])
    built = sweep.build_sweep(*sweep.sweep_data_from_args(args))
    assert built.env == {"PRESET": "tiny"} and built.seeds == [3] and built.knobs[0].values == [0.01, 0.02]
    assert built.out == Path("runs") / "sweeps" / "s"


# --- knob values, folder names, launchers, search ------------------------------------------------


def test_knob_ranges_expand_to_their_values():
    assert sweep.parse_knob("N", {"start": 4, "stop": 8, "step": 2}, "f").values == [4, 6, 8]
    assert sweep.parse_knob("X", {"start": 0.1, "stop": 0.5, "step": 0.1}, "f").values == [0.1, 0.2, 0.3, 0.4, 0.5]
    log_values = sweep.parse_knob("X", {"start": 0.01, "stop": 1.0, "num": 3, "log": True}, "f").values
    assert log_values == [0.01, 0.1, 1.0]
    assert sweep.parse_knob("N", {"start": 2, "stop": 8, "num": 4}, "f").values == [2, 4, 6, 8]
    assert sweep.parse_cli_knob("MATRIX_LR=0.02,0.03") == ("MATRIX_LR", [0.02, 0.03])
    assert sweep.parse_cli_knob("NUM_LAYERS=4:8:2") == ("NUM_LAYERS", {"start": 4, "stop": 8, "step": 2})
    with pytest.raises(sweep.SweepError, match=r"f \[knobs\] N: step -1 never gets from 1 to 3"):
        sweep.parse_knob("N", {"start": 1, "stop": 3, "step": -1}, "f")


def test_random_configurations_are_reproducible_distinct_and_inside_their_ranges():
    knobs = [sweep.parse_knob("A", {"low": 0.001, "high": 0.1, "log": True}, "f"),
             sweep.parse_knob("B", [1, 2, 3], "f"), sweep.parse_knob("C", {"low": 2, "high": 9, "int": True}, "f")]
    first = sweep.random_configs(knobs, 12, sample_seed=5)
    assert first == sweep.random_configs(list(reversed(knobs)), 12, sample_seed=5)
    assert first != sweep.random_configs(knobs, 12, sample_seed=6)
    assert len({sweep.config_name(c) for c in first}) == 12
    for config in first:
        assert 0.001 <= float(config["A"]) <= 0.1 and float(f"{float(config['A']):.4g}") == float(config["A"])
        assert config["B"] in ("1", "2", "3") and 2 <= int(config["C"]) <= 9
    # only 3 distinct configurations exist: asking for 5 gives those 3
    assert len(sweep.random_configs([sweep.parse_knob("B", [1, 2, 3], "f")], 5, sample_seed=0)) == 3


def test_folder_names_are_deterministic_readable_and_filesystem_safe():
    assert sweep.config_name({"B": "2", "A": "0.1"}) == sweep.config_name({"A": "0.1", "B": "2"}) == "A=0.1__B=2"
    assert sweep.config_name({}) == "base"
    sites = [sweep.config_name({"SITES": value}) for value in ("q,k", "q;k", "q/k", "q k")]
    assert len(set(sites)) == 4 and all(name.startswith("SITES=q-k__h") for name in sites)
    long_name = sweep.config_name({f"KNOB_{i}": "1" * 20 for i in range(8)})
    assert len(long_name) <= sweep.MAX_NAME_CHARS + 13 and "__h" in long_name
    for name in sites + [long_name]:
        assert all(ch.isalnum() or ch in "._-=" for ch in name)
    assert sweep.env_text(True, "x") == "1" and sweep.env_text(1e-05, "x") == "1e-05"


def test_launch_commands():
    script = Path("/repo/train_gpt.py")
    assert sweep.Launcher().command(script) == [sys.executable, str(script)]
    assert sweep.Launcher(kind="torchrun", nproc_per_node=8).command(script) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", str(script)]
    assert sweep.Launcher(kind="gpus", gpus=["0", "3"]).slots() == ["0", "3"]
    assert sweep.Launcher(parallel=3).slots() == [None, None, None]


FAKE_SCRIPT = '''
import json, os, sys, time
from dataclasses import dataclass


@dataclass
class FakeSettings:  # the names a sweep may set, found the way train_gpt.py's are (SECTIONS)
    preset: str = "tiny"
    lr: float = 0.0
    depth: int = 0
    sleep: float = 0.0


SECTIONS = {"fake": FakeSettings}
started = time.time()
folder = os.environ["ARTIFACT_DIR"]
with open(os.path.join(folder, "train.log"), "a") as handle:  # appends, like train_gpt.py
    handle.write(f"run_id:{os.environ['RUN_ID']}\\n")
if os.environ.get("FAKE_HANG") == "/".join(folder.split(os.sep)[-2:]):
    time.sleep(600)
time.sleep(float(os.environ.get("SLEEP", "0")))
lr, depth = float(os.environ["LR"]), float(os.environ.get("DEPTH", "0"))
score = (lr - 0.3) ** 2 + 0.01 * depth + 0.001 * int(os.environ["SEED"])
summary = dict(quant_val_bpb=score, artifact_limit_ok=True, train_time_ok=True, eval_time_ok=True,
               gpu=os.environ.get("CUDA_VISIBLE_DEVICES"), world_size=os.environ.get("WORLD_SIZE"),
               started=started, ended=time.time())
if os.environ.get("RANK", "0") == "0":
    with open(os.path.join(folder, "summary.json"), "w") as handle:
        json.dump(summary, handle)
'''


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_SCRIPT)
    return path


def test_gpus_launcher_runs_one_run_per_gpu_at_a_time_pinned_with_cuda_visible_devices(fake_script, tmp_path):
    out = tmp_path / "out"
    code = sweep.main(["--script", str(fake_script), "--out", str(out), "--env", "SLEEP=0.4", "--knob", "LR=0.1,0.2",
                       "--seeds", "1", "2", "3", "--launcher", "gpus", "--gpus", "0,1"])
    assert code == 0
    summaries = [json.loads(p.read_text()) for p in out.glob("*/seed*/summary.json")]
    assert len(summaries) == 6 and {s["gpu"] for s in summaries} == {"0", "1"}
    for gpu in ("0", "1"):
        spans = sorted((s["started"], s["ended"]) for s in summaries if s["gpu"] == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # never shared
    spans = [(s["started"], s["ended"]) for s in summaries]
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a is not b)  # two GPUs busy at once
    recorded = json.loads((out / "LR=0.1" / "seed1" / "sweep_run.json").read_text())
    assert recorded["settings"] == {"SLEEP": "0.4", "LR": "0.1", "SEED": "1"} and recorded["gpu"] in ("0", "1")


def test_torchrun_launcher_starts_nproc_ranks_per_run(fake_script, tmp_path):
    out = tmp_path / "out"
    assert sweep.main(["--script", str(fake_script), "--out", str(out), "--knob", "LR=0.1", "--seeds", "1",
                       "--launcher", "torchrun", "--nproc-per-node", "2"]) == 0
    assert json.loads((out / "LR=0.1" / "seed1" / "summary.json").read_text())["world_size"] == "2"
    assert (out / "LR=0.1" / "seed1" / "train.log").read_text().count("run_id:LR=0.1-seed1") == 2  # both ranks


def test_inherited_training_variables_are_not_passed_to_runs(fake_script, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEPTH", "100")  # would change the score if it leaked into the run
    out = tmp_path / "out"
    assert sweep.main(["--script", str(fake_script), "--out", str(out), "--knob", "LR=0.3", "--seeds", "1"]) == 0
    assert "not passing DEPTH from the shell" in capsys.readouterr().out
    assert json.loads((out / "LR=0.3" / "seed1" / "summary.json").read_text())["quant_val_bpb"] == pytest.approx(0.001)


def test_tpe_without_optuna_is_a_clear_error(fake_script, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    code = sweep.main(["--script", str(fake_script), "--out", str(tmp_path / "out"), "--knob", "LR=0.1,0.2",
                       "--mode", "tpe", "--trials", "2"])
    assert code == 2 and "mode = \"tpe\" needs optuna (pip install optuna)" in capsys.readouterr().err


def test_tpe_search_runs_its_trials_ranks_them_and_resumes_from_finished_ones(fake_script, tmp_path, capsys):
    pytest.importorskip("optuna")
    sweep_file = tmp_path / "tpe.toml"
    sweep_file.write_text(f'script = "{fake_script}"\nmode = "tpe"\ntrials = 12\nseeds = [1]\n'
                          "[knobs]\nLR = { low = 0.0, high = 1.0 }\nDEPTH = [0, 1, 2]\n")
    out = tmp_path / "out"
    assert sweep.main([str(sweep_file), "--out", str(out)]) == 0
    configs = [json.loads(p.read_text())["config"] for p in out.glob("*/seed1/sweep_run.json")]
    assert len(configs) == 12 and all(float(f"{float(c['LR']):.4g}") == float(c["LR"]) for c in configs)
    best = min((float(c["LR"]) - 0.3) ** 2 + 0.01 * int(c["DEPTH"]) + 0.001 for c in configs)
    assert table_rows((out / "results.md").read_text())[0]["score"] == f"{best:.5f} (quantized)"
    capsys.readouterr()
    sweep_file.write_text(sweep_file.read_text().replace("trials = 12", "trials = 14"))
    assert sweep.main([str(sweep_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tpe: 12 finished configurations" in printed and printed.count("start ") == 2
    assert len(list(out.glob("*/seed1/summary.json"))) == 14


def test_killed_sweep_resumes_and_reruns_only_the_unfinished_run(fake_script, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--script", str(fake_script), "--out", str(out), "--knob", "LR=0.1,0.2", "--seeds", "1", "2"]
    victim = out / "LR=0.2" / "seed2"  # the last run; it hangs until the sweep is killed
    process = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(os.environ, FAKE_HANG="LR=0.2/seed2"),
                               start_new_session=True)
    deadline = time.time() + 60
    while not (victim / "train.log").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and its run, mid-run
    process.wait()
    finished = {path: path.stat().st_mtime_ns for path in out.glob("*/seed*/summary.json")}
    assert len(finished) == 3 and not (victim / "summary.json").exists() and (victim / "train.log").exists()

    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("skip ") == 3 and printed.count("start ") == 1 and "start  [1/1] LR=0.2 seed 2" in printed
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert json.loads((victim / "summary.json").read_text())["quant_val_bpb"] == pytest.approx(0.01 + 0.002)
    assert (victim / "train.log").read_text() == "run_id:LR=0.2-seed2\n"  # the killed attempt's files are gone
    assert [row["runs ok"] for row in table_rows((out / "results.md").read_text())] == ["2/2", "2/2"]


def test_readme_example_is_the_committed_sweep_file_and_plans_its_six_runs(tmp_path, capsys):
    example = REPO / "sweeps" / "demo_matrix_lr.toml"
    readme = (REPO / "README.md").read_text()
    assert readme.split("## Sweeps", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0] == example.read_text()
    assert sweep.main([str(example), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    planned = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("todo")]
    assert [Path(words[1]).relative_to(tmp_path / "out").as_posix() for words in planned] == [
        f"MATRIX_LR={lr}/seed{seed}" for lr in ("0.013", "0.026", "0.052") for seed in (1, 2)]
    assert all("PRESET=tiny" in words and f"SEED={words[1][-1]}" in words for words in planned)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
