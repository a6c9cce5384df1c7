"""The artifact file: bit-exact round trips for every coder, the rANS coder itself, and a reader that
stays safe on hostile files (only ArtifactError, bounded memory, no hang).

Each safety test's docstring names the broken reader it catches; every one was checked to fail with
that breakage put into train_gpt.py by hand.
"""

import contextlib
import datetime
import json
import os
import resource
import struct
import tracemalloc
import zlib

import brotli
import lzma
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train_gpt
from train_gpt import (CODECS, ArtifactError, QuantSettings, deserialize_artifact, load_quantized_into,
                       quantize_model_state, serialize_artifact)

# --- a small model whose container has every kind of entry: int6/int7/int8-gate codes, LQER
# factors, fp16 smalls and a raw integer buffer -------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_q = nn.Linear(dim, dim, bias=False)
        self.attn.gate = nn.Linear(dim, 4, bias=False)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(dim, 2 * dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((4,), 1.5))


class TinyNet(nn.Module):
    def __init__(self, vocab=48, dim=24, layers=2):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.register_buffer("step_counter", torch.tensor([3], dtype=torch.int64))


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.05)
    return net


def tiny_container(seed=0):
    settings = QuantSettings(quant_small_tensor_numel=16, lqer_rank=2, lqer_top_k=1)
    return quantize_model_state(tiny_net(seed).state_dict(), {}, settings)


def assert_same_container(got, expected):
    assert got["entries"].keys() == expected["entries"].keys()
    for name, entry in expected["entries"].items():
        assert got["entries"][name].keys() == entry.keys(), name
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert got["entries"][name][key].dtype == value.dtype, (name, key)
                assert torch.equal(got["entries"][name][key], value), (name, key)
            else:
                assert got["entries"][name][key] == value, (name, key)


def frame_streams(blob):
    """Artifact -> (codec id, [(coder, stride, raw length, crc, body)])."""
    return train_gpt._read_frame(blob)


def description_of(blob):
    coder, stride, raw_length, _, body = frame_streams(blob)[1][0]
    return json.loads(train_gpt.byte_unshuffle(train_gpt._inflate(body, coder, raw_length, "test"), stride))


def with_description(blob, description_bytes):
    """The same artifact with stream 0 replaced and every checksum valid again: what a hostile
    writer can produce, past all CRCs."""
    codec_id, streams = frame_streams(blob)
    streams[0] = (CODECS["brotli"], 1, len(description_bytes), zlib.crc32(description_bytes),
                  brotli.compress(description_bytes))
    return train_gpt._frame(codec_id, streams)


@contextlib.contextmanager
def address_space_headroom(extra_bytes):
    """RLIMIT_AS = what the process maps now + extra_bytes: any larger allocation fails (as
    MemoryError or RuntimeError, which the tests then see as a non-ArtifactError)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as handle:
        mapped = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def peak_traced_bytes(function):
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["rans", "brotli", "lzma", "zlib"])
def test_every_codec_round_trips_a_model_container_bit_exact(codec):
    container = tiny_container()
    assert any("lqer_a_codes" in entry for entry in container["entries"].values())
    for per_group in (False, True):
        restored = deserialize_artifact(serialize_artifact(container, codec=codec, per_group=per_group))
        assert_same_container(restored, container)


@st.composite
def quant_entries(draw):
    """A quantized matrix with codes drawn from a discrete Laplace-like law of random width (or all
    one value, or the full int8 range), any shape including 1 x 1 and N-D."""
    bits = draw(st.integers(2, 8))
    shape = draw(st.lists(st.integers(1, 40), min_size=2, max_size=3))
    rows, cols = shape[0], int(np.prod(shape[1:]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    style = draw(st.sampled_from(["laplace", "constant", "uniform"]))
    if style == "laplace":
        codes = np.clip(np.round(rng.laplace(0, draw(st.floats(0.05, 20)), (rows, cols))), low, high)
    elif style == "constant":
        codes = np.full((rows, cols), draw(st.integers(low, high)))
    else:
        codes = rng.integers(low, high + 1, (rows, cols))
    scales = torch.from_numpy(rng.random(rows).astype(np.float16))
    return {"kind": "quant", "dtype": "float32", "shape": shape, "bits": bits,
            "codes": torch.from_numpy(codes.astype(np.int8)), "scales": scales}


@settings(max_examples=40, deadline=None)
@given(st.lists(quant_entries(), min_size=0, max_size=5), st.sampled_from(["rans", "brotli"]))
def test_generated_containers_round_trip_bit_exact(entries, codec):
    """Names share roles across 'layers' so that tables are shared; also covers no matrices at all."""
    container = {"entries": {f"blocks.{index % 2}.w{index // 2}.weight": entry for index, entry in enumerate(entries)}}
    container["entries"]["bias"] = {"kind": "float", "dtype": "bfloat16", "tensor": torch.ones(3, dtype=torch.float16)}
    assert_same_container(deserialize_artifact(serialize_artifact(container, codec=codec)), container)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000), st.integers(1, 5), st.integers(0, 2 ** 32 - 1))
def test_rans_coder_inverts_itself_for_any_length_and_tables(n, n_contexts, seed):
    """Lengths below, at and past one step of 1024 lanes; tables from skewed counts, some contexts
    with a single symbol (zero bits each) and some unused."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_contexts, 256), dtype=np.int64)
    for context in range(n_contexts):
        support = rng.choice(256, size=int(rng.integers(1, 256)), replace=False)
        counts[context, support] = rng.geometric(0.01, size=len(support))
    counts[rng.integers(n_contexts)] = 0  # an unused context
    freqs = train_gpt._rans_frequencies(counts)
    assert (freqs.sum(1) == 2 ** 15).all() and ((freqs > 0) >= (counts > 0)).all()
    usable = [np.flatnonzero(row) for row in freqs]
    contexts = rng.integers(0, n_contexts, n).astype(np.uint16)
    symbols = np.array([rng.choice(usable[c]) for c in contexts], dtype=np.uint8)
    states, words = train_gpt._rans_encode(symbols, contexts, freqs)
    assert np.array_equal(train_gpt._rans_decode(states, words, contexts, freqs), symbols)


def test_rans_size_is_close_to_the_empirical_entropy_and_beats_brotli():
    """Fails on a coder that wastes bits (e.g. tables rounded too coarsely, states not shared across
    matrices) or that is no better than the brotli stream it replaces."""
    rng = np.random.default_rng(0)
    entries = {}
    for layer in range(4):
        weight = rng.standard_t(6, (256, 256))
        scales = 12.85 * weight.std(1) / 31
        codes = np.clip(np.round(weight / scales[:, None]), -31, 31).astype(np.int8)
        entries[f"blocks.{layer}.mlp.fc.weight"] = {"kind": "quant", "dtype": "float32", "shape": [256, 256], "bits": 6,
                                                    "codes": torch.from_numpy(codes),
                                                    "scales": torch.from_numpy(scales.astype(np.float16))}
    container = {"entries": entries}
    codes = np.concatenate([e["codes"].numpy().ravel() for e in entries.values()])
    _, counts = np.unique(codes, return_counts=True)
    entropy_bytes = -(counts * np.log2(counts / counts.sum())).sum() / 8
    codes_only = {"entries": {n: dict(e, scales=torch.zeros(0, dtype=torch.float16)) for n, e in entries.items()}}
    overhead = len(serialize_artifact(codes_only, codec="rans")) - entropy_bytes
    assert 0 < overhead < 0.002 * entropy_bytes + 1000  # states, tables, bins, JSON
    assert len(serialize_artifact(container, codec="rans")) < 0.995 * len(serialize_artifact(container, codec="brotli"))


def test_column_bins_are_chosen_when_columns_differ_in_scale(monkeypatch):
    """Fails if the encoder ignores (or mis-assigns) its row/column bins: codes whose columns have
    very different widths must cost clearly less than with one table per role."""
    rng = np.random.default_rng(1)
    widths = np.exp(rng.normal(0, 0.6, 512))
    codes = np.clip(np.round(rng.normal(0, 1, (256, 512)) * 3 * widths), -31, 31).astype(np.int8)
    container = {"entries": {"w": {"kind": "quant", "dtype": "float32", "shape": [256, 512], "bits": 6,
                                   "codes": torch.from_numpy(codes), "scales": torch.ones(256, dtype=torch.float16)}}}
    binned = serialize_artifact(container)
    monkeypatch.setattr(train_gpt, "_RANS_CLASSES", ((1, 1),))
    single = serialize_artifact(container)
    assert len(binned) < 0.95 * len(single)
    assert_same_container(deserialize_artifact(binned), container)


def write_version_1(container):
    """The version 1 format written independently: JSON + one brotli stream byte-shuffled with
    stride 2, stream table without a coder byte."""
    placement, payload = {}, bytearray()
    for name, entry in container["entries"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                raw = value.numpy().tobytes()
                placement[(name, key)] = [key, str(value.dtype).removeprefix("torch."), list(value.shape), 1,
                                          len(payload), len(raw)]
                payload += raw
    described = [{"name": name, "attrs": {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)},
                  "arrays": [placement[(name, k)] for k, v in entry.items() if isinstance(v, torch.Tensor)]}
                 for name, entry in container["entries"].items()]
    meta = json.dumps({"entries": described}).encode()
    raws = [(1, meta), (2, bytes(payload))]
    bodies = [brotli.compress(train_gpt.byte_shuffle(raw, stride)) for stride, raw in raws]
    table = b"".join(struct.pack("<BQQI", stride, len(raw), len(body), zlib.crc32(raw))
                     for (stride, raw), body in zip(raws, bodies))
    header = b"PGQZ" + bytes([1, 0, 2, 0]) + table
    return header + struct.pack("<I", zlib.crc32(header)) + b"".join(bodies)


def test_version_1_artifacts_are_still_read():
    container = tiny_container()
    assert_same_container(deserialize_artifact(write_version_1(container)), container)


def test_read_artifact_timed_returns_the_container_and_the_decoding_seconds(tmp_path):
    container = tiny_container()
    path = tmp_path / "final_model.ptz"
    path.write_bytes(serialize_artifact(container))
    restored, seconds = train_gpt.read_artifact_timed(str(path))
    assert_same_container(restored, container)
    assert 0 < seconds < 60


# --- hostile artifacts: named attacks ------------------------------------------------------------


@pytest.mark.parametrize("coder, compress", [
    ("brotli", lambda data: brotli.compress(data, quality=1)),
    ("lzma", lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE, preset=1)),
    ("zlib", lambda data: zlib.compress(data, 9)),
])
def test_a_stream_is_never_decompressed_past_its_declared_length(coder, compress):
    """Fails on a reader that decompresses whole streams (brotli.decompress, lzma.decompress,
    zlib.decompress) and compares lengths afterwards: 60 MB of zeros behind a 1 KB declaration
    would be fully expanded first."""
    bomb = compress(bytes(60_000_000))
    blob = train_gpt._frame(CODECS[coder], [(CODECS[coder], 1, 1000, 0, bomb)])
    assert len(blob) < 100_000

    def read():
        with pytest.raises(ArtifactError, match="more bytes than the 1000 declared"):
            deserialize_artifact(blob)
    assert peak_traced_bytes(read) < 2_000_000


def test_declared_sizes_over_the_cap_are_refused_before_decompressing():
    """Fails on a reader without the cap on declared sizes (it would expand the 60 MB stream,
    which matches its declared length, before anything else can object)."""
    data = bytes(60_000_000)
    stream = (CODECS["zlib"], 1, len(data), zlib.crc32(data), zlib.compress(data, 1))
    blob = train_gpt._frame(CODECS["zlib"], [stream] * 3)
    assert 3 * len(data) > train_gpt.ARTIFACT_MAX_RAW_BYTES

    def read():
        with pytest.raises(ArtifactError, match="declares 180000000 decompressed bytes"):
            deserialize_artifact(blob)
    assert peak_traced_bytes(read) < 2_000_000


def test_codes_and_scales_that_would_broadcast_are_refused():
    """Fails on a reader that does not check codes [rows, cols] against scales [rows] and the shape
    attribute: codes [1, n] with scales [n] dequantize to an n x n matrix (here 6000^2 floats)."""
    n = 6000
    entry = {"kind": "quant", "dtype": "float32", "shape": [1, n], "bits": 6,
             "codes": torch.zeros(1, n, dtype=torch.int8), "scales": torch.ones(n, dtype=torch.float16)}
    blob = serialize_artifact({"entries": {"w": entry}}, codec="brotli")
    assert len(blob) < 1000
    with address_space_headroom(100_000_000), pytest.raises(ArtifactError, match="scales of shape \\[1\\]"):
        train_gpt.dequantize_state(deserialize_artifact(blob))


def quant_entry_description(blob):
    description = description_of(blob)
    return description, next(e for e in description["entries"] if e["attrs"]["kind"] == "quant"
                             and e["attrs"].get("lqer_rank"))


def mutate(description, path, value):
    target = description
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return description


DELETE = object()


@pytest.mark.parametrize("path, value, words", [
    (("entries",), {"a": 1}, "no list of entries"),
    (("entries", 0), "text", "entry 0 is malformed"),
    (("entries", 0, "attrs"), DELETE, "entry 0 is malformed"),
    (("entries", 0, "arrays", 0), ["codes", "int8", [2]], "is malformed"),
    (("entries", 0, "arrays", 0, 1), ["int8"], "is malformed"),  # unhashable dtype: TypeError before
    (("entries", 0, "arrays", 0, 2), [2, -3], "is malformed"),
    (("entries", 0, "arrays", 0, 2), [True, 3], "is malformed"),
    (("entries", 0, "arrays", 0, 3), 99, "does not fit"),
    (("entries", 0, "arrays", 0, 4), 10 ** 30, "does not fit"),
    (("entries", 0, "arrays", 0, 2), [2 ** 40, 2 ** 40], "does not fit"),
    (("entries", 0, "attrs", "kind"), "pickle", "unknown kind"),
    (("entries", 0, "attrs", "kind"), ["quant"], "unknown kind"),
    (("entries", 0, "attrs", "bits"), "6", "bits in 2..8"),
    (("entries", 0, "attrs", "shape"), 7, "positive integer shape"),
    (("entries", 0, "attrs", "shape"), [2, 3], "codes of shape"),  # codes [rows, cols] disagree with "shape"
    (("entries", 0, "attrs", "lqer_rank"), [1] * 10, "positive LQER rank"),  # list * rows before
    (("entries", 0, "attrs", "lqer_rank"), 3, "LQER factor a needs"),
    (("entries", 0, "attrs", "lqer_rank"), 0, "unexpected arrays"),
    (("entries", 0, "attrs", "lqer_bits"), 8, "LQER factor a needs"),
    (("entries", 0, "name"), 5, "entry 0 is malformed"),
])
def test_malformed_descriptions_with_valid_checksums_raise_artifact_error(path, value, words):
    """Fails on a reader that indexes the JSON without checking types and sizes (TypeError,
    KeyError, IndexError, AttributeError, a list multiplied by rows) or that only checks byte counts
    (shape attribute and LQER factor sizes disagreeing with the arrays)."""
    blob = serialize_artifact(tiny_container(), codec="brotli")
    description, entry = quant_entry_description(blob)
    description["entries"].remove(entry)
    description["entries"].insert(0, entry)  # the LQER entry first, so path ("entries", 0, ...) hits it
    broken = with_description(blob, json.dumps(mutate(description, path, value)).encode())
    with pytest.raises(ArtifactError, match=words):
        deserialize_artifact(broken)


@pytest.mark.parametrize("text, words", [
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # RecursionError in json.loads
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"entries": [{"name": "a", "attrs": {}, "arrays": []}, {"name": "a", "attrs": {}, "arrays": []}]}',
     "duplicate names"),
    (b'{"entries": [{"name": "a", "attrs": {"kind": "raw"}, "arrays": []}]}', "exactly one array"),
])
def test_unparsable_or_inconsistent_json_raises_artifact_error(text, words):
    """Fails on a reader that lets RecursionError / UnicodeDecodeError out of json.loads, or accepts
    entries without their arrays or twice under one name."""
    blob = serialize_artifact(tiny_container(), codec="brotli")
    with pytest.raises(ArtifactError, match=words):
        deserialize_artifact(with_description(blob, text))


def test_an_artifact_of_another_shape_is_refused_before_dequantizing():
    """Fails on a loader that dequantizes first and reshapes into the model (a transposed matrix of
    the same size would load silently; a larger one would allocate before failing)."""
    net = tiny_net()
    container = tiny_container()
    entry = container["entries"]["blocks.0.mlp.fc.weight"]
    entry["shape"] = entry["shape"][::-1]
    entry["codes"] = entry["codes"].reshape(entry["shape"][0], -1)
    entry["scales"] = torch.ones(entry["shape"][0], dtype=torch.float16)
    for key in [k for k in entry if k.startswith("lqer")]:
        del entry[key]
    restored = deserialize_artifact(serialize_artifact(container))
    message = "blocks.0.mlp.fc.weight has shape \\[24, 48\\], the model's is \\[48, 24\\]"
    with pytest.raises(ArtifactError, match=message):
        load_quantized_into(net, restored)
    with pytest.raises(ArtifactError, match="missing"):
        load_quantized_into(nn.Linear(2, 2), restored)


# --- hostile artifacts: fuzzing -------------------------------------------------------------------

BLOBS = {codec: serialize_artifact(tiny_container(), codec=codec) for codec in ("rans", "brotli", "lzma")}
FUZZ = settings(max_examples=150, deadline=datetime.timedelta(seconds=3),
                suppress_health_check=[HealthCheck.too_slow])


def read_and_load(blob):
    """What a run does with an artifact; memory stays within the model's size or it raises."""
    load_quantized_into(tiny_net(), deserialize_artifact(blob))


read_and_load(BLOBS["rans"])  # once outside the limit: lazy library loads are not the reader's memory


def only_artifact_errors(blob):
    with address_space_headroom(400_000_000):
        try:
            read_and_load(blob)
        except ArtifactError:
            pass


@st.composite
def byte_mutations(draw):
    blob = bytearray(BLOBS[draw(st.sampled_from(sorted(BLOBS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        position = draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del blob[position:]
        elif kind == "insert":
            blob[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            blob[position:position + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(blob)


@FUZZ
@given(byte_mutations())
def test_fuzzed_bytes_raise_only_artifact_error_in_bounded_memory(blob):
    """Bit flips, truncations, insertions and overwrites anywhere (the rANS and brotli bodies are not
    covered by any CRC before decoding). Fails on a reader that lets decoder errors, IndexError from
    bad side info, or a large allocation out, or that hangs (3 s deadline)."""
    only_artifact_errors(blob)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8)


@st.composite
def description_mutations(draw):
    """A valid artifact whose JSON description has 1-3 nodes replaced (by a nearby or extreme integer
    where the node is an integer, else by any JSON value) or deleted, re-packed with valid CRCs."""
    codec = draw(st.sampled_from(["rans", "brotli"]))
    description = description_of(BLOBS[codec])
    for _ in range(draw(st.integers(1, 3))):
        node, path = description, []
        while isinstance(node, (dict, list)) and node and (not path or draw(st.integers(0, 4)) > 0):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            path.append(key)
            node = node[key]
        if not path:
            continue
        if type(node) is int and draw(st.booleans()):
            value = draw(st.sampled_from([0, 1, -1, node + 1, node - 1, node * 2, node // 2, 2 ** 31, 2 ** 63]))
        else:
            value = draw(st.just(DELETE) | json_values)
        mutate(description, path, value)
    return with_description(BLOBS[codec], json.dumps(description).encode())


@FUZZ
@given(description_mutations())
def test_fuzzed_descriptions_with_valid_checksums_raise_only_artifact_error_in_bounded_memory(blob):
    """Fails on a reader that trusts the description's types, shapes, offsets, kinds, bits or LQER
    sizes (TypeError/KeyError/IndexError/RuntimeError escape, or a shape makes it allocate)."""
    only_artifact_errors(blob)


def rans_stream_with_side(side_edit=None, states_edit=None, words_edit=None):
    """An artifact whose rANS stream has its side info (as uint16 values), states or words edited
    and re-packed with valid brotli and frame checksums: only the rANS reader's own checks remain."""
    blob = BLOBS["rans"]
    codec_id, streams = frame_streams(blob)
    coder, stride, raw_length, crc, body = streams[train_gpt._CODES_STREAM]
    side_length, packed_length = struct.unpack_from("<II", body)
    side = np.frombuffer(train_gpt.byte_unshuffle(brotli.decompress(body[8:8 + packed_length]), 2), "<u2").copy()
    lanes = train_gpt._rans_lanes(raw_length)
    states = np.frombuffer(body, "<u4", count=lanes, offset=8 + packed_length).copy()
    words = np.frombuffer(body, "<u2", offset=8 + packed_length + 4 * lanes).copy()
    side, states, words = [edit(array) if edit else array for edit, array in
                           ((side_edit, side), (states_edit, states), (words_edit, words))]
    side_bytes = train_gpt.byte_shuffle(side.astype("<u2").tobytes(), 2)
    packed = brotli.compress(side_bytes)
    body = (struct.pack("<II", len(side_bytes), len(packed)) + packed + states.astype("<u4").tobytes()
            + words.astype("<u2").tobytes())
    streams[train_gpt._CODES_STREAM] = (coder, stride, raw_length, crc, body)
    return train_gpt._frame(codec_id, streams)


def set_at(index, value):
    def edit(array):
        array[index] = value
        return array
    return edit


@pytest.mark.parametrize("edits, words", [
    (dict(side_edit=set_at(0, 60000)), "side info truncated"),  # number of roles
    (dict(side_edit=set_at(1, 0)), "bad roles or bins"),  # 0 row bins of role 0
    (dict(side_edit=set_at(2, 65)), "bad roles or bins"),  # 65 column bins
    (dict(side_edit=lambda side: np.concatenate([side, [0]])), "wrong length"),
    (dict(side_edit=lambda side: side[:-1]), "wrong length"),
    (dict(side_edit=set_at(-1, 7)), "do not sum to 2\\^15"),
    (dict(states_edit=set_at(0, 5)), "invalid state"),
    (dict(words_edit=lambda words: words[:-1]), "checksum mismatch"),
    (dict(words_edit=lambda words: np.concatenate([words, [1]])), "checksum mismatch"),
    (dict(words_edit=lambda words: words ^ 1), "checksum mismatch"),
])
def test_rans_side_info_states_and_words_are_checked_before_use(edits, words):
    """Fails on a rANS reader that trusts its side info (role and bin counts, lengths, table sums,
    start states) or reads past its words: IndexError / ValueError from numpy, or a wrong decode."""
    with pytest.raises(ArtifactError, match=words):
        deserialize_artifact(rans_stream_with_side(**edits))


def test_rans_bins_out_of_range_are_refused():
    """Fails on a rANS reader that does not check each matrix's row and column bins against its
    role's bin counts (a bin past them selects another role's table, or none)."""
    body = frame_streams(BLOBS["rans"])[1][train_gpt._CODES_STREAM][4]
    _, packed_length = struct.unpack_from("<II", body)
    roles = int(np.frombuffer(train_gpt.byte_unshuffle(brotli.decompress(body[8:8 + packed_length]), 2), "<u2")[0])
    matrices = sum(1 for entry in tiny_container()["entries"].values() if entry["kind"] == "quant")
    first_bin = 1 + 2 * roles + matrices  # after the role count, the bins of each role and each matrix's role
    with pytest.raises(ArtifactError, match="bin out of range"):
        deserialize_artifact(rans_stream_with_side(side_edit=set_at(first_bin, 64)))
