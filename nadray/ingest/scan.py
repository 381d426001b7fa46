"""Byte scans of a text input's records, run beside pyarrow's parse of the same bytes.

The clean-file fast paths (``common.fast_records``) ask two questions of the bytes that
pyarrow cannot answer while parsing:

- ``has_padding``: may some value carry whitespace that trimming would remove? If not,
  no ``utf8_trim_whitespace`` runs (a copy of every text column).
- ``number_hazard``: may pyarrow's number parsing accept a value that the Validator's
  rules refuse? If so, numbers are not taken from the parse (``fast_records(types=...)``).

numpy releases the GIL in their passes, so the scans run beside the parse.
"""

from __future__ import annotations

import numpy as np

# Bytes compared at a time: a piece stays in cache across its passes (50 MB in 256 KB
# pieces: 11 ms; in 1 MB pieces: 48 ms, on the 2-core machine).
_PAD_SCAN = 1 << 18


def has_padding(body: bytes, start: int = 0, end: int | None = None, sep: bytes = b",") -> bool:
    """Whether some value of ``body[start:end]`` may carry whitespace that trimming would remove.

    False only for ASCII text whose only bytes below ``!`` are the LFs that end lines (and
    the separator, a TAB): then every ``utf8_trim_whitespace`` of its fields is a no-op and
    can be skipped. Any other control byte, or a non-ASCII one, gives True: that errs on
    the safe side (trimming runs).
    """
    return _scan(body, start, len(body) if end is None else end, start, sep, hazard=False)[0]


def number_hazard(body: bytes, start: int = 0, end: int | None = None, sep: bytes = b",") -> bool:
    """Whether pyarrow's number parsing of ``body[start:end]`` may accept a value that the
    Validator's rules refuse, so numbers must not be taken from the parse.

    One such value: a field that starts with ``0x`` (Arrow reads hex integers; the rules
    take decimal only). Arrow also trims spaces and TABs around a number, as the rules do
    (``utf8_trim_whitespace``, which removes more: what it alone removes, Arrow refuses).
    Errs on the safe side: any ``0x`` after a separator, a line start or a sign counts.
    """
    return _scan(body, start, len(body) if end is None else end, start, sep, padding=False)[1]


def scan_records(body: bytes, start: int, end: int | None, sep: bytes) -> tuple[bool, bool]:
    """``(has_padding, number_hazard)`` of ``body[start:end]``, in one thread beside the parse.

    Split over 4 threads on the 16-core machine the two scans took as long as in one (12 MB:
    10.4 ms; 51 MB: 35 ms), so they are not split."""
    end = len(body) if end is None else end
    return _scan(body, start, end, start, sep)


def _scan(body: bytes, lo: int, hi: int, first: int, sep: bytes, padding: bool = True,
          hazard: bool = True) -> tuple[bool, bool]:
    """Both scans over ``body[lo:hi]``, of records that begin at ``first``."""
    a = np.frombuffer(body, np.uint8)
    tab = 0x09 if sep == b"\t" else -1
    padded = found = False
    for p in range(lo, hi, _PAD_SCAN):
        piece = a[p:min(p + _PAD_SCAN, hi)]
        if padding and not padded:
            # '!'..DEL map to 0..0x5e; every byte below '!' (LF too) or above DEL maps higher.
            outside = np.count_nonzero(np.subtract(piece, 0x21, dtype=np.uint8) > 0x5E)
            if outside:
                ends = np.count_nonzero(piece == 0x0A) + (np.count_nonzero(piece == tab) if tab >= 0 else 0)
                padded = outside > ends
        if hazard and not found:
            xs = np.flatnonzero((piece | 0x20) == 0x78) + p  # 'x' or 'X'
            xs = xs[xs > first]
            zeros = xs[a[xs - 1] == 0x30]  # ... after a '0'
            if zeros.size:
                before = a[np.maximum(zeros - 2, 0)]
                found = bool(np.any((zeros - 2 < first) | (before == sep[0]) | (before == 0x0A)
                                    | (before == 0x2D) | (before == 0x2B)))
        if (padded or not padding) and (found or not hazard):
            break
    return padded, found
