"""The training loop: loss falls, the wallclock cap is absolute (fake clock), NaN stops the run,
compile warm-up is undone exactly, checkpoints are atomic, main() writes its outputs, and two Gloo
ranks follow the same loss curve as one process."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt
from audit_tokens import audit_token_nll
from tg_helpers import tiny_h

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(dataset, **overrides):
    settings = dict(GRAD_ACCUM_STEPS=1, TRAIN_BATCH_TOKENS=512, ITERATIONS=30, DATA_PATH=dataset.path)
    settings.update(overrides)
    h = tiny_h(**settings)
    torch.manual_seed(h.run.seed)
    model = train_gpt.GPT(h.model, "sdpa")
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    accum, seqs = h.data.batch_layout(1)

    def make_loader():
        return train_gpt.TrainLoader(dataset.train_paths, h.model.vocab_size, h.data.train_seq_len, seqs, accum, 0, 1, h.run.seed)

    return h, model, optimizer, make_loader


def losses_from(lines):
    return [float(m.group(1)) for line in lines for m in [re.search(r"train_loss:([0-9.naif]+)", line)] if m]


def test_short_training_run_lowers_the_loss(tiny_dataset):
    h, model, optimizer, make_loader = setup(tiny_dataset, ITERATIONS=40)
    lines = []
    result = train_gpt.train_model(h, model, optimizer, make_loader, lines.append)
    losses = losses_from(lines)
    assert result.steps == 40 and result.stop_reason == "iterations" and len(losses) == 40
    assert losses[0] > 5.5  # ~ln(512) at init
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0, losses
    assert any(line.startswith("step:40/40 train_loss:") and "step_avg:" in line and "tok/s:" in line for line in lines)



def test_weight_decay_schedule_sets_every_step_s_decay_from_its_progress(tiny_dataset):
    """WEIGHT_DECAY_SCHEDULE in the loop: the decay each optimizer step uses is the base times the
    schedule's factor at that step's progress (step / ITERATIONS without a wallclock cap)."""
    h, model, optimizer, make_loader = setup(tiny_dataset, ITERATIONS=10, WEIGHT_DECAY_SCHEDULE="0.2,0.6,0.5,1.75")
    groups = optimizer.muon.param_groups + optimizer.adam.param_groups
    bases = [group["base_weight_decay"] for group in groups]
    seen, original_step = [], optimizer.step

    def recording_step():
        seen.append([group["weight_decay"] for group in groups])
        return original_step()

    optimizer.step = recording_step
    train_gpt.train_model(h, model, optimizer, make_loader, [].append)
    assert len(seen) == 10
    for step, decays in enumerate(seen):  # independent: numpy's interpolation through the four points
        factor = float(np.interp(step / 10, [0, 0.2, 0.6, 1], [1, 1, 0.5, 1.75]))
        assert decays == pytest.approx([base * factor for base in bases]), step
    assert len({tuple(decays) for decays in seen}) > 5  # it changed from step to step

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ClockedLoader:
    """Wraps a loader; every optimizer step 'takes' `seconds_per_step` on the fake clock."""

    def __init__(self, loader, clock, seconds_per_step):
        self.loader, self.clock, self.seconds_per_step = loader, clock, seconds_per_step

    def next_step(self, seq_len=0):
        self.clock.now += self.seconds_per_step
        return self.loader.next_step(seq_len)


@pytest.mark.parametrize("seconds_per_step, expected_steps", [(1.0, 7), (0.9, 7), (2.5, 2), (7.0, 1)])
def test_wallclock_cap_is_absolute_with_a_fake_clock(tiny_dataset, seconds_per_step, expected_steps):
    h, model, optimizer, make_loader = setup(tiny_dataset, MAX_WALLCLOCK_SECONDS=10, GPTQ_RESERVE_SECONDS=3,
                                             ITERATIONS=1000, WARMUP_STEPS=2, NUM_LOOPS=1)
    clock = FakeClock()
    result = train_gpt.train_model(h, model, optimizer, lambda: ClockedLoader(make_loader(), clock, seconds_per_step),
                                   lambda line: None, clock=clock)
    assert result.stop_reason == "wallclock" and result.steps == expected_steps
    # training + the GPTQ calibration reserve never exceed the cap; warm-up is outside the timed run
    assert result.train_time_s + h.quant.gptq_reserve_seconds <= h.optim.max_wallclock_seconds
    assert result.warmup_time_s == pytest.approx(2 * seconds_per_step)
    assert train_gpt.training_budget_seconds(h) == 7


class PassClockedLoader(ClockedLoader):
    """Every step takes `seconds_per_pass` per layer pass: steps get slower when recurrence turns on."""

    def __init__(self, loader, clock, seconds_per_pass, model):
        super().__init__(loader, clock, 0.0)
        self.seconds_per_pass, self.model = seconds_per_pass, model

    def next_step(self, seq_len=0):
        self.clock.now += self.seconds_per_pass * sum(map(len, self.model.layer_order()))
        return self.loader.next_step(seq_len)


def test_wallclock_cap_holds_when_recurrence_slows_steps_near_the_end(tiny_dataset):
    """Steps take 0.6 s (6 passes) and 1.0 s once recurrence is on (10 passes). Recurrence switches on
    at 6.0 s of a 6.9 s budget: the cap must predict the slower step (6.0 + 1.0 > 6.9) and stop."""
    h, model, optimizer, make_loader = setup(tiny_dataset, MAX_WALLCLOCK_SECONDS=10, GPTQ_RESERVE_SECONDS=3.1,
                                             ITERATIONS=1000, ENABLE_LOOPING_AT=0.85)
    clock = FakeClock()
    result = train_gpt.train_model(h, model, optimizer, lambda: PassClockedLoader(make_loader(), clock, 0.1, model),
                                   lambda line: None, clock=clock)
    assert model.recurrence_active and result.steps == 10
    assert result.train_time_s + h.quant.gptq_reserve_seconds <= h.optim.max_wallclock_seconds


def test_recurrence_switches_on_at_its_training_fraction(tiny_dataset):
    h, model, optimizer, make_loader = setup(tiny_dataset, ITERATIONS=20, ENABLE_LOOPING_AT=0.5)
    lines = []
    train_gpt.train_model(h, model, optimizer, make_loader, lines.append)
    assert any("recurrence: on at step 10 " in line for line in lines)
    assert model.recurrence_active


def test_seq_schedule_trains_each_stage_on_fixed_tokens_and_warm_up_compiles_every_shape(tiny_dataset):
    """TRAIN_SEQ_SCHEDULE (PR 2014): each timed step runs at seq_len_at(progress) with TRAIN_BATCH_TOKENS
    tokens, and every (batch shape, recurrence) the timed loop uses was already run in the compile warm-up
    (a compiled forward sees each shape there first: none compiles inside the timed run)."""
    h, model, optimizer, make_loader = setup(tiny_dataset, ITERATIONS=20, TRAIN_SEQ_LEN=128, WARMUP_STEPS=6,
                                             TRAIN_SEQ_SCHEDULE="32@0.25,64@0.5,128@1", ENABLE_LOOPING_AT=0.4)
    calls = []

    def forward(inputs, targets, layout):
        calls.append((tuple(inputs.shape), model.recurrence_active))
        return model(inputs, targets, layout)

    lines = []
    result = train_gpt.train_model(h, model, optimizer, make_loader, lines.append, forward=forward)
    warm_up, timed = calls[:h.optim.warmup_steps], calls[h.optim.warmup_steps:]
    assert result.steps == 20 and len(timed) == 20
    expected = [(512 // length, length) for length in
                (train_gpt.seq_len_at(h.data.seq_schedule(), step / 20) for step in range(20))]
    assert [shape for shape, _ in timed] == expected
    assert set(timed) <= set(warm_up) and {shape for shape, _ in timed} == {(16, 32), (8, 64), (4, 128)}
    assert sum("train_seq_len:" in line for line in lines) == 3


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
    h, model, optimizer, make_loader = setup(tiny_dataset, ITERATIONS=20, CHECKPOINT_EVERY=2)
    calls = []

    def forward(inputs, targets, layout=None):
        calls.append(1)
        loss = model(inputs, targets, layout)
        return loss * float("nan") if len(calls) == 5 else loss

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = str(run_dir / "checkpoint.pt")
    lines = []
    with pytest.raises(train_gpt.TrainingDiverged, match="at step 5") as error:
        train_gpt.train_model(h, model, optimizer, make_loader, lines.append, forward=forward,
                              checkpoint_dir=str(run_dir))
    assert error.value.step == 5
    assert any("non-finite train loss" in line and "checkpoint.pt" in line for line in lines)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    # periodic checkpoints are never named final_model.pt (that name means a finished run), and no
    # temporary file is left behind
    assert os.listdir(run_dir) == ["checkpoint.pt"]


def test_compile_warmup_is_undone_exactly(tiny_dataset):
    """A run with warm-up steps must equal a run without: weights, optimizer state and data restored."""
    curves = []
    for warmup in (0, 3):
        h, model, optimizer, make_loader = setup(tiny_dataset, ITERATIONS=6, WARMUP_STEPS=warmup)
        lines = []
        train_gpt.train_model(h, model, optimizer, make_loader, lines.append)
        curves.append((losses_from(lines), [p.detach().clone() for p in model.parameters()]))
    assert curves[0][0] == curves[1][0]
    assert all(torch.equal(a, b) for a, b in zip(curves[0][1], curves[1][1]))


def test_a_training_step_reads_one_value_from_the_device(tiny_dataset, monkeypatch):
    """The timed loop's only device-to-host transfer per step is the loss, read before the update; the
    clip, the optimizer, the EMA and the wallclock decision never read a tensor. Counted through every
    Tensor -> Python conversion (item, tolist, float, int, bool, format) over 6 steps with EMA and clipping."""
    h, model, optimizer, make_loader = setup(tiny_dataset, ITERATIONS=6, TRAIN_LOG_EVERY=2, GRAD_CLIP_NORM=0.3)
    ema = train_gpt.ExponentialMovingAverage(model, 0.9)
    reads = []

    def adam_step_counter(tensor):  # AdamW's step counts live on the host here (CUDA: fused, on device)
        return any(tensor is state.get("step") for state in optimizer.adam.state.values())
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__format__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            if not adam_step_counter(self):
                reads.append(_name)
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    result = train_gpt.train_model(h, model, optimizer, make_loader, lambda line: None, ema=ema)
    monkeypatch.undo()
    assert result.steps == 6 and reads == ["item"] * 6, reads


def test_ema_tracks_the_weights():
    h = tiny_h()
    model = train_gpt.GPT(h.model)
    ema = train_gpt.ExponentialMovingAverage(model, decay=0.5)
    start = model.tok_emb.weight.detach().clone()
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    ema.update(model)
    ema.copy_to(model)
    assert torch.allclose(model.tok_emb.weight, start + 0.5)


def test_atomic_write_replaces_without_partial_files_and_with_normal_permissions(tmp_path):
    path = str(tmp_path / "model.pt")
    train_gpt.atomic_write_bytes(path, b"first")
    train_gpt.atomic_write_bytes(path, b"second")
    assert os.listdir(tmp_path) == ["model.pt"] and open(path, "rb").read() == b"second"
    umask = os.umask(0o022)
    try:
        train_gpt.atomic_write_bytes(path, b"third")
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's 0600

    class Unwritable(bytes):  # a failure mid-write leaves the old file and no temporary behind
        def __len__(self):
            raise OSError("disk full")
    with pytest.raises(TypeError):
        train_gpt.atomic_write_bytes(path, object())
    assert os.listdir(tmp_path) == ["model.pt"] and open(path, "rb").read() == b"third"


TINY_MAIN_ENV = dict(PRESET="tiny", VOCAB_SIZE="512", ITERATIONS="8", MAX_WALLCLOCK_SECONDS="0",
                     GPTQ_RESERVE_SECONDS="0", TRAIN_BATCH_TOKENS="2048", WARMUP_STEPS="1", TRAIN_LOG_EVERY="1",
                     POST_TRAINING_ENABLED="0", EMA_DECAY="0.9", ATTN_BACKEND="sdpa")


def test_main_trains_and_writes_checkpoint_log_and_summary(tiny_dataset, tmp_path):
    artifact_dir = tmp_path / "run"
    env = dict(TINY_MAIN_ENV, DATA_PATH=tiny_dataset.path, ARTIFACT_DIR=str(artifact_dir), RUN_ID="t1")
    summary = train_gpt.main(env)
    on_disk = json.loads((artifact_dir / "summary.json").read_text())
    for key in ("steps", "train_time_s", "tokens_per_s", "pre_quant_val_bpb", "quant_val_bpb", "sliding_val_bpb",
                "ttt_val_bpb", "ttt_mode", "code_bytes", "model_bytes", "artifact_bytes", "artifact_limit_ok",
                "train_time_ok", "eval_time_s", "eval_time_ok", "device", "world_size", "seed", "hyperparameters"):
        assert key in on_disk
    assert on_disk["steps"] == 8 and on_disk["world_size"] == 1 and on_disk["device"] == "cpu"
    assert on_disk["hyperparameters"]["vocab_size"] == 512 and summary["run_id"] == "t1"
    log = (artifact_dir / "train.log").read_text()
    assert "hparam VOCAB_SIZE=512" in log and "attention:sdpa" in log and "step:8/8 train_loss:" in log
    # the checkpoint holds the EMA weights and re-runs post-training without retraining
    model = train_gpt.GPT(tiny_h().model)
    assert train_gpt.load_checkpoint(str(artifact_dir / "final_model.pt"), model) == 8
    again = train_gpt.main(dict(env, POST_TRAINING_ONLY="1"))
    assert again["steps"] == 8 and again["train_time_s"] is None


def test_main_fails_early_on_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA_PATH"):
        train_gpt.main(dict(TINY_MAIN_ENV, DATA_PATH=str(tmp_path / "nothing"), ARTIFACT_DIR=str(tmp_path / "run")))


POST_TRAINING_ENV = dict(POST_TRAINING_ENABLED="1", GPTQ_CALIBRATION_BATCHES="2", VAL_MAX_DOCS="12",
                         SLIDING_WINDOW_ENABLED="1",
                         EVAL_SEQ_LEN="128", EVAL_BATCH_TOKENS="1024", SLIDING_STRIDE="64", TTT_MODE="chunked",
                         TTT_CHUNK_TOKENS="512", TTT_EPOCHS="1", SAVE_TOKEN_NLL="1", QUANT_SMALL_TENSOR_NUMEL="1024")


def test_post_training_evaluates_exactly_the_artifact_it_wrote(tiny_dataset, tmp_path, monkeypatch):
    """A full run: quantize, write the counted artifact, evaluate. Between the preflight check (which
    loads the val data to validate it, and keeps nothing) and evaluation, only training shards are read
    (by training and GPTQ calibration); the quantized score is reproduced from the artifact file alone;
    the saved per-token NLLs reproduce the final score."""
    reads = []
    real_read_shard, real_evaluate, real_preflight = (train_gpt.read_shard, train_gpt.evaluate_after_training,
                                                      train_gpt.preflight)
    monkeypatch.setattr(train_gpt, "read_shard", lambda path: reads.append(os.path.basename(path)) or
                        real_read_shard(path))

    def preflight(*args, **kwargs):
        result = real_preflight(*args, **kwargs)
        reads.append("<preflight done>")
        return result

    monkeypatch.setattr(train_gpt, "preflight", preflight)

    def evaluate(*args, **kwargs):
        reads.append("<evaluation starts>")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_gpt, "evaluate_after_training", evaluate)
    artifact_dir = tmp_path / "run"
    env = dict(TINY_MAIN_ENV, **POST_TRAINING_ENV, DATA_PATH=tiny_dataset.path, ARTIFACT_DIR=str(artifact_dir))
    summary = train_gpt.main(env)

    assert any(name.startswith("fineweb_val_") for name in reads[:reads.index("<preflight done>")])
    before_eval = reads[reads.index("<preflight done>") + 1: reads.index("<evaluation starts>")]
    assert before_eval and all(name.startswith("fineweb_train_") for name in before_eval), reads
    assert any(name.startswith("fineweb_val_") for name in reads[len(before_eval):])

    model_file, code_file = artifact_dir / "final_model.ptz", artifact_dir / "train_gpt_packed.py"
    assert summary["model_bytes"] == model_file.stat().st_size
    assert summary["code_bytes"] == code_file.stat().st_size == train_gpt.counted_code_bytes(train_gpt.__file__)
    assert summary["artifact_bytes"] == summary["model_bytes"] + summary["code_bytes"]
    assert summary["artifact_limit_ok"] is True
    assert summary["train_time_ok"] is True and summary["gptq_calibration_time_s"] >= 0
    log = (artifact_dir / "train.log").read_text()
    assert f"Serialized model quantized+rans: {summary['model_bytes']} bytes" in log
    assert f"Total submission size quantized+rans: {summary['artifact_bytes']} bytes" in log

    # the quantized score, recomputed from nothing but the artifact file and the val shards
    h = train_gpt.Hyperparameters.from_env(env)
    model = train_gpt.GPT(h.model, "sdpa")
    train_gpt.load_quantized_into(model, train_gpt.read_artifact(str(model_file)))
    model.set_recurrence(h.model.recurrence_enabled)
    val = train_gpt.load_val_data(h.data.val_glob, h.model.vocab_size, None, h.data.val_max_docs)
    again = train_gpt.eval_stream(model, val, h.eval.eval_seq_len, h.eval.batch_rows())
    assert again["val_bpb"] == pytest.approx(summary["quant_val_bpb"], rel=1e-9, abs=1e-9)
    assert summary["pre_quant_val_bpb"] != summary["quant_val_bpb"]
    audited = audit_token_nll(str(artifact_dir / "token_nll.npz"))
    assert audited["val_bpb"] == pytest.approx(summary["ttt_val_bpb"], rel=1e-6)
    assert audited["scored_tokens"] == int(val.num_tokens) - 1  # every token after the first, once
    assert audited["bos_targets"] == val.num_docs - 1


    # the counted (packed) script is a working train_gpt.py: re-quantizing and re-evaluating the saved
    # checkpoint with it gives the same artifact and scores, and it counts itself as the same code
    rerun_dir = tmp_path / "rerun"
    rerun_dir.mkdir()
    shutil.copy(artifact_dir / "final_model.pt", rerun_dir / "final_model.pt")
    full_env = dict(os.environ, **dict(env, ARTIFACT_DIR=str(rerun_dir), POST_TRAINING_ONLY="1", OMP_NUM_THREADS="1"))
    result = subprocess.run([sys.executable, str(code_file)], env=full_env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rerun = json.loads((rerun_dir / "summary.json").read_text())
    assert (rerun_dir / "final_model.ptz").read_bytes() == model_file.read_bytes()
    assert (rerun_dir / "train_gpt_packed.py").read_bytes() == code_file.read_bytes()
    for key in ("pre_quant_val_bpb", "quant_val_bpb", "sliding_val_bpb", "code_bytes", "artifact_bytes"):
        assert rerun[key] == pytest.approx(summary[key], rel=1e-9), key


class SteppingLoader:
    """A training stream whose every step takes `seconds` of fake time."""

    def __init__(self, clock, seconds):
        self.clock, self.seconds, self.steps = clock, seconds, 0

    def next_step(self):
        self.clock.now += self.seconds
        self.steps += 1
        return [(torch.full((1, 8), 5), torch.full((1, 8), 5))]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("time_left,estimate,expected", [
    (100.0, 0.0, 6), (3.5, 0.0, 2), (0.5, 0.0, 1), (-1.0, 0.0, 0), (0.5, 1.0, 0), (2.5, 1.0, 1), (3.5, 1.0, 2)])
def test_gptq_calibration_stops_at_the_wallclock_cap(time_left, estimate, expected):
    """Calibration counts as training: a batch is taken only while two of the slowest batch still fit;
    before the first batch is timed, the training micro-step time (`estimate`) stands in for it."""
    clock = FakeClock()
    loader = SteppingLoader(clock, 1.0)
    h = tiny_h(GPTQ_CALIBRATION_BATCHES=6, GPTQ_CALIBRATION_SOURCE="train")
    context = train_gpt.RunContext("", lambda line: None, torch.device("cpu"), make_train_loader=lambda: loader,
                                   clock=clock, training_start=0.0, micro_step_seconds=estimate)
    deadline = clock() + time_left
    batches = list(train_gpt.calibration_batches(h, None, context, lambda: deadline - clock()))
    assert len(batches) == expected == loader.steps
    assert all(batch.shape == (1, 8) for batch in batches)  # inputs only, from the training stream
    if estimate >= 1.0 or time_left >= 2.0:  # a known batch cost: the cap holds exactly
        assert clock() <= deadline
    # without an estimate (no timed training step) one batch may be taken with
    # less than its cost left, but never after the deadline has passed


def test_generated_calibration_samples_from_the_model_without_data():
    h = tiny_h(GPTQ_CALIBRATION_SOURCE="generated", GPTQ_CALIBRATION_BATCHES=2, GPTQ_GENERATED_SEQ_LEN=12,
               TRAIN_BATCH_TOKENS=256, GRAD_ACCUM_STEPS=1)
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "sdpa").eval()
    context = train_gpt.RunContext("", lambda line: None, torch.device("cpu"),
                                   make_train_loader=lambda: pytest.fail("generated calibration must not read data"),
                                   clock=FakeClock())
    first = list(train_gpt.calibration_batches(h, model, context, lambda: math.inf))
    second = list(train_gpt.calibration_batches(h, model, context, lambda: math.inf))
    assert len(first) == 2 and all(batch.shape == (h.data.batch_layout(1)[1], 12) for batch in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # seeded by SEED and rank
    assert all(bool((batch[:, 0] == train_gpt.BOS_ID).all()) and int(batch.max()) < h.model.vocab_size for batch in first)
    assert len({tuple(row.tolist()) for batch in first for row in batch}) > 1
    hessians = train_gpt.collect_hessians(model, first)
    assert "tok_emb.weight" in hessians and len(hessians) > 3


def test_calibration_windows_use_every_window_of_this_ranks_shards_once_per_pass(tmp_path):
    """GPTQ_CALIBRATION_SOURCE=windows (PR 1736/1855): every row is a window of one of this rank's shards
    (paths[rank::world]) starting at that shard's phase + a multiple of TRAIN_SEQ_LEN; one pass uses
    every such window exactly once (a pass: as many rows as the shards hold windows), then the shards
    are cut again; the draw is seeded by the rank alone; no shard of another rank is read. Fails on
    copies that take all shards on every rank, draw a start without popping it (repeats), or cut a
    shard's windows at a phase other than its first window's."""
    from conftest import write_shard
    rng = np.random.default_rng(0)
    seq_len, world = 16, 3
    shards = [rng.integers(0, 60000, size) for size in (100, 250, 17, 190, 64, 333, 40)]
    paths = [write_shard(str(tmp_path / f"fineweb_train_{i:06d}.bin"), tokens) for i, tokens in enumerate(shards)]
    for rank in range(world):
        mine = list(range(rank, len(paths), world))
        windows = train_gpt.CalibrationWindows(paths, 65536, seq_len, rank, world)
        total = sum(len(starts) for starts in windows.starts)  # one pass
        rows = windows.batch(total).numpy()
        found = {}
        for row in rows:  # locate every row in this rank's shards (random 16-token rows are unique)
            hits = [(i, start) for i in mine for start in range(len(shards[i]) - seq_len)
                    if np.array_equal(shards[i][start: start + seq_len], row)]
            assert len(hits) == 1, "a row that is not a window of exactly one of this rank's shards"
            found.setdefault(hits[0][0], []).append(hits[0][1])
        # every shard long enough for a window (+1 target) is used, each of its windows once: its
        # phase (< seq_len) is where its first window starts
        assert set(found) == {i for i in mine if len(shards[i]) >= seq_len + 1}
        for index, starts in found.items():
            phase = min(starts)
            assert phase < seq_len and sorted(starts) == list(range(phase, len(shards[index]) - seq_len, seq_len))
        again = train_gpt.CalibrationWindows(paths, 65536, seq_len, rank, world).batch(total + 5)
        assert np.array_equal(again[:total].numpy(), rows)  # seeded by the rank alone
        assert windows.batch(5).shape == (5, seq_len)  # a new pass after the first is used up
    with pytest.raises(ValueError, match="TRAIN_SEQ_LEN"):
        train_gpt.CalibrationWindows(paths, 65536, 400, 0, 1)
    with pytest.raises(ValueError, match="VOCAB_SIZE"):
        train_gpt.CalibrationWindows(paths, 1000, seq_len, 0, 1).batch(3)


def test_windows_calibration_reads_only_train_shards(tiny_dataset):
    """The default calibration source draws its rows from TRAIN_FILES only: the batches hold only
    training tokens, and the run's own loader is never asked for data."""
    h = tiny_h(DATA_PATH=tiny_dataset.path, GPTQ_CALIBRATION_BATCHES=2, TRAIN_BATCH_TOKENS=256, GRAD_ACCUM_STEPS=1)
    assert h.quant.gptq_calibration_source == "windows"
    context = train_gpt.RunContext("", lambda line: None, torch.device("cpu"),
                                   make_train_loader=lambda: pytest.fail("windows calibration reads shards itself"),
                                   clock=FakeClock())
    batches = list(train_gpt.calibration_batches(h, None, context, lambda: math.inf))
    assert len(batches) == 2 and all(batch.shape == (h.data.batch_layout(1)[1], h.data.train_seq_len)
                                     for batch in batches)
    train = np.concatenate([train_gpt.read_shard(path) for path in train_gpt.shard_paths(h.data.train_glob, "x")])
    windows = np.lib.stride_tricks.sliding_window_view(train, h.data.train_seq_len)
    for row in torch.cat(batches).numpy():
        assert (windows == row).all(axis=1).any()


def run_script(launcher, env, cwd):
    full_env = dict(os.environ, **env, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run(launcher + [os.path.join(REPO_ROOT, "train_gpt.py")], env=full_env, cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return losses_from(result.stdout.splitlines())


def test_two_gloo_ranks_match_one_process(tiny_dataset, tmp_path):
    """torchrun --nproc_per_node=2 (Gloo) with the same global batch follows the 1-process loss curve.
    Tolerance 2e-3 absolute per step: only float summation order differs (rank all-reduce vs sequential
    accumulation), and Newton-Schulz keeps such differences small over a few steps."""
    env = dict(TINY_MAIN_ENV, **POST_TRAINING_ENV)
    env.update(DATA_PATH=tiny_dataset.path, ITERATIONS="5", WARMUP_STEPS="0",
               EMA_DECAY="0", TRAIN_BATCH_TOKENS="2048", GRAD_ACCUM_STEPS="0", SAVE_TOKEN_NLL="0",
               # what one process cannot reproduce: a clip of each rank's own half-batch gradient (PR 1855's
               # local scope) and LoRA A factors warm-started across the batches one rank scores
               GRAD_CLIP_SCOPE="global", PHASED_TTT_WARM_START_A="0")
    single = run_script([sys.executable], dict(env, ARTIFACT_DIR=str(tmp_path / "one")), tmp_path)
    double = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                        dict(env, ARTIFACT_DIR=str(tmp_path / "two")), tmp_path)
    assert len(single) == len(double) == 5
    assert single[-1] < single[0]
    assert all(abs(a - b) < 2e-3 for a, b in zip(single, double)), (single, double)
    # post-training under Gloo: rank 0 writes one artifact, both ranks evaluate the weights read back
    # from it; the scores follow the single process to the same tolerance as the weights they came from
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["artifact_limit_ok"]
    assert abs(two["model_bytes"] - one["model_bytes"]) < 0.02 * one["model_bytes"]
    for key in ("pre_quant_val_bpb", "quant_val_bpb", "sliding_val_bpb", "ttt_val_bpb"):
        assert abs(two[key] - one[key]) < 5e-3, (key, one[key], two[key])
    assert two["evals"]["quantized"]["scored_tokens"] == one["evals"]["quantized"]["scored_tokens"]


def test_tokenizer_with_a_different_vocab_size_is_rejected(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = [f"document number {i} about topic {i % 7} and more words" for i in range(200)]
    prefix = str(tmp_path / "tok")
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=64,
                                             model_type="bpe", minloglevel=2)
    h = tiny_h(TOKENIZER_PATH=prefix + ".model", VOCAB_SIZE=512)
    with pytest.raises(ValueError, match="TOKENIZER_PATH.*64 tokens but VOCAB_SIZE=512"):
        train_gpt.check_tokenizer(h)
    train_gpt.check_tokenizer(tiny_h(TOKENIZER_PATH=prefix + ".model", VOCAB_SIZE=64))
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        train_gpt.check_tokenizer(tiny_h(TOKENIZER_PATH=str(tmp_path / "missing.model")))


def _flat_packing_worker(rank, world_size, port, shard_path, expected_grads, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        loss, grads = _flat_step(shard_path, accum=1, rank=rank, world_size=world_size)
        mismatched = []
        for name, grad in grads.items():
            dist.all_reduce(grad)  # sum of the ranks' gradients
            if not torch.allclose(grad / world_size, torch.from_numpy(expected_grads[name]), atol=1e-6, rtol=1e-4):
                mismatched.append(name)
        queue.put((rank, loss, mismatched))  # small results only: a full pipe would block the join
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _flat_step(shard_path, accum, rank, world_size):
    """One flat-packed varlen forward+backward of the first step: (loss averaged over ranks, local grads)."""
    from tg_helpers import perturb_parameters

    h = tiny_h(TRAIN_SEQ_LEN=32)
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "varlen")
    perturb_parameters(model, seed=0)
    model.set_recurrence(True)
    loader = train_gpt.TrainLoader([shard_path], 512, 32, 2, accum, rank, world_size, seed=0)
    loss = train_gpt.forward_backward(model, loader.next_step(), train_gpt.TrainingOptimizer(model, h.optim),
                                      "varlen", "fp32", flat=True)
    return float(loss), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_flat_packing_on_two_gloo_ranks_matches_one_process(tmp_path):
    """The same global step packed flat on 2 Gloo ranks (one micro-batch each) and on one process (two
    micro-batches): the same loss, and the ranks' mean gradient is the single process's gradient."""
    from conftest import make_documents, write_shard
    from tg_helpers import spawn_gloo_ranks

    path = write_shard(tmp_path / "fineweb_train_000000.bin",
                       np.concatenate(make_documents(30, 512, seed=2, min_len=5, max_len=90)))
    single_loss, single_grads = _flat_step(path, accum=2, rank=0, world_size=1)
    expected = {name: grad.numpy() for name, grad in single_grads.items()}
    queue = spawn_gloo_ranks(_flat_packing_worker, 2, path, expected)
    results = sorted(queue.get() for _ in range(2))
    for _, loss, mismatched in results:
        assert loss == pytest.approx(single_loss, rel=1e-5) and mismatched == []


def test_flat_training_loss_is_the_mean_over_segments_scored_on_their_own(tiny_dataset):
    """forward_backward with TRAIN_PACKING=flat: the loss of a micro-batch joined into one row equals the
    mean token NLL of its segments (each BOS, and every TRAIN_SEQ_LEN tokens into a document) each run as
    its own row, with the same targets. SmearGate off: a cut inside a document keeps its predecessor
    token in the flat row (as in PR 1855), which a segment run alone cannot have."""
    h = tiny_h(TRAIN_SEQ_LEN=32, SMEAR_GATE=0)
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "varlen")
    from tg_helpers import perturb_parameters
    perturb_parameters(model, seed=1)
    batches = train_gpt.TrainLoader(tiny_dataset.train_paths, 512, 32, 4, 1, 0, 1, seed=0).next_step()
    loss = train_gpt.forward_backward(model, batches, train_gpt.TrainingOptimizer(model, h.optim), "varlen", "fp32",
                                      flat=True)
    inputs, targets = batches[0][0].reshape(-1), batches[0][1].reshape(-1)
    starts, doc_start = [], 0
    for position, token in enumerate(inputs.tolist()):
        doc_start = position if position == 0 or token == train_gpt.BOS_ID else doc_start
        if (position - doc_start) % 32 == 0:
            starts.append(position)
    assert len(starts) > int((inputs == train_gpt.BOS_ID).sum()) + 1 - int(inputs[0] == train_gpt.BOS_ID)
    bounds = starts + [inputs.numel()]
    with torch.no_grad():
        total = sum(model.per_token_nll(inputs[a:b][None], targets[a:b][None]).sum() for a, b in zip(bounds, bounds[1:]))
    assert float(loss) == pytest.approx(float(total) / inputs.numel(), rel=1e-5)


@pytest.mark.parametrize("packing", ["rows", "flat"])
def test_warm_up_compiles_cu_seqlens_buckets_64_to_256_in_both_recurrence_states(tiny_dataset, packing):
    """A compiled varlen step is one graph per (cu_seqlens bucket, recurrence state); the warm-up runs
    buckets 64..256 (PR 1855's) in both states, with BOS ids spread over a real batch, so a batch with
    more or fewer documents than the warm-up's real steps does not compile inside the timed run. Every
    (bucket, shape, state) of the timed steps was run in the warm-up."""
    h = tiny_h(GRAD_ACCUM_STEPS=1, TRAIN_BATCH_TOKENS=512, ITERATIONS=6, DATA_PATH=tiny_dataset.path,
               WARMUP_STEPS=2, ENABLE_LOOPING_AT=0.5, TRAIN_PACKING=packing)
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "varlen")
    calls = []

    def forward(inputs, targets, layout):
        calls.append((layout.cu_seqlens.numel(), tuple(inputs.shape), model.recurrence_active))
        return model(inputs, targets, layout)

    def make_loader():
        return train_gpt.TrainLoader(tiny_dataset.train_paths, 512, 128, 4, 1, 0, 1, h.run.seed)

    result = train_gpt.train_model(h, model, train_gpt.TrainingOptimizer(model, h.optim), make_loader, [].append,
                                   forward=forward)
    timed, warm_up = calls[-result.steps:], calls[:-result.steps]
    shape = (1, 512) if packing == "flat" else (4, 128)
    assert {(bucket, shape, state) for bucket in (64, 128, 192, 256) for state in (False, True)} <= set(warm_up)
    assert set(timed) <= set(warm_up) and {state for _, _, state in timed} == {False, True}


@pytest.mark.parametrize("flat", [False, True], ids=["rows", "flat"])
def test_warm_up_batches_reach_every_bucket_a_record_step_can_have(flat):
    """At PR 1855's per-rank shape (48 rows of 2048) each of the buckets 64..256 gets a warm-up batch whose
    layout, counted independently (every BOS, every row start or every 2048 tokens into a document),
    lands in it; a bucket below the fewest segments the shape allows (96 rows of 1024 need 96) gets none."""
    ids = torch.randint(8, 512, (48, 2048), generator=torch.Generator().manual_seed(0))
    for bucket in (64, 128, 192, 256):
        (inputs, targets), = train_gpt.with_documents_for_bucket([(ids, ids + 1)], bucket, flat)
        assert inputs.shape == ids.shape and torch.equal(targets, ids + 1)
        stream, starts, doc_start = inputs.flatten().tolist(), 0, 0
        for position, token in enumerate(stream):
            doc_start = position if token == train_gpt.BOS_ID or (position % 2048 == 0 and not flat) else doc_start
            starts += (position - doc_start) % 2048 == 0
        assert bucket - 64 < starts + 1 <= bucket, (bucket, starts)
    assert train_gpt.with_documents_for_bucket([(ids.view(96, 1024), ids.view(96, 1024))], 64, flat) is None
