"""Assemble and validate Parameter Golf record folders.

A record folder follows the challenge's layout
(`records/track_10min_16mb/<date>_<name>/`): README.md, submission.json, the counted
`train_gpt.py`, and one `train_seed<N>.log` per seed. This tool builds such a folder from N run
directories written by train_gpt.py, and re-checks a folder the way a reviewer would.

    python records/make_record.py assemble RUN_DIR [RUN_DIR ...] --name "My run" [--non-record]
    python records/make_record.py validate records/track_10min_16mb/2026-01-01_My_run

Each run directory holds `summary.json` (SPEC section 9), `train.log` (the human log) and the
counted code (the packed, self-extracting file whose size is `code_bytes`: `train_gpt_packed.py`);
it becomes the folder's `train_gpt.py`. The folder also gets `summary_seed<N>.json` (each run's
summary, verbatim), `data_manifest.json` (the data-prep manifest) and `loss_curve.png`.

Statistics: a new record must beat the previous one by at least 0.005 nats at p < 0.01. Scores
are bits per byte; they are turned into nats per token with the ratio val_loss / val_bpb that the
runs report (the same for every run on a fixed val set and tokenizer). The test is Welch's t-test
of the new seeds against a reference mean/std/n, one-sided, with the 0.005-nat margin in the
null hypothesis (H0: improvement <= 0.005 nats).

The statistics, log parsing and manifest/config comparisons are pure functions that the tests
call directly; reading runs, assembling and validating are the only parts that touch files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# -----------------------------------------------------------------------------
# Challenge rules and defaults
# The limits are the challenge's (decimal bytes, seconds on 8xH100). The default reference is
# PR 1736 (SP8192 CaseOps + gated attention + phased TTT), 3-seed mean 1.06549, std 0.00070.
# -----------------------------------------------------------------------------

ARTIFACT_LIMIT_BYTES = 16_000_000
TRAIN_TIME_LIMIT_S = 600.0
EVAL_TIME_LIMIT_S = 600.0
RECORD_MARGIN_NATS = 0.005  # a new record must beat the previous mean by this much...
SIGNIFICANCE_LEVEL = 0.01  # ...shown at this one-sided p-value
MIN_RECORD_SEEDS = 3
RECORD_HARDWARE = "8xH100"
# Used only when no run reports val_loss next to val_bpb: nats per byte (ln 2 per bit). Real
# tokenizers have more than one byte per token, so this underestimates a bpb gap in nats per
# token and makes the threshold harder to clear: a conservative fallback.
FALLBACK_NATS_PER_BPB = math.log(2.0)

# Hyperparameters that may differ between the seeds of one record (the seed and per-run names).
CONFIG_KEYS_ALLOWED_TO_DIFFER = ("seed", "run_id", "artifact_dir", "logfile", "log_file", "log_path")

# Evaluation stages in the order train_gpt.py reports them; the score is the last one run.
STAGES = ("pre_quant", "quant", "sliding", "ttt")
SCORE_STAGE_PREFERENCE = ("ttt", "sliding", "quant")
STAGE_TITLES = {"pre_quant": "pre-quant", "quant": "quantized", "sliding": "sliding", "ttt": "TTT"}


@dataclass(frozen=True)
class Reference:
    """The result to beat: a mean and sample std of val_bpb over n seeds."""

    name: str = "PR 1736"
    mean_bpb: float = 1.06549
    std_bpb: float = 0.00070
    n: int = 3
    nats_per_bpb: float | None = None  # None: assume the new runs' ratio (same tokenizer)


# -----------------------------------------------------------------------------
# Statistics
# The Student t survival function is computed from the regularized incomplete beta function
# (continued fraction, modified Lentz), so scipy is optional; when scipy is installed it is used
# and the tests check that both agree.
# -----------------------------------------------------------------------------


def mean_and_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        m2 = 2 * m
        # even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))
        numerator = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        result *= d * c
        # odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        numerator = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        result *= delta
        if abs(delta - 1.0) < 1e-15:
            return result
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf_builtin(t: float, df: float) -> float:
    """P(T > t) for Student's t with df (any positive real) degrees of freedom; no scipy."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    # P(|T| > |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2)
    two_sided = regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 0.5 * two_sided if t > 0 else 1.0 - 0.5 * two_sided


def student_t_sf(t: float, df: float) -> float:
    """P(T > t): scipy's implementation when installed, else the built-in one."""
    try:
        from scipy import stats as scipy_stats
    except ImportError:
        return student_t_sf_builtin(t, df)
    return float(scipy_stats.t.sf(t, df))


def welch_improvement_test(
    new_mean: float,
    new_std: float,
    new_n: int,
    ref_mean: float,
    ref_std: float,
    ref_n: int,
    margin: float = 0.0,
) -> dict[str, float]:
    """One-sided Welch t-test of H0: ref_mean - new_mean <= margin (lower is better).

    Returns the observed improvement (ref - new), its standard error, t, the Welch-Satterthwaite
    degrees of freedom and the one-sided p-value.
    """
    if new_n < 2 or ref_n < 2:
        raise ValueError("Welch's t-test needs at least 2 values on each side")
    improvement = ref_mean - new_mean
    var_new = new_std**2 / new_n
    var_ref = ref_std**2 / ref_n
    standard_error = math.sqrt(var_new + var_ref)
    if standard_error == 0.0:
        # No spread at all: the sign of the difference decides.
        t_stat = math.inf if improvement > margin else -math.inf
        df = float(new_n + ref_n - 2)
    else:
        t_stat = (improvement - margin) / standard_error
        df = (var_new + var_ref) ** 2 / (var_new**2 / (new_n - 1) + var_ref**2 / (ref_n - 1))
    return {
        "improvement": improvement,
        "standard_error": standard_error,
        "t": t_stat,
        "df": df,
        "p_value": student_t_sf(t_stat, df),
    }


def significance_analysis(
    new_bpbs: list[float],
    nats_per_bpb: float,
    reference: Reference,
    margin_nats: float = RECORD_MARGIN_NATS,
    alpha: float = SIGNIFICANCE_LEVEL,
) -> dict[str, Any]:
    """The challenge's record test in nats: improvement >= margin and p < alpha.

    `nats_per_bpb` converts the new runs' bpb to nats per token; the reference uses its own ratio
    when it has one, else the same ratio (both then share the tokenizer and val set).
    """
    ref_ratio = reference.nats_per_bpb if reference.nats_per_bpb is not None else nats_per_bpb
    new_mean_bpb, new_std_bpb = mean_and_std(new_bpbs)
    result: dict[str, Any] = {
        "reference": reference.name,
        "n": len(new_bpbs),
        "mean_bpb": new_mean_bpb,
        "std_bpb": new_std_bpb,
        "nats_per_bpb": nats_per_bpb,
        "reference_nats_per_bpb": ref_ratio,
        "margin_nats": margin_nats,
        "alpha": alpha,
        "improvement_bpb": reference.mean_bpb - new_mean_bpb,
        "improvement_nats": reference.mean_bpb * ref_ratio - new_mean_bpb * nats_per_bpb,
    }
    result["threshold_ok"] = result["improvement_nats"] >= margin_nats
    if new_std_bpb is None or reference.n < 2:
        result.update(t=None, df=None, p_value=None, p_value_vs_zero=None, significant=None)
        return result
    args = (
        new_mean_bpb * nats_per_bpb,
        new_std_bpb * nats_per_bpb,
        len(new_bpbs),
        reference.mean_bpb * ref_ratio,
        reference.std_bpb * ref_ratio,
        reference.n,
    )
    vs_margin = welch_improvement_test(*args, margin=margin_nats)
    vs_zero = welch_improvement_test(*args, margin=0.0)
    result.update(
        t=vs_margin["t"],
        df=vs_margin["df"],
        p_value=vs_margin["p_value"],
        p_value_vs_zero=vs_zero["p_value"],
        significant=vs_margin["p_value"] < alpha,
    )
    return result


# -----------------------------------------------------------------------------
# Log parsing
# Tolerant of both our format (`step:100/4800 train_loss:3.1234 train_time:12345ms ...`) and the
# upstream one (`500/20000 train_loss: 2.5859 train_time: 0.8m ...`). Eval lines are
# `<label> val_loss:X val_bpb:Y [scored_tokens:N scored_bytes:B ...] [eval_time:Nms]`; the label
# names the stage, and the `name:value` fields are read by name (new ones are kept, not an error).
# -----------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+|nan|inf)"
_STEP_LINE = re.compile(rf"(?:^|\s)(?:step:\s*)?(\d+)/(\d+)\s+train_loss:\s*({_NUMBER})", re.I)
_EVAL_LINE = re.compile(
    rf"^\s*([A-Za-z][\w\-. ]*?)\s+(?:val_loss:\s*({_NUMBER})\s+)?val_bpb:\s*({_NUMBER})(.*)$", re.I
)
_TIME_FIELD = r":\s*(\d+(?:\.\d+)?)\s*(ms|s|m)\b"
_TRAIN_TIME = re.compile(r"train_time" + _TIME_FIELD)
_EVAL_TIME = re.compile(r"eval_time" + _TIME_FIELD)
_TOTAL_SIZE = re.compile(r"Total submission size[^:\n]*:\s*(\d+)\s*bytes", re.I)
_CODE_SIZE = re.compile(r"^\s*Code size[^:\n]*:\s*(\d+)\s*bytes", re.I)
_MODEL_SIZE = re.compile(r"^\s*Serialized model quantized[^:\n]*:\s*(\d+)\s*bytes", re.I)
_FIELD = re.compile(r"([A-Za-z_]\w*):\s*(\S+)")
_HYPERPARAMETER_JSON = re.compile(r"^\s*hyperparameters\s*:\s*(\{.*\})\s*$", re.I)
_HYPERPARAMETER_HEADER = re.compile(r"^\s*hyperparameters\s*:\s*$", re.I)
_HYPERPARAMETER_ITEM = re.compile(r"^\s+([A-Za-z_][\w.]*)\s*[:=]\s?(.*)$")
_HPARAM_LINE = re.compile(r"^\s*hparam\s+([A-Za-z_][\w.]*)=(.*)$")  # train_gpt.py: `hparam NAME=value`


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def stage_of_label(label: str) -> str | None:
    """Map an eval-line label to a stage: pre_quant, quant, sliding, ttt (None: not a score)."""
    label = label.lower()
    if "ttt" in label:
        return "ttt"
    if "sliding" in label:
        return "sliding"
    if "pre" in label:
        return "pre_quant"
    if "quant" in label:
        return "quant"
    return None


@dataclass
class ParsedLog:
    train_points: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> last eval line
    max_train_time_s: float | None = None
    max_eval_time_s: float | None = None
    total_submission_bytes: int | None = None
    code_bytes: int | None = None  # `Code size ...: N bytes`
    model_bytes: int | None = None  # `Serialized model quantized+...: N bytes`
    hyperparameters: dict[str, Any] | None = None
    eval_lines: list[dict[str, Any]] = field(default_factory=list)  # every eval line: line number, label, fields


def parse_train_log(text: str) -> ParsedLog:
    """Pull train-loss points, final eval scores, times, sizes and hyperparameters from a log."""
    parsed = ParsedLog()
    lines = text.splitlines()
    in_hyperparameters = False
    for line_number, line in enumerate(lines, start=1):
        if in_hyperparameters:
            item = _HYPERPARAMETER_ITEM.match(line)
            if item:
                parsed.hyperparameters[item.group(1)] = item.group(2).strip()
                continue
            in_hyperparameters = False
        hparam = _HPARAM_LINE.match(line)
        if hparam:
            parsed.hyperparameters = parsed.hyperparameters or {}
            parsed.hyperparameters[hparam.group(1).lower()] = hparam.group(2).strip()
            continue
        if _HYPERPARAMETER_HEADER.match(line):
            parsed.hyperparameters = {}
            in_hyperparameters = True
            continue
        as_json = _HYPERPARAMETER_JSON.match(line)
        if as_json:
            try:
                parsed.hyperparameters = json.loads(as_json.group(1))
            except json.JSONDecodeError:
                pass
            continue
        step = _STEP_LINE.search(line)
        if step:
            parsed.train_points.append((int(step.group(1)), float(step.group(3))))
        for match in _TRAIN_TIME.finditer(line):
            seconds = _seconds(*match.groups())
            parsed.max_train_time_s = max(parsed.max_train_time_s or 0.0, seconds)
        for match in _EVAL_TIME.finditer(line):
            seconds = _seconds(*match.groups())
            parsed.max_eval_time_s = max(parsed.max_eval_time_s or 0.0, seconds)
        size = _TOTAL_SIZE.search(line)
        if size:
            parsed.total_submission_bytes = int(size.group(1))
        for pattern, attribute in ((_CODE_SIZE, "code_bytes"), (_MODEL_SIZE, "model_bytes")):
            size = pattern.match(line)
            if size:
                setattr(parsed, attribute, int(size.group(1)))
        evaluation = _EVAL_LINE.match(line)
        if evaluation:
            fields = dict(_FIELD.findall(line[evaluation.end(1) :]))
            parsed.eval_lines.append({"line": line_number, "label": evaluation.group(1).strip(), "fields": fields})
            stage = stage_of_label(evaluation.group(1))
            if stage is not None:
                loss_text = evaluation.group(2)
                loss = float(loss_text) if loss_text is not None else None
                parsed.evals[stage] = {
                    "label": evaluation.group(1).strip(),
                    "val_loss": loss if loss is not None and math.isfinite(loss) else None,
                    "val_bpb": float(evaluation.group(3)),
                    "val_loss_text": evaluation.group(2),
                    "val_bpb_text": evaluation.group(3),
                }
    return parsed


def printed_tolerance(number_text: str) -> float:
    """Half a unit in the last printed decimal place of a number as it appears in a log."""
    mantissa = number_text.lower().split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(number_text.lower().split("e")[1]) if "e" in number_text.lower() else 0
    return 0.5 * 10.0 ** (exponent - decimals)


BPB_FIELDS = ("val_loss", "val_bpb", "scored_tokens", "scored_bytes")


def bpb_arithmetic_status(fields: dict[str, str]) -> tuple[str, str]:
    """PASS / FAIL / UNKNOWN for one eval line's own fields (texts as printed): val_bpb must equal
    val_loss * scored_tokens / ln 2 / scored_bytes to within the printed digits of val_bpb and val_loss
    (the rounding of val_loss moves the recomputed value by its half-digit times tokens / (ln 2 bytes))."""
    missing = [name for name in BPB_FIELDS if name not in fields]
    if missing:
        return "UNKNOWN", f"no {', '.join(missing)}"
    try:
        loss, bpb = float(fields["val_loss"]), float(fields["val_bpb"])
        tokens, scored_bytes = int(fields["scored_tokens"]), int(fields["scored_bytes"])
    except ValueError:
        shown = " ".join(f"{name}:{fields[name]}" for name in BPB_FIELDS)
        return "FAIL", f"unreadable fields ({shown})"
    if tokens <= 0 or scored_bytes <= 0 or not (math.isfinite(loss) and math.isfinite(bpb)):
        return "FAIL", f"scored_tokens {tokens}, scored_bytes {scored_bytes}, val_loss {loss}, val_bpb {bpb}"
    tokens_per_bit_byte = tokens / (math.log(2.0) * scored_bytes)
    recomputed = loss * tokens_per_bit_byte
    tolerance = (printed_tolerance(fields["val_bpb"]) + printed_tolerance(fields["val_loss"]) * tokens_per_bit_byte
                 + 1e-12 * abs(recomputed))  # + float rounding when the values are printed in full
    if abs(recomputed - bpb) > tolerance:
        return "FAIL", (f"val_bpb {fields['val_bpb']} but val_loss * scored_tokens / ln 2 / scored_bytes = "
                        f"{recomputed:.8f}")
    return "PASS", f"val_bpb {fields['val_bpb']} recomputed"


# -----------------------------------------------------------------------------
# Data manifest and configuration checks (pure)
# -----------------------------------------------------------------------------

_OVERLAP_WORDS = ("overlap", "disjoint", "contamina", "leak")
_GOOD_WHEN_TRUE_WORDS = ("no_", "disjoint", "_ok", "passed", "clean")
# settings and bookkeeping next to the results (e.g. `allow_train_val_duplicates`), not results
_NOT_A_RESULT_WORDS = ("checked", "total", "scanned", "compared", "method", "hash", "sha", "allow")


def _walk(value: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    else:
        yield path, value


def manifest_overlap_status(manifest: dict | None) -> tuple[str, str]:
    """PASS / FAIL / UNKNOWN for 'no validation document is in the training data'.

    Looks for the manifest's overlap/duplicate results by key name (any nesting): a count of 0,
    an empty list, False for `val_overlap`-like keys or True for `no_overlap`/`disjoint`-like
    keys pass; anything positive fails; no such key at all is UNKNOWN, never a pass.
    """
    if manifest is None:
        return "UNKNOWN", "no data manifest"
    findings: list[tuple[str, Any, bool | None]] = []
    for path, value in _walk(manifest):
        key = path.lower()
        about_overlap = any(word in key for word in _OVERLAP_WORDS) or ("dup" in key and "val" in key)
        if not about_overlap or any(word in key for word in _NOT_A_RESULT_WORDS):
            continue
        last_key = key.rsplit(".", 1)[-1]
        if isinstance(value, bool):
            good_when_true = any(word in last_key for word in _GOOD_WHEN_TRUE_WORDS)
            findings.append((path, value, value == good_when_true))
        elif isinstance(value, (int, float)):
            findings.append((path, value, value == 0))
        elif isinstance(value, list):
            findings.append((path, f"{len(value)} entries", len(value) == 0))
        elif isinstance(value, str) and value.strip().lower() in ("pass", "passed", "ok", "none", "0"):
            findings.append((path, value, True))
        elif isinstance(value, str) and value.strip().lower() in ("fail", "failed"):
            findings.append((path, value, False))
    if not findings:
        return "UNKNOWN", "manifest has no val-overlap/duplicate result"
    detail = ", ".join(f"{path}={value}" for path, value, _ in findings)
    if any(ok is False for _, _, ok in findings):
        return "FAIL", detail
    return "PASS", detail


def manifest_sidecar_status(manifest: dict | None) -> tuple[str, str]:
    """PASS / FAIL / UNKNOWN for 'every val document's byte sidecar sums to its UTF-8 length'
    (bpb is only right if it is): the manifest's `*sidecar_mismatch*` counts must be 0."""
    if manifest is None:
        return "UNKNOWN", "no data manifest"
    found = [(path, value) for path, value in _walk(manifest) if "sidecar_mismatch" in path.lower()]
    counts = [(path, value) for path, value in found if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if not counts:
        return "UNKNOWN", "manifest has no sidecar verification result"
    detail = ", ".join(f"{path}={value}" for path, value in counts)
    return ("PASS" if all(value == 0 for _, value in counts) else "FAIL"), detail


def config_differences(configs: list[dict], allowed: Iterable[str]) -> dict[str, list[Any]]:
    """Keys whose values are not identical across runs (a missing key counts as a difference)."""
    allowed = set(allowed)
    keys = sorted(set().union(*[set(config) for config in configs]) - allowed)
    missing = object()
    differences = {}
    for key in keys:
        values = [config.get(key, missing) for config in configs]
        rendered = [json.dumps(v, sort_keys=True, default=str) if v is not missing else None for v in values]
        if len(set(rendered)) > 1:
            differences[key] = ["<missing>" if v is missing else v for v in values]
    return differences


def hardware_status(device: str | None, world_size: int | None) -> tuple[bool, str]:
    """Whether a run's hardware is the record track's 8xH100 (SXM), with a reason."""
    device_text = str(device or "unknown device")
    if world_size != 8 or "h100" not in device_text.lower():
        return False, f"ran on {world_size} x {device_text}, not {RECORD_HARDWARE}"
    return True, f"{world_size} x {device_text}"


def score_stage(summary: dict) -> str:
    """The stage whose val_bpb is the run's score: TTT, else sliding window, else quantized."""
    for stage in SCORE_STAGE_PREFERENCE:
        if summary.get(f"{stage}_val_bpb") is not None:
            return stage
    raise ValueError("summary.json has none of ttt_val_bpb, sliding_val_bpb, quant_val_bpb (no quantized eval ran)")


def summary_val_loss(summary: dict, stage: str) -> float | None:
    """A stage's val_loss from summary.json: `<stage>_val_loss`, else the `evals` entry of that stage."""
    if summary.get(f"{stage}_val_loss") is not None:
        return summary[f"{stage}_val_loss"]
    for label, result in (summary.get("evals") or {}).items():
        if stage_of_label(label) == stage and isinstance(result, dict) and result.get("val_loss") is not None:
            return result["val_loss"]
    return None


def nats_per_bpb_of(val_loss: float | None, val_bpb: float | None) -> float | None:
    if val_loss is None or val_bpb is None or not val_bpb > 0 or not val_loss > 0:
        return None
    return val_loss / val_bpb


# -----------------------------------------------------------------------------
# JSON types
# The checks read numbers, objects and lists out of the folder's JSON files; a file holding another
# type there (a string for a number, a list for an object) is reported as a FAIL naming the file and
# the key before any check reads it, never as a traceback. null stays allowed: the checks judge a
# missing value themselves.
# -----------------------------------------------------------------------------

NUMBER, INTEGER, TEXT, FLAG, OBJECT, LIST = "a number", "an integer", "a string", "true/false", "an object", "a list"
SUBMISSION_TYPES = {
    "seeds": LIST, "seed_results": OBJECT, "val_bpb": NUMBER, "val_bpb_std": NUMBER, "val_loss": NUMBER,
    "p_value": NUMBER, "bytes_total": INTEGER, "bytes_code": INTEGER, "code_sha256": TEXT, "record_attempt": FLAG,
    "score_stage": TEXT, "reference": OBJECT, "allowed_config_differences": LIST,
}
SEED_RESULT_TYPES = {
    "val_bpb": NUMBER, "val_loss": NUMBER, "steps": INTEGER, "artifact_bytes": INTEGER, "model_bytes": INTEGER,
    "code_bytes": INTEGER, "train_time_s": NUMBER, "eval_time_s": NUMBER, "device": TEXT, "world_size": INTEGER,
    "data_manifest_sha256": TEXT, **{f"{stage}_val_bpb": NUMBER for stage in STAGES},
}
REFERENCE_TYPES = {"name": TEXT, "val_bpb": NUMBER, "val_bpb_std": NUMBER, "n_seeds": INTEGER, "nats_per_bpb": NUMBER}
SUMMARY_TYPES = {
    "seed": INTEGER, "code_bytes": INTEGER, "model_bytes": INTEGER, "artifact_bytes": INTEGER, "device": TEXT,
    "world_size": INTEGER, "hyperparameters": OBJECT, "evals": OBJECT,
    **{f"{stage}_val_bpb": NUMBER for stage in STAGES}, **{f"{stage}_val_loss": NUMBER for stage in STAGES},
}
SUMMARY_EVAL_TYPES = {"val_loss": NUMBER, "val_bpb": NUMBER, "scored_tokens": INTEGER, "scored_bytes": INTEGER}


def _has_type(value: Any, kind: str) -> bool:
    if kind in (NUMBER, INTEGER):
        allowed = (int, float) if kind == NUMBER else int
        return isinstance(value, allowed) and not isinstance(value, bool)
    return isinstance(value, {TEXT: str, FLAG: bool, OBJECT: dict, LIST: list}[kind])


def _json_kind(value: Any) -> str:
    for kind in (FLAG, INTEGER, NUMBER, TEXT, OBJECT, LIST):
        if _has_type(value, kind):
            return kind
    return "null" if value is None else type(value).__name__


def json_type_problems(file_name: str, data: Any, types: dict[str, str], where: str = "") -> list[str]:
    """`file: key is <kind> (value), expected <kind>` for each key of `types` that `data` holds with
    another type; `where` is the key path of `data` inside the file ("" for the top level)."""
    if not isinstance(data, dict):
        return [f"{file_name}: {where or 'the top level'} is {_json_kind(data)}, expected an object"]
    problems = []
    for key, kind in types.items():
        value = data.get(key)
        if value is not None and not _has_type(value, kind):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            problems.append(f"{file_name}: {where + '.' if where else ''}{key} is {_json_kind(value)} ({shown}), "
                            f"expected {kind}")
    return problems


def submission_type_problems(submission: Any) -> list[str]:
    problems = json_type_problems("submission.json", submission, SUBMISSION_TYPES)
    if not isinstance(submission, dict):
        return problems
    for index, seed in enumerate(submission.get("seeds") or []):
        if not isinstance(seed, (int, str)) or isinstance(seed, bool):
            problems.append(f"submission.json: seeds[{index}] is {_json_kind(seed)}, expected an integer")
    for index, key in enumerate(submission.get("allowed_config_differences") or []):
        if not isinstance(key, str):
            problems.append(f"submission.json: allowed_config_differences[{index}] is {_json_kind(key)}, expected a string")
    if isinstance(submission.get("seed_results"), dict):
        for seed, entry in submission["seed_results"].items():
            problems += json_type_problems("submission.json", entry, SEED_RESULT_TYPES, f"seed_results.{seed}")
    if isinstance(submission.get("reference"), dict):
        problems += json_type_problems("submission.json", submission["reference"], REFERENCE_TYPES, "reference")
    return problems


def summary_type_problems(file_name: str, summary: Any) -> list[str]:
    problems = json_type_problems(file_name, summary, SUMMARY_TYPES)
    if isinstance(summary, dict) and isinstance(summary.get("evals"), dict):
        for label, result in summary["evals"].items():
            problems += json_type_problems(file_name, result, SUMMARY_EVAL_TYPES, f"evals.{label}")
    return problems


# -----------------------------------------------------------------------------
# Checks
# A check is PASS, FAIL or UNKNOWN with the numbers behind it. `gating` checks decide the exit
# code; the record-bar checks (seeds, hardware, threshold, significance) gate record attempts only.
# -----------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # "PASS", "FAIL" or "UNKNOWN"
    detail: str
    gating: bool = True

    def line(self) -> str:
        note = "" if self.gating else "  (informational: non-record)"
        return f"{self.status:<8} {self.name:<22} {self.detail}{note}"


def _status(ok: bool | None) -> str:
    return "UNKNOWN" if ok is None else ("PASS" if ok else "FAIL")


def _fmt(value: float | None, digits: int = 5) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# -----------------------------------------------------------------------------
# Reading run directories
# -----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


@dataclass
class SeedRun:
    run_dir: Path
    summary: dict
    log_text: str
    log: ParsedLog
    code_path: Path
    manifest_path: Path | None

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])


def find_counted_code(run_dir: Path, code_bytes: int | None, explicit: Path | None) -> Path:
    """The counted (packed) code of a run: --code, else a .py in the run dir of size code_bytes."""
    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"--code {explicit}: no such file")
        return explicit
    candidates = sorted(run_dir.glob("*.py"))
    for candidate in candidates:
        if code_bytes is not None and candidate.stat().st_size == code_bytes:
            return candidate
    if (run_dir / "train_gpt.py").is_file():
        print(
            f"warning: {run_dir}/train_gpt.py is {(run_dir / 'train_gpt.py').stat().st_size} bytes but "
            f"the run counted {code_bytes}: the folder will hold it and fail the code check",
            file=sys.stderr,
        )
        return run_dir / "train_gpt.py"
    raise FileNotFoundError(
        f"{run_dir}: no .py file of {code_bytes} bytes (the counted code); pass --code PATH"
    )


def _resolve_manifest(run_dir: Path, summary: dict) -> Path | None:
    """The run's data manifest: summary `data_manifest` (absolute, or relative to the cwd or the run
    dir), else `manifest.json` in the run's DATA_PATH (`hyperparameters.data_path`)."""
    manifest = summary.get("data_manifest")
    if manifest:
        for candidate in (Path(manifest), run_dir / manifest):
            if candidate.is_file():
                return candidate
        print(f"warning: {run_dir}: data manifest {manifest} not found", file=sys.stderr)
        return None
    data_path = (summary.get("hyperparameters") or {}).get("data_path")
    if data_path and (Path(data_path) / "manifest.json").is_file():
        return Path(data_path) / "manifest.json"
    return None


def load_run(run_dir: Path, code: Path | None = None) -> SeedRun:
    summary_path = run_dir / "summary.json"
    log_path = run_dir / "train.log"
    for required in (summary_path, log_path):
        if not required.is_file():
            raise FileNotFoundError(f"{run_dir}: missing {required.name}")
    summary = _read_json(summary_path)
    if summary.get("seed") is None:
        raise ValueError(f"{summary_path}: no seed")
    try:
        score_stage(summary)
    except ValueError as error:
        raise ValueError(f"{summary_path}: {error}") from None
    log_text = log_path.read_text(errors="replace")
    return SeedRun(
        run_dir=run_dir,
        summary=summary,
        log_text=log_text,
        log=parse_train_log(log_text),
        code_path=find_counted_code(run_dir, summary.get("code_bytes"), code),
        manifest_path=_resolve_manifest(run_dir, summary),
    )


# -----------------------------------------------------------------------------
# Assembling a folder: submission.json, logs, code, plot, then README with the checks
# -----------------------------------------------------------------------------


def slugify(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "run"


def seed_result(run: SeedRun, stage: str) -> dict[str, Any]:
    """One seed's entry in submission.json: the challenge's fields first, then ours."""
    summary = run.summary
    val_bpb = summary[f"{stage}_val_bpb"]
    val_loss = summary_val_loss(summary, stage)
    if val_loss is None and stage in run.log.evals:
        val_loss = run.log.evals[stage]["val_loss"]
    steps = summary.get("steps")
    train_time_s = summary.get("train_time_s")
    manifest_sha = _sha256(run.manifest_path) if run.manifest_path else None
    return {
        "val_loss": val_loss,
        "val_bpb": val_bpb,
        "steps": steps,
        "ms_per_step": (1000.0 * train_time_s / steps) if steps and train_time_s is not None else None,
        "artifact_bytes": summary.get("artifact_bytes"),
        "model_bytes": summary.get("model_bytes"),
        "code_bytes": summary.get("code_bytes"),
        "train_time_s": train_time_s,
        "eval_time_s": summary.get("eval_time_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        **{f"{s}_val_bpb": summary.get(f"{s}_val_bpb") for s in STAGES},
        "ttt_mode": summary.get("ttt_mode"),
        "device": summary.get("device"),
        "world_size": summary.get("world_size"),
        "data_manifest_sha256": manifest_sha,
    }


def build_submission(
    runs: list[SeedRun],
    *,
    name: str,
    author: str,
    github_id: str,
    blurb: str,
    date: str,
    reference: Reference,
    record_attempt: bool,
    non_record_reason: str | None,
    code_path: Path,
) -> dict[str, Any]:
    stages = {score_stage(run.summary) for run in runs}
    if len(stages) != 1:
        raise ValueError(f"seeds were scored at different stages: {sorted(stages)}")
    stage = stages.pop()
    seed_results = {str(run.seed): seed_result(run, stage) for run in runs}
    bpbs = [entry["val_bpb"] for entry in seed_results.values()]
    losses = [entry["val_loss"] for entry in seed_results.values()]
    ratios = [nats_per_bpb_of(loss, bpb) for loss, bpb in zip(losses, bpbs)]
    known_ratios = [ratio for ratio in ratios if ratio is not None]
    nats_per_bpb = statistics.fmean(known_ratios) if known_ratios else FALLBACK_NATS_PER_BPB
    mean_bpb, std_bpb = mean_and_std(bpbs)
    mean_loss, std_loss = mean_and_std(losses) if None not in losses else (None, None)
    artifact_sizes = [e["artifact_bytes"] for e in seed_results.values() if e["artifact_bytes"] is not None]
    submission: dict[str, Any] = {
        "author": author,
        "github_id": github_id,
        "name": name,
        "blurb": blurb,
        "date": date,
        "track": "10min_16mb" if record_attempt else "non_record_16mb",
        "val_bpb": mean_bpb,
        "val_bpb_std": std_bpb,
        "val_loss": mean_loss,
        "val_loss_std": std_loss,
        "seeds": [run.seed for run in runs],
        "seed_results": seed_results,
        "bytes_total": max(artifact_sizes) if artifact_sizes else None,
        "bytes_code": code_path.stat().st_size,
        "hardware": ", ".join(sorted({f"{r.summary.get('world_size')}x {r.summary.get('device')}" for r in runs})),
        # Our extras.
        "record_attempt": record_attempt,
        "non_record_reason": non_record_reason,
        "score_stage": stage,
        "code_sha256": _sha256(code_path),
        "nats_per_bpb": nats_per_bpb,
        "nats_per_bpb_source": (
            "val_loss / val_bpb of the runs" if known_ratios else "assumed ln 2 (no val_loss reported)"
        ),
        "reference": {
            "name": reference.name,
            "val_bpb": reference.mean_bpb,
            "val_bpb_std": reference.std_bpb,
            "n_seeds": reference.n,
            "nats_per_bpb": reference.nats_per_bpb,
        },
    }
    significance = significance_analysis(bpbs, nats_per_bpb, reference)
    submission["p_value"] = significance["p_value"]
    submission["significance"] = significance
    return submission


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """Train loss against step, one line per seed (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for label, points in curves.items():
        finite = [(step, loss) for step, loss in points if math.isfinite(loss)]
        if finite:
            axes.plot([step for step, _ in finite], [loss for _, loss in finite], label=label, linewidth=1.2)
    if not any(curves.values()):
        axes.text(0.5, 0.5, "no train_loss step lines in the logs", ha="center", transform=axes.transAxes)
    axes.set_xlabel("step")
    axes.set_ylabel("train loss (nats/token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if any(curves.values()):
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _results_table(submission: dict) -> list[str]:
    """Per-seed scores at every stage (the scored stage in bold), sizes and times; mean and std rows."""
    stage, seed_results = submission["score_stage"], submission["seed_results"]
    header = "| seed | steps | pre-quant | quantized | sliding | TTT | val_loss | artifact bytes | train s | eval s |"
    lines = [header, "|---:" * (header.count("|") - 1) + "|"]
    for seed, entry in seed_results.items():
        scores = []
        for s in STAGES:
            value = entry[f"{s}_val_bpb"]
            scores.append("-" if value is None else (f"**{value:.5f}**" if s == stage else f"{value:.5f}"))
        artifact = "-" if entry["artifact_bytes"] is None else f"{entry['artifact_bytes']:,}"
        cells = [seed, str(entry["steps"]), *scores, _fmt(entry["val_loss"]), artifact,
                 _fmt(entry["train_time_s"], 1), _fmt(entry["eval_time_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    columns = [[e[f"{s}_val_bpb"] for e in seed_results.values()] for s in STAGES]
    columns.append([e["val_loss"] for e in seed_results.values()])
    for label, reducer, minimum in (("mean", statistics.fmean, 1), ("std", statistics.stdev, 2)):
        cells = [f"**{label}**", ""]
        cells += ["-" if None in values or len(values) < minimum else _fmt(reducer(values)) for values in columns]
        lines.append("| " + " | ".join(cells + ["", "", ""]) + " |")
    return lines


def _significance_section(submission: dict) -> list[str]:
    sig, reference = submission["significance"], submission["reference"]
    if sig["significant"] is None:
        verdict = "unknown (needs 2 or more seeds)"
    else:
        verdict = "met" if sig["significant"] else "not met"
    reference_ratio = (
        " (assumed equal: same tokenizer and val set)." if reference["nats_per_bpb"] is None else "."
    )
    return [
        f"Reference: {reference['name']}, val_bpb {reference['val_bpb']:.5f} +- {reference['val_bpb_std']:.5f}"
        f" over {reference['n_seeds']} seeds.",
        f"bpb is converted to nats per token with {sig['nats_per_bpb']:.5f} nats/bpb"
        f" ({submission['nats_per_bpb_source']}); the reference uses {sig['reference_nats_per_bpb']:.5f}"
        + reference_ratio,
        "",
        f"- improvement: {sig['improvement_bpb']:+.5f} bpb = {sig['improvement_nats']:+.5f} nats"
        f" (required: >= {sig['margin_nats']} nats) -> {'met' if sig['threshold_ok'] else 'not met'}",
        f"- Welch's t-test, H0: improvement <= {sig['margin_nats']} nats: t = {_fmt(sig['t'], 3)},"
        f" df = {_fmt(sig['df'], 2)}, one-sided p = {_fmt_p(sig['p_value'])} (required: < {sig['alpha']})"
        f" -> {verdict}",
        f"- for comparison, the p-value against H0: no improvement at all = {_fmt_p(sig['p_value_vs_zero'])}",
    ]


def render_readme(
    submission: dict, checks: list[Check], has_plot: bool, hyperparameters: dict | None = None
) -> str:
    """The folder's README: headline, per-seed table, significance, checks, configuration, files."""
    record, stage = submission["record_attempt"], submission["score_stage"]
    lines = [f"# {'Record' if record else 'Non-record'}: {submission['name']}", ""]
    if not record:
        lines += [f"**Non-record submission.** {submission['non_record_reason']}", ""]
    std = submission["val_bpb_std"]
    headline = f"**val_bpb = {submission['val_bpb']:.5f}** ({len(submission['seeds'])}-seed mean"
    headline += f", std {std:.5f}" if std is not None else ""
    headline += f"; score = {STAGE_TITLES[stage]} val_bpb)"
    if submission["bytes_total"] is not None:
        headline += f" | artifact <= {submission['bytes_total']:,} bytes"
    lines += [headline + f" | {submission['hardware']}", ""]
    if submission.get("blurb"):
        lines += [submission["blurb"], ""]
    lines += ["## Per-seed results", "", *_results_table(submission), ""]
    lines += ["## Significance", "", *_significance_section(submission), ""]
    lines += ["## Checks", "", "Re-run them with `python records/make_record.py validate <this folder>`.", ""]
    lines += ["| check | status | detail |", "|---|---|---|"]
    for check in checks:
        status = check.status if check.gating else f"{check.status} (informational)"
        lines.append(f"| {check.name} | {status} | {check.detail.replace('|', '/')} |")
    if hyperparameters:
        lines += ["", "## Configuration", "", "<details><summary>Resolved hyperparameters (first seed)</summary>", ""]
        lines += ["```", *[f"{key}={value}" for key, value in hyperparameters.items()], "```", "", "</details>"]
    seeds = list(submission["seed_results"])
    lines += ["", "## Included files", ""]
    lines += ["- `README.md` (this file)", "- `submission.json`", "- `train_gpt.py` (the counted code)"]
    lines += [f"- `train_seed{seed}.log`, `summary_seed{seed}.json`" for seed in seeds]
    if any(entry["data_manifest_sha256"] for entry in submission["seed_results"].values()):
        lines.append("- `data_manifest.json` (the data preparation manifest)")
    if has_plot:
        lines += ["- `loss_curve.png` (train loss against step, per seed)", "", "![train loss](loss_curve.png)"]
    return "\n".join(lines) + "\n"


def non_record_reasons(summaries: list[dict], non_record: bool, reason: str | None) -> list[str]:
    """Why a set of runs is not a record attempt (empty: it is one): the flag, or the hardware."""
    reasons = [reason or "marked non-record by the author"] if non_record else []
    for summary in summaries:
        ok, why = hardware_status(summary.get("device"), summary.get("world_size"))
        if not ok:
            reasons.append(f"seed {summary.get('seed')} {why}")
            break
    return reasons


def assemble(
    run_dirs: list[Path],
    out: Path,
    *,
    name: str,
    author: str = "",
    github_id: str = "",
    blurb: str = "",
    date: str | None = None,
    reference: Reference = Reference(),
    non_record: bool = False,
    non_record_reason: str | None = None,
    code: Path | None = None,
    plot: bool = True,
    allowed_config_keys: Iterable[str] = CONFIG_KEYS_ALLOWED_TO_DIFFER,
    force: bool = False,
) -> list[Check]:
    """Write a record folder at `out` from run directories; returns the folder's checks."""
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = [load_run(Path(run_dir), code) for run_dir in run_dirs]
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds among the runs: {seeds}")
    code_hashes = {_sha256(run.code_path) for run in runs}
    if len(code_hashes) != 1:
        raise ValueError("the runs' counted code files differ: one record folder holds one train_gpt.py")
    reasons = non_record_reasons([run.summary for run in runs], non_record, non_record_reason)
    record_attempt = not reasons
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use --force to overwrite)")
        for pattern in GENERATED_FILES:  # no stale seed logs or plots from an earlier assembly
            for stale in out.glob(pattern):
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)

    shutil.copyfile(runs[0].code_path, out / "train_gpt.py")
    for run in runs:
        (out / f"train_seed{run.seed}.log").write_text(run.log_text)
        shutil.copyfile(run.run_dir / "summary.json", out / f"summary_seed{run.seed}.json")
    manifest_run = next((run for run in runs if run.manifest_path), None)
    if manifest_run is not None:
        shutil.copyfile(manifest_run.manifest_path, out / "data_manifest.json")

    submission = build_submission(
        runs,
        name=name,
        author=author,
        github_id=github_id,
        blurb=blurb,
        date=date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        reference=reference,
        record_attempt=record_attempt,
        non_record_reason=None if record_attempt else "; ".join(reasons),
        code_path=out / "train_gpt.py",
    )
    submission["allowed_config_differences"] = sorted(set(allowed_config_keys))
    _write_json(out / "submission.json", submission)
    if plot:
        curves = {f"seed {run.seed}": run.log.train_points for run in runs}
        plot_loss_curves(curves, out / "loss_curve.png", f"{name}: train loss")

    checks = validate_folder(out)
    status = {check.name: check.status for check in checks}
    # the challenge's compliance flags (as in merged records), then every check by name
    submission["compliance"] = {
        "train_under_600s": status.get("train_time") == "PASS",
        "eval_under_600s": status.get("eval_time") == "PASS",
        "artifact_under_16mb": status.get("artifact_size") == "PASS",
        "three_seeds": status.get("seeds") == "PASS",
        "same_config_across_seeds": status.get("same_config") == "PASS",
        "no_val_overlap": status.get("val_overlap") == "PASS",
    }
    submission["checks"] = status
    _write_json(out / "submission.json", submission)
    (out / "README.md").write_text(render_readme(submission, checks, plot, runs[0].summary.get("hyperparameters")))
    return checks


GENERATED_FILES = (
    "README.md", "submission.json", "train_gpt.py", "train_seed*.log", "summary_seed*.json",
    "data_manifest.json", "loss_curve.png",
)


def _finite_or_none(value: Any) -> Any:
    """JSON has no inf/nan: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n")


# -----------------------------------------------------------------------------
# Validating a folder the way a reviewer would
# Scores come from the seed logs, code bytes from the counted train_gpt.py in the folder; the
# numbers in submission.json are compared with them, never taken on trust.
# -----------------------------------------------------------------------------


def _close(a: float | None, b: float | None, tolerance: float) -> bool:
    return a is not None and b is not None and abs(a - b) <= tolerance


@dataclass
class Folder:
    """A record folder as a reviewer reads it."""

    path: Path
    submission: dict
    seed_results: dict[str, dict]  # from submission.json, keyed by seed (as a string)
    logs: dict[str, ParsedLog]
    summaries: dict[str, dict]  # summary_seed<N>.json ({} when absent)
    code_path: Path
    record: bool
    stage: str

    @property
    def seeds(self) -> list[str]:
        return list(self.seed_results)


def _joined(problems: list[str]) -> str:
    return "; ".join(problems)


def check_scores_match_logs(folder: Folder) -> Check:
    """Each seed's log prints the score submission.json claims, to the digits it prints."""
    problems = []
    for seed in folder.seeds:
        entry, line = folder.seed_results[seed], folder.logs[seed].evals.get(folder.stage)
        if line is None:
            problems.append(f"seed {seed}: no {folder.stage} val_bpb line in the log")
            continue
        if not _close(entry.get("val_bpb"), line["val_bpb"], printed_tolerance(line["val_bpb_text"]) + 1e-9):
            problems.append(f"seed {seed}: val_bpb submission {entry.get('val_bpb')} vs log {line['val_bpb_text']}")
        claimed_loss = entry.get("val_loss")
        if claimed_loss is not None and line["val_loss"] is None:
            problems.append(f"seed {seed}: submission has val_loss {claimed_loss}, the log none")
        elif claimed_loss is not None and not _close(
            claimed_loss, line["val_loss"], printed_tolerance(line["val_loss_text"]) + 1e-9
        ):
            problems.append(f"seed {seed}: val_loss submission {claimed_loss} vs log {line['val_loss_text']}")
    if problems:
        return Check("scores_match_logs", "FAIL", _joined(problems))
    shown = ", ".join(f"{seed}: {folder.logs[seed].evals[folder.stage]['val_bpb_text']}" for seed in folder.seeds)
    return Check("scores_match_logs", "PASS", f"{folder.stage} val_bpb in the logs: {shown}")


def folder_reference(submission: dict) -> Reference:
    data = submission.get("reference") or {}
    return Reference(
        name=data.get("name", "reference"),
        mean_bpb=data.get("val_bpb", Reference.mean_bpb),
        std_bpb=data.get("val_bpb_std", Reference.std_bpb),
        n=data.get("n_seeds", Reference.n),
        nats_per_bpb=data.get("nats_per_bpb"),
    )


def recompute_significance(folder: Folder) -> dict[str, Any]:
    """The significance analysis from the per-seed scores (checked against the logs beforehand)."""
    entries = [folder.seed_results[seed] for seed in folder.seeds]
    ratios = [nats_per_bpb_of(entry.get("val_loss"), entry["val_bpb"]) for entry in entries]
    ratios = [ratio for ratio in ratios if ratio is not None]
    nats_per_bpb = statistics.fmean(ratios) if ratios else FALLBACK_NATS_PER_BPB
    bpbs = [entry["val_bpb"] for entry in entries]
    return significance_analysis(bpbs, nats_per_bpb, folder_reference(folder.submission))


def check_reported_statistics(folder: Folder, significance: dict[str, Any]) -> Check:
    """Mean, std and p-value in submission.json are what the per-seed scores give."""
    submission, problems = folder.submission, []
    mean_bpb, std_bpb = significance["mean_bpb"], significance["std_bpb"]
    if not _close(submission.get("val_bpb"), mean_bpb, 1e-9):
        problems.append(f"val_bpb {submission.get('val_bpb')} vs mean of seeds {mean_bpb:.8f}")
    if std_bpb is not None and not _close(submission.get("val_bpb_std"), std_bpb, 1e-9):
        problems.append(f"val_bpb_std {submission.get('val_bpb_std')} vs seeds {std_bpb:.8f}")
    claimed_p, recomputed_p = submission.get("p_value"), significance["p_value"]
    if (claimed_p is None) != (recomputed_p is None) or (
        recomputed_p is not None and not _close(claimed_p, recomputed_p, 1e-6 * max(recomputed_p, 1e-12))
    ):
        problems.append(f"p_value {claimed_p} vs recomputed {_fmt_p(recomputed_p)}")
    if problems:
        return Check("reported_statistics", "FAIL", _joined(problems))
    detail = f"mean {mean_bpb:.5f}, std {_fmt(std_bpb)}, p {_fmt_p(recomputed_p)} (recomputed)"
    return Check("reported_statistics", "PASS", detail)


def check_code_bytes(folder: Folder, code_bytes: int) -> Check:
    """The folder's train_gpt.py is the code the runs counted; its size is measured here."""
    problems = []
    if folder.submission.get("bytes_code") != code_bytes:
        problems.append(f"submission bytes_code {folder.submission.get('bytes_code')} != file {code_bytes}")
    if folder.submission.get("code_sha256") not in (None, _sha256(folder.code_path)):
        problems.append("code_sha256 does not match train_gpt.py")
    try:
        compile(folder.code_path.read_bytes(), str(folder.code_path), "exec")
    except (SyntaxError, ValueError) as error:
        problems.append(f"train_gpt.py is not valid Python ({error})")
    for seed in folder.seeds:
        counted = folder.seed_results[seed].get("code_bytes")
        if counted is not None and counted != code_bytes:
            problems.append(f"seed {seed} counted {counted} B of code, train_gpt.py here is {code_bytes} B")
    if problems:
        return Check("code_bytes", "FAIL", _joined(problems))
    return Check("code_bytes", "PASS", f"train_gpt.py = {code_bytes:,} bytes (measured)")


def check_artifact_size(folder: Folder, code_bytes: int) -> Check:
    """Measured code bytes + each seed's model bytes fit the limit and equal what is claimed."""
    problems, totals = [], []
    for seed in folder.seeds:
        entry = folder.seed_results[seed]
        if entry.get("model_bytes") is None:
            problems.append(f"seed {seed}: no model_bytes")
            continue
        total = code_bytes + int(entry["model_bytes"])
        totals.append(total)
        if total > ARTIFACT_LIMIT_BYTES:
            problems.append(f"seed {seed}: {total:,} B > {ARTIFACT_LIMIT_BYTES:,} B")
        claimed = entry.get("artifact_bytes")
        if claimed is not None and claimed != total:
            problems.append(f"seed {seed}: submission artifact_bytes {claimed:,} != code + model {total:,}")
        logged = folder.logs[seed].total_submission_bytes
        if logged is not None and logged != total:
            problems.append(f"seed {seed}: log total {logged:,} != code + model {total:,}")
    if problems:
        only_unknown = all("no model_bytes" in problem for problem in problems)
        return Check("artifact_size", "UNKNOWN" if only_unknown else "FAIL", _joined(problems))
    detail = f"max {max(totals):,} B <= {ARTIFACT_LIMIT_BYTES:,} B (code {code_bytes:,} + model)"
    return Check("artifact_size", "PASS", detail)


def check_bytes_total(folder: Folder, code_bytes: int) -> Check:
    """bytes_total = the largest code + model; every size a log or summary reports agrees with it:
    `Code size` = train_gpt.py here, `Serialized model quantized+...` = model_bytes, and each
    summary's code_bytes, model_bytes and artifact_bytes (= code_bytes + model_bytes)."""
    problems, totals = [], {}
    for seed in folder.seeds:
        model_bytes = folder.seed_results[seed].get("model_bytes")
        if model_bytes is None:
            continue  # artifact_size reports it
        totals[seed] = code_bytes + model_bytes
        summary, log = folder.summaries[seed], folder.logs[seed]
        for key, expected in (("code_bytes", code_bytes), ("model_bytes", model_bytes), ("artifact_bytes", totals[seed])):
            if summary.get(key) is not None and summary[key] != expected:
                problems.append(f"summary_seed{seed}.json {key} {summary[key]:,} != {expected:,}")
        if log.code_bytes is not None and log.code_bytes != code_bytes:
            problems.append(f"train_seed{seed}.log code size {log.code_bytes:,} != train_gpt.py {code_bytes:,}")
        if log.model_bytes is not None and log.model_bytes != model_bytes:
            problems.append(f"train_seed{seed}.log serialized model {log.model_bytes:,} != model_bytes {model_bytes:,}")
    if not totals:
        return Check("bytes_total", "UNKNOWN", "no seed has model_bytes")
    largest = max(totals.values())
    claimed = folder.submission.get("bytes_total")
    if claimed != largest:
        problems.insert(0, f"submission bytes_total {claimed} != largest code + model {largest:,}")
    if problems:
        return Check("bytes_total", "FAIL", _joined(problems))
    return Check("bytes_total", "PASS", f"{largest:,} B = largest code + model; logs and summaries agree")


def check_bpb_arithmetic(folder: Folder) -> Check:
    """Every eval line of every log, and every summary eval, recomputes: val_bpb = val_loss *
    scored_tokens / ln 2 / scored_bytes. A scored stage without those fields is UNKNOWN."""
    problems, unknown, checked = [], [], 0
    for seed in folder.seeds:
        scored_status = None
        for entry in folder.logs[seed].eval_lines:
            status, why = bpb_arithmetic_status(entry["fields"])
            checked += status == "PASS"
            if status == "FAIL":
                problems.append(f"train_seed{seed}.log line {entry['line']} ({entry['label']}): {why}")
            if stage_of_label(entry["label"]) == folder.stage:
                scored_status = status
        evals = folder.summaries[seed].get("evals") or {}
        for label, result in evals.items():
            fields = {name: repr(result[name]) for name in BPB_FIELDS if result.get(name) is not None}
            status, why = bpb_arithmetic_status(fields)
            checked += status == "PASS"
            if status == "FAIL":
                problems.append(f"summary_seed{seed}.json evals.{label}: {why}")
        if scored_status in (None, "UNKNOWN"):
            unknown.append(f"seed {seed}: no {folder.stage} eval line with val_loss, scored_tokens and scored_bytes")
    if problems:
        return Check("bpb_arithmetic", "FAIL", _joined(problems))
    if unknown:
        return Check("bpb_arithmetic", "UNKNOWN", _joined(unknown))
    return Check("bpb_arithmetic", "PASS", f"{checked} eval results: val_bpb = val_loss * scored_tokens / ln 2 / scored_bytes")


def check_time(folder: Folder, name: str, key: str, log_attribute: str, limit_s: float) -> Check:
    """Per seed, the larger of the claimed and the logged time is within the limit."""
    worst, problems, unknown = [], [], []
    for seed in folder.seeds:
        claimed = folder.seed_results[seed].get(key)
        values = [v for v in (claimed, getattr(folder.logs[seed], log_attribute)) if v is not None]
        if not values:
            unknown.append(f"seed {seed}: unknown")
            continue
        worst.append(max(values))
        if max(values) > limit_s:
            problems.append(f"seed {seed}: {max(values):.1f} s > {limit_s:.0f} s")
    if problems:
        return Check(name, "FAIL", _joined(problems + unknown))
    if unknown:
        return Check(name, "UNKNOWN", _joined(unknown))
    return Check(name, "PASS", f"max {max(worst):.1f} s <= {limit_s:.0f} s")


def check_same_config(folder: Folder) -> Check:
    """Resolved hyperparameters (from the logs, else the summaries) agree except per-run names."""
    allowed = folder.submission.get("allowed_config_differences", CONFIG_KEYS_ALLOWED_TO_DIFFER)
    if all(folder.logs[seed].hyperparameters for seed in folder.seeds):
        configs, source = [folder.logs[seed].hyperparameters for seed in folder.seeds], "logs"
    elif all(folder.summaries[seed].get("hyperparameters") for seed in folder.seeds):
        configs, source = [folder.summaries[seed]["hyperparameters"] for seed in folder.seeds], "summaries"
    else:
        return Check("same_config", "UNKNOWN", "no hyperparameters in the logs or summaries")
    problems = [f"differ: {key}={values}" for key, values in config_differences(configs, allowed).items()]
    for seed, config in zip(folder.seeds, configs):  # each log is the run of the seed it is named for
        if "seed" in config and str(config["seed"]) != seed:
            problems.append(f"train_seed{seed}.log / summary ran seed {config['seed']}")
    if problems:
        return Check("same_config", "FAIL", _joined(problems))
    detail = f"{len(configs[0])} hyperparameters identical ({source}; may differ: {', '.join(allowed)})"
    return Check("same_config", "PASS", detail)


def check_data(folder: Folder) -> list[Check]:
    """No val overlap and exact byte sidecars per the manifest; every seed used that manifest."""
    manifest_path = folder.path / "data_manifest.json"
    manifest = _read_json(manifest_path) if manifest_path.is_file() else None
    checks = [
        Check("val_overlap", *manifest_overlap_status(manifest)),
        Check("val_byte_sidecars", *manifest_sidecar_status(manifest)),
    ]
    hashes = [folder.seed_results[seed].get("data_manifest_sha256") for seed in folder.seeds]
    if manifest is None or None in hashes:
        checks.append(Check("same_data", "UNKNOWN", "a run has no data manifest"))
    elif set(hashes) == {_sha256(manifest_path)}:
        checks.append(Check("same_data", "PASS", "all seeds used data_manifest.json"))
    else:
        checks.append(Check("same_data", "FAIL", "seeds used different data manifests"))
    return checks


def check_record_bar(folder: Folder, significance: dict[str, Any] | None) -> list[Check]:
    """Seeds, hardware, the 0.005-nat margin and p < 0.01: gating for record attempts only."""
    seeds = folder.seeds
    checks = [Check(
        "seeds", _status(len(seeds) >= MIN_RECORD_SEEDS),
        f"{len(seeds)} seeds ({', '.join(seeds)}; record: >= {MIN_RECORD_SEEDS})", gating=folder.record,
    )]
    hardware = []
    for seed in seeds:
        summary, entry = folder.summaries[seed], folder.seed_results[seed]
        device = summary.get("device", entry.get("device"))
        hardware.append(hardware_status(device, summary.get("world_size", entry.get("world_size"))))
    bad = sorted({why for ok, why in hardware if not ok})
    checks.append(Check("hardware", _status(not bad), _joined(bad) if bad else hardware[0][1], gating=folder.record))
    if significance is None:
        checks.append(Check("significance", "FAIL", "not computed: scores do not match the logs", gating=folder.record))
        return checks
    improvement = significance["improvement_nats"]
    reference = folder_reference(folder.submission).name
    checks.append(Check(
        "improvement_threshold", _status(significance["threshold_ok"]),
        f"{improvement:+.5f} nats vs {reference} (need >= {RECORD_MARGIN_NATS})", gating=folder.record,
    ))
    checks.append(Check(
        "significance", _status(significance["significant"]),
        f"Welch one-sided p = {_fmt_p(significance['p_value'])} (need < {SIGNIFICANCE_LEVEL}),"
        f" t = {_fmt(significance['t'], 3)}, df = {_fmt(significance['df'], 2)}",
        gating=folder.record,
    ))
    return checks


def read_folder(path: Path) -> tuple[Folder | None, Check]:
    """Load a folder's files; the Check says which are missing, unreadable or of the wrong JSON types."""
    submission_path, code_path = path / "submission.json", path / "train_gpt.py"
    if not submission_path.is_file():
        return None, Check("files", "FAIL", f"{submission_path} missing")
    try:
        submission = _read_json(submission_path)
    except ValueError as error:
        return None, Check("files", "FAIL", str(error))
    problems = submission_type_problems(submission)
    if problems:
        return None, Check("json_types", "FAIL", _joined(problems))
    seed_results = submission.get("seed_results") or {}
    logs = {seed: path / f"train_seed{seed}.log" for seed in seed_results}
    missing = [p.name for p in [code_path, *logs.values()] if not p.is_file()]
    if missing or not seed_results:
        return None, Check("files", "FAIL", f"missing: {missing or 'seed_results'}")
    if [str(seed) for seed in submission.get("seeds", [])] != list(seed_results):
        return None, Check("files", "FAIL", f"seeds {submission.get('seeds')} != seed_results {list(seed_results)}")
    summaries, manifest_path = {}, path / "data_manifest.json"
    try:
        for seed in seed_results:
            summary_path = path / f"summary_seed{seed}.json"
            summaries[seed] = _read_json(summary_path) if summary_path.is_file() else {}
            problems += summary_type_problems(summary_path.name, summaries[seed])
        if manifest_path.is_file():
            problems += json_type_problems(manifest_path.name, _read_json(manifest_path), {})
    except ValueError as error:
        return None, Check("files", "FAIL", str(error))
    if problems:
        return None, Check("json_types", "FAIL", _joined(problems))
    folder = Folder(
        path=path,
        submission=submission,
        seed_results=seed_results,
        logs={seed: parse_train_log(log.read_text(errors="replace")) for seed, log in logs.items()},
        summaries=summaries,
        code_path=code_path,
        record=bool(submission.get("record_attempt", True)),
        stage=submission.get("score_stage", "ttt"),
    )
    return folder, Check("files", "PASS", f"{len(seed_results)} seed logs, train_gpt.py, submission.json")


def validate_folder(path: Path) -> list[Check]:
    """Every check of a record folder, in reading order."""
    folder, files_check = read_folder(Path(path))
    if folder is None:
        return [files_check]
    checks = [files_check, check_scores_match_logs(folder), check_bpb_arithmetic(folder)]
    significance = None
    if checks[-1].status == "PASS":
        significance = recompute_significance(folder)
        checks.append(check_reported_statistics(folder, significance))
    else:
        checks.append(Check("reported_statistics", "FAIL", "not recomputed: scores do not match the logs"))
    code_bytes = folder.code_path.stat().st_size
    checks += [
        check_code_bytes(folder, code_bytes),
        check_artifact_size(folder, code_bytes),
        check_bytes_total(folder, code_bytes),
        check_time(folder, "train_time", "train_time_s", "max_train_time_s", TRAIN_TIME_LIMIT_S),
        check_time(folder, "eval_time", "eval_time_s", "max_eval_time_s", EVAL_TIME_LIMIT_S),
        check_same_config(folder),
        *check_data(folder),
        *check_record_bar(folder, significance),
    ]
    return checks


def failed(checks: list[Check], strict: bool = False) -> list[Check]:
    """Gating checks that fail (and, when strict, those that are UNKNOWN)."""
    bad = {"FAIL", "UNKNOWN"} if strict else {"FAIL"}
    return [check for check in checks if check.gating and check.status in bad]


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("assemble", help="write a record folder from run directories")
    build.add_argument(
        "run_dirs", nargs="+", type=Path, help="run directories (summary.json + train.log + counted code)"
    )
    build.add_argument("--name", required=True, help="submission name")
    build.add_argument("--out", type=Path, help="folder to write (default: records/track_<...>/<date>_<name>)")
    build.add_argument("--author", default="")
    build.add_argument("--github-id", default="")
    build.add_argument("--blurb", default="")
    build.add_argument("--date", help="YYYY-MM-DD (default: today, UTC)")
    build.add_argument("--code", type=Path, help="the counted code file, if not found in the run dirs")
    build.add_argument("--non-record", action="store_true", help="label the folder non-record")
    build.add_argument("--non-record-reason", help="why it is not a record attempt")
    build.add_argument("--ref-name", default=Reference.name)
    build.add_argument("--ref-mean", type=float, default=Reference.mean_bpb, help="reference mean val_bpb")
    build.add_argument("--ref-std", type=float, default=Reference.std_bpb, help="reference sample std of val_bpb")
    build.add_argument("--ref-n", type=int, default=Reference.n, help="reference number of seeds")
    build.add_argument("--ref-nats-per-bpb", type=float, help="reference val_loss/val_bpb (default: the new runs')")
    build.add_argument(
        "--allow-config-diff", action="append", default=[], metavar="KEY",
        help="a hyperparameter allowed to differ across seeds (repeatable)",
    )
    build.add_argument("--no-plot", action="store_true", help="skip loss_curve.png (no matplotlib needed)")
    build.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")

    check = commands.add_parser("validate", help="re-check a record folder; exit 1 on a failed check")
    check.add_argument("folder", type=Path)
    check.add_argument("--strict", action="store_true", help="treat UNKNOWN as failure")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(_parser().parse_args(argv))
    except (ValueError, OSError) as error:  # bad or missing inputs: one line, not a traceback
        print(f"make_record.py: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "validate":
        checks = validate_folder(args.folder)
        strict = args.strict
    else:
        date = args.date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        if args.out is None:
            summaries = [_read_json(run_dir / "summary.json") for run_dir in args.run_dirs]
            is_record = not non_record_reasons(summaries, args.non_record, args.non_record_reason)
            track = "track_10min_16mb" if is_record else "track_non_record_16mb"
            args.out = Path(__file__).resolve().parent / track / f"{date}_{slugify(args.name)}"
        checks = assemble(
            args.run_dirs,
            args.out,
            name=args.name,
            author=args.author,
            github_id=args.github_id,
            blurb=args.blurb,
            date=date,
            reference=Reference(args.ref_name, args.ref_mean, args.ref_std, args.ref_n, args.ref_nats_per_bpb),
            non_record=args.non_record,
            non_record_reason=args.non_record_reason,
            code=args.code,
            plot=not args.no_plot,
            allowed_config_keys=tuple(CONFIG_KEYS_ALLOWED_TO_DIFFER) + tuple(args.allow_config_diff),
            force=args.force,
        )
        print(f"wrote {args.out}")
        strict = False
    for check in checks:
        print(check.line())
    failures = failed(checks, strict)
    print(f"{len(failures)} failing check(s)" if failures else "all gating checks pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
