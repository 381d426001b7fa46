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


# Values for the columns the Zeek fast paths let pyarrow read as numbers: each is read the
# same as the line path reads it, or the input falls back to text (hex, signs, padding,
# out-of-range, not numbers at all).
NUMBERISH = st.one_of(
    st.sampled_from(["0", "-0", "007", "+7", "-5", "0x1f", "0X1F", "-0x5", "1e3", "1E5", "5.", ".5", "5.0", "nan",
                     "inf", "-inf", "Infinity", " 5", "5 ", " 5 ", "\t5", "5\u00a0", " - ", "-", "(empty)", "", " ",
                     "65535", "65536", "9223372036854775807", "9223372036854775808", "1e400", "0x", "x0",
                     "1540469303.123456", "2018-10-25T12:08:23Z", "4102444800", "-1e13"]),
    st.integers(-2**64, 2**64).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="0123456789xX.+-e ", max_size=8),
)
ZEEK_NUMBER_COLS = ["ts", "id.orig_p", "id.resp_p", "duration", "orig_bytes", "resp_bytes", "orig_pkts", "resp_pkts"]
# ... and the text columns, whose null spellings the same parse reads as null.
TEXTISH = st.one_of(st.sampled_from(["", "-", "(empty)", " - ", " ", "--", "T", "F", "t", "yes", "tcp", " UDP ", "Benign",
                                     "Malicious", "C&C", "(empty)   Malicious", "\u00a0-"]),
                    st.text(alphabet="-TF(empty) ab", max_size=6))
ZEEK_TEXT_COLS = ["id.orig_h", "id.resp_h", "proto", "service", "conn_state", "local_orig", "label", "detailed-label"]


def _zeek_file(shape: str, cells: list[tuple[int, str, str]]) -> bytes:
    cols = ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service", "duration",
            "orig_bytes", "resp_bytes", "conn_state", "local_orig", "orig_pkts", "resp_pkts", "label", "detailed-label"]
    rows = [["1540469303.5", "Cx0x%d" % i, "192.168.1.%d" % i, str(58680 + i), "8.8.8.8", "53", "udp", "dns", "0.1",
             "48", "96", "SF", "-", "2", "2", "benign", "-"] for i in range(12)]
    for r, col, value in cells:
        rows[r % len(rows)][cols.index(col)] = value
    if shape == "csv":
        return "\n".join([",".join(cols)] + [",".join(r) for r in rows]).encode() + b"\n"
    head = ["#separator \\x09", "#set_separator\t,", "#empty_field\t(empty)", "#unset_field\t-", "#path\tconn",
            "#open\t2018-10-25-12-08-23", "#fields\t" + "\t".join(cols), "#types\t" + "\t".join("string" for _ in cols)]
    return "\n".join(head + ["\t".join(r) for r in rows]).encode() + b"\n"


@pytest.mark.parametrize("shape", ["csv", "tsv"])
def test_numbers_read_by_pyarrow_equal_the_line_path(shape):
    """The fast paths let pyarrow read the numeric columns as numbers and the null spellings as
    null (common.fast_records(types=...)); whatever the cells hold, the flows and the quarantine
    (raw text and reason) are exactly the line path's, which reads and casts text."""
    from nadray.ingest.common import split_lines

    slow = zeek._read_csv if shape == "csv" else zeek._read_tsv

    def rows(res):
        q = res.quarantine
        return (res.read, res.flows.to_pylist(), list(zip(q["source_row"].to_pylist(), q["raw"].to_pylist(),
                                                          q["reason"].to_pylist())))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(st.one_of(st.tuples(st.integers(0, 11), st.sampled_from(ZEEK_NUMBER_COLS), NUMBERISH),
                              st.tuples(st.integers(0, 11), st.sampled_from(ZEEK_TEXT_COLS), TEXTISH)), max_size=5))
    def run(cells):
        data = _zeek_file(shape, [(r, c, v.replace(",", ";") if shape == "csv" else v.replace("\t", " "))
                                  for r, c, v in cells])
        assert rows(zeek.read(data, "conn")) == rows(slow(split_lines(data), "conn"))

    run()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"0", b"x", b",", b"\t", b"\n", b"-", b"a", b" ", b"\x7f", b"\x01", b"\xc3\xa9"]),
                max_size=40), st.integers(0, 8), st.sampled_from([b",", b"\t"]), st.sampled_from([3, 64, 1 << 18]))
def test_has_padding_counts_a_tab_separator_as_no_padding(parts, start, sep, piece):
    """In a Zeek TSV the TABs are separators, not padding: with sep TAB, has_padding is True
    exactly where a byte other than LF, TAB and '!'..DEL occurs (in pieces of any size)."""
    from nadray.ingest import common

    body = b"".join(parts)
    start = min(start, len(body))
    old, common._PAD_SCAN = common._PAD_SCAN, piece
    try:
        got = common.has_padding(body, start, None, sep)
    finally:
        common._PAD_SCAN = old
    assert got == any(c not in b"\n" + sep and not 0x21 <= c <= 0x7F for c in body[start:])
