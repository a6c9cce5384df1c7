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


class CaseOpsDecodeError(ValueError):
    """An encoded string that the CaseOps encoder could never have produced."""

    def __init__(self, message: str, position: int):
        super().__init__(f"{message} (at character position {position})")
        self.position = position


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

# A literal operator, or a maximal ASCII-letter run that holds at least one capital. Runs that are
# all lowercase are never matched, so ordinary text costs no Python call. The lookbehind pins the
# match to the start of the run, and the possessive quantifiers keep the scan linear (no
# backtracking through long lowercase runs).
_ENCODE_PATTERN = re.compile(r"[\ue001-\ue004]|(?<![A-Za-z])[a-z]*+[A-Z][A-Za-z]*+")

# Lowercases a capital and puts CAPNEXT in front of it (used for mixed-case words).
_CAPNEXT_TABLE = str.maketrans({chr(code): CAPNEXT + chr(code + 32) for code in range(65, 91)})


def _encode_word_or_operator(match: re.Match) -> str:
    word = match.group()
    if word in _OPERATOR_NAMES:
        return ESC + word
    lowered = word.lower()  # the run is pure ASCII, so lower() only maps A-Z to a-z
    if word.isupper():
        # "I" (one capital) is written with TITLE; ALLCAPS needs 2+ letters.
        return (ALLCAPS if len(word) >= 2 else TITLE) + lowered
    first_is_capital = word[0] <= "Z"
    if first_is_capital and word[1:].islower():
        return TITLE + lowered
    # Mixed case ("McDonald", "iPhone", "ABCdef"): the first letter is covered by TITLE, every
    # later capital by its own CAPNEXT.
    return (TITLE if first_is_capital else "") + lowered[0] + word[1:].translate(_CAPNEXT_TABLE)


def encode_lossless_caps_v2(text: str) -> str:
    """Apply the CaseOps transform (see the module docstring for the rules)."""
    return _ENCODE_PATTERN.sub(_encode_word_or_operator, text)


# ---------------------------------------------------------------------------------------------
# Decoding (strict)
# ---------------------------------------------------------------------------------------------

# Every operator and every capital in the encoded text must belong to one of the valid units
# below; the last branch catches whatever is left over and is reported as an error. The units:
#   escape : ESC + one operator character.
#   allcaps: ALLCAPS at a word start + 2 or more letters (the whole word) and no CAPNEXT after.
#   title  : TITLE at a word start + the whole word, its later capitals marked by CAPNEXT.
#   capnext: CAPNEXT between two letters (a capital inside a word that started lowercase; CAPNEXTs
#            of TITLE words are consumed by the title branch, so they never get here).
# "At a word start" means not preceded by a lowercase letter; a preceding capital is itself an
# error found earlier in the left-to-right scan.
_DECODE_PATTERN = re.compile(
    r"(?P<escape>\ue004[\ue001-\ue004])"
    r"|(?<![a-z])\ue002(?P<allcaps>[a-z]{2,}+)(?!\ue003)"
    r"|(?<![a-z])\ue001(?P<title>[a-z](?:\ue003?[a-z])*+)"
    r"|(?<=[a-z])\ue003(?P<capnext>[a-z])"
    r"|(?P<invalid>[\ue001-\ue004A-Z])"
)


def _capitalize_marked_letters(word: str) -> str:
    # "a<CAPNEXT>bc<CAPNEXT>d" -> "aBcD"
    pieces = word.split(CAPNEXT)
    return pieces[0] + "".join(piece[0].upper() + piece[1:] for piece in pieces[1:])


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
    # Only ALLCAPS can get here: its letters are there but the word shape is wrong.
    if not ("a" <= encoded[position + 2 : position + 3] <= "z"):
        return "ALLCAPS on a 1-letter word (the encoder writes a single capital with TITLE)"
    return "CAPNEXT inside an ALLCAPS word"


def decode_lossless_caps_v2(encoded: str) -> str:
    """Invert `encode_lossless_caps_v2` exactly; raise CaseOpsDecodeError on malformed input."""
    pieces: list[str] = []
    copied_up_to = 0
    for match in _DECODE_PATTERN.finditer(encoded):
        start = match.start()
        kind = match.lastgroup
        if kind == "escape":
            replacement = encoded[start + 1]
        elif kind == "allcaps":
            replacement = match.group("allcaps").upper()
        elif kind == "title":
            word = match.group("title")
            marked = word.count(CAPNEXT)
            if marked and marked == len(word) - marked - 1:
                # Every letter is a capital: the encoder would have used ALLCAPS.
                raise CaseOpsDecodeError(
                    "TITLE word whose every later letter carries CAPNEXT "
                    "(the encoder writes an all-capital word with ALLCAPS)",
                    start,
                )
            replacement = _capitalize_marked_letters(word[0].upper() + word[1:])
        elif kind == "capnext":
            replacement = match.group("capnext").upper()
        else:
            raise CaseOpsDecodeError(_describe_invalid(encoded, start), start)
        pieces.append(encoded[copied_up_to:start])
        pieces.append(replacement)
        copied_up_to = match.end()
    pieces.append(encoded[copied_up_to:])
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# Byte map
# ---------------------------------------------------------------------------------------------


def _operator_insertion_points(utf8: np.ndarray) -> np.ndarray:
    """Byte offsets in the original UTF-8 text before which the encoder inserts an operator.

    The encoder inserts exactly one operator before: each literal operator character (ESC), the
    first letter of each word that starts with a capital (TITLE or ALLCAPS), and each later
    capital of a word that is not all capitals (CAPNEXT). Works on the UTF-8 bytes directly:
    bytes below 0x80 only ever occur as ASCII characters, so ASCII-letter runs are byte runs.
    """
    n_bytes = utf8.shape[0]
    is_capital = (utf8 - np.uint8(65)) < 26  # uint8 wrap-around makes this one comparison
    is_lower = (utf8 - np.uint8(97)) < 26
    is_letter = is_capital | is_lower
    prev_is_letter = np.zeros(n_bytes, dtype=bool)
    prev_is_letter[1:] = is_letter[:-1]
    is_word_start = is_letter & ~prev_is_letter

    word_starts = np.flatnonzero(is_word_start)
    capital_starts = np.flatnonzero(is_capital & is_word_start)
    inner_capitals = np.flatnonzero(is_capital & prev_is_letter)
    if inner_capitals.size:
        # A later capital gets CAPNEXT unless its word is all capitals (then ALLCAPS covers it;
        # such a word has 2+ letters, since it holds a capital after the first letter).
        word_has_lower = np.logical_or.reduceat(is_lower, word_starts)  # segments also span the
        word_of_capital = np.searchsorted(word_starts, inner_capitals, side="right") - 1  # gaps,
        inner_capitals = inner_capitals[word_has_lower[word_of_capital]]  # which hold no letters

    # Literal operators: EE 80 81..84. A 0xEE byte always leads a 3-byte character, so two more
    # bytes exist after it in valid UTF-8.
    lead_positions = np.flatnonzero(utf8[: max(n_bytes - 2, 0)] == 0xEE)
    is_operator = (utf8[lead_positions + 1] == 0x80) & ((utf8[lead_positions + 2] - np.uint8(0x81)) < 4)
    operator_positions = lead_positions[is_operator]

    points = np.concatenate([capital_starts, inner_capitals, operator_positions])
    points.sort()
    return points


def encode_with_byte_map(text: str) -> tuple[str, np.ndarray]:
    """Encode `text` and map each encoded UTF-8 byte to its original byte offset.

    Returns (encoded, orig_byte_offset) with orig_byte_offset an int64 array of length
    len(encoded.encode("utf-8")) + 1, non-decreasing, from 0 to len(text.encode("utf-8")).
    Raises UnicodeEncodeError for text that has no UTF-8 form (lone surrogates).
    """
    encoded = encode_lossless_caps_v2(text)
    utf8 = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    insertion_points = _operator_insertion_points(utf8)
    n_inserted = insertion_points.shape[0]
    if len(encoded) != len(text) + n_inserted:  # cheap cross-check of the two computations
        raise AssertionError("CaseOps byte map disagrees with the encoder; please report this bug")

    # Mark the operator bytes in the encoded byte stream: the k-th inserted operator starts at its
    # original insertion point shifted by the 3 bytes of each of the k operators before it.
    n_encoded_bytes = utf8.shape[0] + _OPERATOR_UTF8_LEN * n_inserted
    is_original_byte = np.ones(n_encoded_bytes, dtype=np.uint8)
    operator_starts = insertion_points + _OPERATOR_UTF8_LEN * np.arange(n_inserted)
    for byte_in_operator in range(_OPERATOR_UTF8_LEN):
        is_original_byte[operator_starts + byte_in_operator] = 0

    # Entry b counts the original bytes before encoded byte b.
    orig_byte_offset = np.zeros(n_encoded_bytes + 1, dtype=np.int64)
    np.cumsum(is_original_byte, dtype=np.int64, out=orig_byte_offset[1:])
    return encoded, orig_byte_offset
