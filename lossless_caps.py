"""CaseOps: a lossless, word-level capitalization transform (`lossless_caps_caseops_v1`).

The transform lets a tokenizer share one lowercase piece between "the", "The" and "THE" by moving
ASCII capitalization into four private-use operator characters:

    TITLE   U+E001  the next word starts with a capital
    ALLCAPS U+E002  the next word (2+ letters) is entirely upper case
    CAPNEXT U+E003  the next letter, inside a word, is a capital
    ESC     U+E004  the next character is a literal operator character from the input

Only ASCII letters are touched, one maximal run of ASCII letters (a "word") at a time:
    "hello"    -> "hello"                         all lowercase: copied
    "NASA's"   -> ALLCAPS "nasa" "'s"             2+ letters, all upper case
    "Hello"    -> TITLE "hello"                   capital + 1 or more lowercase letters
    "I"        -> TITLE "i"                       a single capital
    "McDonald" -> TITLE "mc" CAPNEXT "donald"     any other mix: TITLE if the first letter is a
    "iPhone"   -> "i" CAPNEXT "phone"             capital, CAPNEXT before every later capital
    "\ue001"   -> ESC "\ue001"                    literal operators are escaped
Everything else (digits, punctuation, whitespace, non-ASCII letters such as "É") is copied.
The output is character-for-character identical to the published transform of
openai/parameter-golf PR 1729 / PR 1736, so the published CaseOps tokenizer and data work unchanged.

`decode_lossless_caps_v2` is strict: it accepts exactly the strings that the encoder can produce
(for example it rejects TITLE + "a" + CAPNEXT + "b", because the encoder writes "AB" as ALLCAPS "ab")
and raises `CaseOpsDecodeError` naming the offending character position for anything else. So
encode is a bijection from all strings onto the set of strings that decode accepts.

Byte map (for bits-per-byte accounting): `encode_with_byte_map` also returns `orig_byte_offset`,
one int64 entry per UTF-8 byte of the encoded text plus a final entry. Entry b is the number of
original UTF-8 bytes that come before encoded byte b. Copied or lowercased characters keep their
UTF-8 length, so they map byte for byte; the 3 bytes of an inserted operator carry no original
bytes and all map to the offset of the character they precede. The original bytes of any encoded
byte span [a, b) are `orig_byte_offset[b] - orig_byte_offset[a]`.

All three functions run in linear time: regexes find the few places that change, and the byte map
is built with numpy over the UTF-8 bytes, without a Python loop over characters.
"""

from __future__ import annotations

import functools
import re

import numpy as np

TRANSFORM_NAME = "lossless_caps_caseops_v1"

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_OPERATOR_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}

# Every operator is U+E001..U+E004, i.e. 3 UTF-8 bytes EE 80 81..84.
_OPERATOR_UTF8_LEN = 3

# Words up to this length go through an LRU cache (frequent words like "The" repeat a lot);
# longer pieces (identifiers, base64 blobs) are computed directly so the cache stays small.
_CACHED_PIECE_MAX_LEN = 32


class CaseOpsDecodeError(ValueError):
    """An encoded string that the CaseOps encoder could never have produced."""

    def __init__(self, message: str, position: int):
        super().__init__(f"{message} (at character position {position})")
        self.position = position


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

# Splits the text around the only pieces that change: a literal operator, or the part of an
# ASCII-letter run from its first capital to its end. Lowercase text never matches, so ordinary
# prose costs no Python work. The pattern begins with a character class, which lets the regex
# engine skip quickly to the next candidate, and its possessive quantifier never backtracks.
_ENCODE_SPLIT = re.compile(r"([A-Z\ue001-\ue004](?:(?<=[A-Z])[A-Za-z]*+)?)")

# Lowercases a capital and puts CAPNEXT in front of it (used for mixed-case words).
_CAPNEXT_TABLE = str.maketrans({chr(code): CAPNEXT + chr(code + 32) for code in range(65, 91)})


def _encode_word_or_operator(piece: str) -> str:
    """Encode a literal operator, or a whole ASCII-letter run that starts with a capital."""
    if piece in _OPERATOR_NAMES:
        return ESC + piece
    lowered = piece.lower()  # the run is pure ASCII, so lower() only maps A-Z to a-z
    if piece.isupper():
        # "I" (one capital) is written with TITLE; ALLCAPS needs 2+ letters.
        return (ALLCAPS if len(piece) >= 2 else TITLE) + lowered
    if piece[1:].islower():
        return TITLE + lowered
    # Mixed case ("McDonald", "ABCdef"): TITLE covers the first capital, CAPNEXT each later one.
    return TITLE + lowered[0] + piece[1:].translate(_CAPNEXT_TABLE)


_encode_word_or_operator_cached = functools.lru_cache(maxsize=1 << 16)(_encode_word_or_operator)


def encode_lossless_caps_v2(text: str) -> str:
    """Apply the CaseOps transform (see the module docstring for the rules)."""
    pieces = _ENCODE_SPLIT.split(text)  # [copied, changed, copied, changed, ..., copied]
    for index in range(1, len(pieces), 2):
        piece = pieces[index]
        if piece[0] <= "Z" and "a" <= pieces[index - 1][-1:] <= "z":
            # A capital inside a run that started lowercase ("iPhone" splits as "i" + "Phone"):
            # the word is mixed case, so every capital in it gets CAPNEXT; the lowercase start
            # was copied unchanged. (Operators sort after "Z"; they break runs and get ESC.)
            pieces[index] = piece.translate(_CAPNEXT_TABLE)
        elif len(piece) <= _CACHED_PIECE_MAX_LEN:
            pieces[index] = _encode_word_or_operator_cached(piece)
        else:
            pieces[index] = _encode_word_or_operator(piece)
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# Decoding (strict)
# ---------------------------------------------------------------------------------------------

# Every operator and every capital in the encoded text must begin one of the valid units below.
# The pattern first matches that one character (a character class lets the regex engine skip
# quickly to the next candidate), then the lookbehinds say which unit it begins:
#   escape : ESC + one operator character.
#   allcaps: ALLCAPS at a word start + 2 or more letters (the whole word) and no CAPNEXT after.
#   title  : TITLE at a word start + the whole word, its later capitals marked by CAPNEXT.
#   capnext: CAPNEXT between two letters (a capital inside a word that started lowercase; CAPNEXTs
#            of TITLE words are consumed by the title branch, so they never get here).
#   invalid: the empty alternative; a lone character is never a valid unit, so it marks an error.
# "At a word start" means not preceded by a lowercase letter; a preceding capital is itself an
# error, found earlier in the left-to-right scan. The one capturing group makes split() return
# [copied, unit, copied, unit, ..., copied].
_DECODE_SPLIT = re.compile(
    "([\ue001-\ue004A-Z]"
    "(?:(?<=\ue004)[\ue001-\ue004]"  # escape
    "|(?<=\ue002)(?<![a-z]\ue002)[a-z]{2,}+(?!\ue003)"  # allcaps
    "|(?<=\ue001)(?<![a-z]\ue001)[a-z](?:\ue003?[a-z])*+"  # title
    "|(?<=[a-z]\ue003)[a-z]"  # capnext
    "|))"  # invalid
)


def _decode_unit(unit: str) -> str | None:
    """Decode one unit matched by _DECODE_SPLIT (its context is already checked); None if invalid."""
    if len(unit) == 1:
        return None
    operator, body = unit[0], unit[1:]
    if operator == ESC:
        return body
    if operator == ALLCAPS:
        return body.upper()
    if operator == CAPNEXT:
        return body.upper()
    # TITLE: "a<CAPNEXT>bc<CAPNEXT>d" -> "ABcD".
    parts = body.split(CAPNEXT)
    if len(parts) > 1 and all(len(part) == 1 for part in parts):
        return None  # every letter a capital: the encoder would have used ALLCAPS
    return "".join(part[0].upper() + part[1:] for part in parts)


_decode_unit_cached = functools.lru_cache(maxsize=1 << 16)(_decode_unit)


def _describe_invalid(encoded: str, position: int) -> str:
    """Why the operator or capital at `position` cannot be part of any encoder output."""
    char = encoded[position]
    if "A" <= char <= "Z":
        return f"capital letter {char!r} (encoded text holds lowercase letters only)"
    name = _OPERATOR_NAMES[char]
    if position + 1 == len(encoded):
        return f"dangling {name} at the end of the input"
    following = encoded[position + 1]
    previous = encoded[position - 1] if position > 0 else ""
    if char == ESC:
        return f"ESC followed by {following!r}, which is not an operator character"
    if char == CAPNEXT:
        if not ("a" <= previous <= "z"):
            return "CAPNEXT that does not follow a letter of the same word"
        return f"CAPNEXT followed by {following!r} instead of a lowercase letter"
    if "a" <= previous <= "z":
        return f"{name} in the middle of a letter run"
    if not ("a" <= following <= "z"):
        return f"{name} followed by {following!r} instead of a lowercase letter"
    if char == TITLE:
        return "TITLE word whose every later letter has CAPNEXT (the encoder uses ALLCAPS for it)"
    if not ("a" <= encoded[position + 2 : position + 3] <= "z"):
        return "ALLCAPS on a 1-letter word (the encoder writes a single capital with TITLE)"
    return "CAPNEXT inside an ALLCAPS word"


def decode_lossless_caps_v2(encoded: str) -> str:
    """Invert `encode_lossless_caps_v2` exactly; raise CaseOpsDecodeError on malformed input."""
    pieces = _DECODE_SPLIT.split(encoded)
    decoded_units = [
        _decode_unit_cached(unit) if len(unit) <= _CACHED_PIECE_MAX_LEN else _decode_unit(unit)
        for unit in pieces[1::2]
    ]
    if None in decoded_units:
        first_bad = decoded_units.index(None)
        position = sum(len(piece) for piece in pieces[: 2 * first_bad + 1])
        raise CaseOpsDecodeError(_describe_invalid(encoded, position), position)
    pieces[1::2] = decoded_units
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# Byte map
# ---------------------------------------------------------------------------------------------


def _inserted_operator_starts(encoded_utf8: np.ndarray, has_escape: bool) -> np.ndarray:
    """Byte offsets, in encoder output, of the operators that the encoder inserted.

    Every operator character in the output was inserted, except a literal one from the input,
    which directly follows its inserted ESC. A maximal run of adjacent operators therefore reads
    inserted, literal, inserted, literal, ... (ESC + literal pairs, then at most one TITLE,
    ALLCAPS or CAPNEXT, which is followed by a letter and so ends the run).
    """
    # Operators are U+E001..U+E004 = EE 80 81..84; a 0xEE byte always leads a 3-byte character.
    lead_bytes = np.flatnonzero(encoded_utf8[: max(encoded_utf8.shape[0] - 2, 0)] == 0xEE)
    is_operator = (encoded_utf8[lead_bytes + 1] == 0x80) & (
        (encoded_utf8[lead_bytes + 2] - np.uint8(0x81)) < 4  # uint8 wrap-around: one comparison
    )
    operator_starts = lead_bytes[is_operator]
    if not has_escape:
        return operator_starts  # no literal operators: all were inserted
    n_operators = operator_starts.shape[0]
    starts_run = np.ones(n_operators, dtype=bool)
    starts_run[1:] = operator_starts[1:] != operator_starts[:-1] + _OPERATOR_UTF8_LEN
    order = np.arange(n_operators)
    index_in_run = order - np.maximum.accumulate(np.where(starts_run, order, 0))
    return operator_starts[index_in_run % 2 == 0]


def encode_with_byte_map(text: str) -> tuple[str, np.ndarray]:
    """Encode `text` and map each encoded UTF-8 byte to its original byte offset.

    Returns (encoded, orig_byte_offset) with orig_byte_offset an int64 array of length
    len(encoded.encode("utf-8")) + 1, non-decreasing, from 0 to len(text.encode("utf-8")).
    Raises UnicodeEncodeError for text that has no UTF-8 form (lone surrogates).
    """
    encoded = encode_lossless_caps_v2(text)
    encoded_utf8 = np.frombuffer(encoded.encode("utf-8"), dtype=np.uint8)
    inserted_starts = _inserted_operator_starts(encoded_utf8, ESC in encoded)
    n_encoded_bytes = encoded_utf8.shape[0]
    n_original_bytes = n_encoded_bytes - _OPERATOR_UTF8_LEN * inserted_starts.shape[0]
    if n_original_bytes != len(text.encode("utf-8")):  # cheap sanity check on the analysis above
        raise AssertionError("CaseOps byte map disagrees with the encoder; please report this bug")

    is_original_byte = np.ones(n_encoded_bytes, dtype=np.uint8)
    for byte_in_operator in range(_OPERATOR_UTF8_LEN):
        is_original_byte[inserted_starts + byte_in_operator] = 0
    # Entry b counts the original bytes before encoded byte b.
    orig_byte_offset = np.zeros(n_encoded_bytes + 1, dtype=np.int64)
    np.cumsum(is_original_byte, dtype=np.int64, out=orig_byte_offset[1:])
    return encoded, orig_byte_offset
