"""Byte scans of a text input's records, run beside pyarrow's parse of the same bytes.

The clean-file fast paths (``common.fast_records``) ask two questions of the bytes that
pyarrow cannot answer while parsing:

- ``has_padding``: may some value carry whitespace that trimming would remove? If not,
  no ``utf8_trim_whitespace`` runs (a copy of every text column).
- ``number_hazard``: may pyarrow's number parsing accept a value that the Validator's
  rules refuse? If so, numbers are not taken from the parse (``fast_records(types=...)``).

numpy releases the GIL, so on a machine with cores to spare the scans cost no time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nadray.runtime import local_cpus

# Bytes compared at a time: a piece stays in cache across its passes (50 MB in 256 KB
# pieces: 11 ms; in 1 MB pieces: 48 ms, on the 2-core machine).
_PAD_SCAN = 1 << 18

# At most this many threads scan one input, one per 4 cores: they run beside pyarrow's
# parse, which takes the other cores. On the 16-core machine one thread scanned 51 MB for
# padding in 16 ms, 12 MB in 3 ms, about as long as pyarrow parsed it (26 / 7 ms).
SCAN_MAX_THREADS = 4


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
    """``(has_padding, number_hazard)`` of ``body[start:end]``, on byte ranges in threads
    where there are cores to spare. Each range stops at its first finding of both."""
    end = len(body) if end is None else end
    k = max(1, min(local_cpus() // 4, SCAN_MAX_THREADS, (end - start) // (4 * _PAD_SCAN)))
    if k == 1:
        return _scan(body, start, end, start, sep)
    cuts = [start + (end - start) * i // k for i in range(k + 1)]
    with ThreadPoolExecutor(k, thread_name_prefix="nadray-scan") as pool:
        found = list(pool.map(lambda lo, hi: _scan(body, lo, hi, start, sep), cuts[:-1], cuts[1:]))
    return any(p for p, _ in found), any(h for _, h in found)


def _scan(body: bytes, lo: int, hi: int, first: int, sep: bytes, padding: bool = True,
          hazard: bool = True) -> tuple[bool, bool]:
    """Both scans over ``body[lo:hi]``, of records that begin at ``first``. Every pass
    writes into buffers made once per range: a new array per piece and pass made the
    scans slower than the parse beside them on the 16-core machine."""
    a = np.frombuffer(body, np.uint8)
    tab = 0x09 if sep == b"\t" else -1
    size = min(_PAD_SCAN, max(hi - lo, 0))
    buf, m1, m2 = np.empty(size, np.uint8), np.empty(size, np.bool_), np.empty(size, np.bool_)
    padded = found = False
    for p in range(lo, hi, _PAD_SCAN):
        q = min(p + _PAD_SCAN, hi)
        n = q - p
        piece = a[p:q]
        if padding and not padded:
            # '!'..DEL map to 0..0x5e; every byte below '!' (LF too) or above DEL maps higher.
            np.subtract(piece, 0x21, out=buf[:n])
            outside = np.count_nonzero(np.greater(buf[:n], 0x5E, out=m1[:n]))
            if outside:
                ends = np.count_nonzero(np.equal(piece, 0x0A, out=m2[:n]))
                if tab >= 0:
                    ends += np.count_nonzero(np.equal(piece, tab, out=m2[:n]))
                padded = outside > ends
        s = max(p, first + 1)  # an 'x' at s has its '0' at s - 1, inside the records
        if hazard and not found and s < q:
            k = q - s
            x, zero = m1[:k], m2[:k]
            np.equal(np.bitwise_or(a[s:q], 0x20, out=buf[:k]), 0x78, out=x)  # 'x' or 'X'
            np.logical_and(x, np.equal(a[s - 1:q - 1], 0x30, out=zero), out=x)  # after a '0'
            if np.count_nonzero(x):
                at = np.flatnonzero(x) + s - 1  # where each "0x" starts
                before = a[np.maximum(at - 1, 0)]
                found = bool(np.any((at == first) | (before == sep[0]) | (before == 0x0A)
                                    | (before == 0x2D) | (before == 0x2B)))
        if (padded or not padding) and (found or not hazard):
            break
    return padded, found
