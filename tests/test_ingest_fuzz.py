"""Property-based fuzzing of each text parser: arbitrary lines or bytes appended to,
inserted into or substituted for records of a valid file never crash the parser,
and nothing is lost: every data record is either a flow or a quarantine row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nadray.errors import InputError
from nadray.ingest import argus, cicflowmeter, cs448b, unsw, zeek
from nadray.ingest.common import ReadResult

SLIPS = "stratosphere_slips_testdata"

CIC = (b"Flow ID, Source IP, Source Port, Destination IP, Destination Port, Protocol, Timestamp, Flow Duration, "
       b"Total Fwd Packets, Total Backward Packets,Total Length of Fwd Packets, Total Length of Bwd Packets, Label\n"
       + b"".join(b"f,10.0.0.%d,%d,10.0.1.1,80,6,7/7/2017 3:%02d,%d,2,1,100,50,BENIGN\n" % (i, 1000 + i, i, i * 10)
                  for i in range(20)))  # hand-made from the documented CIC-IDS2017 column set
UNSW = b"\r\n".join(
    b"59.166.0.%d,%d,149.171.126.6,53,udp,CON,0.001,132,164,31,29,0,0,dns,5.0,6.0,2,2,0,0,0,0,66,82,0,0,0,0,"
    b"%d,1421927414,0.017,0.013,0,0,0,0,0,0,0,0,3,7,1,3,1,1,1,,0" % (i, 1000 + i, 1421927400 + i)
    for i in range(20)) + b"\r\n"  # hand-made from the documented UNSW-NB15 49-column layout


def _head(path: Path, n: int) -> bytes:
    return b"\n".join(path.read_bytes().split(b"\n")[:n]) + b"\n"


def _cases(shared: Path) -> dict[str, tuple]:
    return {
        "zeek-tsv": (zeek.read, _head(shared / SLIPS / "test10-mixed-zeek-dir" / "conn.log", 30), 8),
        "zeek-labelled": (zeek.read, _head(shared / SLIPS / "test18-malicious-ctu-sme-11-win" / "zeek-labeled"
                                           / "conn.log.labeled", 30), 8),
        "zeek-json": (zeek.read, _head(shared / SLIPS / "port-scans" / "vertical" / "conn.log", 20), 0),
        "iot23-csv": (zeek.read, _head(shared / "iot23_small_scenarios" / "CTU-Malware-Capture-44-1-labeled.csv", 25), 1),
        "argus": (argus.read, _head(shared / SLIPS / "test5-mixed.binetflow", 25), 1),
        "cs448b": (cs448b.read, _head(shared / "cs448b_ipasn" / "cs448b_ipasn.mo7903.csv", 25), 1),
        "cicflowmeter": (cicflowmeter.read, CIC, 1),
        "unsw": (unsw.read, UNSW, 0),
    }


junk_line = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
    st.text(max_size=80).map(lambda s: s.replace("\n", "").encode("utf-8", "surrogatepass")
                             .decode("utf-8", "replace").encode()),
    st.sampled_from([b"", b"-", b"#", b",,,,", b"\t\t\t", b"\xef\xbb\xbf", b"\r", b"nan,inf,-1", b"{", b"[1,2]",
                     b'{"ts": "x"}', b"0x", b"\x00\x00"]),
)
edits = st.lists(st.tuples(st.sampled_from(["append", "insert", "replace", "mutate"]),
                           st.integers(min_value=0, max_value=10_000), junk_line), min_size=1, max_size=6)


def _apply(data: bytes, header_lines: int, ops) -> bytes:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for op, pos, junk in ops:
        body = len(lines) - header_lines
        i = header_lines + (pos % body if body > 0 else 0)
        if op == "append":
            lines.append(junk)
        elif op == "insert":
            lines.insert(i, junk)
        elif op == "replace" and body > 0:
            lines[i] = junk
        elif op == "mutate" and body > 0:
            ln = lines[i]
            k = pos % (len(ln) + 1)
            lines[i] = ln[:k] + junk + ln[k + len(junk) // 2:]
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def cases(shared_data):
    return _cases(shared_data)


def _check(res: ReadResult) -> None:
    rows = sorted(res.flows["source_row"].to_pylist()
                  + [r for r in res.quarantine["source_row"].to_pylist() if r is not None])
    assert rows == list(range(res.read)), "every data record is a flow or a quarantine row, once"
    assert res.read == res.flows.num_rows + res.quarantined


@pytest.mark.parametrize("name", ["zeek-tsv", "zeek-labelled", "zeek-json", "iot23-csv", "argus", "cs448b",
                                  "cicflowmeter", "unsw"])
def test_fuzz_parser(cases, name):
    read, base, header = cases[name]
    clean = read(base, "fuzz")
    assert clean.quarantined == 0 and clean.read > 0

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(ops=edits)
    def run(ops):
        data = _apply(base, header, ops)
        try:
            res = read(data, "fuzz")
        except InputError:
            return  # a whole-file problem, reported in one line: allowed, never another exception
        _check(res)
        assert res.read >= clean.read - sum(op in ("replace", "mutate") for op, _, _ in ops) - 1

    run()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 40), st.sampled_from([3, 64, 1 << 18]))
def test_has_padding_never_misses_what_trimming_would_remove(body, start, piece):
    """Skipping the trim is safe only if no value can start or end with a byte it removes:
    has_padding must say True whenever body[start:] holds one of them, or any non-ASCII byte."""
    from nadray.ingest import common

    old, common._PAD_SCAN = common._PAD_SCAN, piece
    try:
        got = common.has_padding(body, start)
    finally:
        common._PAD_SCAN = old
    rest = body[start:]
    trimmed = b" \t\x0b\x0c\r\x1c\x1d\x1e\x1f"
    if not rest.isascii() or any(c in trimmed for c in rest):
        assert got
    if all(c == 0x0A or 0x21 <= c <= 0x7E for c in rest):
        assert not got
