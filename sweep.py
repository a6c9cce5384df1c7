"""Resumable environment-variable sweeps of train_gpt.py, with a results table, significance and plots.

    python sweep.py sweeps/lr.toml                  # run the sweep, or resume it where it stopped
    python sweep.py sweeps/lr.toml --dry-run        # list the runs it would start
    python sweep.py --report --out sweeps/lr        # rebuild results.csv, results.md, val_bpb.png from the folders
    python sweep.py --out sweeps/quick --preset tiny --env ITERATIONS=300 \\
        --knob MATRIX_LR=0.02,0.026,0.032 --knob NUM_LAYERS=4:8:2 --seeds 1 2 3

A sweep file (TOML; YAML too when pyyaml is installed) names everything a run depends on:

    preset = "tiny"                 # PRESET of every run (or vary it as a knob)
    seeds = [1, 2, 3]               # every configuration runs once per seed
    mode = "grid"                   # grid | random (trials samples) | tpe (Optuna, trials configurations)
    baseline = { MATRIX_LR = 0.026 }  # the configuration others are tested against (default: the first)
    [env]                           # fixed environment variables of every run
    ITERATIONS = 300
    [knobs]                         # the variables to vary
    MATRIX_LR = [0.02, 0.026, 0.032]                 # values
    NUM_LAYERS = { start = 4, stop = 8, step = 2 }   # 4, 6, 8 (stop included)
    EMBED_LR = { start = 0.01, stop = 0.1, num = 3, log = true }  # 0.01, 0.0316, 0.1
    SCALAR_LR = { low = 0.005, high = 0.05, log = true }          # random / tpe only: a distribution
    [launcher]
    kind = "python"                 # python (one process) | torchrun (nproc_per_node) | gpus (one run per GPU)
    gpus = [0, 1, 2, 3]             # kind = "gpus": concurrent single-GPU runs, CUDA_VISIBLE_DEVICES pinned

Every name in [env], [knobs] and baseline must be a variable of `python docs/env_table.py` (a typo
is an error naming the key, never a sweep on defaults). SEED, RUN_ID and ARTIFACT_DIR are set per run by
the sweep; WORLD_SIZE, RANK, CUDA_VISIBLE_DEVICES and the other launcher variables by the launcher.
Variables of train_gpt.py inherited from the shell are dropped (with a note), so a run's settings are
exactly what its folder records.

Runs start in the current directory, so relative paths in [env] (DATA_PATH, ...) are relative to it.
Layout of the output folder (`--out`, default runs/sweeps/<file name>):
    <out>/<configuration>/seed<N>/   one run: sweep_run.json (its settings), output.log (console), and
                                     what train_gpt.py writes (train.log, summary.json, ...);
                                     failed.json with the exit code and log tail when it failed
    <out>/sweep.json                 the sweep's knobs, baseline and score stage (for --report)
    <out>/results.csv, results.md, val_bpb.png
A configuration's folder name is its knob settings (`MATRIX_LR=0.02__NUM_LAYERS=6`; characters that
are not filesystem-safe and names over 100 characters get a hash suffix), so it is the same on every
invocation: a run whose summary.json exists is skipped, and an interrupted sweep resumes when the same
command is run again. A failed run is recorded and the sweep goes on; the exit code is 1 if any failed.

The table's statistics are the records tool's (records/make_record.py): mean and sample std over seeds,
and a one-sided Welch t-test of "this configuration's mean score is lower than the baseline's".
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
if str(REPO / "docs") not in sys.path:
    sys.path.insert(0, str(REPO / "docs"))  # env_table: the settings of a training script


def _load_make_record():
    """records/make_record.py (not a package): its statistics are the ones this table uses."""
    if "make_record" in sys.modules:
        return sys.modules["make_record"]
    spec = importlib.util.spec_from_file_location("make_record", REPO / "records" / "make_record.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_record"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


make_record = _load_make_record()


class SweepError(ValueError):
    """Bad sweep input; the message names the file and key."""


# -----------------------------------------------------------------------------
# Sweep definition
# A sweep is read from a file and/or the command line into one `Sweep`, checked against the env table
# of the training script before anything runs. Values keep their TOML types until they become
# environment strings (`env_text`): bools as 1/0, floats as their shortest repr.
# -----------------------------------------------------------------------------

MODES = ("grid", "random", "tpe")
LAUNCHERS = ("python", "torchrun", "gpus")
SCORE_STAGES = make_record.STAGES  # pre_quant, quant, sliding, ttt
TOP_LEVEL_KEYS = ("preset", "seeds", "mode", "trials", "sample_seed", "baseline", "score", "out", "script",
                  "env", "knobs", "launcher")
LAUNCHER_KEYS = ("kind", "nproc_per_node", "gpus", "parallel")
# set by the sweep for each run, with what to write instead
SET_BY_SWEEP = {"SEED": "list the seeds in `seeds`", "RUN_ID": "each run is named after its settings",
                "ARTIFACT_DIR": "each run gets its own folder under the sweep's output folder"}
# set by torchrun or by the gpus launcher; never by the user
SET_BY_LAUNCHER = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES")
FLOAT_SAMPLE_DIGITS = 4  # random / tpe samples of a continuous knob are rounded to this many significant digits


@dataclasses.dataclass
class Knob:
    """One varied variable: explicit values (grid, random choice, tpe categorical) or a distribution."""
    name: str
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def sample(self, rng: random.Random) -> Any:
        if self.values is not None:
            return rng.choice(self.values)
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return self.clip(value)

    def clip(self, value: float) -> Any:
        """A sampled number as the run will see it: rounded, inside [low, high]."""
        if self.integer:
            return min(max(int(round(value)), int(self.low)), int(self.high))
        return min(max(float(f"{value:.{FLOAT_SAMPLE_DIGITS}g}"), self.low), self.high)


@dataclasses.dataclass
class Launcher:
    kind: str = "python"
    nproc_per_node: int = 1
    gpus: list[str] = dataclasses.field(default_factory=list)
    parallel: int = 1

    def slots(self) -> list[str | None]:
        """One entry per concurrent run: the GPU it is pinned to, or None."""
        return list(self.gpus) if self.kind == "gpus" else [None] * self.parallel

    def command(self, script: Path) -> list[str]:
        if self.kind == "torchrun":  # the torchrun entry point of this interpreter
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.nproc_per_node}", str(script)]
        return [sys.executable, str(script)]


@dataclasses.dataclass
class Sweep:
    out: Path
    script: Path
    env: dict[str, Any]
    knobs: list[Knob]
    seeds: list[int]
    mode: str = "grid"
    trials: int | None = None
    sample_seed: int = 0
    baseline: dict[str, Any] | None = None  # None: the first configuration
    score: str | None = None  # None: each run's final stage (TTT, else sliding, else quantized)
    launcher: Launcher = dataclasses.field(default_factory=Launcher)
    source: str = "command line"


def env_text(value: Any, where: str) -> str:
    """The environment string of a sweep value: bool -> 1/0, numbers as written, strings as they are."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SweepError(f"{where}: {value} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        return value
    raise SweepError(f"{where}: {value!r} is a {type(value).__name__}; expected a string, number or boolean")


def parse_scalar(text: str) -> Any:
    """A command-line value with TOML-like typing: int, float, true/false, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _tidy(value: float) -> float:
    """Remove float noise from computed grid points (0.30000000000000004 -> 0.3)."""
    return float(f"{value:.12g}")


def parse_knob(name: str, spec: Any, where: str) -> Knob:
    """A [knobs] entry: a list of values, {start, stop, step}, {start, stop, num[, log]} or {low, high[, log, int]}."""
    where = f"{where} [knobs] {name}"
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{where}: the list of values is empty")
        for value in spec:
            env_text(value, where)
        if len({env_text(value, where) for value in spec}) != len(spec):
            raise SweepError(f"{where}: values repeat in {spec}")
        return Knob(name, values=list(spec))
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a list of values or a table like {{ start = 1, stop = 4, step = 1 }}, "
                         f"got {spec!r} (fixed values go in [env])")
    keys = set(spec)

    def number(key: str) -> float:
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SweepError(f"{where}: {key} must be a number, got {value!r}")
        return value

    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SweepError(f"{where}: log must be true or false, got {log!r}")
    if keys == {"start", "stop", "step"}:
        start, stop, step = number("start"), number("stop"), number("step")
        if step == 0 or (stop - start) / step < 0:
            raise SweepError(f"{where}: step {step} never gets from {start} to {stop}")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        values = [start + index * step for index in range(count)]
        if not all(isinstance(spec[key], int) for key in ("start", "stop", "step")):
            values = [_tidy(value) for value in values]
        return Knob(name, values=values)
    if keys in ({"start", "stop", "num"}, {"start", "stop", "num", "log"}):
        start, stop, num = number("start"), number("stop"), spec["num"]
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise SweepError(f"{where}: num must be a positive integer, got {num!r}")
        if log and not (start > 0 and stop > 0):
            raise SweepError(f"{where}: log spacing needs start and stop > 0")
        fractions = [index / (num - 1) if num > 1 else 0.0 for index in range(num)]
        if log:
            values = [_tidy(start * (stop / start) ** fraction) for fraction in fractions]
        else:
            values = [_tidy(start + (stop - start) * fraction) for fraction in fractions]
        if isinstance(spec["start"], int) and isinstance(spec["stop"], int) and all(v.is_integer() for v in values):
            values = [int(value) for value in values]
        if len(set(values)) != len(values):
            raise SweepError(f"{where}: {num} values between {start} and {stop} repeat: {values}")
        return Knob(name, values=values)
    if keys and keys <= {"low", "high", "log", "int"} and {"low", "high"} <= keys:
        low, high, integer = number("low"), number("high"), spec.get("int", False)
        if not isinstance(integer, bool):
            raise SweepError(f"{where}: int must be true or false, got {integer!r}")
        if not low < high:
            raise SweepError(f"{where}: low ({low}) must be below high ({high})")
        if log and low <= 0:
            raise SweepError(f"{where}: log sampling needs low > 0")
        return Knob(name, low=low, high=high, log=log, integer=integer)
    raise SweepError(f"{where}: unknown form {sorted(keys)}; use a list, {{start, stop, step}}, "
                     f"{{start, stop, num, log}} or {{low, high, log, int}}")


def parse_cli_knob(text: str) -> tuple[str, Any]:
    """--knob NAME=v1,v2,v3 (values) or NAME=start:stop:step (stop included)."""
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise SweepError(f"--knob {text!r}: expected NAME=v1,v2,... or NAME=start:stop:step")
    parts = spec.split(":")
    if len(parts) == 3:
        start, stop, step = (parse_scalar(part) for part in parts)
        return name, {"start": start, "stop": stop, "step": step}
    return name, [parse_scalar(value) for value in spec.split(",")]


def parse_assignments(items: list[str], flag: str) -> dict[str, Any]:
    """NAME=VALUE pairs from the command line (--env, --baseline)."""
    result = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SweepError(f"{flag} {item!r}: expected NAME=VALUE")
        result[name] = parse_scalar(value)
    return result


def read_sweep_file(path: Path) -> dict[str, Any]:
    """The sweep file as a dict: TOML, or YAML when the name ends in .yaml/.yml (needs pyyaml)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SweepError(f"{path}: cannot be read ({error.strerror})") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SweepError(f"{path}: reading YAML needs pyyaml (pip install pyyaml); or write the sweep as TOML") from None
        try:
            data = yaml.safe_load(raw) or {}
        except yaml.YAMLError as error:
            raise SweepError(f"{path}: not valid YAML ({error})") from None
    else:
        import tomllib
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise SweepError(f"{path}: not valid TOML ({error})") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a table of settings at the top level")
    return data


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise SweepError(f"{where}: [{key}] must be a table of NAME = value, got {value!r}")
    return value


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def build_sweep(data: dict[str, Any], source: str, default_out: Path) -> Sweep:
    """Check a sweep's settings (from a file, with command-line overrides merged in) and build it."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SweepError(f"{source}: unknown key {key!r}{hint}; known keys: {', '.join(TOP_LEVEL_KEYS)}")
    env = dict(_table(data, "env", source))
    if data.get("preset") is not None:
        if "PRESET" in env:
            raise SweepError(f"{source}: PRESET is set twice (preset = ... and [env] PRESET)")
        env = {"PRESET": data["preset"], **env}
    for name, value in env.items():
        env_text(value, f"{source} [env] {name}")
    knobs = [parse_knob(name, spec, source) for name, spec in _table(data, "knobs", source).items()]
    for knob in knobs:
        if knob.name in env:
            raise SweepError(f"{source}: {knob.name} is both fixed in [env] and varied in [knobs]")

    seeds = data.get("seeds", [1337])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{source}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{source}: seeds repeat: {seeds}")
    mode = data.get("mode", "grid")
    if mode not in MODES:
        raise SweepError(f"{source}: mode = {mode!r}; choose one of {', '.join(MODES)}")
    trials = data.get("trials")
    if mode == "grid":
        for knob in knobs:
            if knob.values is None:
                raise SweepError(f"{source} [knobs] {knob.name}: a {{low, high}} distribution needs mode = "
                                 f"\"random\" or \"tpe\"; a grid needs values (a list, step or num)")
    else:
        trials = _int(trials, f"{source}: trials (needed by mode = {mode!r})", 1)
        if not knobs:
            raise SweepError(f"{source}: mode = {mode!r} needs at least one entry in [knobs]")
    score = data.get("score")
    if score is not None and score not in SCORE_STAGES:
        raise SweepError(f"{source}: score = {score!r}; choose one of {', '.join(SCORE_STAGES)}")

    launcher_data = _table(data, "launcher", source)
    for key in launcher_data:
        if key not in LAUNCHER_KEYS:
            raise SweepError(f"{source}: [launcher] has an unknown key {key!r}; known keys: {', '.join(LAUNCHER_KEYS)}")
    launcher = Launcher(kind=launcher_data.get("kind", "python"))
    if launcher.kind not in LAUNCHERS:
        raise SweepError(f"{source}: [launcher] kind = {launcher.kind!r}; choose one of {', '.join(LAUNCHERS)}")
    launcher.nproc_per_node = _int(launcher_data.get("nproc_per_node", 1), f"{source}: [launcher] nproc_per_node", 1)
    launcher.parallel = _int(launcher_data.get("parallel", 1), f"{source}: [launcher] parallel", 1)
    gpus = launcher_data.get("gpus", [])
    if not isinstance(gpus, list) or not all(isinstance(g, (int, str)) and not isinstance(g, bool) for g in gpus):
        raise SweepError(f"{source}: [launcher] gpus must be a list of device ids like [0, 1], got {gpus!r}")
    launcher.gpus = [str(gpu) for gpu in gpus]
    if launcher.kind == "gpus" and not launcher.gpus:
        raise SweepError(f"{source}: [launcher] kind = \"gpus\" needs gpus = [0, 1, ...]")
    if launcher.kind != "gpus" and launcher.gpus:
        raise SweepError(f"{source}: [launcher] gpus is only used with kind = \"gpus\"")
    if launcher.kind == "torchrun" and launcher.parallel != 1:
        raise SweepError(f"{source}: [launcher] torchrun runs use every GPU of the node; parallel must be 1")

    baseline = data.get("baseline")
    if baseline is not None:
        if not isinstance(baseline, dict):
            raise SweepError(f"{source}: baseline must be a table of knob values like {{ MATRIX_LR = 0.026 }}")
        knob_names = {knob.name for knob in knobs}
        for name, value in baseline.items():
            if name not in knob_names:
                raise SweepError(f"{source}: baseline sets {name}, which is not in [knobs] "
                                 f"(knobs: {', '.join(sorted(knob_names)) or 'none'})")
            env_text(value, f"{source}: baseline {name}")
    out = data.get("out")
    script = data.get("script", str(REPO / "train_gpt.py"))
    for key, value in (("out", out), ("script", script)):
        if value is not None and not isinstance(value, str):
            raise SweepError(f"{source}: {key} must be a path string, got {value!r}")
    return Sweep(out=Path(out) if out else default_out, script=Path(script), env=env, knobs=knobs, seeds=seeds,
                 mode=mode, trials=trials, sample_seed=_int(data.get("sample_seed", 0), f"{source}: sample_seed", 0),
                 baseline=baseline, score=score, launcher=launcher, source=source)


# -----------------------------------------------------------------------------
# The env table: the single list of variable names
# Names come from the training script's settings dataclasses (docs/env_table.py reads them from its
# source, packed or not), so a knob added to train_gpt.py can be swept at once, and a typo is caught
# before any run starts.
# -----------------------------------------------------------------------------

_env_table_cache: dict[tuple[str, float], frozenset[str]] = {}


def known_env_names(script: Path) -> frozenset[str]:
    """The variable names of the training script's settings (cached per file version)."""
    import env_table
    import lzma

    script = script.resolve()
    try:
        key = (str(script), script.stat().st_mtime)
    except OSError:
        raise SweepError(f"training script {script} does not exist") from None
    if key not in _env_table_cache:
        try:
            _env_table_cache[key] = env_table.knob_names(str(script))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError, lzma.LZMAError) as error:
            raise SweepError(f"cannot read the environment variables of {script}: {error}") from None
    return _env_table_cache[key]


def check_names(names: list[str], known: frozenset[str], where: str, script: Path) -> None:
    """Every name must be a variable of the env table and not one the sweep or launcher sets."""
    for name in names:
        if name in SET_BY_SWEEP:
            raise SweepError(f"{where} {name}: set by the sweep for each run ({SET_BY_SWEEP[name]})")
        if name in SET_BY_LAUNCHER:
            raise SweepError(f"{where} {name}: set by the launcher, not by the sweep (see [launcher])")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SweepError(f"{where} {name}: unknown environment variable{hint}; "
                             f"`python docs/env_table.py` lists them")


def check_sweep_names(sweep: Sweep) -> None:
    known = known_env_names(sweep.script)
    check_names(list(sweep.env), known, f"{sweep.source} [env]", sweep.script)
    check_names([knob.name for knob in sweep.knobs], known, f"{sweep.source} [knobs]", sweep.script)


# -----------------------------------------------------------------------------
# Configurations and their folders
# A configuration is {knob name: environment string}. Its folder name is built from the sorted
# settings alone, so it is the same on every invocation and for every order of the knobs in the file.
# -----------------------------------------------------------------------------

MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def make_config(values: dict[str, Any], where: str) -> dict[str, str]:
    return {name: env_text(value, f"{where} {name}") for name, value in sorted(values.items())}


def config_name(config: dict[str, str]) -> str:
    """Filesystem-safe, deterministic folder name: NAME=value joined by __ ('base' when nothing varies).
    Values with unsafe characters, and names over MAX_NAME_CHARS, get a hash of the exact settings."""
    if not config:
        return "base"
    plain = "__".join(f"{name}={value}" for name, value in sorted(config.items()))
    safe = "__".join(f"{name}={_UNSAFE.sub('-', value)}" for name, value in sorted(config.items()))
    if safe == plain and len(plain) <= MAX_NAME_CHARS:
        return plain
    digest = hashlib.sha1(json.dumps(sorted(config.items())).encode()).hexdigest()[:10]
    return f"{safe[:MAX_NAME_CHARS]}__h{digest}"


def grid_configs(knobs: list[Knob]) -> list[dict[str, str]]:
    """Every combination, in file order (the first value of every knob first)."""
    names = [knob.name for knob in knobs]
    return [make_config(dict(zip(names, combo)), "[knobs]") for combo in itertools.product(*(k.values for k in knobs))]


def random_configs(knobs: list[Knob], trials: int, sample_seed: int) -> list[dict[str, str]]:
    """`trials` distinct random configurations, the same for the same sample_seed (fewer if there are
    fewer distinct ones)."""
    rng = random.Random(sample_seed)
    configs: dict[str, dict[str, str]] = {}
    for _ in range(50 * trials):
        config = make_config({knob.name: knob.sample(rng) for knob in sorted(knobs, key=lambda k: k.name)}, "[knobs]")
        configs.setdefault(config_name(config), config)
        if len(configs) == trials:
            break
    return list(configs.values())


def run_settings(sweep: Sweep, config: dict[str, str], seed: int) -> dict[str, str]:
    """Every environment variable a run is defined by (besides RUN_ID and ARTIFACT_DIR)."""
    settings = {name: env_text(value, f"[env] {name}") for name, value in sweep.env.items()}
    settings.update(config)
    settings["SEED"] = str(seed)
    return settings


# -----------------------------------------------------------------------------
# Running
# Each run: check or clear its folder, record its settings (sweep_run.json), start the launcher with
# the console going to output.log, and record a failure (failed.json: exit code, log tail) instead of
# raising. Runs go through a pool of slots: one per GPU (kind = "gpus") or `parallel` plain ones.
# -----------------------------------------------------------------------------

LOG_TAIL_LINES = 40


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so that it is either the old or the new version, never a partial one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    with open(temporary, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SweepError(f"{path}: cannot be read as JSON ({error})") from None


@dataclasses.dataclass
class PlannedRun:
    config: dict[str, str]
    seed: int
    folder: Path
    settings: dict[str, str]
    baseline: bool = False

    @property
    def label(self) -> str:
        return f"{config_name(self.config)} seed {self.seed}"

    def done(self) -> bool:
        return (self.folder / "summary.json").exists()


def plan_runs(sweep: Sweep, configs: list[dict[str, str]], baseline: dict[str, str] | None) -> list[PlannedRun]:
    """One run per configuration and seed; a finished folder must hold the same settings."""
    runs = []
    for config in configs:
        for seed in sweep.seeds:
            folder = sweep.out / config_name(config) / f"seed{seed}"
            run = PlannedRun(config, seed, folder, run_settings(sweep, config, seed), baseline=config == baseline)
            record = folder / "sweep_run.json"
            if record.exists():
                recorded = read_json(record).get("settings")
                if recorded != run.settings:
                    changed = sorted(k for k in set(recorded or {}) | set(run.settings)
                                     if (recorded or {}).get(k) != run.settings.get(k))
                    raise SweepError(f"{folder}: made with different settings ({', '.join(changed)} differ: "
                                     f"{ {k: (recorded or {}).get(k) for k in changed} } then, "
                                     f"{ {k: run.settings.get(k) for k in changed} } now); use another --out "
                                     f"or delete the folder")
            elif folder.exists() and any(folder.iterdir()):
                raise SweepError(f"{folder}: exists but was not made by sweep.py (no sweep_run.json); "
                                 f"use another --out")
            runs.append(run)
    return runs


def inherited_environment(sweep_names: set[str], known: frozenset[str]) -> tuple[dict[str, str], list[str]]:
    """The shell's environment without train_gpt.py variables the sweep does not set (and without
    the launcher's variables): a run's settings are exactly those its folder records."""
    dropped = sorted(name for name in os.environ
                     if (name in known and name not in sweep_names)
                     or (name in SET_BY_LAUNCHER and name != "CUDA_VISIBLE_DEVICES"))
    return {k: v for k, v in os.environ.items() if k not in dropped}, dropped


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def score_of(summary: dict, stage: str | None) -> tuple[str | None, float | None]:
    """(stage, val_bpb) that ranks a run: the requested stage, else the last one that ran."""
    if stage is None:
        try:
            stage = make_record.score_stage(summary)
        except ValueError:
            return None, None
    value = summary.get(f"{stage}_val_bpb")
    return stage, (float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None)


class Runner:
    """Starts planned runs through the launcher's slots; prints one line per run."""

    def __init__(self, sweep: Sweep, base_env: dict[str, str], total: int):
        self.sweep, self.base_env, self.total = sweep, base_env, total
        self.command = sweep.launcher.command(sweep.script.resolve())
        self.slots: queue.Queue = queue.Queue()
        for slot in sweep.launcher.slots():
            self.slots.put(slot)
        self.print_lock = threading.Lock()
        self.started = 0
        self.failed: list[PlannedRun] = []

    def say(self, message: str) -> None:
        with self.print_lock:
            print(message, flush=True)

    def run_all(self, runs: list[PlannedRun]) -> None:
        pending = [run for run in runs if not run.done()]
        for run in runs:
            if run.done():
                self.say(f"skip   {run.label}: summary.json exists")
        if not pending:
            return
        pool = ThreadPoolExecutor(max_workers=len(self.sweep.launcher.slots()))
        try:
            for future in [pool.submit(self._run_in_slot, run) for run in pending]:
                future.result()
        finally:  # on Ctrl-C no further run starts; the running ones got the signal too
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_in_slot(self, run: PlannedRun) -> None:
        slot = self.slots.get()
        try:
            self.execute(run, slot)
        finally:
            self.slots.put(slot)

    def execute(self, run: PlannedRun, gpu: str | None) -> None:
        with self.print_lock:
            self.started += 1
            number = self.started
        if run.folder.exists():  # an interrupted or failed attempt (plan_runs checked it is ours)
            shutil.rmtree(run.folder)
        run.folder.mkdir(parents=True)
        env = dict(self.base_env, **run.settings, RUN_ID=f"{config_name(run.config)}-seed{run.seed}",
                   ARTIFACT_DIR=str(run.folder.resolve()))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        write_json(run.folder / "sweep_run.json", dict(config=run.config, seed=run.seed, settings=run.settings,
                                                       baseline=run.baseline, command=self.command, gpu=gpu))
        where = f" on GPU {gpu}" if gpu is not None else ""
        self.say(f"start  [{number}/{self.total}] {run.label}{where}")
        started = time.time()
        with open(run.folder / "output.log", "wb") as output:
            returncode = subprocess.run(self.command, env=env, stdout=output, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - started
        if returncode == 0 and run.done():
            _, score = score_of(read_json(run.folder / "summary.json"), self.sweep.score)
            self.say(f"done   {run.label}: val_bpb {score if score is None else f'{score:.5f}'} in {seconds:.0f} s")
            return
        tail = log_tail(run.folder / "output.log")
        reason = f"exit code {returncode}" if returncode != 0 else "exited 0 but wrote no summary.json"
        write_json(run.folder / "failed.json", dict(returncode=returncode, reason=reason, wall_s=round(seconds, 1),
                                                    log_tail=tail))
        self.failed.append(run)
        self.say(f"FAILED {run.label}: {reason} after {seconds:.0f} s; last lines of {run.folder / 'output.log'}:\n"
                 + "\n".join(f"    {line}" for line in tail[-10:]))


def import_optuna(source: str):
    """Optuna, imported only by a tpe sweep (it is not a requirement)."""
    try:
        import optuna
    except ImportError:
        raise SweepError(f"{source}: mode = \"tpe\" needs optuna (pip install optuna); "
                         f"mode = \"grid\" and \"random\" need nothing extra") from None
    return optuna


def tpe_search(sweep: Sweep, runner: Runner) -> None:
    """Optuna TPE over the knobs: each trial is a configuration run with every seed; its value is the
    mean score. Finished configurations in the folder are told to the study first, so a resumed search
    continues from them. Failed or flagged configurations are told as failed trials."""
    optuna = import_optuna(sweep.source)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for knob in sweep.knobs:
        if knob.values is not None:
            distributions[knob.name] = optuna.distributions.CategoricalDistribution(knob.values)
        elif knob.integer:
            distributions[knob.name] = optuna.distributions.IntDistribution(int(knob.low), int(knob.high), log=knob.log)
        else:
            distributions[knob.name] = optuna.distributions.FloatDistribution(knob.low, knob.high, log=knob.log)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=sweep.sample_seed))

    def typed(config: dict[str, str]) -> dict[str, Any] | None:
        """The optuna params of a finished configuration, or None if it lies outside this search."""
        if set(config) != set(distributions):
            return None
        params = {}
        for knob in sweep.knobs:
            text = config[knob.name]
            if knob.values is not None:
                matches = [v for v in knob.values if env_text(v, knob.name) == text]
                if not matches:
                    return None
                params[knob.name] = matches[0]
            else:
                number = parse_scalar(text)
                if isinstance(number, bool) or not isinstance(number, (int, float)) or not knob.low <= number <= knob.high:
                    return None
                params[knob.name] = int(number) if knob.integer else float(number)
        return params

    def tell_value(name: str) -> float | None:
        table = summarize(collect_runs(sweep.out), None, sweep.score)
        row = next((row for row in table if row.name == name), None)
        return None if row is None or row.flags or row.score[0] is None else row.score[0]

    for config in {config_name(result.config): result.config for result in collect_runs(sweep.out)}.values():
        params, value = typed(config), tell_value(config_name(config))
        if params is not None and value is not None:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    if study.trials:
        print(f"tpe: {len(study.trials)} finished configurations from {sweep.out} told to the study", flush=True)
    baseline = next((result.config for result in collect_runs(sweep.out) if result.baseline), None)
    while len(study.trials) < sweep.trials:
        trial = study.ask(distributions)
        values = {knob.name: trial.params[knob.name] if knob.values is not None else knob.clip(trial.params[knob.name])
                  for knob in sweep.knobs}
        config = make_config(values, "tpe")
        runner.total += len(sweep.seeds)
        if baseline is None:  # no baseline chosen: the search's first configuration
            baseline = config
        runs = plan_runs(sweep, [config], baseline)
        runner.run_all(runs)
        value = tell_value(config_name(config))
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)


# -----------------------------------------------------------------------------
# Results
# Read back from the folders alone (so --report works on any sweep folder): one row per run in
# results.csv; one row per configuration in results.md with mean and std of every stage, sorted by
# the score with flagged configurations (over a limit, failed runs) after the ranked ones.
# -----------------------------------------------------------------------------

STAGE_COLUMNS = [(stage, make_record.STAGE_TITLES[stage]) for stage in SCORE_STAGES]
CSV_SUMMARY_KEYS = ("pre_quant_val_bpb", "quant_val_bpb", "sliding_val_bpb", "ttt_val_bpb", "ttt_mode", "steps",
                    "train_time_s", "gptq_calibration_time_s", "train_plus_calibration_s", "tokens_per_s",
                    "code_bytes", "model_bytes", "artifact_bytes", "artifact_limit_ok", "train_time_ok",
                    "eval_time_s", "eval_time_ok", "device", "world_size", "stop_reason", "final_train_loss")
LIMIT_FLAGS = (("artifact_limit_ok", "artifact over the size limit"), ("train_time_ok", "training over the time cap"),
               ("eval_time_ok", "evaluation over the time cap"))


@dataclasses.dataclass
class RunResult:
    config: dict[str, str]
    seed: int
    folder: Path
    status: str  # ok | failed | unfinished
    summary: dict | None
    failure: dict | None
    baseline: bool = False  # started as a run of the sweep's baseline configuration


def collect_runs(out: Path) -> list[RunResult]:
    """Every run folder under `out` (<configuration>/seed<N>/sweep_run.json) with its outcome."""
    results = []
    for record_path in sorted(Path(out).glob("*/seed*/sweep_run.json")):
        folder = record_path.parent
        record = read_json(record_path)
        summary = read_json(folder / "summary.json") if (folder / "summary.json").exists() else None
        failure = read_json(folder / "failed.json") if (folder / "failed.json").exists() else None
        status = "ok" if summary is not None else ("failed" if failure is not None else "unfinished")
        results.append(RunResult(record["config"], record["seed"], folder, status, summary, failure,
                                 bool(record.get("baseline"))))
    return results


@dataclasses.dataclass
class ConfigRow:
    name: str
    config: dict[str, str]
    runs: list[RunResult]
    stages: dict[str, tuple[float, float | None, int] | None]  # stage -> (mean, std, n)
    score: tuple[float | None, float | None, int]  # mean, std, n of the ranking score
    score_stages: list[str]
    scores: list[float]
    artifact_bytes: tuple[float, int] | None  # mean, max
    train_time: float | None
    eval_time: float | None
    flags: list[str]
    delta: float | None = None
    p_value: float | None = None
    is_baseline: bool = False


def _stat(values: list[float]) -> tuple[float, float | None, int] | None:
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not values:
        return None
    mean, std = make_record.mean_and_std(values)
    return mean, std, len(values)


def summarize(results: list[RunResult], baseline: dict[str, str] | None, score_stage: str | None) -> list[ConfigRow]:
    """One row per configuration, sorted: ranked rows by mean score, then flagged ones."""
    by_name: dict[str, list[RunResult]] = {}
    for result in results:
        by_name.setdefault(config_name(result.config), []).append(result)
    rows = []
    for name, runs in by_name.items():
        summaries = [run.summary for run in runs if run.status == "ok"]
        scored = [score_of(summary, score_stage) for summary in summaries]
        scores = [value for _, value in scored if value is not None]
        score = _stat(scores) or (None, None, 0)
        flags = []
        for key, text in LIMIT_FLAGS:
            over = sum(summary.get(key) is False for summary in summaries)
            if over:
                flags.append(f"{text} ({over}/{len(summaries)} runs)")
        failed = sum(run.status == "failed" for run in runs)
        if failed:
            flags.append(f"{failed} run{'s' if failed > 1 else ''} failed")
        if not summaries:
            flags.append("no finished run")
        elif len(scores) < len(summaries):
            flags.append(f"{len(summaries) - len(scores)} finished runs without a {score_stage or 'final'} score")
        sizes = [s["artifact_bytes"] for s in summaries if isinstance(s.get("artifact_bytes"), (int, float))]

        def mean_of(key: str) -> float | None:
            stat = _stat([summary.get(key) for summary in summaries])
            return None if stat is None else stat[0]

        rows.append(ConfigRow(
            name=name, config=runs[0].config, runs=sorted(runs, key=lambda run: run.seed),
            stages={stage: _stat([s.get(f"{stage}_val_bpb") for s in summaries]) for stage in SCORE_STAGES},
            score=score, score_stages=sorted({stage for stage, value in scored if value is not None}),
            scores=scores, artifact_bytes=(sum(sizes) / len(sizes), max(sizes)) if sizes else None,
            train_time=mean_of("train_time_s"), eval_time=mean_of("eval_time_s"), flags=flags))
    base = next((row for row in rows if baseline is not None and row.config == baseline), None)
    for row in rows:
        row.is_baseline = row is base
        if base is None or row is base or row.score[0] is None or base.score[0] is None:
            continue
        row.delta = row.score[0] - base.score[0]
        if row.score[2] >= 2 and base.score[2] >= 2:
            row.p_value = make_record.welch_improvement_test(
                row.score[0], row.score[1], row.score[2], base.score[0], base.score[1], base.score[2])["p_value"]
    rows.sort(key=lambda row: (bool(row.flags), row.score[0] is None, row.score[0] or 0.0, row.name))
    return rows


def _mean_std(stat: tuple[float, float | None, int] | None, digits: int = 5) -> str:
    if stat is None or stat[0] is None:
        return "-"
    mean, std, _ = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_table(rows: list[ConfigRow], baseline: dict[str, str] | None, score_stage: str | None) -> str:
    """The Markdown results table with a short legend, failed runs listed with their last log line."""
    stages = [(stage, title) for stage, title in STAGE_COLUMNS if any(row.stages[stage] for row in rows)]
    header = (["rank", "configuration", "runs ok", "score"] + [title for _, title in stages]
              + ["artifact bytes (max)", "train s", "eval s", "Δ vs baseline", "p (Welch)", "flags"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rank = 0
    for row in rows:
        ranked = not row.flags
        rank += ranked
        stage_names = ", ".join(make_record.STAGE_TITLES[s] for s in row.score_stages)
        cells = [str(rank) if ranked else "-", f"`{row.name}`" + (" (baseline)" if row.is_baseline else ""),
                 f"{sum(run.status == 'ok' for run in row.runs)}/{len(row.runs)}",
                 _mean_std(row.score) + (f" ({stage_names})" if stage_names else "")]
        cells += [_mean_std(row.stages[stage]) for stage, _ in stages]
        cells += ["-" if row.artifact_bytes is None else f"{row.artifact_bytes[0]:,.0f} ({row.artifact_bytes[1]:,})",
                  "-" if row.train_time is None else f"{row.train_time:.1f}",
                  "-" if row.eval_time is None else f"{row.eval_time:.1f}",
                  "-" if row.delta is None else f"{row.delta:+.5f}",
                  "-" if row.p_value is None else f"{row.p_value:.3g}",
                  "; ".join(f"**{flag}**" for flag in row.flags)]
        lines.append("| " + " | ".join(cells) + " |")
    score_text = (f"{make_record.STAGE_TITLES[score_stage]} val_bpb" if score_stage
                  else "val_bpb of each run's final stage (TTT, else sliding, else quantized)")
    base_name = "none" if baseline is None else f"`{config_name(baseline)}`"
    if baseline is not None and not any(row.is_baseline for row in rows):
        base_name += " (no runs in this folder)"
    notes = [f"Score: {score_text}, mean ± sample std over seeds; lower is better. Baseline: {base_name}. "
             "Δ: score minus the baseline's. p: one-sided Welch t-test that the mean score is below the "
             "baseline's (needs 2 finished runs on each side). Flagged configurations (a limit broken, a run "
             "failed) are never ranked and come after the ranked ones. Times are means in seconds."]
    failed = [run for row in rows for run in row.runs if run.status == "failed"]
    if failed:
        notes += ["", "Failed runs (the log tail is in failed.json, the whole console in output.log):", ""]
        for run in failed:
            tail = run.failure.get("log_tail") or ["(no output)"]
            notes.append(f"- `{config_name(run.config)}/seed{run.seed}`: {run.failure.get('reason')}: `{tail[-1]}`")
    return "\n".join(lines + [""] + notes) + "\n"


def results_csv(results: list[RunResult], out: Path, score_stage: str | None) -> str:
    """One row per run: settings, status, score and the summary's scalar fields."""
    knob_names = sorted({name for result in results for name in result.config})
    leading = ["configuration", "seed", "status", "folder"] + knob_names + ["score_stage", "score"]
    extra = sorted({key for r in results if r.summary for key, value in r.summary.items()
                    if key not in CSV_SUMMARY_KEYS and key not in leading and not isinstance(value, (dict, list))})
    header = (leading
              + list(CSV_SUMMARY_KEYS) + extra + ["failure"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for result in sorted(results, key=lambda r: (config_name(r.config), r.seed)):
        summary = result.summary or {}
        stage, score = score_of(summary, score_stage) if result.summary else (None, None)
        failure = result.failure or {}
        row = ([config_name(result.config), result.seed, result.status, str(result.folder.relative_to(out))]
               + [result.config.get(name, "") for name in knob_names] + [stage or "", "" if score is None else score]
               + [summary.get(key, "") for key in CSV_SUMMARY_KEYS + tuple(extra)]
               + [failure.get("reason", "")])
        writer.writerow(["" if value is None else value for value in row])
    return buffer.getvalue()


def _numeric(texts: list[str]) -> list[float] | None:
    try:
        return [float(text) for text in texts]
    except ValueError:
        return None


MAX_PLOT_LINES = 8  # beyond this many settings of the other knobs, one line of means over all of them


def plot_knobs(rows: list[ConfigRow], path: Path, score_stage: str | None) -> bool:
    """val_bpb against each knob that takes more than one value. Every run's score is a dot (a cross
    when its configuration is flagged); a line joins the means at each value, one line per setting of
    the other knobs (or one over all of them when there are too many). False if nothing varies."""
    scored = [row for row in rows if row.scores]
    knob_names = sorted({name for row in scored for name in row.config
                         if len({r.config.get(name) for r in scored}) > 1})
    if not knob_names:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(knob_names))
    lines = math.ceil(len(knob_names) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.8 * columns, 3.8 * lines), squeeze=False)
    for axis, name in zip(axes.flat, knob_names):
        texts = sorted({row.config[name] for row in scored if name in row.config})
        numbers = _numeric(texts)
        position = dict(zip(texts, numbers if numbers is not None else range(len(texts))))

        def others(row: ConfigRow) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(row.config.items()) if k != name) or "mean over runs"

        groups = sorted({others(row) for row in scored if name in row.config})
        if len(groups) > MAX_PLOT_LINES:
            groups = ["mean over runs"]
        for index, group in enumerate(groups):
            color = plt.get_cmap("tab10")(index % 10)
            points: dict[str, list[float]] = {}
            for row in scored:
                if name in row.config and (len(groups) == 1 or others(row) == group):
                    points.setdefault(row.config[name], []).extend(row.scores)
                    axis.scatter([position[row.config[name]]] * len(row.scores), row.scores, s=20, alpha=0.6,
                                 marker="x" if row.flags else "o", color="tab:red" if row.flags else color)
            xs = sorted(points, key=lambda text: position[text])
            axis.plot([position[x] for x in xs], [sum(points[x]) / len(points[x]) for x in xs], color=color,
                      linewidth=1.2, label=group)
        if numbers is None:
            axis.set_xticks(list(position.values()), texts, rotation=30)
        else:
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 20:
                axis.set_xscale("log")
            if len(texts) <= MAX_PLOT_LINES:
                axis.set_xticks(numbers, texts)  # the swept values themselves
        axis.set_xlabel(name)
        axis.set_ylabel(f"{make_record.STAGE_TITLES[score_stage] if score_stage else 'final'} val_bpb")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(knob_names):]:
        axis.set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write(path, buffer.getvalue())
    return True


def write_report(out: Path, baseline: dict[str, str] | None, score_stage: str | None) -> str:
    """results.csv, results.md and val_bpb.png from the run folders; returns the Markdown table."""
    results = collect_runs(out)
    if not results:
        raise SweepError(f"{out}: no run folders (<configuration>/seed<N>/sweep_run.json) to report on")
    rows = summarize(results, baseline, score_stage)
    atomic_write(out / "results.csv", results_csv(results, out, score_stage))
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "failed", "unfinished")}
    title = (f"# Sweep {out.name}\n\n{len(rows)} configurations, {len(results)} runs: {counts['ok']} finished, "
             f"{counts['failed']} failed, {counts['unfinished']} unfinished.\n\n")
    table = render_table(rows, baseline, score_stage)
    plotted = plot_knobs(rows, out / "val_bpb.png", score_stage)
    atomic_write(out / "results.md", title + table + ("\n![val_bpb against each knob](val_bpb.png)\n" if plotted else ""))
    return table


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path, help="sweep file (.toml, or .yaml/.yml with pyyaml)")
    parser.add_argument("--out", type=Path, help="output folder (default: the file's `out`, else runs/sweeps/<file name>)")
    parser.add_argument("--preset", help="PRESET of every run")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a fixed variable (repeatable)")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=SPEC",
                        help="a varied variable: NAME=v1,v2,v3 or NAME=start:stop:step (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--trials", type=int, help="configurations to sample (random, tpe)")
    parser.add_argument("--sample-seed", type=int)
    parser.add_argument("--baseline", help="baseline configuration: NAME=VALUE,... or a configuration folder name "
                                           "('base' for none of the knobs set)")
    parser.add_argument("--score", choices=SCORE_STAGES, help="stage that ranks (default: each run's final stage)")
    parser.add_argument("--launcher", choices=LAUNCHERS)
    parser.add_argument("--nproc-per-node", type=int, help="torchrun processes per run")
    parser.add_argument("--gpus", help="comma-separated GPU ids for --launcher gpus")
    parser.add_argument("--parallel", type=int, help="concurrent runs of the python launcher")
    parser.add_argument("--script", help="training script (default: train_gpt.py next to this file)")
    parser.add_argument("--report", action="store_true", help="only rebuild the results from the run folders")
    parser.add_argument("--dry-run", action="store_true", help="list the runs without starting any")
    return parser.parse_args(argv)


def sweep_data_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, Path]:
    """The sweep file's settings with the command line's on top; (data, source name, default out)."""
    data = read_sweep_file(args.file) if args.file else {}
    source = str(args.file) if args.file else "command line"
    if args.env:
        data["env"] = dict(_table(data, "env", source), **parse_assignments(args.env, "--env"))
    if args.knob:
        data["knobs"] = dict(_table(data, "knobs", source), **dict(parse_cli_knob(item) for item in args.knob))
    for key in ("preset", "seeds", "mode", "trials", "sample_seed", "score", "script"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.out is not None:
        data["out"] = str(args.out)
    if args.baseline is not None:
        data["baseline"] = baseline_from_text(args.baseline)
    launcher = dict(_table(data, "launcher", source))
    for key, value in (("kind", args.launcher), ("nproc_per_node", args.nproc_per_node), ("parallel", args.parallel),
                       ("gpus", args.gpus.split(",") if args.gpus else None)):
        if value is not None:
            launcher[key] = value
    if launcher:
        data["launcher"] = launcher
    default_out = Path("runs") / "sweeps" / (args.file.stem if args.file else "sweep")
    return data, source, default_out


def baseline_from_text(text: str) -> dict[str, Any]:
    if text in ("", "base"):
        return {}
    return parse_assignments(text.split(","), "--baseline")


def report_baseline(args: argparse.Namespace, out: Path) -> tuple[dict[str, str] | None, str | None]:
    """Baseline and score stage for --report: the command line's, else those sweep.json recorded, else
    the configuration whose runs were started as the baseline."""
    recorded = read_json(out / "sweep.json") if (out / "sweep.json").exists() else {}
    baseline, score = recorded.get("baseline"), args.score or recorded.get("score")
    if baseline is None:
        baseline = next((result.config for result in collect_runs(out) if result.baseline), None)
    if args.baseline is not None:
        names = {config_name(result.config): result.config for result in collect_runs(out)}
        baseline = names.get(args.baseline) or make_config(baseline_from_text(args.baseline), "--baseline")
    return baseline, score


def run_sweep(sweep: Sweep, dry_run: bool = False) -> int:
    """Run every configuration and seed not finished yet, then write the results; 1 if a run failed."""
    check_sweep_names(sweep)
    known = known_env_names(sweep.script)
    if sweep.mode == "grid":
        configs = grid_configs(sweep.knobs)
    elif sweep.mode == "random":
        configs = random_configs(sweep.knobs, sweep.trials, sweep.sample_seed)
    else:
        import_optuna(sweep.source)  # before any run starts
        configs = []  # tpe asks for configurations one at a time
    baseline = make_config(sweep.baseline, f"{sweep.source}: baseline") if sweep.baseline is not None else None
    if baseline is None and configs:
        baseline = configs[0]
    if baseline is not None and baseline not in configs:  # a baseline outside the grid or samples runs first
        configs.insert(0, baseline)
    planned = plan_runs(sweep, configs, baseline)
    if dry_run:
        for run in planned:
            print(f"{'done' if run.done() else 'todo'}  {run.folder}  " + " ".join(f"{k}={v}" for k, v in run.settings.items()))
        if sweep.mode == "tpe":
            print(f"tpe: then {sweep.trials} configurations chosen by Optuna, {len(sweep.seeds)} seeds each")
        return 0
    sweep.out.mkdir(parents=True, exist_ok=True)
    base_env, dropped = inherited_environment(set(sweep.env) | {k.name for k in sweep.knobs}, known)
    if dropped:
        print(f"note: not passing {', '.join(dropped)} from the shell to the runs (set them in [env] to use them)")
    write_json(sweep.out / "sweep.json", dict(
        source=sweep.source, mode=sweep.mode, seeds=sweep.seeds, env=make_config(sweep.env, "[env]"),
        knobs=[dataclasses.asdict(knob) for knob in sweep.knobs], baseline=baseline, score=sweep.score,
        launcher=dataclasses.asdict(sweep.launcher)))
    runner = Runner(sweep, base_env, total=sum(not run.done() for run in planned))
    try:
        runner.run_all(planned)
        if sweep.mode == "tpe":
            tpe_search(sweep, runner)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; run the same command again to resume", flush=True)
        if collect_runs(sweep.out):
            write_report(sweep.out, baseline, sweep.score)
        return 130
    if baseline is None:  # tpe without a chosen baseline: its first configuration
        baseline = next((result.config for result in collect_runs(sweep.out) if result.baseline), None)
        if baseline is not None:
            write_json(sweep.out / "sweep.json", dict(read_json(sweep.out / "sweep.json"), baseline=baseline))
    print("\n" + write_report(sweep.out, baseline, sweep.score))
    print(f"results: {sweep.out / 'results.md'}, {sweep.out / 'results.csv'}, {sweep.out / 'val_bpb.png'}")
    return 1 if runner.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.report:
            data, _, default_out = sweep_data_from_args(args) if args.file else ({}, "", None)
            out = args.out or (Path(data["out"]) if data.get("out") else default_out)
            if out is None:
                raise SweepError("--report needs --out DIR or the sweep file")
            baseline, score = report_baseline(args, out)
            print(write_report(out, baseline, score))
            return 0
        data, source, default_out = sweep_data_from_args(args)
        return run_sweep(build_sweep(data, source, default_out), dry_run=args.dry_run)
    except SweepError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
