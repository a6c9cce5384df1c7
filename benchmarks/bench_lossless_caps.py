"""Throughput of the CaseOps transform on synthetic English-like text (prints MB/s, asserts nothing).

Run from the repository root:  python benchmarks/bench_lossless_caps.py
MB = 10**6 bytes of ORIGINAL UTF-8 text processed per second, best of a few repeats, one core.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lossless_caps import decode_lossless_caps_v2, encode_lossless_caps_v2, encode_with_byte_map  # noqa: E402

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more some time people year new first also about because through between water after "
    "information government university president company system number however"
).split()
_CAPITALIZED = ["The", "In", "I", "It", "This", "New", "York", "London", "John", "Smith", "March"]
_OTHER = ["NASA", "USA", "McDonald", "iPhone", "YouTube", "2024", "3.5%", "café", "naïve", "—", "É"]


def synthetic_english(n_bytes: int, seed: int = 0) -> str:
    """Sentences of common words: ~10% capitalized, ~2% acronyms / mixed case / digits / non-ASCII."""
    rng = random.Random(seed)
    sentences: list[str] = []
    size = 0
    while size < n_bytes:
        words = [rng.choice(_CAPITALIZED) if rng.random() < 0.5 else rng.choice(_WORDS).capitalize()]
        for _ in range(rng.randint(6, 24)):
            draw = rng.random()
            if draw < 0.05:
                words.append(rng.choice(_CAPITALIZED))
            elif draw < 0.07:
                words.append(rng.choice(_OTHER))
            else:
                words.append(rng.choice(_WORDS))
        sentence = " ".join(words) + rng.choice([". ", ", ", "! ", "? ", ".\n\n"])
        sentences.append(sentence)
        size += len(sentence.encode("utf-8"))
    return "".join(sentences)[:n_bytes]


def best_seconds(function, argument, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(argument)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    for megabytes in (1, 10):
        text = synthetic_english(megabytes * 10**6)
        n_bytes = len(text.encode("utf-8"))
        encoded = encode_lossless_caps_v2(text)
        assert decode_lossless_caps_v2(encoded) == text
        repeats = 5 if megabytes == 1 else 2
        for name, function, argument in (
            ("encode", encode_lossless_caps_v2, text),
            ("decode", decode_lossless_caps_v2, encoded),
            ("encode_with_byte_map", encode_with_byte_map, text),
        ):
            seconds = best_seconds(function, argument, repeats)
            print(f"{megabytes:>3} MB  {name:<22} {n_bytes / seconds / 1e6:8.1f} MB/s")
        print(f"      encoded/original characters: {len(encoded) / len(text):.4f}")


if __name__ == "__main__":
    main()
