"""benchmarks/bench_ladder.py: the rungs are valid settings, the top of the ladder is the `small`
preset's training, and the table's statistics agree with scipy."""

import os
import sys

import pytest

import train_gpt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_ladder  # noqa: E402

TRAINING_FIELDS = ("model", "optim")  # what a training rung may change (data shape aside)


def test_every_rung_resolves_and_changes_something():
    envs = bench_ladder.rung_envs("/nonexistent", steps=40, val_docs=8)
    resolved = [train_gpt.Hyperparameters.from_env(env).as_dict() for env in envs]
    assert resolved[0]["preset"] == "baseline" and resolved[0]["model_dim"] == 64
    for index in range(1, len(resolved)):
        changed = {k for k in resolved[index] if resolved[index][k] != resolved[index - 1][k]}
        assert changed, bench_ladder.TRAINING_RUNGS[index][0]
    # every rung keeps the fixed shape
    assert {r["model_dim"] for r in resolved} == {64} and {r["num_layers"] for r in resolved} == {6}
    assert {r["train_batch_tokens"] for r in resolved} == {2048}


def test_top_training_rung_is_the_small_preset_training_at_the_ladder_shape():
    """The ladder's last training rung must train exactly what PRESET=small trains (same model and
    optimizer settings), so the ladder measures the preset; only quantization and evaluation differ
    (they are the post-training rungs)."""
    top_env = bench_ladder.rung_envs("/nonexistent", steps=40, val_docs=8)[-1]
    shape = {k: v for k, v in top_env.items() if k in bench_ladder.LADDER_SHAPE or k in ("ITERATIONS",)}
    shape.update(TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", ROPE_DIMS="8", PRESET="small")
    assert shape.pop("ORTHOGONAL_INIT") == "0"  # off on every rung until the ladder is rerun with it
    assert train_gpt.Hyperparameters.from_env(shape).model.orthogonal_init
    shape["ORTHOGONAL_INIT"] = "0"
    top, small = train_gpt.Hyperparameters.from_env(top_env), train_gpt.Hyperparameters.from_env(shape)
    assert top.model == small.model
    ignored = {"muon_momentum_warmup_steps"}  # unused once MUON_MOMENTUM_WARMUP_FRAC > 0
    top_optim, small_optim = vars(top.optim), vars(small.optim)
    assert {k: v for k, v in top_optim.items() if k not in ignored} == {
        k: v for k, v in small_optim.items() if k not in ignored}
    assert small.optim.muon_momentum_warmup_frac > 0 and small.optim.ema_horizon_frac > 0


@pytest.mark.parametrize("new, old", [([3.40, 3.42, 3.45], [3.50, 3.48, 3.55]), ([1.0, 1.1], [0.9, 1.3, 1.2, 1.0])])
def test_delta_and_two_sided_welch_p_match_scipy(new, old):
    stats = pytest.importorskip("scipy.stats")
    delta, p_value = bench_ladder.compare(new, old)
    expected = stats.ttest_ind(new, old, equal_var=False)
    assert delta == pytest.approx(sum(new) / len(new) - sum(old) / len(old))
    assert p_value == pytest.approx(expected.pvalue, rel=1e-4)
    assert bench_ladder.compare([1.0], old) == (None, None)
