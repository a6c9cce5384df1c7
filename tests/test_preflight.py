"""What a run checks before its first training step, and what a stopped run leaves behind.

Each bad input fails in `preflight` (or `start_run`) with an error that names the file or the
environment variable, before any training step (training is replaced by a function that fails the
test, and the log has no `step:` line). SIGTERM stops training between two steps with interrupted.pt,
a log line and a non-zero exit; checkpoints carry a sha256 that loading verifies.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import prepare_caseops_data as prep
import train_gpt
from conftest import write_shard
from test_train_gpt_training import TINY_MAIN_ENV
from tg_helpers import tiny_h

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKENIZER = os.path.join(REPO_ROOT, "tokenizers", "demo_caseops_1024.model")
OPERATOR_IDS = [4, 5, 6, 7]  # U+E001..U+E004 in the demo CaseOps tokenizer


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """A real prepare_caseops_data.py output (demo CaseOps tokenizer, vocab 1024): train shards, one val
    shard, its byte sidecar and manifest.json. Tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("caseops")
    rng = random.Random(0)
    words = ["The", "cat", "NASA", "sat", "on", "McDonald", "mat", "Data", "golf", "iPhone", "caf\u00e9", "x"]
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(40):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            handle.write(json.dumps({"text": text}) + "\n")
    out = folder / "data"
    assert prep.main(["--docs", str(folder / "docs.jsonl"), "--out", str(out), "--quiet", "--sp", DEMO_TOKENIZER,
                      "--val-docs", "10", "--workers", "1", "--shard-tokens", "2000"]) == 0
    return out


@pytest.fixture
def caseops_copy(caseops_data, tmp_path):
    return shutil.copytree(caseops_data, tmp_path / "data")


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to train fails the test: an error must come before the first step."""
    monkeypatch.setattr(train_gpt, "train_run", lambda *args, **kwargs: pytest.fail("training started"))


def main_env(data_path, artifact_dir, **overrides):
    return dict(TINY_MAIN_ENV, DATA_PATH=str(data_path), ARTIFACT_DIR=str(artifact_dir), POST_TRAINING_ENABLED="1",
                **overrides)


def caseops_env(data_path, artifact_dir, **overrides):
    return main_env(data_path, artifact_dir, VOCAB_SIZE="1024", TOKENIZER_PATH=DEMO_TOKENIZER, **overrides)


def fails_before_training(env, error_type, *names):
    """Run main(env); it must raise `error_type` naming every one of `names`, log the error, and log no step."""
    with pytest.raises(error_type) as error:
        train_gpt.main(env)
    for name in names:
        assert str(name) in str(error.value), (name, str(error.value))
    log = open(os.path.join(env["ARTIFACT_DIR"], "train.log")).read()
    assert f"error: {error_type.__name__}: {error.value}" in log
    assert "step:" not in log and "preflight: ok" not in log
    return str(error.value)


def test_prepared_data_passes_preflight(caseops_data):
    h = train_gpt.Hyperparameters.from_env(caseops_env(caseops_data, "unused"))
    assert train_gpt.preflight(h) == sorted(str(path) for path in caseops_data.glob("fineweb_train_*.bin"))


def test_val_shard_with_a_bad_header_is_refused(tiny_dataset, tmp_path, no_training):
    tokens = train_gpt.read_shard(tiny_dataset.val_paths[0])
    write_shard(tiny_dataset.val_paths[0], tokens, magic=12345)
    fails_before_training(main_env(tiny_dataset.path, tmp_path / "run"), ValueError, tiny_dataset.val_paths[0], "magic")


def test_train_shard_with_a_truncated_body_is_refused(tiny_dataset, tmp_path, no_training):
    path = tiny_dataset.train_paths[1]
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 10)
    fails_before_training(main_env(tiny_dataset.path, tmp_path / "run"), ValueError, path, "header declares")


def test_sidecar_shorter_than_its_shard_is_refused(tiny_dataset, tmp_path, no_training):
    byte_counts = train_gpt.read_shard(tiny_dataset.val_byte_paths[0])
    write_shard(tiny_dataset.val_byte_paths[0], byte_counts[:-1])
    fails_before_training(main_env(tiny_dataset.path, tmp_path / "run"), ValueError, tiny_dataset.val_byte_paths[0],
                          "byte entries")


def test_sidecar_that_differs_from_the_manifest_is_refused(caseops_copy, tmp_path, no_training):
    """Doubling every byte count keeps the sidecar's length (and halves val_bpb); only the manifest's
    sha256 can catch it. Without a manifest the same file loads, which is why the check exists."""
    sidecar = caseops_copy / "fineweb_val_bytes_000000.bin"
    write_shard(sidecar, train_gpt.read_shard(str(sidecar)) * 2)
    fails_before_training(caseops_env(caseops_copy, tmp_path / "run"), ValueError, sidecar, "manifest.json")
    os.remove(caseops_copy / "manifest.json")
    train_gpt.preflight(train_gpt.Hyperparameters.from_env(caseops_env(caseops_copy, tmp_path / "run")))


def test_val_shard_that_differs_from_the_manifest_is_refused(caseops_copy, tmp_path, no_training):
    shard = caseops_copy / "fineweb_val_000000.bin"
    tokens = train_gpt.read_shard(str(shard)).copy()
    tokens[5] = 9 if tokens[5] != 9 else 10
    write_shard(shard, tokens)
    fails_before_training(caseops_env(caseops_copy, tmp_path / "run"), ValueError, shard, "sha256")


def test_val_stream_that_does_not_start_with_bos_is_refused(tiny_dataset, tmp_path, no_training):
    tokens = train_gpt.read_shard(tiny_dataset.val_paths[0])
    byte_counts = train_gpt.read_shard(tiny_dataset.val_byte_paths[0])
    assert tokens[0] == train_gpt.BOS_ID
    write_shard(tiny_dataset.val_paths[0], tokens[1:])
    write_shard(tiny_dataset.val_byte_paths[0], byte_counts[1:])
    fails_before_training(main_env(tiny_dataset.path, tmp_path / "run"), ValueError,
                          os.path.join(tiny_dataset.path, "fineweb_val_"), "must start with BOS")


def test_artifact_folder_that_cannot_be_created_is_refused(tiny_dataset, tmp_path, no_training):
    """Tests run as root, which writes into read-only folders, so the folder's parent is a file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    artifact_dir = blocker / "run"
    with pytest.raises(OSError, match=f"ARTIFACT_DIR={artifact_dir}: not writable"):
        train_gpt.main(main_env(tiny_dataset.path, artifact_dir))


def test_train_files_that_match_validation_files_are_refused(tiny_dataset, tmp_path, no_training):
    env = main_env(tiny_dataset.path, tmp_path / "run", TRAIN_FILES=os.path.join(tiny_dataset.path, "*.bin"))
    fails_before_training(env, ValueError, "TRAIN_FILES", "fineweb_val_")
    # a byte sidecar is a valid shard too, and must not be trainable either (this glob skips the val shard)
    env.update(TRAIN_FILES=os.path.join(tiny_dataset.path, "fineweb_*[ns]_000000.bin"))
    fails_before_training(env, ValueError, "TRAIN_FILES", tiny_dataset.val_byte_paths[0])


def test_user_defined_pieces_are_counted_from_the_model_proto(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    assert train_gpt.user_defined_piece_count(open(DEMO_TOKENIZER, "rb").read()) == 4
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"document {i} about topic {i % 7} and other words" for i in range(300)))
    for symbols, model_type in (([], "bpe"), (["<tag>", "\ue001", "\ue002"], "unigram")):
        prefix = str(tmp_path / model_type)
        sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=40,
                                                 model_type=model_type, user_defined_symbols=symbols, minloglevel=2)
        assert train_gpt.user_defined_piece_count(open(prefix + ".model", "rb").read()) == len(symbols)


def test_piece_rule_is_refused_for_a_caseops_tokenizer(caseops_copy, tmp_path, no_training):
    """Without sidecars the piece rule would count each operator as its 3 UTF-8 bytes, though it stands
    for none of the original text: here exactly 3 x (operator tokens) bytes too many."""
    tokens = train_gpt.read_shard(str(caseops_copy / "fineweb_val_000000.bin")).astype(np.int64)
    true_bytes = int(train_gpt.read_shard(str(caseops_copy / "fineweb_val_bytes_000000.bin")).sum())
    piece_rule_bytes = int(train_gpt.piece_byte_counts(tokens, train_gpt.piece_byte_tables(DEMO_TOKENIZER, 1024)).sum())
    operators = int(np.isin(tokens, OPERATOR_IDS).sum())
    assert operators > 0 and piece_rule_bytes == true_bytes + 3 * operators
    os.remove(caseops_copy / "fineweb_val_bytes_000000.bin")
    fails_before_training(caseops_env(caseops_copy, tmp_path / "run"), ValueError, "TOKENIZER_PATH", "sidecars")


def save_tiny_checkpoint(path, step=7):
    h = tiny_h()
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "sdpa")
    train_gpt.save_checkpoint(str(path), model, h, step)
    return h, model


def test_checkpoint_loads_only_when_its_sha256_matches(tmp_path):
    path = tmp_path / "checkpoint.pt"
    h, model = save_tiny_checkpoint(path)
    loaded = train_gpt.GPT(h.model, "sdpa")
    assert train_gpt.load_checkpoint(str(path), loaded) == 7
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # edited: one weight changed, the file otherwise well-formed
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["tok_emb.weight"][0, 0] += 1.0
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f"checkpoint {path}: sha256 mismatch"):
        train_gpt.load_checkpoint(str(path), loaded)
    # damaged: bytes flipped in the middle of the file (torch.load may fail, or load wrong values)
    save_tiny_checkpoint(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(b ^ 0xFF for b in data[middle: middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checkpoint {path}: "):
        train_gpt.load_checkpoint(str(path), loaded)


def test_post_training_only_refuses_a_damaged_final_model(tiny_dataset, tmp_path):
    artifact_dir = tmp_path / "run"
    artifact_dir.mkdir()
    path = artifact_dir / "final_model.pt"
    save_tiny_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["step"] = 8  # the step is covered by the sha256 too
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f"checkpoint {path}: sha256 mismatch"):
        train_gpt.main(main_env(tiny_dataset.path, artifact_dir, POST_TRAINING_ONLY="1"))
    assert f"error: ValueError: checkpoint {path}: sha256 mismatch" in (artifact_dir / "train.log").read_text()


def test_stop_signal_ends_training_after_the_step_in_progress(tiny_dataset, tmp_path):
    """A signal that arrives during step 3 (appended to stop_signals by the handler) lets step 3 finish,
    then interrupted.pt is written with step 3 and TrainingInterrupted is raised; no final_model.pt."""
    h = tiny_h(GRAD_ACCUM_STEPS=1, TRAIN_BATCH_TOKENS=512, ITERATIONS=20, DATA_PATH=tiny_dataset.path)
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model, "sdpa")
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    stop_signals, calls, lines = [], [], []
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def forward(inputs, targets, layout=None):
        calls.append(1)
        if len(calls) == 3:
            stop_signals.append(signal.SIGTERM)
        return model(inputs, targets, layout)

    def make_loader():
        return train_gpt.TrainLoader(tiny_dataset.train_paths, 512, h.data.train_seq_len, 4, 1, 0, 1, h.run.seed)

    with pytest.raises(train_gpt.TrainingInterrupted, match="signal 15 after step 3"):
        train_gpt.train_model(h, model, optimizer, make_loader, lines.append, forward=forward,
                              checkpoint_dir=str(run_dir), stop_signals=stop_signals)
    assert len(calls) == 3 and sum(line.startswith("step:") for line in lines) == 3
    assert lines[-1] == f"stopping: signal 15 after step 3; checkpoint: {run_dir / 'interrupted.pt'}"
    assert os.listdir(run_dir) == ["interrupted.pt"]
    loaded = train_gpt.GPT(h.model, "sdpa")
    assert train_gpt.load_checkpoint(str(run_dir / "interrupted.pt"), loaded) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_sigterm_to_a_training_process_saves_interrupted_checkpoint_and_exits_nonzero(tiny_dataset, tmp_path):
    artifact_dir = tmp_path / "run"
    env = dict(os.environ, **dict(TINY_MAIN_ENV, ITERATIONS="100000", WARMUP_STEPS="0"), DATA_PATH=tiny_dataset.path,
               ARTIFACT_DIR=str(artifact_dir), OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "train_gpt.py")], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # wait until training is under way
            if line.startswith("step:3/"):
                break
        sent = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
        seconds_to_exit = time.perf_counter() - sent
    finally:
        process.kill()
    assert process.returncode not in (0, None, -signal.SIGTERM), process.returncode  # exited, not killed
    log = (artifact_dir / "train.log").read_text()
    stopped = [line for line in log.splitlines() if line.startswith("stopping: signal 15 after step ")]
    assert len(stopped) == 1 and stopped[0].endswith(f"checkpoint: {artifact_dir / 'interrupted.pt'}"), log[-2000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert step >= 3 and f"step:{step}/100000 " in log and f"step:{step + 1}/" not in log
    assert "error: TrainingInterrupted: signal 15" in log and "TrainingInterrupted" in stderr
    assert not (artifact_dir / "final_model.pt").exists() and not (artifact_dir / "checkpoint.pt").exists()
    h = train_gpt.Hyperparameters.from_env(dict(TINY_MAIN_ENV))
    assert train_gpt.load_checkpoint(str(artifact_dir / "interrupted.pt"), train_gpt.GPT(h.model, "sdpa")) == step
    assert seconds_to_exit < 60, seconds_to_exit
    print(f"SIGTERM to exit: {seconds_to_exit:.2f}s")


def test_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tiny_dataset, tmp_path):
    """interrupted.pt is resumable: a run stopped after step 3 and continued with RESUME=1 ends with the
    same weights, EMA and loss as a run that was never stopped (optimizer and EMA state, data position
    and the recurrence switch all carried over). Fails if any of them is not saved or not restored,
    e.g. the loader restarting from the first batch or Muon's momentum starting at zero."""
    env = dict(TINY_MAIN_ENV, ITERATIONS="6", WARMUP_STEPS="0", ENABLE_LOOPING_AT="0.3", POST_TRAINING_ENABLED="0",
               DATA_PATH=tiny_dataset.path)
    whole = train_gpt.main(dict(env, ARTIFACT_DIR=str(tmp_path / "whole")))
    stopped_dir = tmp_path / "stopped"
    original_log_step = train_gpt.log_step

    def stop_after_step_3(h, step, loss_value, elapsed, log):
        original_log_step(h, step, loss_value, elapsed, log)
        if step == 3:  # what the SIGTERM handler does: the run stops before step 4
            os.kill(os.getpid(), signal.SIGTERM)

    train_gpt.log_step = stop_after_step_3
    try:
        with pytest.raises(train_gpt.TrainingInterrupted):
            train_gpt.main(dict(env, ARTIFACT_DIR=str(stopped_dir)))
    finally:
        train_gpt.log_step = original_log_step
    assert not (stopped_dir / "final_model.pt").exists()
    resumed = train_gpt.main(dict(env, ARTIFACT_DIR=str(stopped_dir), RESUME="1"))
    assert "resume: from step 3" in (stopped_dir / "train.log").read_text()
    assert resumed["steps"] == whole["steps"] == 6
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    whole_state = torch.load(tmp_path / "whole" / "final_model.pt", weights_only=True)["model"]
    resumed_state = torch.load(stopped_dir / "final_model.pt", weights_only=True)["model"]
    assert all(torch.equal(whole_state[name], resumed_state[name]) for name in whole_state)


def test_resume_without_an_interrupted_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    env = dict(TINY_MAIN_ENV, ITERATIONS="2", DATA_PATH=tiny_dataset.path, ARTIFACT_DIR=str(tmp_path / "run"),
               RESUME="1")
    with pytest.raises(ValueError, match="interrupted.pt"):
        train_gpt.main(env)
