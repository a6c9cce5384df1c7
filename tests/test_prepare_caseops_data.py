"""Tests for prepare_caseops_data.py: shard format, exact val byte sidecars, verification counts,
worker-count independence, resume, bad input and the demo corpus.

Sidecars are checked against an independent attribution written here from SPEC section 2-3 (walk the
transformed text character by character, inserted operators weigh 0 bytes, every piece covers its
surface), not against the script's own boundary code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lossless_caps  # noqa: E402
import prepare_caseops_data as prep  # noqa: E402

DEMO_MODEL = REPO / "tokenizers" / "demo_caseops_1024.model"
OPS = (lossless_caps.TITLE, lossless_caps.ALLCAPS, lossless_caps.CAPNEXT, lossless_caps.ESC)

# -----------------------------------------------------------------------------
# Helpers


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Deterministic documents exercising case patterns, non-ASCII text, rare characters (byte
    fallback), literal operators, whitespace runs, digits and an empty document."""
    rng = random.Random(seed)
    words = ["the", "The", "THE", "NASA's", "iPhone", "McDonald", "I", "a", "data", "Parameter", "golf",
             "naïve", "café", "Ünïcode", "日本語", "😀", "🦜x", "\ue001", "\ue004y", "12345", "x2", "ﬁne",
             "Ｆｕｌｌ", "①", "tab\there", "line\nbreak", "  double", "end.  ", "\u2581odd", "ʃəʊ"]
    docs = []
    for i in range(n):
        if i == 3:  # doc 3 is empty
            docs.append("")
            continue
        docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) + f" #{i}")
    return docs


def write_jsonl(path: Path, docs: list[str], as_strings: bool = False) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc if as_strings else {"text": doc}, ensure_ascii=False) + "\n")
    return path


def run_prep(tmp_path: Path, docs_path: Path, out_name: str = "out", *extra: str) -> tuple[int, Path]:
    out = tmp_path / out_name
    code = prep.main(["--docs", str(docs_path), "--out", str(out), "--quiet", *extra])
    return code, out


def split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    """Split a BOS-prefixed stream into per-document token arrays (BOS included)."""
    starts = np.flatnonzero(tokens == prep.BOS_ID)
    return np.split(tokens, starts[1:]) if starts.size else []


def read_split(out: Path, prefix: str) -> np.ndarray:
    files = sorted(out.glob(f"{prefix}_[0-9]*.bin"))
    return np.concatenate([prep.read_shard(f) for f in files]) if files else np.zeros(0, np.uint16)


def independent_sidecar(sp: spm.SentencePieceProcessor, doc: str) -> list[int]:
    """Original bytes per token for a LOSSLESS tokenizer, computed without the script's code: weight
    every byte of the transformed text (inserted operators 0, everything else 1), then give each piece
    the weights of its surface (a byte-fallback piece is one byte)."""
    encoded = lossless_caps.encode_lossless_caps_v2(doc)
    weights: list[int] = []
    i = 0
    while i < len(encoded):
        ch = encoded[i]
        if ch == lossless_caps.ESC:  # inserted ESC, then the literal operator character (3 real bytes)
            weights += [0, 0, 0, 1, 1, 1]
            i += 2
            continue
        weights += [0, 0, 0] if ch in OPS else [1] * len(ch.encode("utf-8"))
        i += 1
    counts, position = [], 0
    for token_id in sp.encode(encoded):
        width = 1 if sp.is_byte(token_id) else len(sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8"))
        counts.append(sum(weights[position : position + width]))
        position += width
    assert position == len(weights), "pieces must tile a lossless tokenizer's input"
    return counts


@pytest.fixture(scope="module")
def demo_sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(DEMO_MODEL))


@pytest.fixture(scope="module")
def nfkc_model(tmp_path_factory) -> Path:
    """A small tokenizer trained like the published SP8192 CaseOps model (nmt_nfkc, whitespace removal,
    no dummy prefix, byte fallback, split digits, operators as user-defined symbols)."""
    texts = [lossless_caps.encode_lossless_caps_v2(d) for d in make_docs(200, seed=1)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=320,
        normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True, add_dummy_prefix=False,
        byte_fallback=True, split_digits=True, character_coverage=0.995, hard_vocab_limit=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=list(OPS), minloglevel=2)
    path = tmp_path_factory.mktemp("nfkc") / "nfkc_caseops.model"
    path.write_bytes(model.getvalue())
    return path


# -----------------------------------------------------------------------------
# Byte attribution core


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=0, max_size=30), st.integers(0, 60))
def test_token_boundaries_tile_the_input_for_any_piece_offsets(begins, input_len):
    bounds = prep.token_boundaries(np.array(begins, dtype=np.int64), input_len)
    assert bounds.size == len(begins) + 1
    assert bounds[-1] == input_len
    if begins:
        assert bounds[0] == 0
    assert (np.diff(bounds) >= 0).all()
    counts = prep.original_bytes_per_token(bounds, None)
    assert counts.sum() == (input_len if begins else 0)


def test_token_boundaries_keep_tiled_pieces_and_give_uncovered_bytes_to_the_preceding_token():
    # pieces [0,2) [2,5) [5,6) tile the input: boundaries are their begins
    assert prep.token_boundaries(np.array([0, 2, 5]), 6).tolist() == [0, 2, 5, 6]
    # a normalizer dropped bytes 0-1 (leading spaces), 4-5 (inner) and 8-9 (trailing)
    assert prep.token_boundaries(np.array([2, 6]), 10).tolist() == [0, 6, 10]


def test_byte_fallback_pieces_of_one_character_share_it_evenly():
    # three byte pieces of a 3-byte character report (4,4) (4,4) (4,7); then a piece at 7
    assert prep.token_boundaries(np.array([0, 4, 4, 4, 7]), 9).tolist() == [0, 4, 5, 6, 7, 9]
    # a 4-byte emoji as the last character
    assert prep.token_boundaries(np.array([0, 2, 2, 2, 2]), 6).tolist() == [0, 2, 3, 4, 5, 6]


def test_operator_bytes_carry_no_original_bytes():
    encoded, byte_map = lossless_caps.encode_with_byte_map("Hi NASA")
    ctx = prep.make_worker_context(DEMO_MODEL.read_bytes(), "caseops", "x.jsonl")
    ids, begins = prep.piece_begins_from_tokenizer(ctx, encoded)
    counts = prep.original_bytes_per_token(prep.token_boundaries(begins, len(encoded.encode())), byte_map)
    assert counts.sum() == len("Hi NASA")
    for token_id, count in zip(ids, counts):
        if ctx.sp.id_to_piece(int(token_id)) in OPS:
            assert count == 0


def test_fast_tiling_path_equals_sentencepiece_offsets_for_lossless_tokenizer(demo_sp):
    ctx = prep.make_worker_context(DEMO_MODEL.read_bytes(), "caseops", "x.jsonl")
    for doc in make_docs(40, seed=5):
        result = prep.process_document(ctx, doc, True, 1)
        encoded, byte_map = lossless_caps.encode_with_byte_map(doc)
        _, begins = prep.piece_begins_from_tokenizer(ctx, encoded)
        from_offsets = prep.original_bytes_per_token(prep.token_boundaries(begins, len(encoded.encode())), byte_map)
        assert result.sidecar[1:].tolist() == from_offsets.tolist()


def test_long_documents_encoded_in_pieces_give_the_same_ids_as_whole(demo_sp):
    ctx = prep.make_worker_context(DEMO_MODEL.read_bytes(), "caseops", "x.jsonl")
    assert ctx.split_safe
    ctx.segment_chars = 40  # cut every ~40 characters, before a space
    for doc in make_docs(30, seed=11) + ["word " * 200, " leading and  double  spaces ", "nospaces" * 30]:
        encoded = lossless_caps.encode_lossless_caps_v2(doc)
        assert prep.encode_ids(ctx, encoded) == demo_sp.encode(encoded)


def test_normalizing_tokenizer_is_never_encoded_in_pieces(nfkc_model):
    ctx = prep.make_worker_context(nfkc_model.read_bytes(), "caseops", "x.jsonl")
    assert not ctx.split_safe


TEXT = st.text(alphabet=st.one_of(st.sampled_from("aAbBzZ  \n\t.'19\u2581") , st.sampled_from(OPS),
                                  st.characters(codec="utf-8")), max_size=60)


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_any_text_gets_exact_sidecar_with_the_lossless_tokenizer(text):
    ctx = _demo_ctx()
    result = prep.process_document(ctx, text, True, 1)
    assert int(result.sidecar.sum()) == len(text.encode("utf-8")) and result.sidecar_ok
    assert result.roundtrip_ok == ("\u2581" not in text)
    if "\u2581" not in text:
        assert result.sidecar[1:].tolist() == independent_sidecar(ctx.sp, text)


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_any_text_gets_exact_sidecar_with_a_normalizing_tokenizer(nfkc_model, text):
    ctx = _nfkc_ctx(nfkc_model)
    result = prep.process_document(ctx, text, True, 1)
    if result.tokens.size == 1 and text:  # normalized away entirely (whitespace only): nothing to carry it
        assert not result.sidecar_ok and not ctx.sp.encode(lossless_caps.encode_lossless_caps_v2(text))
    else:
        assert int(result.sidecar.sum()) == len(text.encode("utf-8")) and result.sidecar_ok


_CONTEXTS: dict = {}


def _demo_ctx():
    if "demo" not in _CONTEXTS:
        _CONTEXTS["demo"] = prep.make_worker_context(DEMO_MODEL.read_bytes(), "caseops", "x.jsonl")
    return _CONTEXTS["demo"]


def _nfkc_ctx(path):
    if path not in _CONTEXTS:
        _CONTEXTS[path] = prep.make_worker_context(path.read_bytes(), "caseops", "x.jsonl")
    return _CONTEXTS[path]


# -----------------------------------------------------------------------------
# End to end with the shipped lossless tokenizer


@pytest.fixture(scope="module")
def lossless_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lossless")
    docs = make_docs(60)
    docs_path = write_jsonl(tmp / "docs.jsonl", docs)
    code, out = run_prep(tmp, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "20",
                         "--shard-tokens", "400", "--workers", "1")
    assert code == 0
    return docs, docs_path, out


def test_shards_have_challenge_header_and_bos_before_every_document(lossless_run, demo_sp):
    docs, _, out = lossless_run
    for split, doc_range in (("fineweb_val", range(0, 20)), ("fineweb_train", range(20, 60))):
        for shard in sorted(out.glob(f"{split}_[0-9]*.bin")):
            header = np.frombuffer(shard.read_bytes()[:1024], dtype="<i4")
            assert header[:3].tolist() == [20240520, 1, (shard.stat().st_size - 1024) // 2]
            assert not header[3:].any()
        stream = read_split(out, split)
        per_doc = split_docs(stream)
        assert len(per_doc) == len(doc_range)
        for doc_tokens, doc_index in zip(per_doc, doc_range):
            expected = demo_sp.encode(lossless_caps.encode_lossless_caps_v2(docs[doc_index]))
            assert doc_tokens.tolist() == [1] + expected


def test_documents_straddle_shards_of_exactly_shard_tokens(lossless_run):
    _, _, out = lossless_run
    train_shards = sorted(out.glob("fineweb_train_[0-9]*.bin"))
    assert len(train_shards) >= 3
    sizes = [prep.read_shard(s).size for s in train_shards]
    assert all(size == 400 for size in sizes[:-1]) and 0 < sizes[-1] <= 400


def test_val_sidecar_matches_independent_attribution_and_sums_to_utf8_length(lossless_run, demo_sp):
    docs, _, out = lossless_run
    tokens = read_split(out, "fineweb_val")
    sidecar = read_split(out, "fineweb_val_bytes")
    assert sidecar.size == tokens.size
    starts = np.flatnonzero(tokens == 1)
    assert (sidecar[starts] == 0).all()
    for doc_index, doc_sidecar in enumerate(np.split(sidecar, starts[1:])):
        assert int(doc_sidecar.sum()) == len(docs[doc_index].encode("utf-8"))
        if "\u2581" not in docs[doc_index]:  # SentencePiece reads a literal U+2581 as a space
            assert doc_sidecar[1:].tolist() == independent_sidecar(demo_sp, docs[doc_index])


def test_manifest_records_counts_hashes_and_verification(lossless_run, demo_sp):
    docs, docs_path, out = lossless_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["val_sidecar_mismatch_docs"] == 0
    # the lossless tokenizer round-trips everything except a literal U+2581, which SentencePiece
    # itself reads as its whitespace marker; those documents are counted, not hidden
    failed = [i for i, d in enumerate(docs)
              if lossless_caps.decode_lossless_caps_v2(demo_sp.decode(demo_sp.encode(
                  lossless_caps.encode_lossless_caps_v2(d)))) != d]
    assert failed == [i for i, d in enumerate(docs) if "\u2581" in d] and failed
    assert manifest["verification"]["roundtrip_failed_docs"] == {
        "val": sum(i < 20 for i in failed), "train": sum(i >= 20 for i in failed)}
    assert manifest["splits"]["val"]["docs"] == 20 and manifest["splits"]["train"]["docs"] == 40
    assert manifest["splits"]["val"]["original_bytes"] == sum(len(d.encode()) for d in docs[:20])
    assert manifest["input"]["sha256"] == hashlib.sha256(docs_path.read_bytes()).hexdigest()
    assert manifest["transform"] == lossless_caps.TRANSFORM_NAME
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(DEMO_MODEL.read_bytes()).hexdigest()
    assert (out / "tokenizer.model").read_bytes() == DEMO_MODEL.read_bytes()
    hashes = (out / manifest["val_doc_hashes"]["file"]).read_text().split()
    assert hashes == [hashlib.sha256(d.encode()).hexdigest() for d in docs[:20]]
    for record in manifest["files"]:
        assert hashlib.sha256((out / record["name"]).read_bytes()).hexdigest() == record["sha256"]
    assert not list(out.glob(".*"))  # no checkpoint or temp file left behind


def test_empty_document_is_a_lone_bos_with_zero_bytes(lossless_run):
    docs, _, out = lossless_run
    assert docs[3] == ""
    per_doc = split_docs(read_split(out, "fineweb_val"))
    assert per_doc[3].tolist() == [1]


def test_identity_transform_tokenizes_the_original_text(tmp_path, demo_sp):
    docs = make_docs(12, seed=3)
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs, as_strings=True), "out",
                         "--sp", str(DEMO_MODEL), "--val-docs", "6", "--transform", "identity", "--workers", "1")
    assert code == 0
    per_doc = split_docs(read_split(out, "fineweb_val"))
    sidecar = read_split(out, "fineweb_val_bytes")
    assert [d.tolist() for d in per_doc] == [[1] + demo_sp.encode(d) for d in docs[:6]]
    starts = np.flatnonzero(read_split(out, "fineweb_val") == 1)
    assert [int(s.sum()) for s in np.split(sidecar, starts[1:])] == [len(d.encode()) for d in docs[:6]]
    assert json.loads((out / "manifest.json").read_text())["transform"] == "identity"


# -----------------------------------------------------------------------------
# Normalizing tokenizer (like the published SP8192 CaseOps model)


def test_normalizing_tokenizer_keeps_sidecar_exact_and_counts_non_roundtrip_docs(tmp_path, nfkc_model):
    docs = make_docs(30, seed=9) + ["  ﬁ Ｆｕｌｌ ①  spaces   here  ", "plain words only", "①②③ ＡＢＣ"]
    docs = docs[-3:] + docs[:-3]  # the NFKC-heavy documents are validation documents
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs), "out", "--sp", str(nfkc_model),
                         "--val-docs", "15", "--workers", "2")
    assert code == 0
    tokens, sidecar = read_split(out, "fineweb_val"), read_split(out, "fineweb_val_bytes")
    starts = np.flatnonzero(tokens == 1)
    sums = [int(s.sum()) for s in np.split(sidecar, starts[1:])]
    assert sums == [len(d.encode("utf-8")) for d in docs[:15]]

    sp = spm.SentencePieceProcessor(model_file=str(nfkc_model))

    def round_trips(doc: str) -> bool:
        decoded = sp.decode(sp.encode(lossless_caps.encode_lossless_caps_v2(doc)))
        try:
            return lossless_caps.decode_lossless_caps_v2(decoded) == doc
        except ValueError:
            return False

    manifest = json.loads((out / "manifest.json").read_text())
    verification = manifest["verification"]
    assert verification["tokenless_nonempty_docs"] == {"val": 0, "train": 0}
    expected_val = sum(not round_trips(d) for d in docs[:15])
    assert expected_val >= 2  # the NFKC / whitespace documents really do not round-trip
    assert verification["roundtrip_failed_docs"] == {"val": expected_val,
                                                      "train": sum(not round_trips(d) for d in docs[15:])}
    assert verification["val_sidecar_mismatch_docs"] == 0
    assert verification["val_docs_attributed_from_tokenizer_offsets"] >= expected_val
    assert manifest["tokenizer"]["normalization_rule_name"] == "nmt_nfkc"
    assert manifest["tokenizer"]["remove_extra_whitespaces"] is True


def test_tokenizer_spec_file_trains_with_the_published_settings(tmp_path):
    docs = make_docs(50, seed=4)
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs), "out", "--vocab-size", "400",
                         "--tokenizer-spec", str(REPO / "tokenizers" / "sp8192_caseops.spec.json"),
                         "--val-docs", "10", "--workers", "1")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tokenizer = manifest["tokenizer"]
    assert tokenizer["normalization_rule_name"] == "nmt_nfkc" and tokenizer["remove_extra_whitespaces"] is True
    assert tokenizer["add_dummy_prefix"] is False and tokenizer["operator_ids"] == [4, 5, 6, 7]
    assert tokenizer["trainer_settings"]["character_coverage"] == 0.999
    assert manifest["verification"]["val_sidecar_mismatch_docs"] == 0


def test_document_normalized_to_nothing_is_reported_not_hidden(tmp_path, nfkc_model):
    docs = ["words here", "   \t  ", "more words", "and more"]
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs), "out", "--sp", str(nfkc_model),
                         "--val-docs", "2", "--workers", "1")
    assert code == 0
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    assert verification["tokenless_nonempty_docs"] == {"val": 1, "train": 0}
    assert verification["val_sidecar_mismatch_docs"] == 1
    assert split_docs(read_split(out, "fineweb_val"))[1].tolist() == [1]


# -----------------------------------------------------------------------------
# Scale: worker-count independence and resume


def test_output_is_byte_identical_for_one_and_two_workers(tmp_path, lossless_run):
    _, docs_path, out_one = lossless_run
    code, out_two = run_prep(tmp_path, docs_path, "two", "--sp", str(DEMO_MODEL), "--val-docs", "20",
                             "--shard-tokens", "400", "--workers", "2")
    assert code == 0
    names = sorted(p.name for p in out_one.glob("fineweb_*.bin"))
    assert names == sorted(p.name for p in out_two.glob("fineweb_*.bin"))
    for name in names:
        assert (out_one / name).read_bytes() == (out_two / name).read_bytes(), name
    manifest_one = json.loads((out_one / "manifest.json").read_text())
    manifest_two = json.loads((out_two / "manifest.json").read_text())
    assert manifest_one["files"] == manifest_two["files"]


@pytest.mark.parametrize(("chunk_bytes", "workers"), [(1, 1), (1, 2), (300, 2), (300, 3), (4000, 2)])
def test_output_is_byte_identical_for_any_chunking_and_worker_count(tmp_path, lossless_run, monkeypatch,
                                                                    chunk_bytes, workers):
    # 1 byte: one line per chunk; 300: a few documents each, chunks cut shards and the val/train border
    _, docs_path, reference = lossless_run
    monkeypatch.setattr(prep, "CHUNK_BYTES", chunk_bytes)
    code, out = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "20",
                         "--shard-tokens", "400", "--workers", str(workers))
    assert code == 0
    for path in reference.glob("fineweb_*.bin"):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    manifest, expected = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    for key in ("files", "splits", "verification", "input", "val_doc_hashes"):
        assert manifest[key] == expected[key], key


@pytest.mark.parametrize("chunk_bytes", [None, 300])  # the whole input in one chunk / resuming mid-chunk
@pytest.mark.parametrize("abort_after", [3, 9])  # inside the val stream (mid-document) / the train stream
def test_interrupted_run_resumes_without_redoing_shards_and_gives_identical_bytes(tmp_path, lossless_run,
                                                                                  monkeypatch, abort_after,
                                                                                  chunk_bytes):
    _, docs_path, reference = lossless_run
    if chunk_bytes:
        monkeypatch.setattr(prep, "CHUNK_BYTES", chunk_bytes)
    args = ("--sp", str(DEMO_MODEL), "--val-docs", "20", "--shard-tokens", "400", "--workers", "2")
    monkeypatch.setenv(prep.ABORT_ENV, str(abort_after))
    code, out = run_prep(tmp_path, docs_path, "out", *args)
    assert code == 3
    work = prep.work_dir_for(out)  # the unfinished output is built beside --out
    state = json.loads((work / prep.STATE_NAME).read_text())
    if abort_after == 3:
        assert state["next_doc"] < 20 and state["next_doc_token_offset"] > 0  # resumes inside a document
    else:
        assert state["next_doc"] > 20 and state["shard_index"]["train"] > 0
    done = {record["name"]: (work / record["name"]).stat().st_mtime_ns for record in state["files"]}
    assert len(done) >= 3 and not (out / "manifest.json").exists() and not (work / "manifest.json").exists()
    assert not list(work.glob(".*.tmp-*"))  # nothing half-written
    monkeypatch.delenv(prep.ABORT_ENV)
    code, out = run_prep(tmp_path, docs_path, "out", *args)
    assert code == 0
    for name, mtime in done.items():  # completed shards were not rewritten
        assert (out / name).stat().st_mtime_ns == mtime
    for path in reference.glob("fineweb_*.bin"):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert json.loads((out / "manifest.json").read_text())["splits"] == \
        json.loads((reference / "manifest.json").read_text())["splits"]
    assert not (out / prep.STATE_NAME).exists() and not work.exists()


def test_resume_reuses_the_tokenizer_trained_by_the_interrupted_run(tmp_path, monkeypatch, capsys):
    docs_path = write_jsonl(tmp_path / "d.jsonl", make_docs(60, seed=2))
    args = ("--vocab-size", "400", "--val-docs", "10", "--shard-tokens", "500", "--workers", "1")
    code, reference = run_prep(tmp_path, docs_path, "reference", *args)
    assert code == 0
    monkeypatch.setenv(prep.ABORT_ENV, "2")
    assert run_prep(tmp_path, docs_path, "out", *args)[0] == 3
    monkeypatch.delenv(prep.ABORT_ENV)
    capsys.readouterr()
    code, out = run_prep(tmp_path, docs_path, "out", *args)
    assert code == 0 and "reusing the tokenizer" in capsys.readouterr().out
    for path in list(reference.glob("fineweb_*.bin")) + [reference / "tokenizer.model"]:
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_rerun_of_a_completed_run_is_a_verified_no_op(tmp_path, capsys):
    docs_path = write_jsonl(tmp_path / "d.jsonl", make_docs(8))
    args = ("--sp", str(DEMO_MODEL), "--val-docs", "4", "--workers", "1")
    assert run_prep(tmp_path, docs_path, "out", *args)[0] == 0
    capsys.readouterr()
    assert run_prep(tmp_path, docs_path, "out", *args)[0] == 0
    assert "already complete" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Validation split rules


def test_train_document_identical_to_a_val_document_is_refused_unless_allowed(tmp_path, capsys):
    docs = ["alpha doc", "beta doc", "gamma", "alpha doc", "delta"]
    docs_path = write_jsonl(tmp_path / "d.jsonl", docs)
    code, out = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "2")
    assert code == 2
    assert f"{docs_path}:4" in capsys.readouterr().err
    assert not list(out.glob("fineweb_*"))
    code, out = run_prep(tmp_path, docs_path, "ok", "--sp", str(DEMO_MODEL), "--val-docs", "2",
                         "--allow-train-val-duplicates")
    assert code == 0
    duplicates = json.loads((out / "manifest.json").read_text())["train_val_duplicates"]
    assert duplicates["count"] == 1 and duplicates["first"] == [{"train_line": 4, "val_doc": 0}]


def test_short_val_split_on_challenge_data_is_refused_without_override(tmp_path, capsys):
    docs_path = write_jsonl(tmp_path / "docs_selected.jsonl", [f"document {i}" for i in range(10)])
    code, _ = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "4")
    assert code == 2 and "--allow-short-val" in capsys.readouterr().err
    code, _ = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "4", "--allow-short-val")
    assert code == 0


def test_short_val_split_is_refused_on_any_corpus_larger_than_the_challenge_split(tmp_path, capsys):
    big = tmp_path / "big.jsonl"
    big.write_text("".join(f'"d{i}"\n' for i in range(prep.CHALLENGE_VAL_DOCS + 1)))
    code, out = run_prep(tmp_path, big, "out", "--sp", str(DEMO_MODEL), "--val-docs", "10000")
    assert code == 2 and "10,000" in capsys.readouterr().err
    assert not list(out.glob("fineweb_*"))


def test_default_val_split_is_the_challenge_50000(tmp_path, capsys):
    code, _ = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", ["a", "b"]), "out", "--sp", str(DEMO_MODEL))
    assert code == 2 and "--val-docs 50,000" in capsys.readouterr().err


def test_trained_tokenizer_learns_from_training_documents_only(tmp_path):
    val_word, train_word = "qzvjqzvj", "wykpwykp"
    docs = [f"{val_word} " * 50] * 5 + [f"{train_word} and more words " * 20 + str(i) for i in range(40)]
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs), "out", "--vocab-size", "300",
                         "--val-docs", "5", "--workers", "1", "--allow-train-val-duplicates")
    assert code == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert train_word in pieces or "\u2581" + train_word in pieces
    assert not any(val_word[:4] in p for p in pieces)
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(OPS)
    tokenizer = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tokenizer["trained_on_doc_indices"] == [5, 45]
    assert tokenizer["normalization_rule_name"] == "identity"
    assert tokenizer["add_dummy_prefix"] is False and tokenizer["remove_extra_whitespaces"] is False


# -----------------------------------------------------------------------------
# Bad input


BAD_LINES = {
    "malformed_json": b'{"text": "unterminated\n',
    "missing_text": b'{"body": "no text field"}\n',
    "invalid_utf8": b'{"text": "caf\xe9"}\n',
    "text_not_a_string": b'{"text": 42}\n',
    "lone_surrogate": b'{"text": "half a pair \\ud800 here"}\n',
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_stops_with_file_and_line_and_leaves_no_output(tmp_path, capsys, kind):
    docs_path = tmp_path / "d.jsonl"
    docs_path.write_bytes(b'{"text": "one"}\n"two"\n' + BAD_LINES[kind] + b'{"text": "four"}\n')
    code, out = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "1")
    assert code == 2
    assert f"{docs_path}:3" in capsys.readouterr().err
    assert not list(out.glob("fineweb_*")) and not (out / "manifest.json").exists()
    assert not list(out.glob(".*"))


def test_skip_bad_lines_skips_and_counts_them(tmp_path):
    docs_path = tmp_path / "d.jsonl"
    docs_path.write_bytes(b'{"text": "one"}\n' + b"".join(BAD_LINES.values()) + b'"two"\n"three"\n')
    code, out = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "1", "--skip-bad-lines")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["bad_lines_skipped"] == len(BAD_LINES)
    assert [b["line"] for b in manifest["input"]["bad_lines_first"]] == list(range(2, 2 + len(BAD_LINES)))
    assert manifest["splits"]["val"]["docs"] == 1 and manifest["splits"]["train"]["docs"] == 2


def test_first_bad_line_is_reported_when_later_chunks_are_bad_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 1)  # one line per chunk, scanned by two workers
    docs_path = tmp_path / "d.jsonl"
    docs_path.write_bytes(b"".join(b'"doc %d"\n' % i for i in range(30)) + b"{oops\n" * 10)
    code, out = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "1", "--workers", "2")
    assert code == 2
    assert f"{docs_path}:31: malformed JSON" in capsys.readouterr().err
    assert not list(out.glob("fineweb_*"))


@pytest.mark.parametrize("chunk_bytes", [1, 40])
def test_skipped_bad_lines_do_not_depend_on_chunking(tmp_path, monkeypatch, chunk_bytes):
    docs_path = tmp_path / "d.jsonl"
    docs_path.write_bytes(b'{"text": "one"}\n' + b"".join(BAD_LINES.values()) + b'"two"\n"three"\n' +
                          b"".join(BAD_LINES.values()) + b'"four"')  # no newline at the end
    args = ("--sp", str(DEMO_MODEL), "--val-docs", "2", "--skip-bad-lines", "--shard-tokens", "7")
    assert run_prep(tmp_path, docs_path, "reference", *args, "--workers", "1")[0] == 0
    monkeypatch.setattr(prep, "CHUNK_BYTES", chunk_bytes)
    assert run_prep(tmp_path, docs_path, "out", *args, "--workers", "2")[0] == 0
    manifest, expected = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("out", "reference"))
    for key in ("files", "splits", "input"):
        assert manifest[key] == expected[key], key
    assert manifest["input"]["lines"] == 4 + 2 * len(BAD_LINES) and manifest["splits"]["train"]["docs"] == 2


@pytest.mark.parametrize("content", [None, b"not a sentencepiece model"])
def test_unreadable_tokenizer_is_a_clear_error(tmp_path, capsys, content):
    model = tmp_path / "broken.model"
    if content is not None:
        model.write_bytes(content)
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", ["a", "b"]), "out", "--sp", str(model),
                         "--val-docs", "1")
    assert code == 2
    assert str(model) in capsys.readouterr().err
    assert not list(out.glob("fineweb_*"))


@pytest.fixture(scope="module")
def oversized_model(tmp_path_factory) -> Path:
    """A tokenizer with 65,632 pieces: the last ids do not fit in uint16."""
    symbols = [f"S{i:05d}X" for i in range(65600)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 10), model_writer=model,
                                   model_type="bpe", vocab_size=65700, hard_vocab_limit=False, pad_id=0,
                                   bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=symbols, minloglevel=2)
    path = tmp_path_factory.mktemp("big") / "big.model"
    path.write_bytes(model.getvalue())
    return path


def test_caseops_run_refuses_a_tokenizer_without_the_operators(tmp_path, capsys):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_docs(50)), model_writer=model, model_type="bpe",
                                   vocab_size=500, byte_fallback=True, hard_vocab_limit=False, pad_id=0, bos_id=1,
                                   eos_id=2, unk_id=3, minloglevel=2)
    path = tmp_path / "plain.model"
    path.write_bytes(model.getvalue())
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", ["a", "b"]), "out", "--sp", str(path),
                         "--val-docs", "1")
    assert code == 2 and "CaseOps operators" in capsys.readouterr().err
    assert not list(out.glob("fineweb_*"))


def test_failed_tokenizer_training_is_a_clear_error(tmp_path, capsys):
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", make_docs(20)), "out", "--vocab-size", "20",
                         "--val-docs", "5")
    assert code == 2 and "SentencePiece training failed" in capsys.readouterr().err
    assert not list(out.glob("fineweb_*"))


def test_tokenizer_with_ids_beyond_uint16_is_refused(tmp_path, capsys, oversized_model):
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", ["S65599X", "b"]), "out",
                         "--sp", str(oversized_model), "--val-docs", "1", "--transform", "identity")
    assert code == 2 and "uint16" in capsys.readouterr().err
    assert not list(out.glob("fineweb_*"))


def test_document_with_token_id_beyond_uint16_names_file_and_line(oversized_model):
    ctx = prep.make_worker_context(oversized_model.read_bytes(), "identity", "docs.jsonl")
    with pytest.raises(prep.BadInputError, match=r"docs\.jsonl:7: token id 6\d{4} does not fit in uint16"):
        prep.process_document(ctx, "hello S65599X", False, 7)


def test_cli_exit_code_and_message_for_bad_input(tmp_path):
    docs_path = tmp_path / "d.jsonl"
    docs_path.write_bytes(b'"fine"\n{"text": oops}\n')
    result = subprocess.run([sys.executable, str(REPO / "prepare_caseops_data.py"), "--docs", str(docs_path),
                             "--out", str(tmp_path / "out"), "--sp", str(DEMO_MODEL), "--val-docs", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{docs_path}:2: malformed JSON" in result.stderr


# -----------------------------------------------------------------------------
# Demo corpus


def test_demo_corpus_is_deterministic_and_needs_no_download():
    first = prep.build_demo_corpus(max_bytes=300_000)
    second = prep.build_demo_corpus(max_bytes=300_000)
    assert first == second
    assert sum(len(d.encode()) for d in first) >= 300_000
    assert all(isinstance(d, str) and d for d in first)


def test_demo_runs_end_to_end_with_the_shipped_tokenizer(tmp_path):
    code = prep.main(["--demo", "--out", str(tmp_path / "demo"), "--workers", "2", "--quiet"])
    assert code == 0
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(DEMO_MODEL.read_bytes()).hexdigest()
    assert manifest["splits"]["val"]["docs"] == prep.DEMO_VAL_DOCS
    assert 100_000 <= manifest["splits"]["val"]["tokens"] <= 300_000
    assert 1_000_000 <= manifest["splits"]["train"]["tokens"] <= 3_000_000
    assert manifest["verification"]["val_sidecar_mismatch_docs"] == 0
    assert manifest["verification"]["roundtrip_failed_docs"] == {"val": 0, "train": 0}


# -----------------------------------------------------------------------------
# The output folder: never delete what this script did not write; replace its own output atomically


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_out_holding_files_this_script_did_not_write_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "challenge_data"
    out.mkdir()
    prep.write_atomic(out / "fineweb_train_000000.bin", prep.shard_bytes(np.arange(50, dtype=np.uint16)))
    (out / "manifest.json").write_text('{"source": "downloaded"}\n')
    (out / "tokenizer.model").write_bytes(DEMO_MODEL.read_bytes())
    before = tree_bytes(out)
    docs_path = write_jsonl(tmp_path / "d.jsonl", make_docs(8))
    code, _ = run_prep(tmp_path, docs_path, "challenge_data", "--sp", str(DEMO_MODEL), "--val-docs", "4",
                       "--shard-tokens", "30", "--workers", "1")
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and "fineweb_train_000000.bin" in err
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["challenge_data", "d.jsonl"]  # no work folder either

    code, _ = run_prep(tmp_path, docs_path, "challenge_data", "--sp", str(DEMO_MODEL), "--val-docs", "4",
                       "--shard-tokens", "30", "--workers", "1", "--force")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == prep.SCRIPT_FORMAT and manifest["splits"]["train"]["docs"] == 4
    assert prep.foreign_entries(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["challenge_data", "d.jsonl"]


def test_own_output_with_a_file_added_by_someone_else_is_refused(tmp_path, capsys):
    docs_path = write_jsonl(tmp_path / "d.jsonl", make_docs(8))
    args = ("--sp", str(DEMO_MODEL), "--val-docs", "4", "--workers", "1")
    code, out = run_prep(tmp_path, docs_path, "out", *args)
    assert code == 0 and prep.foreign_entries(out) == []
    (out / "notes.txt").write_text("mine")
    before = tree_bytes(out)
    assert run_prep(tmp_path, docs_path, "out", *args, "--shard-tokens", "40")[0] == 2
    assert "notes.txt" in capsys.readouterr().err
    assert tree_bytes(out) == before


def test_empty_out_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", make_docs(8)), "out", "--sp", str(DEMO_MODEL),
                         "--val-docs", "4", "--workers", "1")
    assert code == 0 and (out / "manifest.json").is_file()


def test_own_output_stays_whole_until_a_different_run_completes(tmp_path, monkeypatch):
    docs_path = write_jsonl(tmp_path / "d.jsonl", make_docs(60))
    first = ("--sp", str(DEMO_MODEL), "--val-docs", "20", "--shard-tokens", "400", "--workers", "1")
    assert run_prep(tmp_path, docs_path, "out", *first)[0] == 0
    out = tmp_path / "out"
    before = tree_bytes(out)
    second = ("--sp", str(DEMO_MODEL), "--val-docs", "20", "--shard-tokens", "300", "--workers", "2")
    monkeypatch.setenv(prep.ABORT_ENV, "4")  # the new run stops halfway
    assert run_prep(tmp_path, docs_path, "out", *second)[0] == 3
    assert tree_bytes(out) == before  # the earlier dataset is untouched, still complete and verified
    assert prep._completed_run_matches(out, json.loads(before["manifest.json"])["fingerprint"])
    monkeypatch.delenv(prep.ABORT_ENV)
    assert run_prep(tmp_path, docs_path, "out", *second)[0] == 0  # resumes, then replaces
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shard_tokens"] == 300
    assert sorted(tree_bytes(out)) == sorted([f["name"] for f in manifest["files"]] + [
        "manifest.json", "tokenizer.model", prep.VAL_HASHES_NAME])
    assert all(len(prep.read_shard(out / f["name"])) <= 300 for f in manifest["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]  # no work or old folder left


def test_run_failing_while_encoding_leaves_the_earlier_output_in_place(tmp_path, monkeypatch, capsys):
    docs_path = write_jsonl(tmp_path / "d.jsonl", make_docs(30))
    args = ("--sp", str(DEMO_MODEL), "--val-docs", "10", "--workers", "1")
    assert run_prep(tmp_path, docs_path, "out", *args, "--shard-tokens", "100")[0] == 0
    before = tree_bytes(tmp_path / "out")
    real = prep.process_document

    def fails_at_document_25(ctx, text, want_sidecar, line_no):
        if line_no == 25:
            raise prep.BadInputError(f"{ctx.docs_path}:{line_no}: simulated failure")
        return real(ctx, text, want_sidecar, line_no)

    monkeypatch.setattr(prep, "process_document", fails_at_document_25)
    code, out = run_prep(tmp_path, docs_path, "out", *args, "--shard-tokens", "80")
    assert code == 2 and ":25: simulated failure" in capsys.readouterr().err
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]  # the failed run's folder is gone


def test_crash_between_the_two_renames_is_repaired_by_the_next_run(tmp_path, capsys):
    docs_path = write_jsonl(tmp_path / "d.jsonl", make_docs(8))
    args = ("--sp", str(DEMO_MODEL), "--val-docs", "4", "--workers", "1")
    code, out = run_prep(tmp_path, docs_path, "out", *args)
    before = tree_bytes(out)
    out.rename(prep.old_dir_for(out))  # the old output was moved aside, the new one not yet moved in
    capsys.readouterr()
    assert run_prep(tmp_path, docs_path, "out", *args)[0] == 0
    printed = capsys.readouterr().out
    assert "restored" in printed and "already complete" in printed
    assert tree_bytes(out) == before and not prep.old_dir_for(out).exists()


def test_output_files_and_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", make_docs(8)), "out",
                             "--sp", str(DEMO_MODEL), "--val-docs", "4", "--workers", "1")
    finally:
        os.umask(previous)
    assert code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(modes) >= 6 and set(modes.values()) == {0o640}, modes


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM with worker processes (a real subprocess)


@contextlib.contextmanager
def killed_at_exit(process: subprocess.Popen):
    """Whatever a test asserts, its process group is not left running."""
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def signal_and_wait(process: subprocess.Popen, signum: int, whole_group: bool) -> tuple[str, float]:
    """Send `signum` to the process group (as Ctrl-C does) or to the process alone (as `kill` does);
    returns its stderr and the seconds it took to exit."""
    sent = time.monotonic()
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return err, time.monotonic() - sent


def child_pids(pid: int) -> list[int]:
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat_file.parent.name))
    return children


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory) -> Path:
    """7 MB of text: two workers need several seconds for it."""
    rng = random.Random(5)
    words = ["the", "The", "NASA", "data", "golf", "café", "日本語", "Parameter", "x2", "12345", "iPhone", "naïve"]
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(3000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400)) + f" {i}"},
                               ensure_ascii=False) + "\n")
    return path


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_run_and_its_workers_within_seconds(tmp_path, long_docs, signum):
    out = tmp_path / "out"
    work = prep.work_dir_for(out)
    command = [sys.executable, str(REPO / "prepare_caseops_data.py"), "--docs", str(long_docs), "--out", str(out),
               "--sp", str(DEMO_MODEL), "--val-docs", "100", "--shard-tokens", "20000", "--workers", "2", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group, like a terminal job
    with killed_at_exit(process):
        deadline = time.monotonic() + 120
        while not list(work.glob("fineweb_train_*.bin")):  # encoding is under way: both workers are busy
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.02)
        workers = child_pids(process.pid)
        assert len(workers) == 2
        # Ctrl-C reaches the whole process group; `kill PID` reaches this process only
        err, stopped_after = signal_and_wait(process, signum, whole_group=signum == signal.SIGINT)
    assert process.returncode == 128 + signum
    assert stopped_after < 5.0, f"stopped {stopped_after:.1f} s after {signum.name}"
    assert err.splitlines() == [f"prepare_caseops_data.py: stopped by {signum.name}: workers stopped; the unfinished "
                                f"output in {work} resumes when the same command runs again"]
    time.sleep(0.5)
    assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []  # no orphan worker
    shards = list(work.glob("fineweb_*.bin"))
    assert shards and not list(work.glob(".*.tmp-*")) and not out.exists()
    for shard in shards:  # every file under a final name is a whole shard
        assert prep.read_shard(shard).size == 20000 or shard.name.startswith("fineweb_val")
    if signum == signal.SIGINT:  # the same command resumes from the last shard recorded
        done = {r["name"]: (work / r["name"]).stat().st_mtime_ns
                for r in json.loads((work / prep.STATE_NAME).read_text())["files"]}
        assert prep.main(command[2:]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["splits"]["train"]["docs"] == 2900 and manifest["verification"]["val_sidecar_mismatch_docs"] == 0
        assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in done.items())
        assert not work.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_ctrl_c_stops_tokenizer_training_within_seconds(tmp_path, long_docs):
    # SentencePiece trains in C++ for seconds to minutes; it runs in a worker so the signal is not held off
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "prepare_caseops_data.py"), "--docs", str(long_docs), "--out", str(out),
               "--vocab-size", "4000", "--val-docs", "100", "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    with killed_at_exit(process):
        for line in process.stdout:
            if "training a 4000-piece tokenizer" in line:
                break
        time.sleep(0.2)
        workers = child_pids(process.pid)
        assert len(workers) == 1  # the trainer runs in its own process
        err, stopped_after = signal_and_wait(process, signal.SIGINT, whole_group=True)
    assert process.returncode == 130 and stopped_after < 5.0
    assert err.splitlines() == ["prepare_caseops_data.py: stopped by SIGINT: workers stopped; no shard was written"]
    time.sleep(0.5)
    assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []
    assert not out.exists() and not prep.work_dir_for(out).exists()


# -----------------------------------------------------------------------------
# Small input problems


def test_blank_lines_are_skipped_and_counted(tmp_path, capsys):
    docs_path = tmp_path / "d.jsonl"
    docs_path.write_bytes(b'"one"\n\n"two"\n   \n\t\r\n"three"\n"four"\n\n')
    code, out = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "2", "--workers", "1")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["blank_lines_skipped"] == 4 and manifest["input"]["bad_lines_skipped"] == 0
    assert manifest["input"]["docs"] == 4 and manifest["splits"]["train"]["docs"] == 2
    assert "skipped 4 blank lines and 0 bad lines" in capsys.readouterr().out
    reference = run_prep(tmp_path, write_jsonl(tmp_path / "r.jsonl", ["one", "two", "three", "four"], as_strings=True),
                         "reference", "--sp", str(DEMO_MODEL), "--val-docs", "2", "--workers", "1")[1]
    for path in reference.glob("fineweb_*.bin"):
        assert (out / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])  # with a BOM, then without
def test_utf16_input_is_named_as_such(tmp_path, capsys, encoding):
    docs_path = tmp_path / "d.jsonl"
    docs_path.write_bytes('"one"\n"two"\n"three"\n'.encode(encoding))
    code, out = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "1")
    assert code == 2
    assert f"file {docs_path} looks like UTF-16; convert it to UTF-8" in capsys.readouterr().err
    assert not out.exists()


def test_lone_surrogate_names_file_and_line_and_can_be_skipped(tmp_path, capsys):
    docs_path = tmp_path / "d.jsonl"
    docs_path.write_bytes(b'"one"\n"two"\n{"text": "x \\ud800 y"}\n"three"\n')
    assert run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "1")[0] == 2
    assert f"{docs_path}:3: text holds a lone surrogate (U+D800 at character 2)" in capsys.readouterr().err
    code, out = run_prep(tmp_path, docs_path, "out", "--sp", str(DEMO_MODEL), "--val-docs", "1", "--skip-bad-lines")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["bad_lines_skipped"] == 1 and manifest["input"]["bad_lines_first"][0]["line"] == 3
    assert manifest["splits"]["train"]["docs"] == 2


def test_empty_tokenizer_file_is_named_as_empty(tmp_path, capsys):
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    code, _ = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", ["a", "b"]), "out", "--sp", str(empty),
                       "--val-docs", "1")
    assert code == 2 and f"{empty}: empty file (0 bytes), not a SentencePiece model" in capsys.readouterr().err


def test_val_docs_zero_warns(tmp_path, capsys):
    code, out = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", make_docs(6)), "out", "--sp", str(DEMO_MODEL),
                         "--val-docs", "0", "--workers", "1")
    assert code == 0
    assert "warning: --val-docs 0: no validation split" in capsys.readouterr().err
    assert not list(out.glob("fineweb_val_*")) and list(out.glob("fineweb_train_*"))


def test_symlinked_out_is_replaced_where_it_points(tmp_path):
    docs_path = write_jsonl(tmp_path / "d.jsonl", make_docs(8))
    (tmp_path / "disk").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "disk")
    args = ("--sp", str(DEMO_MODEL), "--val-docs", "4", "--workers", "1")
    assert run_prep(tmp_path, docs_path, "data", *args)[0] == 0
    assert run_prep(tmp_path, docs_path, "data", *args, "--shard-tokens", "50")[0] == 0  # replaces its own output
    assert (tmp_path / "data").is_symlink() and (tmp_path / "disk" / "manifest.json").is_file()
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["shard_tokens"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "data", "disk"]


def test_mount_point_or_root_out_is_refused(tmp_path, capsys):
    code, _ = run_prep(tmp_path, write_jsonl(tmp_path / "d.jsonl", make_docs(4)), "/", "--sp", str(DEMO_MODEL),
                       "--val-docs", "1")
    assert code == 2 and "a mount point" in capsys.readouterr().err
