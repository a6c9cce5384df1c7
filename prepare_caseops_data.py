r"""Documents -> CaseOps transform -> SentencePiece tokens -> challenge shards + val byte sidecars.

This is the front end of every score the project reports, so it is built to be checked:
- shards are byte-compatible with the challenge (256 x int32 header [20240520, 1, n_tokens, ...],
  then uint16 ids; BOS id 1 before every document; the first --val-docs documents are validation);
- every val token gets the number of ORIGINAL UTF-8 bytes it stands for (`fineweb_val_bytes_*.bin`),
  and for every val document those counts sum to its UTF-8 length (checked during the run);
- documents whose tokens do not decode back to the original text are counted, never hidden;
- output is identical whatever --workers is, shards are written atomically, and an interrupted run
  is resumed by running the same command again;
- the output is built in a sibling work folder and renamed to --out when complete, so a dataset
  already in --out stays until the new one is whole; a non-empty --out that this script did not
  write (e.g. downloaded challenge shards) is refused unless --force;
- Ctrl-C or SIGTERM stops the workers within seconds; the work folder is kept for the resume.

Usage:
  # the published SP8192 CaseOps tokenizer on the challenge documents (50,000 val docs)
  python prepare_caseops_data.py --docs fineweb10B_raw/docs_selected.jsonl --out data/sp8192_caseops \
      --sp tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model --workers 16
  # train a new lossless tokenizer on the training split, then tokenize
  python prepare_caseops_data.py --docs docs.jsonl --out data/mine --vocab-size 4096
  # no download: docstrings of the Python standard library + the shipped 1024-vocab tokenizer
  python prepare_caseops_data.py --demo --out /tmp/caseops_demo

Output (flat): fineweb_val_%06d.bin, fineweb_val_bytes_%06d.bin, fineweb_train_%06d.bin,
tokenizer.model, val_doc_sha256.txt (one sha256 per val document, in order) and manifest.json:
input (path, sha256, lines, docs, skipped blank and bad lines), transform, tokenizer (sha256, normalizer
settings read from the model, operator ids, and either the --sp path or the training documents and
trainer settings), per-split docs/tokens/original bytes/shards, every file's sha256, the val hash
file's sha256, train/val duplicates, overrides used, and verification (val_sidecar_mismatch_docs,
roundtrip_failed_docs per split with examples). Blank input lines are skipped and counted. Exit status:
0 done, 1 a worker process died, 2 bad input or arguments, 3 interrupted by the
PREPARE_CASEOPS_ABORT_AFTER_SHARDS test hook, 130 SIGINT (Ctrl-C), 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import io
import itertools
import json
import os
import pickle
import shutil
import signal
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lossless_caps.py lives next to this script
import lossless_caps  # noqa: E402

# -----------------------------------------------------------------------------
# Constants: shard format (SPEC section 2) and defaults
# The challenge's reader checks the magic and version and reads exactly n_tokens uint16 after the
# 1024-byte header; 100M tokens per shard and 50,000 val documents are the challenge's values.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
BOS_ID = 1
CHALLENGE_VAL_DOCS = 50_000
DEFAULT_SHARD_TOKENS = 100_000_000
MAX_TOKEN_ID = 65_535  # shards store uint16
OPERATORS = (lossless_caps.TITLE, lossless_caps.ALLCAPS, lossless_caps.CAPNEXT, lossless_caps.ESC)
STATE_NAME = ".prepare_state.json"  # checkpoint of an unfinished run; removed when the run completes
VAL_HASHES_NAME = "val_doc_sha256.txt"
SCRIPT_FORMAT = "prepare_caseops_data/1"  # bump when the output for the same arguments would change
DEMO_TOKENIZER = Path(__file__).resolve().parent / "tokenizers" / "demo_caseops_1024.model"
DEMO_VAL_DOCS = 300
ABORT_ENV = "PREPARE_CASEOPS_ABORT_AFTER_SHARDS"  # test hook: stop after writing N shards


class BadInputError(Exception):
    """Bad input (document file or tokenizer); the message names the file and, where known, the line."""


class SimulatedInterruption(Exception):
    """Raised by the ABORT_ENV test hook to imitate a run killed between two shards."""


# -----------------------------------------------------------------------------
# Shard files
# A shard (or sidecar) is written under a temporary name in the same directory, flushed and fsynced,
# then renamed over the final name, so a crash never leaves a half-written file under a final name.


def shard_bytes(values: np.ndarray) -> bytes:
    """Header + little-endian uint16 payload of one shard."""
    if values.size and (int(values.min()) < 0 or int(values.max()) > MAX_TOKEN_ID):
        raise ValueError("shard values must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, values.size
    return header.tobytes() + values.astype("<u2", copy=False).tobytes()


def read_shard(path: str | Path) -> np.ndarray:
    """Read a shard written by shard_bytes (or by the challenge's scripts); checks the header."""
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[: HEADER_INTS * 4], dtype="<i4")
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a shard (bad magic/version)")
    values = np.frombuffer(raw[HEADER_INTS * 4 :], dtype="<u2")
    if values.size != header[2]:
        raise ValueError(f"{path}: header says {header[2]} tokens, file holds {values.size}")
    return values


def write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (best effort: not every file system allows it)."""
    try:
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Byte attribution (pure functions)
# A SentencePiece piece reports the byte span [begin, end) of its input that it came from. Token i owns
# the input bytes from its own begin up to the next token's begin, so bytes that no piece covers (a
# normalizer dropped them) go to the preceding token (or to the first token when they lead the text),
# and the spans tile the input exactly: the counts telescope to the input's byte length. Tokens that
# start at the same byte (the byte-fallback pieces of one character, all but the last of which are
# empty) share the span up to the next start evenly, so a 3-byte character in 3 byte pieces gives
# 1 byte each. The CaseOps position map then turns input bytes into original bytes: operators carry 0.


def token_boundaries(piece_begins: np.ndarray, input_len: int) -> np.ndarray:
    """Boundaries c[0..n] in input bytes: token i owns [c[i], c[i+1]); c[0] = 0, c[n] = input_len."""
    n = piece_begins.size
    bounds = np.empty(n + 1, dtype=np.int64)
    if n == 0:
        bounds[0] = input_len
        return bounds
    starts = np.clip(piece_begins.astype(np.int64, copy=False), 0, input_len)
    starts[0] = 0
    np.maximum.accumulate(starts, out=starts)  # pieces never move backwards
    bounds[:n] = starts
    bounds[n] = input_len
    repeated = starts[1:] == starts[:-1]
    if repeated.any():  # runs of tokens with one start share the span to the next start evenly
        run_head = np.ones(n, dtype=bool)
        run_head[1:] = ~repeated
        head_index = np.flatnonzero(run_head)
        run_len = np.diff(np.append(head_index, n))
        run_of = np.cumsum(run_head) - 1
        rank = np.arange(n) - head_index[run_of]
        run_start = starts[head_index][run_of]
        run_stop = bounds[head_index + run_len][run_of]
        bounds[:n] = run_start + (rank * (run_stop - run_start)) // run_len[run_of]
    return bounds


def original_bytes_per_token(bounds: np.ndarray, orig_byte_offset: np.ndarray | None) -> np.ndarray:
    """Original UTF-8 bytes of each token; orig_byte_offset maps input byte -> original byte (None: same)."""
    mapped = bounds if orig_byte_offset is None else orig_byte_offset[bounds]
    return np.diff(mapped)


# -----------------------------------------------------------------------------
# Tokenizer
# Either a given SentencePiece model (--sp) or a BPE trained here on the transformed TRAINING documents
# (--vocab-size). New tokenizers are lossless (identity normalization, no whitespace removal, no dummy
# prefix, byte fallback), with the CaseOps operators as user-defined symbols at ids 4-7.

LOSSLESS_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.9995,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
    "max_sentence_length": 1 << 16,
    "num_threads": 1,  # deterministic merges
}


def tokenizer_trainer_settings(vocab_size: int, transform: str) -> dict:
    settings = dict(LOSSLESS_TRAINER_SETTINGS, vocab_size=vocab_size)
    if transform == "caseops":
        settings["user_defined_symbols"] = list(OPERATORS)
    return settings


def train_tokenizer(texts, settings: dict) -> bytes:
    """Train a SentencePiece model on an iterable of (already transformed) texts; returns the model bytes."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, minloglevel=2, **settings)
    return model.getvalue()


def load_tokenizer(model_bytes: bytes, source: str) -> spm.SentencePieceProcessor:
    if not model_bytes:  # sentencepiece loads 0 bytes as a model with no pieces (other piece-less protos fail)
        raise BadInputError(f"{source}: empty file (0 bytes), not a SentencePiece model")
    try:
        return spm.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError with a terse message
        raise BadInputError(f"{source}: not a readable SentencePiece model ({exc})") from exc


def read_tokenizer_file(path: str) -> bytes:
    try:
        model_bytes = Path(path).read_bytes()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read tokenizer ({exc.strerror})") from exc
    load_tokenizer(model_bytes, path)
    return model_bytes


def check_tokenizer(sp: spm.SentencePieceProcessor, source: str, transform: str) -> None:
    if sp.bos_id() != BOS_ID:
        raise BadInputError(f"{source}: BOS id is {sp.bos_id()}, the shard format needs {BOS_ID}")
    if transform == "caseops":
        missing = [f"U+{ord(op):04X}" for op in OPERATORS if sp.piece_to_id(op) == sp.unk_id()]
        if missing:
            raise BadInputError(f"{source}: CaseOps operators {missing} are not pieces of this tokenizer")


def tokenizer_summary(sp: spm.SentencePieceProcessor, model_bytes: bytes) -> dict:
    """Settings read back from the model proto itself (what it actually does, not what was asked)."""
    summary = {"vocab_size": sp.get_piece_size(), "sha256": sha256_bytes(model_bytes),
               "operator_ids": [sp.piece_to_id(op) for op in OPERATORS],
               "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id()}
    summary.update(_normalizer_spec(model_bytes))
    return summary


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _normalizer_spec(model_bytes: bytes) -> dict:
    """Parse ModelProto.normalizer_spec (field 3): name (1), add_dummy_prefix (3),
    remove_extra_whitespaces (4), escape_whitespaces (5); proto defaults are true. Best effort."""
    spec = {"normalization_rule_name": None, "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    try:
        pos = 0
        while pos < len(model_bytes):
            tag, pos = _varint(model_bytes, pos)
            wire = tag & 7
            if wire == 0:
                _, pos = _varint(model_bytes, pos)
                continue
            if wire != 2:  # no fixed-width fields at the top level of ModelProto
                break
            length, pos = _varint(model_bytes, pos)
            body = model_bytes[pos : pos + length]
            pos += length
            if tag >> 3 != 3:
                continue
            sub = 0
            while sub < len(body):
                sub_tag, sub = _varint(body, sub)
                if sub_tag & 7 == 2:
                    sub_len, sub = _varint(body, sub)
                    if sub_tag >> 3 == 1:
                        spec["normalization_rule_name"] = body[sub : sub + sub_len].decode("utf-8", "replace")
                    sub += sub_len
                elif sub_tag & 7 == 0:
                    value, sub = _varint(body, sub)
                    name = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
                    if sub_tag >> 3 in name:
                        spec[name[sub_tag >> 3]] = bool(value)
                else:
                    break
    except (IndexError, UnicodeDecodeError):
        pass
    return spec


# -----------------------------------------------------------------------------
# Worker: transform, tokenize, attribute, verify (one chunk of documents, in order)
# Fast path, exact by construction: when the pieces decode to exactly the tokenizer's input, the
# pieces' surfaces tile that input, so each piece starts where the previous surfaces end (a cumulative
# sum of a per-id surface-length table). Otherwise (a normalizing tokenizer changed the text, or a
# literal U+2581) the begins come from SentencePiece's own offsets into its input.
# All per-document work (parsing, CaseOps, tokenizing, round trip, sidecar) happens here, in the
# workers; a chunk's result goes back as a few flat arrays, and the main process only slices them into
# shards. Each worker is one single-threaded process (sp.encode of one text uses one thread).


@dataclass
class WorkerContext:
    sp: spm.SentencePieceProcessor
    transform: str
    docs_path: str
    surface_len: np.ndarray  # (vocab,) bytes each piece contributes to the decoded text; < 0: unknown
    offsets_api: str
    split_safe: bool  # encoding text pieces cut before a space gives the same ids as the whole text
    segment_chars: int = 1 << 15


_WORKER: WorkerContext | None = None


def make_worker_context(model_bytes: bytes, transform: str, docs_path: str) -> WorkerContext:
    sp = load_tokenizer(model_bytes, "tokenizer")
    vocab = sp.get_piece_size()
    surface_len = np.empty(vocab, dtype=np.int64)
    for token_id in range(vocab):
        if sp.is_byte(token_id):
            surface_len[token_id] = 1
        elif sp.is_control(token_id):
            surface_len[token_id] = 0
        elif sp.is_unknown(token_id):
            surface_len[token_id] = -(1 << 40)  # never tiles the input: forces the offsets path
        else:
            surface_len[token_id] = len(sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8"))
    try:
        sp.encode("a", out_type="offset_mapping", return_bytes=True)
        offsets_api = "offset_mapping"
    except (TypeError, ValueError):
        offsets_api = "immutable_proto"
    normalizer = _normalizer_spec(model_bytes)
    split_safe = (normalizer["normalization_rule_name"] == "identity" and not normalizer["add_dummy_prefix"]
                  and not normalizer["remove_extra_whitespaces"]
                  and not any("\u2581" in sp.id_to_piece(i)[1:] for i in range(vocab)))
    return WorkerContext(sp, transform, docs_path, surface_len, offsets_api, split_safe)


def encode_ids(ctx: WorkerContext, text: str) -> list[int]:
    """sp.encode(text), in linear time for long texts.
    SentencePiece's BPE encoding of one input is O(n log n) (a 10x longer document costs ~15x). When
    no piece holds U+2581 past its first character and the normalizer is the identity, no merge can
    cross the point before a space, so encoding pieces of the text cut there and concatenating gives
    exactly the ids of the whole text (tests check this); other tokenizers encode the whole text."""
    if not ctx.split_safe or len(text) <= ctx.segment_chars:
        return ctx.sp.encode(text)
    segments, start = [], 0
    while start < len(text):
        cut = text.find(" ", start + ctx.segment_chars)
        cut = len(text) if cut < 0 else cut
        segments.append(text[start:cut])
        start = cut
    ids: list[int] = []
    for segment_ids in ctx.sp.encode(segments, num_threads=1):
        ids += segment_ids
    return ids


def _init_worker(model_bytes: bytes, transform: str, docs_path: str) -> None:
    global _WORKER
    _WORKER = make_worker_context(model_bytes, transform, docs_path)


def piece_begins_from_tokenizer(ctx: WorkerContext, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, begin byte offsets into `text`) from SentencePiece's own piece offsets."""
    if ctx.offsets_api == "offset_mapping":
        result = ctx.sp.encode(text, out_type="offset_mapping", return_bytes=True)
        begins = np.fromiter((begin for begin, _ in result["offsets"]), dtype=np.int64, count=len(result["ids"]))
        return np.asarray(result["ids"], dtype=np.int64), begins
    proto = ctx.sp.encode(text, out_type="immutable_proto")  # sentencepiece <= 0.2.0: begin/end in bytes
    ids = np.fromiter((piece.id for piece in proto.pieces), dtype=np.int64)
    begins = np.fromiter((piece.begin for piece in proto.pieces), dtype=np.int64)
    return ids, begins


@dataclass
class DocResult:
    tokens: np.ndarray  # uint16, BOS first
    sidecar: np.ndarray | None  # uint16 original bytes per token (val docs), BOS first
    roundtrip_ok: bool
    sidecar_ok: bool
    original_bytes: int
    used_offsets: bool = False


def process_document(ctx: WorkerContext, text: str, want_sidecar: bool, line_no: int) -> DocResult:
    original_len = len(text.encode("utf-8"))
    if ctx.transform == "caseops":
        if want_sidecar:
            model_input, orig_byte_offset = lossless_caps.encode_with_byte_map(text)
        else:
            model_input, orig_byte_offset = lossless_caps.encode_lossless_caps_v2(text), None
    else:
        model_input, orig_byte_offset = text, None
    ids = np.asarray(encode_ids(ctx, model_input), dtype=np.int64)
    if ids.size and int(ids.max()) > MAX_TOKEN_ID:
        raise BadInputError(f"{ctx.docs_path}:{line_no}: token id {int(ids.max())} does not fit in uint16")
    decoded = ctx.sp.decode(ids.tolist())
    exact_input = decoded == model_input
    if exact_input or ctx.transform != "caseops":
        roundtrip_ok = exact_input
    else:
        try:
            roundtrip_ok = lossless_caps.decode_lossless_caps_v2(decoded) == text
        except ValueError:  # the pieces produced a malformed operator sequence
            roundtrip_ok = False
    tokens = np.empty(ids.size + 1, dtype=np.uint16)
    tokens[0] = BOS_ID
    tokens[1:] = ids
    if not want_sidecar:
        return DocResult(tokens, None, roundtrip_ok, True, original_len)

    input_len = len(model_input.encode("utf-8"))
    used_offsets = False
    begins = None
    if exact_input:
        lengths = ctx.surface_len[ids]
        if int(lengths.sum()) == input_len and (lengths >= 0).all():
            begins = np.concatenate(([0], np.cumsum(lengths)[:-1])) if ids.size else lengths
    if begins is None:
        offset_ids, begins = piece_begins_from_tokenizer(ctx, model_input)
        if not np.array_equal(offset_ids, ids):
            raise RuntimeError(f"{ctx.docs_path}:{line_no}: tokenizer gave different ids with offsets")
        used_offsets = True
    per_token = original_bytes_per_token(token_boundaries(begins, input_len), orig_byte_offset)
    sidecar_ok = int(per_token.sum()) == original_len and (ids.size > 0 or original_len == 0)
    if per_token.size and (int(per_token.min()) < 0 or int(per_token.max()) > MAX_TOKEN_ID):
        raise BadInputError(f"{ctx.docs_path}:{line_no}: a token stands for more than 65535 bytes")
    sidecar = np.empty(ids.size + 1, dtype=np.uint16)
    sidecar[0] = 0
    sidecar[1:] = per_token
    return DocResult(tokens, sidecar, roundtrip_ok, sidecar_ok, original_len, used_offsets)


@dataclass
class ChunkResult:
    """The documents of one chunk as a few flat arrays: what a worker sends back (one pickle of a
    handful of arrays per chunk, not an object per document)."""
    tokens: np.ndarray  # (tokens,) uint16: every document's BOS + ids, in order
    sidecar: np.ndarray  # (val tokens,) uint16: original bytes per token of the val documents, which
    #                      come first in a chunk (val is a prefix of the input), so it aligns with `tokens`
    doc_tokens: np.ndarray  # (docs,) int64 tokens per document, BOS included (so always >= 1)
    original_bytes: np.ndarray  # (docs,) int64 UTF-8 bytes of each original document
    roundtrip_ok: np.ndarray  # (docs,) bool
    sidecar_ok: np.ndarray  # (docs,) bool (True for train documents)
    used_offsets: np.ndarray  # (docs,) bool


def encode_texts(ctx: WorkerContext, texts: list[str], want_sidecar: list[bool],
                 line_numbers: list[int]) -> ChunkResult:
    """process_document on each text, packed into a ChunkResult (sidecar documents must come first)."""
    results = [process_document(ctx, t, v, n) for t, v, n in zip(texts, want_sidecar, line_numbers)]
    sidecars = [r.sidecar for r in results if r.sidecar is not None]
    assert all(r.sidecar is not None for r in results[: len(sidecars)]), "val documents must lead a chunk"
    return ChunkResult(
        tokens=np.concatenate([r.tokens for r in results]) if results else np.zeros(0, np.uint16),
        sidecar=np.concatenate(sidecars) if sidecars else np.zeros(0, np.uint16),
        doc_tokens=np.array([r.tokens.size for r in results], dtype=np.int64),
        original_bytes=np.array([r.original_bytes for r in results], dtype=np.int64),
        roundtrip_ok=np.array([r.roundtrip_ok for r in results], dtype=bool),
        sidecar_ok=np.array([r.sidecar_ok for r in results], dtype=bool),
        used_offsets=np.array([r.used_offsets for r in results], dtype=bool))


def encode_chunk(task: ChunkTask, ctx: WorkerContext | None = None) -> ChunkResult:
    """Read one chunk of the input (the worker reads the file itself: only the task's few integers go
    to the worker), parse its lines and encode its documents. Lines the scan found bad are skipped
    here too (only with --skip-bad-lines: otherwise the scan has already stopped the run)."""
    ctx = ctx or _WORKER
    texts, line_numbers = [], []
    for line_no, raw in iter_span_lines(ctx.docs_path, task.offset, task.length, task.first_line):
        if is_blank(raw):
            continue
        try:
            texts.append(parse_line(raw, ctx.docs_path, line_no))
        except BadInputError:
            if not task.skip_bad_lines:
                raise
            continue
        line_numbers.append(line_no)
    want_sidecar = [task.first_doc + i < task.val_docs for i in range(len(texts))]
    return encode_texts(ctx, texts, want_sidecar, line_numbers)


# -----------------------------------------------------------------------------
# Input documents
# One JSON value per line: {"text": "..."} or a bare JSON string. Lines are numbered from 1. Blank lines
# (whitespace only) are no documents: skipped and counted. A bad line stops the run naming file and line,
# unless --skip-bad-lines, which skips and counts it.
# The file is cut into chunks of whole lines of about CHUNK_BYTES (by size only, so the same for any
# --workers). A task names a chunk by byte offset and length; the worker reads and parses it itself,
# so the main process only reads the file once to hash it and never parses a line.


def parse_line(raw: bytes, path: str, line_no: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}:{line_no}: invalid UTF-8 at byte {exc.start} of the line") from exc
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    if isinstance(value, dict):
        value = value.get("text")
        if not isinstance(value, str):
            raise BadInputError(f'{path}:{line_no}: object has no string "text" field')
    elif not isinstance(value, str):
        raise BadInputError(f'{path}:{line_no}: expected {{"text": ...}} or a JSON string')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON can spell one half of a surrogate pair alone: "\ud800"
        raise BadInputError(f"{path}:{line_no}: text holds a lone surrogate (U+{ord(value[exc.start]):04X} at "
                            f"character {exc.start}), which has no UTF-8 form") from exc
    return value


def is_blank(raw: bytes) -> bool:
    return not raw.strip()


def check_not_utf16(path: str) -> None:
    """Stop at once on a UTF-16 file (a byte-order mark, or a NUL every other byte), which would
    otherwise fail on every line as invalid UTF-8 or malformed JSON."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read documents ({exc.strerror})") from exc
    even_nuls, odd_nuls = head[0::2].count(0), head[1::2].count(0)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) >= 8 and max(even_nuls, odd_nuls) > len(head) // 4):
        raise BadInputError(f"file {path} looks like UTF-16; convert it to UTF-8 "
                            f"(e.g. iconv -f UTF-16 -t UTF-8 {path} > docs.jsonl)")


CHUNK_BYTES = 1 << 17  # ~50 ms of encoding per task: IPC is negligible, and the last task barely idles a worker
SCAN_BATCH = 16  # chunks per scan task: parsing and hashing 2 MiB (~20 ms) outweighs a task's round trip


class ChunkTask(NamedTuple):
    offset: int  # byte offset of the chunk's first line
    length: int  # bytes (whole lines)
    first_line: int  # line number of its first line
    first_doc: int = 0  # document index of its first good line (known after the scan)
    val_docs: int = 0
    skip_bad_lines: bool = False


def plan_chunks(path: str, digest, chunk_bytes: int):
    """ChunkTasks (offset, length, first line) covering the file in whole lines; hashes the file on the way."""
    offset, line_no = 0, 1
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            if not block.endswith(b"\n"):
                block += f.readline()  # complete the last line
            digest.update(block)
            yield ChunkTask(offset, len(block), line_no)
            offset += len(block)
            line_no += block.count(b"\n")


def iter_span_lines(path: str, offset: int, length: int, first_line: int):
    """(line number, raw line with its newline) of the whole lines in file[offset : offset + length]."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(length)
    return enumerate(io.BytesIO(block), start=first_line)  # splits on b"\n" only, like iterating a file


@dataclass
class ChunkScan:
    task: ChunkTask
    lines: int
    doc_digests: bytes  # sha256 of each good line's text (UTF-8), 32 bytes each, in order
    doc_lines: np.ndarray  # (docs,) int64 line number of each good line
    doc_bytes: int  # UTF-8 bytes of all its documents
    bad_lines: list[tuple[int, str]]
    blank_lines: int


def scan_chunks(tasks: list[ChunkTask], path: str, skip_bad_lines: bool) -> list[ChunkScan]:
    return [scan_chunk(task, path, skip_bad_lines) for task in tasks]


def scan_chunk(task: ChunkTask, path: str, skip_bad_lines: bool) -> ChunkScan:
    digests, doc_lines, bad_lines = [], [], []
    doc_bytes = lines = blank_lines = 0
    for line_no, raw in iter_span_lines(path, task.offset, task.length, task.first_line):
        lines += 1
        if is_blank(raw):
            blank_lines += 1
            continue
        try:
            text = parse_line(raw, path, line_no)
        except BadInputError as exc:
            if not skip_bad_lines:
                raise
            bad_lines.append((line_no, str(exc)))
            continue
        encoded = text.encode("utf-8")
        doc_bytes += len(encoded)
        digests.append(hashlib.sha256(encoded).digest())
        doc_lines.append(line_no)
    return ChunkScan(task, lines, b"".join(digests), np.array(doc_lines, dtype=np.int64), doc_bytes, bad_lines,
                     blank_lines)


@dataclass
class InputScan:
    sha256: str
    size: int
    lines: int
    docs: int
    bad_lines: list[tuple[int, str]]
    val_hashes: list[str]
    train_val_duplicates: list[tuple[int, int]]  # (train line, val doc index), the first few
    doc_bytes: int
    duplicate_count: int
    blank_lines: int = 0
    chunks: list[ChunkTask] = field(default_factory=list)  # with first_doc filled in


def scan_input(path: str, val_docs: int, skip_bad_lines: bool, workers: int = 1,
               max_duplicates_kept: int = 100) -> InputScan:
    """Whole-file pass before anything is written: validates every line, hashes the input and every
    val document, and finds training documents identical to a val document. Workers parse and hash
    the chunks; this process hashes the file, keeps the chunk table and matches the document hashes."""
    check_not_utf16(path)
    digest = hashlib.sha256()
    size = docs = doc_bytes = lines = blank_lines = 0
    bad_lines: list[tuple[int, str]] = []
    val_hashes: list[str] = []
    val_index: dict[bytes, int] = {}
    duplicates: list[tuple[int, int]] = []
    duplicate_count = 0
    chunks: list[ChunkTask] = []
    scan = functools.partial(scan_chunks, path=path, skip_bad_lines=skip_bad_lines)
    planned = plan_chunks(path, digest, CHUNK_BYTES)
    batches = iter(lambda: list(itertools.islice(planned, SCAN_BATCH)), [])
    scanned = ordered_map(scan, batches, workers)
    try:
        for part in itertools.chain.from_iterable(scanned):
            chunks.append(part.task._replace(first_doc=docs))
            size += part.task.length
            lines += part.lines
            doc_bytes += part.doc_bytes
            bad_lines += part.bad_lines
            blank_lines += part.blank_lines
            doc_hashes = [part.doc_digests[i : i + 32] for i in range(0, len(part.doc_digests), 32)]
            n_val = min(max(val_docs - docs, 0), len(doc_hashes))
            for i, doc_hash in enumerate(doc_hashes[:n_val]):
                val_hashes.append(doc_hash.hex())
                val_index.setdefault(doc_hash, docs + i)
            if not val_index.keys().isdisjoint(doc_hashes[n_val:]):  # rare: look at each train document
                for doc_hash, line_no in zip(doc_hashes[n_val:], part.doc_lines[n_val:].tolist()):
                    if doc_hash in val_index:
                        duplicate_count += 1
                        if len(duplicates) < max_duplicates_kept:
                            duplicates.append((line_no, val_index[doc_hash]))
            docs += len(doc_hashes)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read documents ({exc.strerror})") from exc
    finally:
        scanned.close()  # stops the workers at once if this loop raises
    return InputScan(digest.hexdigest(), size, lines, docs, bad_lines, val_hashes, duplicates, doc_bytes,
                     duplicate_count, blank_lines, chunks)


def iter_documents(path: str, bad_line_numbers: set[int], start_doc: int = 0):
    """(doc index, line number, text) for every good line, from document start_doc on."""
    doc_index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no in bad_line_numbers or is_blank(raw):
                continue
            if doc_index >= start_doc:
                yield doc_index, line_no, parse_line(raw, path, line_no)
            doc_index += 1


def ordered_map(fn, tasks, workers: int, initializer=None, initargs=()):
    """fn(task) for every task, yielded in task order, computed by `workers` processes (1: here), with
    at most 3 tasks per worker in flight: Pool.imap would read all tasks ahead and, when this process
    is slower than the workers, buffer every result. Tasks and results are pickled: keep them compact.
    Closing the generator (or an exception or signal while it is open) stops the workers."""
    if workers == 1:
        yield from map(fn, tasks)
        return
    with WorkerPool(fn, workers, initializer, initargs) as pool:
        yield from pool.map(tasks)


# -----------------------------------------------------------------------------
# Worker processes and signals
# Ctrl-C sends SIGINT to every process of the terminal's process group; `kill` sends SIGTERM to this one.
# Only this process decides: workers ignore SIGINT, die at once on SIGTERM (also when this process
# dies: PR_SET_PDEATHSIG), and here either signal raises Interrupted. Leaving a WorkerPool kills its
# workers without reading another message from them, so a worker killed halfway through sending a
# result cannot leave this process waiting for the rest (multiprocessing.Pool could wait forever).

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """SIGINT or SIGTERM reached this process, or killed one of its workers."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class WorkerDiedError(Exception):
    """A worker process ended without being asked to (killed by another signal, out of memory)."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals_raise():
    """Inside the block, SIGINT and SIGTERM raise Interrupted in the main thread; the previous handlers
    come back afterwards (signal handlers can only be set from the main thread: elsewhere, a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals() -> None:
    """From now on (until stop_signals_raise restores the handlers), SIGINT and SIGTERM are dropped."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals_deferred():
    """SIGINT and SIGTERM are held until the block ends: for steps that must not stop halfway (starting
    a worker, swapping the output folder, stopping the workers)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_with_parent(parent_pid: int) -> None:
    """Linux: the kernel sends this process SIGTERM when its parent dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's exit handler still stops the workers
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_loop(conn, fn, initializer, initargs, parent_pid: int) -> None:
    """Body of a worker process: receive (index, task), send back (index, ok, result or exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die at once, even inside C code
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held by the parent while it started us
    _exit_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, task = message
        try:
            reply = (index, True, fn(task))
        except Exception as exc:  # sent back and raised in the parent (BadInputError names file and line)
            reply = (index, False, exc)
        try:
            conn.send(reply)
        except (TypeError, AttributeError, pickle.PicklingError):  # an exception that does not pickle
            conn.send((index, False, RuntimeError(repr(reply[2]))))


_NO_TASK = object()


class WorkerPool:
    """`workers` processes running fn(task) with at most `depth` tasks each outstanding; map() yields
    the results in task order. Leaving the `with` block, however it is left, stops every worker."""

    def __init__(self, fn, workers: int, initializer=None, initargs=(), depth: int = 3):
        import multiprocessing

        context = multiprocessing.get_context()
        self.depth = depth
        self.processes, self.conns = [], []
        try:
            for _ in range(workers):
                parent_end, child_end = context.Pipe()
                with stop_signals_deferred():  # the worker starts with them held and sets its own handlers
                    process = context.Process(target=_worker_loop, daemon=True,
                                              args=(child_end, fn, initializer, initargs, os.getpid()))
                    process.start()
                child_end.close()
                self.processes.append(process)
                self.conns.append(parent_end)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """SIGTERM to every worker (immediate: they keep its default action), then reap them."""
        with stop_signals_deferred():
            for process in self.processes:
                if process.is_alive():
                    process.terminate()
            deadline = time.monotonic() + 5.0
            for process in self.processes:
                process.join(max(deadline - time.monotonic(), 0.0))
                if process.is_alive():
                    process.kill()
                    process.join()
            for conn in self.conns:
                conn.close()
            self.processes, self.conns = [], []

    def map(self, tasks):
        from multiprocessing.connection import wait

        tasks = iter(tasks)
        outstanding = [0] * len(self.processes)  # tasks sent to each worker and not yet answered
        done: dict[int, tuple[bool, object]] = {}  # (ok, result or exception) not yet yielded, by task index
        sent = yielded = 0
        exhausted = False
        while True:
            while not exhausted and sent - yielded < self.depth * len(self.processes):
                task = next(tasks, _NO_TASK)
                if task is _NO_TASK:
                    exhausted = True
                    break
                worker = outstanding.index(min(outstanding))
                try:
                    self.conns[worker].send((sent, task))
                except OSError:  # the worker is gone
                    self._raise_worker_death(worker)
                outstanding[worker] += 1
                sent += 1
            if yielded in done:
                ok, value = done.pop(yielded)
                if not ok:  # raised in task order: the first bad task is the one reported
                    raise value
                yield value
                yielded += 1
                continue
            if exhausted and yielded == sent:
                return
            by_conn = {conn: worker for worker, conn in enumerate(self.conns)}
            ready = wait(self.conns + [process.sentinel for process in self.processes])
            for item in ready:
                worker = by_conn.get(item)
                if worker is None:
                    continue  # a sentinel: handled below, after reading what the worker sent first
                try:
                    index, ok, value = item.recv()
                except (EOFError, OSError):
                    self._raise_worker_death(worker)
                outstanding[worker] -= 1
                done[index] = (ok, value)
            for worker, process in enumerate(self.processes):
                if process.sentinel in ready and not self.conns[worker].poll():
                    self._raise_worker_death(worker)

    def _raise_worker_death(self, worker: int) -> None:
        process = self.processes[worker]
        process.join(1.0)
        code = process.exitcode
        if code is not None and -code in STOP_SIGNALS:  # e.g. SIGTERM sent to the whole process group
            raise Interrupted(-code)
        raise WorkerDiedError(f"a worker process died (exit code {code}); if it was killed for memory, "
                              "use fewer --workers")


# -----------------------------------------------------------------------------
# Demo corpus: docstrings of the Python standard library, read from source with `ast` (no imports, so
# no side effects), files in sorted order, so the corpus is the same on every run of one Python version.

DEMO_MAX_BYTES = 6_000_000


def build_demo_corpus(max_bytes: int = DEMO_MAX_BYTES) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    docs: list[str] = []
    total = 0
    for directory, subdirs, files in os.walk(stdlib):
        subdirs[:] = sorted(d for d in subdirs if d not in skip_dirs and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(directory, name)
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            module = path.relative_to(stdlib).with_suffix("").as_posix().replace("/", ".")
            for doc in _module_documents(module, tree, source):
                try:
                    size = len(doc.encode("utf-8"))
                except UnicodeEncodeError:  # a string constant holding a lone surrogate
                    continue
                docs.append(doc)
                total += size
                if total >= max_bytes:
                    return docs
    return docs


def _module_documents(module: str, tree: ast.Module, source: str) -> list[str]:
    """The module docstring; one document per top-level class or function holding every docstring
    inside it; the module's comments; and the text constants of pydoc_data.topics (language reference)."""
    out = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        out.append(f"Module {module}\n\n{module_doc}\n")
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts = []
            for inner in ast.walk(node):
                if isinstance(inner, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(inner)
                    if doc:
                        kind = "class" if isinstance(inner, ast.ClassDef) else "def"
                        parts.append(f"{kind} {inner.name}:\n{doc}\n")
            if parts:
                out.append(f"{module}.{node.name}\n\n" + "\n".join(parts))
        elif module == "pydoc_data.topics" and isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    out.append(value.value)
    comments = [line.strip().lstrip("#").strip() for line in source.splitlines()
                if line.strip().startswith("#") and not line.strip().startswith("#!")]
    comments = [c for c in comments if c and not c.startswith(("-*-", "noqa", "type:", "pragma"))]
    if len(comments) >= 3:
        out.append(f"Comments in {module}\n\n" + "\n".join(comments) + "\n")
    return out


def write_demo_docs(path: Path, docs: list[str]) -> None:
    payload = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    write_atomic(path, payload)


# -----------------------------------------------------------------------------
# Run state, checkpoint and manifest
# After every shard the run writes a checkpoint: the shards done (with sha256), where the next shard's
# tokens start (document index + tokens of that document already written) and the statistics of the
# documents before it. A re-run with the same fingerprint (input sha256, tokenizer, arguments) checks
# the shards' hashes and continues from there; anything else starts over.


@dataclass
class SplitStats:
    docs: int = 0
    tokens: int = 0
    original_bytes: int = 0
    roundtrip_failed: int = 0
    sidecar_mismatch: int = 0
    offsets_path_docs: int = 0
    tokenless_docs: int = 0  # non-empty documents the tokenizer turned into no token at all
    roundtrip_failed_examples: list = field(default_factory=list)  # first few doc indices

    def add_docs(self, result: ChunkResult, lo: int, hi: int, first_doc: int) -> None:
        """Count documents lo..hi-1 of a chunk whose first document has index first_doc."""
        if hi <= lo:
            return
        doc_tokens, original_bytes = result.doc_tokens[lo:hi], result.original_bytes[lo:hi]
        self.docs += hi - lo
        self.tokens += int(doc_tokens.sum())
        self.original_bytes += int(original_bytes.sum())
        self.offsets_path_docs += int(result.used_offsets[lo:hi].sum())
        self.tokenless_docs += int(((doc_tokens == 1) & (original_bytes > 0)).sum())
        failed = np.flatnonzero(~result.roundtrip_ok[lo:hi])
        self.roundtrip_failed += int(failed.size)
        room = 20 - len(self.roundtrip_failed_examples)
        self.roundtrip_failed_examples += (failed[:room] + first_doc + lo).tolist()
        self.sidecar_mismatch += int((~result.sidecar_ok[lo:hi]).sum())

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> "SplitStats":
        return cls(**data)


class ShardWriter:
    """Cuts the BOS-prefixed document stream of one split into shards of exactly shard_tokens tokens
    (the last one shorter), as the challenge does; documents may straddle two shards."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, first_index: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.index = first_index
        self.tokens: list[np.ndarray] = []
        self.sidecar: list[np.ndarray] = []
        self.count = 0

    def room(self) -> int:
        return self.shard_tokens - self.count

    def add(self, tokens: np.ndarray, sidecar: np.ndarray | None) -> None:
        self.tokens.append(tokens)
        if sidecar is not None:
            self.sidecar.append(sidecar)
        self.count += tokens.size

    def flush(self) -> list[dict]:
        """Write the buffered tokens (and val sidecar) atomically; returns the files' records."""
        if self.count == 0:
            return []
        tokens = np.concatenate(self.tokens)
        written = [self._write(f"fineweb_{self.split}_{self.index:06d}.bin", tokens)]
        if self.split == "val":
            sidecar = np.concatenate(self.sidecar)
            assert sidecar.size == tokens.size
            written.append(self._write(f"fineweb_val_bytes_{self.index:06d}.bin", sidecar))
        self.index += 1
        self.tokens, self.sidecar, self.count = [], [], 0
        return written

    def _write(self, name: str, values: np.ndarray) -> dict:
        payload = shard_bytes(values)
        write_atomic(self.out_dir / name, payload)
        return {"name": name, "sha256": sha256_bytes(payload), "tokens": int(values.size)}


def load_state(out_dir: Path, fingerprint: dict) -> dict | None:
    """The checkpoint of an unfinished run with this fingerprint whose shards are intact, else None."""
    try:
        state = json.loads((out_dir / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    for record in state.get("files", []):
        path = out_dir / record["name"]
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            return None
    return state


def save_state(out_dir: Path, state: dict) -> None:
    write_atomic(out_dir / STATE_NAME, (json.dumps(state, indent=1) + "\n").encode("utf-8"))


# -----------------------------------------------------------------------------
# Output folder
# The output is built in a sibling work folder (.NAME.prepare-work) and renamed to --out only when it
# is complete, so an earlier dataset in --out stays usable until then, and stays if the run fails. An
# interrupted run leaves the work folder; the same command resumes it. --out must be absent, empty or
# this script's own output (a manifest of ours listing every file there): anything else, such as
# downloaded challenge shards, is refused unless --force.

DEMO_DOCS_NAME = "demo_docs.jsonl"
OWN_FILE_NAMES = ("manifest.json", "tokenizer.model", VAL_HASHES_NAME, DEMO_DOCS_NAME)


def output_path(out: str) -> Path:
    """--out with symlinks resolved: the work folder goes beside the real folder, on its file system."""
    path = Path(os.path.realpath(out))
    if os.path.ismount(path):  # cannot be renamed: the output could not be swapped in
        raise BadInputError(f"--out {out}: a mount point (or the root folder); use a folder inside it")
    return path


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.prepare-work"


def old_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.prepare-old"


def foreign_entries(out_dir: Path) -> list[str]:
    """Names in out_dir that this script did not write ([] for an absent or empty folder, or for a
    complete output of ours, or one of the in-place interrupted runs of earlier versions)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return []
    if not out_dir.is_dir():
        return [out_dir.name]
    own: set[str] = set()
    for record_name in ("manifest.json", STATE_NAME):
        try:
            record = json.loads((out_dir / record_name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        fingerprint = record.get("fingerprint")
        if not isinstance(fingerprint, dict) or not str(fingerprint.get("format", "")).startswith("prepare_caseops_data/"):
            continue
        own.update(OWN_FILE_NAMES, [record_name])
        own.update(f["name"] for f in record.get("files", []) if isinstance(f, dict) and isinstance(f.get("name"), str))
    return sorted(p.name for p in out_dir.iterdir()
                  if p.name not in own and not (STATE_NAME in own and p.name.startswith(".") and ".tmp-" in p.name))


def clear_work_dir(work_dir: Path, keep: set[str]) -> None:
    """An empty work folder (but for `keep`): what an earlier, different run left there goes."""
    work_dir.mkdir(exist_ok=True)
    for entry in work_dir.iterdir():
        if entry.name not in keep:
            remove_path(entry)


def install_output(work_dir: Path, out_dir: Path) -> None:
    """Rename the complete work folder to out_dir; the earlier out_dir is deleted only afterwards. The
    two renames run with SIGINT/SIGTERM held; a crash between them is repaired by the next run."""
    old_dir = old_dir_for(out_dir)
    with stop_signals_deferred():
        remove_path(old_dir)
        if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        if out_dir.exists() or out_dir.is_symlink():
            os.rename(out_dir, old_dir)
        os.rename(work_dir, out_dir)
        fsync_dir(out_dir.parent)
    remove_path(old_dir)


def remove_path(path: Path) -> None:
    """Delete a folder tree, a file or a symlink (not what it points to); nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore_interrupted_install(out_dir: Path) -> None:
    """Undo a crash inside install_output: the earlier output goes back if --out is missing."""
    old_dir = old_dir_for(out_dir)
    if not old_dir.exists():
        return
    if out_dir.exists() or out_dir.is_symlink():
        remove_path(old_dir)  # the new output was installed; only the deletion of the old one was cut short
    else:
        os.rename(old_dir, out_dir)
        log(f"restored {out_dir} from {old_dir} (an earlier run stopped while replacing it)")


# -----------------------------------------------------------------------------
# Progress line (stderr; no dependency)


class Progress:
    def __init__(self, total_docs: int, total_bytes: int, enabled: bool = True):
        self.total_docs, self.total_bytes, self.enabled = total_docs, max(total_bytes, 1), enabled
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, docs: int, done_bytes: int, force: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        rate = done_bytes / max(now - self.start, 1e-9)
        eta = (self.total_bytes - done_bytes) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * done_bytes / self.total_bytes)
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] {docs:,}/{self.total_docs:,} docs  {done_bytes / 1e6:,.1f} MB  "
                f"{rate / 1e6:.2f} MB/s  eta {eta:,.0f}s")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


# -----------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--docs", help="input JSONL: one {\"text\": ...} object or JSON string per line")
    p.add_argument("--out", required=True, help="output directory (flat)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--sp", help="an existing SentencePiece model to tokenize with")
    tok.add_argument("--vocab-size", type=int, help="train a lossless SentencePiece BPE of this size on the train split")
    p.add_argument("--tokenizer-train-docs", type=int, default=None,
                   help="with --vocab-size: train on the first N training documents only (default: all)")
    p.add_argument("--tokenizer-spec", default=None,
                   help="with --vocab-size: JSON file whose \"trainer_settings\" override the lossless defaults "
                        "(e.g. tokenizers/sp8192_caseops.spec.json)")
    p.add_argument("--val-docs", type=int, default=None,
                   help=f"the first N documents are validation (default {CHALLENGE_VAL_DOCS:,}; --demo: {DEMO_VAL_DOCS})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="worker processes")
    p.add_argument("--transform", choices=("caseops", "identity"), default="caseops")
    p.add_argument("--demo", action="store_true", help="build the stdlib-docstring corpus (no download) and run on it")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) bad input lines instead of stopping")
    p.add_argument("--allow-short-val", action="store_true",
                   help=f"allow --val-docs below {CHALLENGE_VAL_DOCS:,} on a corpus that has that many documents")
    p.add_argument("--allow-train-val-duplicates", action="store_true",
                   help="allow training documents identical to a validation document (counted in the manifest)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out that is not this script's output (deleted once the new output "
                        "is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    if args.demo == bool(args.docs):
        p.error("give exactly one of --docs or --demo")
    if args.val_docs is None:
        args.val_docs = DEMO_VAL_DOCS if args.demo else CHALLENGE_VAL_DOCS
    if args.val_docs < 0 or args.shard_tokens < 1 or args.workers < 1:
        p.error("--val-docs must be >= 0, --shard-tokens and --workers >= 1")
    if args.val_docs == 0:
        print("prepare_caseops_data.py: warning: --val-docs 0: no validation split, so no val shards or byte "
              "sidecars; the output can be trained on but not scored", file=sys.stderr)
    if args.vocab_size is not None and not (8 < args.vocab_size <= MAX_TOKEN_ID + 1):
        p.error(f"--vocab-size must be in 9..{MAX_TOKEN_ID + 1}")
    if args.tokenizer_spec and args.vocab_size is None:
        p.error("--tokenizer-spec needs --vocab-size")
    if args.sp is None and args.vocab_size is None:
        if not args.demo:
            p.error("give --sp MODEL or --vocab-size N")
        args.sp = str(DEMO_TOKENIZER)
    return args


def log(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


def check_split(args: argparse.Namespace, scan: InputScan) -> None:
    if scan.docs <= args.val_docs:
        raise BadInputError(f"{args.docs}: {scan.docs:,} documents, but --val-docs {args.val_docs:,} leaves no "
                            "training documents; pass a smaller --val-docs")
    if (args.val_docs < CHALLENGE_VAL_DOCS and not args.demo and not args.allow_short_val
            and (scan.docs > CHALLENGE_VAL_DOCS or Path(args.docs).name == "docs_selected.jsonl")):
        raise BadInputError(
            f"{args.docs}: --val-docs {args.val_docs:,} is shorter than the challenge's {CHALLENGE_VAL_DOCS:,}-document "
            "validation split; the rest of that split would land in the training shards (a published prep "
            "script did this with 10,000). Pass --allow-short-val if this is really wanted.")
    if scan.duplicate_count and not args.allow_train_val_duplicates:
        line, val_doc = scan.train_val_duplicates[0]
        raise BadInputError(
            f"{args.docs}:{line}: training document identical to validation document {val_doc} "
            f"({scan.duplicate_count:,} such training documents); pass --allow-train-val-duplicates to accept")


def prepare_tokenizer(args: argparse.Namespace, scan: InputScan, work_dir: Path, bad_lines: set[int]) -> tuple[bytes, dict]:
    """The model bytes and the manifest's record of where they came from. Training runs in a worker
    process: SentencePiece's C++ trainer would hold off a signal here until it finished."""
    if args.sp:
        model_bytes = read_tokenizer_file(args.sp)
        return model_bytes, {"source": "file", "path": str(args.sp)}
    settings = tokenizer_trainer_settings(args.vocab_size, args.transform)
    n_train = scan.docs - args.val_docs
    if args.tokenizer_spec:
        try:
            overrides = json.loads(Path(args.tokenizer_spec).read_text(encoding="utf-8"))["trainer_settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            overrides = exc
        if not isinstance(overrides, dict):
            raise BadInputError(f"{args.tokenizer_spec}: not a tokenizer spec with a \"trainer_settings\" "
                                f"object ({overrides!r})")
        settings.update(overrides)
        settings["vocab_size"] = args.vocab_size
    if args.tokenizer_train_docs is not None:
        n_train = min(n_train, args.tokenizer_train_docs)
    provenance = {"source": "trained", "trained_on_split": "train",
                  "trained_on_doc_indices": [args.val_docs, args.val_docs + n_train],
                  "trained_on_docs": n_train, "trainer_settings": settings,
                  "note": "documents are transformed first; SentencePiece skips sentences longer than "
                          "max_sentence_length bytes"}
    existing = work_dir / "tokenizer.model"
    state_path = work_dir / STATE_NAME
    if existing.is_file() and state_path.is_file():  # resume: reuse the model this run already trained
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if state.get("tokenizer_provenance") == provenance and state.get("input_sha256") == scan.sha256:
                model_bytes = existing.read_bytes()
                if sha256_bytes(model_bytes) == state.get("tokenizer_sha256"):
                    log("reusing the tokenizer trained by the interrupted run")
                    return model_bytes, provenance
        except (OSError, ValueError):
            pass
    log(f"training a {args.vocab_size}-piece tokenizer on {n_train:,} training documents")
    task = TrainingTask(args.docs, frozenset(bad_lines), args.val_docs, n_train, args.transform, settings)
    with WorkerPool(train_tokenizer_on_documents, 1) as pool:
        model_bytes = next(pool.map([task]))
    return model_bytes, provenance


class TrainingTask(NamedTuple):
    docs_path: str
    bad_lines: frozenset
    val_docs: int
    n_train: int
    transform: str
    settings: dict


def train_tokenizer_on_documents(task: TrainingTask) -> bytes:
    """Train on documents val_docs .. val_docs + n_train - 1 of the input, transformed."""
    def training_texts():
        for doc_index, _, text in iter_documents(task.docs_path, task.bad_lines, start_doc=task.val_docs):
            if doc_index >= task.val_docs + task.n_train:
                return
            yield lossless_caps.encode_lossless_caps_v2(text) if task.transform == "caseops" else text

    try:
        return train_tokenizer(training_texts(), task.settings)
    except RuntimeError as exc:  # e.g. a vocabulary smaller than the characters it must cover
        raise BadInputError(f"{task.docs_path}: SentencePiece training failed: {exc}") from exc


def run(args: argparse.Namespace) -> dict:
    out_dir = output_path(args.out)
    work_dir = work_dir_for(out_dir)
    restore_interrupted_install(out_dir)
    foreign = foreign_entries(out_dir)
    if foreign and not args.force:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise BadInputError(f"{out_dir}: not empty and not this script's output ({len(foreign)} entries it did not "
                            f"write: {shown}); nothing was changed. Choose another --out, or pass --force to "
                            "replace the folder (its contents are deleted once the new output is complete)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    input_path = args.docs
    if args.demo:  # the corpus is part of the output: it goes where the shards are built
        docs = build_demo_corpus()
        work_dir.mkdir(exist_ok=True)
        args.docs, input_path = str(work_dir / DEMO_DOCS_NAME), str(out_dir / DEMO_DOCS_NAME)
        write_demo_docs(Path(args.docs), docs)
        log(f"demo corpus: {len(docs):,} stdlib docstring documents -> {input_path}")

    log(f"scanning {input_path}")
    scan = scan_input(args.docs, args.val_docs, args.skip_bad_lines, args.workers)
    check_split(args, scan)
    bad_lines = {line for line, _ in scan.bad_lines}
    for line, why in scan.bad_lines[:5]:
        log(f"skipped bad line: {why}")

    model_bytes, provenance = prepare_tokenizer(args, scan, work_dir, bad_lines)
    sp = load_tokenizer(model_bytes, args.sp or "trained tokenizer")
    if sp.get_piece_size() > MAX_TOKEN_ID + 1:
        raise BadInputError(f"{args.sp}: vocabulary of {sp.get_piece_size():,} pieces: token ids would not fit "
                            "in uint16 shards")
    check_tokenizer(sp, args.sp or "trained tokenizer", args.transform)
    tokenizer_sha = sha256_bytes(model_bytes)

    fingerprint = {"format": SCRIPT_FORMAT, "input_sha256": scan.sha256, "tokenizer_sha256": tokenizer_sha,
                   "transform": args.transform, "val_docs": args.val_docs, "shard_tokens": args.shard_tokens,
                   "skip_bad_lines": args.skip_bad_lines}
    state = load_state(work_dir, fingerprint)
    if state is None:
        if not foreign and _completed_run_matches(out_dir, fingerprint):
            log("output already complete for these arguments (all shard hashes verified)")
            if work_dir.exists():
                shutil.rmtree(work_dir)
            return json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        clear_work_dir(work_dir, keep={DEMO_DOCS_NAME} if args.demo else set())
        state = {"fingerprint": fingerprint, "files": [], "next_doc": 0, "next_doc_token_offset": 0,
                 "shard_index": {"val": 0, "train": 0},
                 "stats": {"val": SplitStats().to_json(), "train": SplitStats().to_json()}}
    else:
        log(f"resuming in {work_dir}: {len(state['files'])} files done, continuing at document {state['next_doc']:,}")
        for leftover in work_dir.glob(".*.tmp-*"):  # temp files of the killed run
            leftover.unlink()
    state["tokenizer_provenance"] = provenance
    state["tokenizer_sha256"] = tokenizer_sha
    state["input_sha256"] = scan.sha256
    write_atomic(work_dir / "tokenizer.model", model_bytes)
    save_state(work_dir, state)

    stats = {split: SplitStats.from_json(state["stats"][split]) for split in ("val", "train")}
    try:
        encode_documents(args, work_dir, state, stats, model_bytes, scan)
    except BadInputError:  # the same input would fail the same way: nothing to resume
        shutil.rmtree(work_dir)
        raise

    val_hash_payload = "".join(h + "\n" for h in scan.val_hashes).encode("ascii")
    write_atomic(work_dir / VAL_HASHES_NAME, val_hash_payload)
    manifest = build_manifest(args, input_path, scan, sp, model_bytes, provenance, state, stats, val_hash_payload,
                              fingerprint)
    write_atomic(work_dir / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    (work_dir / STATE_NAME).unlink()
    if foreign:
        log(f"--force: replacing {out_dir} ({len(foreign)} entries this script did not write)")
    elif out_dir.exists() and any(out_dir.iterdir()):
        log(f"replacing the earlier output in {out_dir}")
    with stop_signals_deferred():
        install_output(work_dir, out_dir)
        ignore_stop_signals()  # the output is complete: a late Ctrl-C changes nothing and is dropped
    verification = manifest["verification"]
    log(f"input: {scan.lines:,} lines, {scan.docs:,} documents; skipped {scan.blank_lines:,} blank lines and "
        f"{len(scan.bad_lines):,} bad lines")
    log(f"val: {stats['val'].docs:,} docs, {stats['val'].tokens:,} tokens, {stats['val'].original_bytes:,} bytes; "
        f"train: {stats['train'].docs:,} docs, {stats['train'].tokens:,} tokens")
    log(f"verification: val sidecar mismatches {verification['val_sidecar_mismatch_docs']} (must be 0); "
        f"docs not decoding to the original text: val {verification['roundtrip_failed_docs']['val']}, "
        f"train {verification['roundtrip_failed_docs']['train']}")
    log(f"done: {out_dir}")
    return manifest


def _completed_run_matches(out_dir: Path, fingerprint: dict) -> bool:
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return False
    return all((out_dir / f["name"]).is_file() and sha256_file(out_dir / f["name"]) == f["sha256"]
               for f in manifest.get("files", []))


def encode_documents(args, out_dir: Path, state: dict, stats: dict, model_bytes: bytes, scan: InputScan) -> None:
    """Encode the chunks in the workers, in order, and cut the token streams into shards. Per chunk this
    process only slices the workers' arrays into shards: no per-document work."""
    abort_after = int(os.environ.get(ABORT_ENV, "0") or 0)
    shards_written = 0
    start_doc, skip_tokens = state["next_doc"], state["next_doc_token_offset"]
    writers = {split: ShardWriter(out_dir, split, args.shard_tokens, state["shard_index"][split])
               for split in ("val", "train")}
    progress = Progress(scan.docs, scan.doc_bytes, enabled=not args.quiet)
    done_bytes = stats["val"].original_bytes + stats["train"].original_bytes

    def checkpoint(next_doc: int, offset: int) -> None:
        nonlocal shards_written
        state["shard_index"] = {s: w.index for s, w in writers.items()}
        state["next_doc"], state["next_doc_token_offset"] = next_doc, offset
        state["stats"] = {s: stats[s].to_json() for s in stats}
        save_state(out_dir, state)
        shards_written += 1
        if abort_after and shards_written >= abort_after:
            raise SimulatedInterruption(f"{ABORT_ENV}={abort_after}: stopping after {shards_written} shard(s)")

    # resume at the chunk holding start_doc (the last chunk starting at or before it); earlier documents
    # of that chunk are encoded again and dropped here
    first_docs = [chunk.first_doc for chunk in scan.chunks]
    first_chunk = max(int(np.searchsorted(first_docs, start_doc, side="right")) - 1, 0)
    tasks = [chunk._replace(val_docs=args.val_docs, skip_bad_lines=args.skip_bad_lines)
             for chunk in scan.chunks[first_chunk:]]
    if args.workers == 1:
        encode = functools.partial(encode_chunk, ctx=make_worker_context(model_bytes, args.transform, args.docs))
        results = ordered_map(encode, tasks, 1)
    else:
        results = ordered_map(encode_chunk, tasks, args.workers, _init_worker, (model_bytes, args.transform, args.docs))

    current_split = "val" if start_doc < args.val_docs else "train"
    with contextlib.closing(results):  # stops the workers at once if this loop raises
        for task, result in zip(tasks, results):
            doc_ends = np.cumsum(result.doc_tokens)  # (docs,) token offset where each document ends
            n_docs = doc_ends.size
            n_val = min(max(args.val_docs - task.first_doc, 0), n_docs)
            for split, lo, hi in (("val", 0, n_val), ("train", n_val, n_docs)):
                lo = max(lo, start_doc - task.first_doc)
                if lo >= hi:
                    continue
                if split != current_split:  # the val stream ends with its own (short) last shard
                    state["files"] += writers[current_split].flush()
                    checkpoint(task.first_doc + lo, 0)
                    current_split = split
                writer = writers[split]
                position = int(doc_ends[lo] - result.doc_tokens[lo])
                if task.first_doc + lo == start_doc:
                    position += skip_tokens
                end, counted = int(doc_ends[hi - 1]), lo  # documents lo..counted-1 are in stats
                while position < end:
                    take = min(end - position, writer.room())
                    writer.add(result.tokens[position : position + take],
                               result.sidecar[position : position + take] if split == "val" else None)
                    position += take
                    if writer.room() == 0:
                        state["files"] += writer.flush()
                        # the checkpoint counts only the documents that ended in this shard; one that continues
                        # in the next shard is redone from its token offset on resume
                        doc = int(np.searchsorted(doc_ends, position, side="right"))
                        stats[split].add_docs(result, counted, doc, task.first_doc)
                        counted = doc
                        offset = position - int(doc_ends[doc] - result.doc_tokens[doc]) if doc < n_docs else 0
                        checkpoint(task.first_doc + doc, offset)
                stats[split].add_docs(result, counted, hi, task.first_doc)
                done_bytes += int(result.original_bytes[lo:hi].sum())
            progress.update(stats["val"].docs + stats["train"].docs, done_bytes)
    state["files"] += writers[current_split].flush()
    progress.update(stats["val"].docs + stats["train"].docs, done_bytes, force=True)
    progress.close()
    state["stats"] = {s: stats[s].to_json() for s in stats}


def build_manifest(args, input_path: str, scan: InputScan, sp, model_bytes: bytes, provenance: dict, state: dict,
                   stats: dict, val_hash_payload: bytes, fingerprint: dict) -> dict:
    files = state["files"]
    tokenizer = tokenizer_summary(sp, model_bytes)
    tokenizer.update(file="tokenizer.model", **provenance)
    splits = {}
    for split in ("val", "train"):
        s = stats[split]
        splits[split] = {
            "docs": s.docs, "tokens": s.tokens, "original_bytes": s.original_bytes,
            "shards": [f["name"] for f in files if f["name"].startswith(f"fineweb_{split}_0")],
        }
    splits["val"]["doc_indices"] = [0, stats["val"].docs]
    splits["val"]["byte_sidecars"] = [f["name"] for f in files if f["name"].startswith("fineweb_val_bytes_")]
    splits["train"]["doc_indices"] = [stats["val"].docs, stats["val"].docs + stats["train"].docs]
    return {
        "format": SCRIPT_FORMAT,
        "fingerprint": fingerprint,
        "input": {"path": str(input_path), "sha256": scan.sha256, "bytes": scan.size, "lines": scan.lines,
                  "docs": scan.docs, "doc_utf8_bytes": scan.doc_bytes, "demo": bool(args.demo),
                  "blank_lines_skipped": scan.blank_lines, "bad_lines_skipped": len(scan.bad_lines),
                  "bad_lines_first": [{"line": line, "error": why} for line, why in scan.bad_lines[:20]]},
        "transform": lossless_caps.TRANSFORM_NAME if args.transform == "caseops" else "identity",
        "tokenizer": tokenizer,
        "bos_id": BOS_ID,
        "shard_tokens": args.shard_tokens,
        "val_docs_requested": args.val_docs,
        "splits": splits,
        "files": files,
        "val_doc_hashes": {"file": VAL_HASHES_NAME, "algorithm": "sha256 of each val document's UTF-8 text, in order",
                           "count": len(scan.val_hashes), "sha256": sha256_bytes(val_hash_payload)},
        "train_val_duplicates": {"count": scan.duplicate_count, "allowed": bool(args.allow_train_val_duplicates),
                                 "first": [{"train_line": line, "val_doc": v} for line, v in scan.train_val_duplicates[:20]]},
        "overrides": {"allow_short_val": bool(args.allow_short_val),
                      "allow_train_val_duplicates": bool(args.allow_train_val_duplicates),
                      "skip_bad_lines": bool(args.skip_bad_lines)},
        "verification": {
            "val_sidecar_mismatch_docs": stats["val"].sidecar_mismatch,
            "roundtrip_failed_docs": {"val": stats["val"].roundtrip_failed, "train": stats["train"].roundtrip_failed},
            "roundtrip_failed_examples": {"val": stats["val"].roundtrip_failed_examples,
                                          "train": stats["train"].roundtrip_failed_examples},
            "val_docs_attributed_from_tokenizer_offsets": stats["val"].offsets_path_docs,
            # a normalizer can reduce a whitespace-only document to nothing: no token can carry its
            # bytes, so it also counts as a sidecar mismatch (FineWeb has no such documents)
            "tokenless_nonempty_docs": {"val": stats["val"].tokenless_docs, "train": stats["train"].tokenless_docs},
        },
        "environment": {"python": sys.version.split()[0], "sentencepiece": spm.__version__, "numpy": np.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with stop_signals_raise():
        try:
            run(args)
        except BadInputError as exc:
            print(f"prepare_caseops_data.py: error: {exc}", file=sys.stderr)
            return 2
        except SimulatedInterruption as exc:
            print(f"prepare_caseops_data.py: interrupted: {exc}", file=sys.stderr)
            return 3
        except WorkerDiedError as exc:
            print(f"prepare_caseops_data.py: error: {exc}", file=sys.stderr)
            return 1
        except Interrupted as exc:
            ignore_stop_signals()  # a second Ctrl-C while this is printed: no traceback
            work_dir = work_dir_for(output_path(args.out))
            where = (f"the unfinished output in {work_dir} resumes when the same command runs again"
                     if (work_dir / STATE_NAME).is_file() else "no shard was written")
            print(f"{chr(10) if sys.stderr.isatty() else ''}prepare_caseops_data.py: stopped by {exc}: workers "
                  f"stopped; {where}", file=sys.stderr, flush=True)
            return 128 + exc.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
