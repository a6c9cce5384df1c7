"""Tests for the CaseOps transform (lossless_caps.py), checked against independent slow references.

The references below are deliberately naive per-character loops written straight from SPEC
section 3, so they share no code or regexes with the module under test.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lossless_caps import (  # noqa: E402
    ALLCAPS,
    CAPNEXT,
    ESC,
    TITLE,
    TRANSFORM_NAME,
    CaseOpsDecodeError,
    decode_lossless_caps_v2,
    encode_lossless_caps_v2,
    encode_with_byte_map,
)

OPERATORS = [TITLE, ALLCAPS, CAPNEXT, ESC]
T, A, C, E = TITLE, ALLCAPS, CAPNEXT, ESC  # short names for writing expected strings


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def is_ascii_letter(char: str) -> bool:
    return "a" <= char <= "z" or "A" <= char <= "Z"


def reference_encode_units(text: str) -> list[tuple[str, int]]:
    """SPEC section 3, one character at a time: (output character, index of the input character
    it comes from or, for an inserted operator, the input character it precedes)."""
    units: list[tuple[str, int]] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char in OPERATORS:
            units += [(ESC, index), (char, index)]
            index += 1
            continue
        if not is_ascii_letter(char):
            units.append((char, index))
            index += 1
            continue
        end = index
        while end < len(text) and is_ascii_letter(text[end]):
            end += 1
        run = text[index:end]
        capitals = [("A" <= letter <= "Z") for letter in run]
        if not any(capitals):
            markers = [""] * len(run)
        elif all(capitals) and len(run) >= 2:
            markers = [ALLCAPS] + [""] * (len(run) - 1)
        elif capitals[0] and not any(capitals[1:]):
            markers = [TITLE] + [""] * (len(run) - 1)
        else:
            markers = [TITLE if capitals[0] else ""] + [CAPNEXT if cap else "" for cap in capitals[1:]]
        for offset, (marker, letter) in enumerate(zip(markers, run)):
            if marker:
                units.append((marker, index + offset))
            units.append((letter.lower(), index + offset))
        index = end
    return units


def reference_encode(text: str) -> str:
    return "".join(char for char, _ in reference_encode_units(text))


def reference_byte_map(text: str) -> list[int]:
    """Per encoded UTF-8 byte, the original byte offset, built one character at a time."""
    char_byte_start = []
    position = 0
    for char in text:
        char_byte_start.append(position)
        position += len(char.encode("utf-8"))
    offsets: list[int] = []
    units = reference_encode_units(text)
    for unit_index, (char, source) in enumerate(units):
        # An output character is inserted iff it is an operator that is not the input character
        # itself: the unit after it comes from the same input character.
        inserted = unit_index + 1 < len(units) and units[unit_index + 1][1] == source
        for byte_index in range(len(char.encode("utf-8"))):
            offsets.append(char_byte_start[source] + (0 if inserted else byte_index))
    offsets.append(position)
    return offsets


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

# Biased toward the characters that matter: ASCII letters of both cases, the four operators,
# non-ASCII letters that have case (É, ß, İ, Kelvin sign), emoji, punctuation and whitespace.
INTERESTING_CHARS = list("aAbBzZmMqQ") + OPERATORS + ["É", "é", "ß", "İ", "\u212a", "😀", " ", "'", "1", "\n"]
any_char = st.characters(blacklist_categories=("Cs",))  # surrogate-free, so UTF-8 always works
texts = st.one_of(
    st.text(st.sampled_from(INTERESTING_CHARS), max_size=60),
    st.text(st.one_of(st.sampled_from(INTERESTING_CHARS), any_char), max_size=60),
    st.text(any_char, max_size=60),
)
ENCODED_ALPHABET = list("abAB ") + OPERATORS + ["é"]


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def test_transform_name():
    assert TRANSFORM_NAME == "lossless_caps_caseops_v1"
    assert (TITLE, ALLCAPS, CAPNEXT, ESC) == ("\ue001", "\ue002", "\ue003", "\ue004")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", ""),
        ("hello world", "hello world"),
        ("Hello World", f"{T}hello {T}world"),
        ("I", f"{T}i"),
        ("I am", f"{T}i am"),
        ("ABC", f"{A}abc"),
        ("NASA's", f"{A}nasa's"),
        ("McDonald", f"{T}mc{C}donald"),
        ("iPhone", f"i{C}phone"),
        ("aBC", f"a{C}b{C}c"),
        ("ABCdef", f"{T}a{C}b{C}cdef"),
        ("eBaY", f"e{C}ba{C}y"),
        ("HeLLo", f"{T}he{C}l{C}lo"),
        ("GPT4o", f"{A}gpt4o"),  # digits end a run: "GPT" and "o"
        ("X-Ray", f"{T}x-{T}ray"),
        ("CaféBar", f"{T}caf\u00e9{T}bar"),  # non-ASCII letters are copied and end a run
        ("ÉCOLE", f"\u00c9{A}cole"),
        (TITLE, f"{E}{T}"),
        (ESC + ESC, f"{E}{E}{E}{E}"),
        (f"a{TITLE}Bc", f"a{E}{T}{T}bc"),  # a literal operator ends the run before it
        (f"{CAPNEXT}x{ALLCAPS}", f"{E}{C}x{E}{A}"),
    ],
)
def test_encode_known_examples(text, expected):
    assert encode_lossless_caps_v2(text) == expected
    assert reference_encode(text) == expected
    assert decode_lossless_caps_v2(expected) == text


@settings(max_examples=400, deadline=None)
@given(texts)
def test_encode_matches_reference(text):
    assert encode_lossless_caps_v2(text) == reference_encode(text)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_round_trip(text):
    assert decode_lossless_caps_v2(encode_lossless_caps_v2(text)) == text


def test_round_trip_with_lone_surrogates():
    text = "Ab\ud800CD\udfff"  # str-level transform; only the byte map needs valid UTF-8
    assert decode_lossless_caps_v2(encode_lossless_caps_v2(text)) == text


def test_encoded_text_has_no_ascii_capitals():
    encoded = encode_lossless_caps_v2("The QUICK brown FoX, McDonald's iPhone.")
    assert not any("A" <= char <= "Z" for char in encoded)


def test_long_runs_are_handled():
    # Would take hours if any scan were quadratic in the run length (no timing assertion).
    long_lower = "a" * 200_000
    for text in (long_lower, long_lower + "B", "B" + long_lower, "AB" * 100_000, long_lower.upper()):
        encoded = encode_lossless_caps_v2(text)
        assert decode_lossless_caps_v2(encoded) == text
    assert encode_lossless_caps_v2(long_lower + "B") == long_lower + C + "b"


# ---------------------------------------------------------------------------------------------
# Strict decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoded, position",
    [
        (T, 0),  # dangling operator at the end
        (f"ab{A}", 2),
        (f"x{E}", 1),
        (f"{T} word", 0),  # operator followed by a non-letter
        (f"{T}1", 0),
        (f"{C}a", 0),  # CAPNEXT not after a letter of the same word
        (f" {C}a", 1),
        (f"a{C}{C}b", 1),
        (f"a{C}é", 1),
        (f"ab{T}cd", 2),  # TITLE / ALLCAPS in the middle of a letter run
        (f"ab{A}cd", 2),
        (f"{A}a", 0),  # ALLCAPS on a 1-letter run: "A" is written TITLE "a"
        (f"{A}a b", 0),
        (f"{A}ab{C}c", 0),  # CAPNEXT inside an ALLCAPS word
        (f"{T}a{C}b", 0),  # "AB" is written ALLCAPS "ab"
        (f"ok {T}a{C}b{C}c!", 3),
        (f"{T}{C}ab", 0),
        (f"{T}{T}ab", 0),
        (f"{A}{T}ab", 0),
        (f"{E}x", 0),  # ESC followed by a non-operator
        (f"{E}{E}{E}a", 2),
        ("Hello", 0),  # capitals never occur in encoded text
        (f"{T}hello World", 7),
        (f"{E}{T}a{C}", 3),
    ],
)
def test_decode_rejects_malformed_input(encoded, position):
    with pytest.raises(CaseOpsDecodeError) as caught:
        decode_lossless_caps_v2(encoded)
    assert caught.value.position == position
    assert f"position {position}" in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "encoded, expected",
    [
        (f"{E}{T}{T}ab", f"{T}Ab"),  # an escaped operator ends a word, so TITLE may follow it
        (f"ab{E}{T}cd", f"ab{T}cd"),
        (f"a{E}{C}{C}", None),  # a dangling CAPNEXT after an escaped operator
        (f"{T}a", "A"),
        (f"{T}ab{C}c", "AbC"),
        (f"a{C}b", "aB"),
    ],
)
def test_decode_boundary_cases(encoded, expected):
    if expected is None:
        with pytest.raises(CaseOpsDecodeError):
            decode_lossless_caps_v2(encoded)
    else:
        assert decode_lossless_caps_v2(encoded) == expected


@settings(max_examples=1500, deadline=None)
@given(st.text(st.sampled_from(ENCODED_ALPHABET), max_size=14))
def test_decode_accepts_only_encoder_outputs(encoded):
    try:
        decoded = decode_lossless_caps_v2(encoded)
    except CaseOpsDecodeError:
        return
    assert encode_lossless_caps_v2(decoded) == encoded


def test_decode_is_a_bijection_onto_the_encoder_image_for_short_strings():
    # Exhaustive over short strings: the encoded strings of length <= 4 that decode accepts are
    # exactly the encodings of the original strings (whose encodings are never shorter).
    max_len = 4
    original_alphabet = list("abAB ") + OPERATORS
    encoder_image = {}
    for length in range(max_len + 1):
        for chars in itertools.product(original_alphabet, repeat=length):
            original = "".join(chars)
            encoded = encode_lossless_caps_v2(original)
            if len(encoded) <= max_len:
                assert encoded not in encoder_image  # encode is injective
                encoder_image[encoded] = original
    accepted = {}
    for length in range(max_len + 1):
        for chars in itertools.product(list("abB ") + OPERATORS, repeat=length):
            candidate = "".join(chars)
            try:
                accepted[candidate] = decode_lossless_caps_v2(candidate)
            except CaseOpsDecodeError:
                pass
    assert accepted == encoder_image


# ---------------------------------------------------------------------------------------------
# Byte map
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [0]),
        ("ab", [0, 1, 2]),
        ("Hi", [0, 0, 0, 0, 1, 2]),  # TITLE's 3 bytes map to the letter it precedes
        ("iPh", [0, 1, 1, 1, 1, 2, 3]),
        ("é!", [0, 1, 2, 3]),
        (TITLE, [0, 0, 0, 0, 1, 2, 3]),  # ESC is inserted, the literal maps byte for byte
        ("😀A", [0, 1, 2, 3, 4, 4, 4, 4, 5]),
    ],
)
def test_byte_map_known_examples(text, expected):
    encoded, orig_byte_offset = encode_with_byte_map(text)
    assert encoded == encode_lossless_caps_v2(text)
    assert orig_byte_offset.tolist() == expected
    assert reference_byte_map(text) == expected


@settings(max_examples=400, deadline=None)
@given(texts)
def test_byte_map_matches_reference(text):
    encoded, orig_byte_offset = encode_with_byte_map(text)
    assert encoded == encode_lossless_caps_v2(text)
    assert orig_byte_offset.dtype == np.int64
    assert orig_byte_offset.tolist() == reference_byte_map(text)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_byte_map_properties(text):
    encoded, orig_byte_offset = encode_with_byte_map(text)
    encoded_bytes = np.frombuffer(encoded.encode("utf-8"), dtype=np.uint8)
    original_bytes = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    assert orig_byte_offset.shape == (encoded_bytes.shape[0] + 1,)
    assert orig_byte_offset[0] == 0
    assert orig_byte_offset[-1] == original_bytes.shape[0]
    steps = np.diff(orig_byte_offset)
    assert np.all((steps == 0) | (steps == 1))  # monotone; each byte carries 0 or 1 original byte
    # A byte that carries an original byte is that byte, lowercased if it is an ASCII capital.
    carried = np.flatnonzero(steps == 1)
    source = original_bytes[orig_byte_offset[carried]]
    lowered = np.where((source >= 65) & (source <= 90), source + 32, source)
    assert np.array_equal(encoded_bytes[carried], lowered)
    # The bytes that carry nothing are whole inserted operators: EE 80 81..84.
    empty = np.flatnonzero(steps == 0).reshape(-1, 3)
    assert np.all(encoded_bytes[empty[:, 0]] == 0xEE)
    assert np.all(encoded_bytes[empty[:, 1]] == 0x80)
    assert np.all((encoded_bytes[empty[:, 2]] >= 0x81) & (encoded_bytes[empty[:, 2]] <= 0x84))


def test_byte_map_sums_per_document_pieces():
    # The sidecar use case: cutting the encoded bytes anywhere and summing the original bytes of
    # the pieces always gives the document's byte length.
    text = "The NASA McDonald's iPhone — café ÉCOLE 😀 " + TITLE + ESC + " end"
    _, orig_byte_offset = encode_with_byte_map(text)
    cuts = np.array([0, 5, 9, 10, 23, 31, 40, orig_byte_offset.shape[0] - 1])
    piece_bytes = np.diff(orig_byte_offset[cuts])
    assert piece_bytes.sum() == len(text.encode("utf-8"))


def test_byte_map_rejects_lone_surrogates():
    with pytest.raises(UnicodeEncodeError):
        encode_with_byte_map("a\ud800")
