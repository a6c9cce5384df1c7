"""Shard reader checks and the deterministic document-preserving train loader."""

import numpy as np
import pytest
import torch

import train_gpt
from conftest import make_documents, write_shard


def test_read_shard_round_trips_tokens(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 7], dtype=np.uint16)
    path = write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    out = train_gpt.read_shard(path)
    assert out.dtype == np.uint16 and out.tolist() == tokens.tolist()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(magic=12345), "magic"),
    (dict(version=2), "version"),
    (dict(declared=10), "declares 10 tokens"),
])
def test_read_shard_rejects_bad_headers_naming_the_file(tmp_path, kwargs, needle):
    path = write_shard(tmp_path / "bad.bin", np.arange(5), **kwargs)
    with pytest.raises(ValueError, match=needle) as error:
        train_gpt.read_shard(path)
    assert "bad.bin" in str(error.value)


def test_read_shard_rejects_truncated_and_missing_files(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="short.bin.*header"):
        train_gpt.read_shard(str(short))
    odd = write_shard(tmp_path / "odd.bin", np.arange(4))
    with open(odd, "ab") as handle:
        handle.write(b"\x01")  # half a token
    with pytest.raises(ValueError, match="odd.bin"):
        train_gpt.read_shard(odd)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        train_gpt.read_shard(str(tmp_path / "missing.bin"))


def test_missing_glob_names_the_env_var(tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA_PATH"):
        train_gpt.shard_paths(str(tmp_path / "fineweb_train_*.bin"), "DATA_PATH")


def test_token_ids_must_be_below_vocab(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 600])
    loader_args = dict(vocab_size=512, seq_len=1, seqs_per_micro=1, accum=1, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="token id 600 >= VOCAB_SIZE=512"):
        train_gpt.TrainLoader([path], **loader_args)


def test_empty_shards_are_an_error(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", [])
    with pytest.raises(ValueError, match="no training tokens"):
        train_gpt.TrainLoader([path], 512, 4, 1, 1, 0, 1, 0)


def _stream(paths, world_size, rank, steps, accum, seed=0):
    loader = train_gpt.TrainLoader(paths, 512, 32, 2, accum, rank, world_size, seed)
    return [loader.next_step() for _ in range(steps)]


def test_loader_targets_are_inputs_shifted_by_one_and_stream_is_contiguous(tiny_dataset):
    loader = train_gpt.TrainLoader(tiny_dataset.train_paths[:1], 512, 32, 2, 2, 0, 1, seed=0)
    stream = train_gpt.read_shard(tiny_dataset.train_paths[0]).astype(np.int64)
    first, second = loader.next_step(), loader.next_step()
    flat_inputs = torch.cat([x.flatten() for x, _ in first + second]).numpy()
    flat_targets = torch.cat([y.flatten() for _, y in first + second]).numpy()
    assert (flat_inputs == stream[: len(flat_inputs)]).all()  # a single shard: the stream in order
    assert (flat_targets == stream[1: len(flat_inputs) + 1]).all()


def test_loader_is_deterministic_and_seed_dependent(tiny_dataset):
    a = _stream(tiny_dataset.train_paths, 1, 0, 3, 2, seed=5)
    b = _stream(tiny_dataset.train_paths, 1, 0, 3, 2, seed=5)
    assert all(torch.equal(x1, x2) for s1, s2 in zip(a, b) for (x1, _), (x2, _) in zip(s1, s2))
    orders = {tuple(train_gpt.TrainLoader(tiny_dataset.train_paths, 512, 32, 2, 1, 0, 1, seed)._order(0))
              for seed in range(8)}
    assert len(orders) == 2  # two shards: both orders appear across seeds


def test_ranks_split_the_same_global_batch_as_one_process(tiny_dataset):
    single = _stream(tiny_dataset.train_paths, 1, 0, 4, accum=4)
    rank0 = _stream(tiny_dataset.train_paths, 2, 0, 4, accum=2)
    rank1 = _stream(tiny_dataset.train_paths, 2, 1, 4, accum=2)
    for step in range(4):
        combined = [x for x, _ in rank0[step]] + [x for x, _ in rank1[step]]
        assert all(torch.equal(a, b) for a, b in zip(combined, [x for x, _ in single[step]]))


def test_loader_wraps_around_epochs(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", np.concatenate(make_documents(3, 512, seed=0)))
    loader = train_gpt.TrainLoader([path], 512, 64, 4, 2, 0, 1, seed=0)
    for _ in range(10):  # far more tokens than the shard holds
        batches = loader.next_step()
        assert all(x.shape == (4, 64) for x, _ in batches)


def _same_steps(first, second):
    return all(torch.equal(a, b) for s1, s2 in zip(first, second) for p1, p2 in zip(s1, s2) for a, b in zip(p1, p2))


def _small_shards(tmp_path, count=3):
    """Shards of ~1-2 K tokens: a 2 x 2 x 32-token step crosses a shard boundary every few steps."""
    return [write_shard(tmp_path / f"fineweb_train_{index:06d}.bin",
                        np.concatenate(make_documents(12, 512, seed=index, max_len=150))) for index in range(count)]


def test_prefetching_loader_yields_exactly_the_synchronous_batches_across_shards_and_epochs(tmp_path):
    paths = _small_shards(tmp_path)
    total = sum(train_gpt.shard_token_count(path) for path in paths)
    steps = 2 * total // (2 * 2 * 32) + 3  # two epochs and more: every shard boundary, twice
    synchronous = _stream(paths, 2, 1, steps, accum=2, seed=3)
    loader = train_gpt.PrefetchingLoader(train_gpt.TrainLoader(paths, 512, 32, 2, 2, 1, 2, seed=3), "cpu")
    prefetched = [loader.next_step() for _ in range(steps)]
    assert len(prefetched) == steps and _same_steps(prefetched, synchronous)


def test_prefetching_loader_resumes_where_the_synchronous_one_does(tmp_path):
    """skip_step (resume) before the first step lands on the same batches; after the read-ahead
    started, skipping would skip an unknown step, so it is an error."""
    paths = _small_shards(tmp_path)
    synchronous = train_gpt.TrainLoader(paths, 512, 32, 2, 2, 0, 1, seed=1)
    loader = train_gpt.PrefetchingLoader(train_gpt.TrainLoader(paths, 512, 32, 2, 2, 0, 1, seed=1), "cpu")
    for _ in range(7):
        synchronous.skip_step()
        loader.skip_step()
    assert _same_steps([loader.next_step() for _ in range(5)], [synchronous.next_step() for _ in range(5)])
    with pytest.raises(RuntimeError, match="skip_step after"):
        loader.skip_step()


def test_prefetching_loader_raises_a_bad_shard_error_in_the_training_thread(tmp_path):
    paths = _small_shards(tmp_path, count=2)
    write_shard(paths[1], np.full(2000, 600, dtype=np.uint16))  # ids >= VOCAB_SIZE in the second shard
    loader = train_gpt.PrefetchingLoader(train_gpt.TrainLoader(paths, 512, 32, 2, 2, 0, 1, seed=0), "cpu")
    with pytest.raises(ValueError, match="fineweb_train_000001.bin: token id 600"):
        for _ in range(50):
            loader.next_step()
def test_a_shorter_scheduled_length_cuts_the_same_step_tokens_into_more_rows(tiny_dataset):
    """TRAIN_SEQ_SCHEDULE (PR 2014) keeps tokens per step fixed: a step at seq_len 8 holds exactly the tokens
    of the same step at 32, in 4x the rows, and the stream position after it is the same."""
    default = train_gpt.TrainLoader(tiny_dataset.train_paths, 512, 32, 2, 2, 0, 1, seed=0)
    short = train_gpt.TrainLoader(tiny_dataset.train_paths, 512, 32, 2, 2, 0, 1, seed=0)
    for _ in range(3):
        long_step, short_step = default.next_step(), short.next_step(8)
        assert [x.shape for x, _ in long_step] == [(2, 32)] * 2 and [x.shape for x, _ in short_step] == [(8, 8)] * 2
        for (x_long, y_long), (x_short, y_short) in zip(long_step, short_step):
            assert torch.equal(x_long.flatten(), x_short.flatten()) and torch.equal(y_long.flatten(), y_short.flatten())


@pytest.mark.parametrize("rank", [0, 1])
def test_each_micro_batch_is_one_contiguous_span_so_its_flat_row_is_that_span(tmp_path, rank):
    """TRAIN_PACKING=flat joins a micro-batch's rows into one row: that is only PR 1855's packing if the
    rows are one contiguous span of the stream. Against an independent slicing of the shard: micro-step m
    of rank r in step s holds stream[s*S + (r*accum + m)*M :][:M] and its targets are shifted by one."""
    stream = np.concatenate(make_documents(40, 512, seed=5, max_len=90))
    path = write_shard(tmp_path / "fineweb_train_000000.bin", stream)
    seq_len, rows, accum, world = 16, 3, 2, 2
    loader = train_gpt.TrainLoader([path], 512, seq_len, rows, accum, rank, world, seed=0)
    micro, step_tokens = rows * seq_len, rows * seq_len * accum * world
    for step in range(stream.size // step_tokens - 1):
        for m, (inputs, targets) in enumerate(loader.next_step()):
            start = step * step_tokens + (rank * accum + m) * micro
            assert inputs.reshape(1, -1)[0].tolist() == stream[start: start + micro].tolist()
            assert targets.reshape(1, -1)[0].tolist() == stream[start + 1: start + micro + 1].tolist()
