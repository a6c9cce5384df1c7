"""Shared test helpers: synthetic token shards in the challenge format.

`write_shard(path, tokens)` writes one shard; `make_documents(...)` makes BOS-started documents from a
simple learnable process; the `tiny_dataset` fixture writes a train/val dataset (vocab 512) with a
byte sidecar into tmp_path (`write_tiny_dataset(folder)` writes the same anywhere). Other test files
may use them freely.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (REPO_ROOT, os.path.join(REPO_ROOT, "records"), os.path.join(REPO_ROOT, "docs")):
    if folder not in sys.path:  # train_gpt, the reviewer tools (audit_tokens) and the env-table generator
        sys.path.insert(0, folder)

# Tiny models are dominated by per-op overhead; one intra-op thread avoids thread contention on a
# shared 2-core machine (about 10x faster there). Override with TEST_TORCH_THREADS.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS, BOS = 20240520, 1, 256, 1


def write_shard(path, tokens, magic=SHARD_MAGIC, version=SHARD_VERSION, declared=None) -> str:
    """Write tokens as a shard: 256 x int32 header [magic, version, n_tokens, 0...] + uint16 tokens.
    `magic`, `version` and `declared` can be overridden to build corrupt shards."""
    tokens = np.asarray(tokens, dtype=np.uint16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = magic, version
    header[2] = len(tokens) if declared is None else declared
    with open(path, "wb") as handle:
        handle.write(header.tobytes())
        handle.write(tokens.astype("<u2").tobytes())
    return str(path)


def make_documents(num_docs, vocab_size=512, seed=0, min_len=20, max_len=200):
    """BOS-started documents from a noisy affine recurrence t' = (a*t + c) mod V (easy to learn).
    Ids 0-7 are reserved (pad, BOS, EOS, UNK, CaseOps operators) and never generated after BOS."""
    rng = np.random.default_rng(seed)
    docs = []
    low = 8
    span = vocab_size - low
    for _ in range(num_docs):
        length = int(rng.integers(min_len, max_len + 1))
        token = int(rng.integers(0, span))
        body = []
        for _ in range(length):
            body.append(low + token)
            token = (token * 5 + 3) % span if rng.random() < 0.9 else int(rng.integers(0, span))
        docs.append(np.array([BOS] + body, dtype=np.uint16))
    return docs


@dataclass
class TinyDataset:
    path: str
    vocab_size: int
    train_paths: list
    val_paths: list
    val_byte_paths: list
    val_docs: list


@pytest.fixture
def tiny_dataset(tmp_path):
    """Two train shards and one val shard (+ byte sidecar) of BOS-separated synthetic documents."""
    return write_tiny_dataset(tmp_path / "data")


def write_tiny_dataset(data_dir) -> TinyDataset:
    """The `tiny_dataset` files in a new folder `data_dir` (for module- or session-scoped fixtures)."""
    vocab_size = 512
    data_dir.mkdir()
    train_paths = []
    for index in range(2):
        docs = make_documents(300, vocab_size, seed=index + 1)
        train_paths.append(write_shard(data_dir / f"fineweb_train_{index:06d}.bin", np.concatenate(docs)))
    val_docs = make_documents(40, vocab_size, seed=99)
    val_tokens = np.concatenate(val_docs)
    val_path = write_shard(data_dir / "fineweb_val_000000.bin", val_tokens)
    rng = np.random.default_rng(7)
    byte_counts = rng.integers(1, 5, size=len(val_tokens))
    byte_counts[val_tokens == BOS] = 0  # BOS carries no original bytes
    bytes_path = write_shard(data_dir / "fineweb_val_bytes_000000.bin", byte_counts)
    return TinyDataset(str(data_dir), vocab_size, train_paths, [val_path], [bytes_path], val_docs)
