"""Large inputs are parsed in pieces (nadray.ingest.stream): the same flows, quarantine and
counts as one whole parse, in every text format, plain or gzip, local or S3."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pyarrow as pa
import pytest

from nadray import archive as arc
from nadray.errors import InputError
from nadray.ingest import ingest, read_input
from nadray.ingest import stream
from test_ingest import CIC_HEADER, UNSW_ATTACK, UNSW_ROW

SLIPS = "stratosphere_slips_testdata"
REAL = [  # one real file per text format and Zeek shape (SOURCES.md)
    "iot23_small_scenarios/CTU-Malware-Capture-44-1-labeled.csv",  # Zeek, IoT-23 CSV
    f"{SLIPS}/test10-mixed-zeek-dir/conn.log",  # Zeek TSV (header indented by a tab)
    f"{SLIPS}/test9-mixed-zeek-dir/conn.log",  # Zeek JSON lines
    f"{SLIPS}/test18-malicious-ctu-sme-11-win/zeek-labeled/conn.log.labeled",  # TSV, labels space-separated
    f"{SLIPS}/test4-malicious.binetflow",  # Argus
    "cs448b_ipasn/cs448b_ipasn.mo7903.csv",  # cs448b
]


def _damaged(src: bytes, seed: int) -> bytes:
    """``src``'s first 400 lines with a truncated record, a garbage line and blank lines put in
    their second half."""
    lines = src.split(b"\n")[:400]
    rnd = random.Random(seed)
    for bad in (b"", b"", b"1,2,3", b"garbage\tline", None):
        i = rnd.randrange(len(lines) // 2, len(lines) - 1)
        lines.insert(i, lines[i][: len(lines[i]) // 2] if bad is None else bad)
    return b"\n".join(lines)


def _inputs(shared_data: Path, tmp_path: Path) -> list[Path]:
    out = []
    for k, rel in enumerate(REAL):
        p = tmp_path / rel.replace("/", "_")
        p.write_bytes(_damaged((shared_data / rel).read_bytes(), k))
        out.append(p)
    cic = tmp_path / "cic.csv"  # hand-made, as in test_ingest: CRLF, values breaking rules, cp1252
    rows = [f"1-2-80-6,172.16.0.1,{i},192.168.10.50,80,6,6/7/2017 9:20,{i % 7 - 1},1,1,0,0,0,NaN,40,40,BENIGN"
            for i in range(400)]
    cic.write_bytes(("\r\n".join([CIC_HEADER, *rows]) + "\r\n").encode() + b"1,2,3,Web Attack \x96\r\n")
    unsw = tmp_path / "unsw.csv"  # no header line, BOM, truncated records
    unsw.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([UNSW_ROW, UNSW_ATTACK, "1,2,3"] * 150).encode())
    joined = tmp_path / "joined-conn.log"  # Zeek TSV logs joined with cat: the fields change, and back
    plain = (shared_data / f"{SLIPS}/port-scans/horizontal/conn.log").read_bytes()
    joined.write_bytes(plain + out[3].read_bytes() + b"\n" + plain)
    return out + [cic, unsw, joined]


def _no_time(q: pa.Table) -> pa.Table:
    return q.drop_columns(["ingested_at"])  # when it was read: each piece's own moment


def test_pieces_hold_exactly_what_one_whole_parse_holds(shared_data, tmp_path):
    for path in _inputs(shared_data, tmp_path):
        gz = path.with_name(path.name + ".gz")
        gz.write_bytes(gzip.compress(path.read_bytes()))
        lines = path.read_bytes().split(b"\n")
        # Piece sizes: a twelfth and a quarter of the file, and one ending exactly on a line end (the
        # last line of a piece then ends its buffer too).
        exact = sum(len(ln) + 1 for ln in lines[:7])
        for p in (path, gz):
            whole = read_input(str(p))
            assert whole.quarantined >= 2, p.name  # the damage is there to be carried across pieces
            for size in (path.stat().st_size // 12, path.stat().st_size // 4, exact):
                pieces = list(stream.iter_input(str(p), piece_bytes=size, whole_bytes=size))
                what = f"{p.name} in pieces of {size} bytes"
                assert len(pieces) > 2 and [r.piece for r in pieces] == list(range(len(pieces))), what
                assert {r.format for r in pieces} == {whole.format}, what
                assert sum(r.read for r in pieces) == whole.read, what
                assert pa.concat_tables([r.flows for r in pieces]).equals(whole.flows), what
                q = pa.concat_tables([r.quarantine for r in pieces])
                assert _no_time(q).equals(_no_time(whole.quarantine)), what
        # Small enough: one whole parse, as before pieces existed.
        (one,) = stream.iter_input(str(path))
        assert one.piece is None and one.flows.equals(read_input(str(path)).flows)


def test_a_line_longer_than_a_piece_is_a_piece_of_its_own(tmp_path, shared_data):
    src = (shared_data / REAL[0]).read_bytes().split(b"\n")
    long = src[5].replace(b"benign", b"benign" + b"x" * 5000)  # one 5 kB record (its label breaks no rule)
    p = tmp_path / "long.csv"
    p.write_bytes(b"\n".join(src[:5] + [long] + src[6:]))
    whole = read_input(str(p))
    pieces = list(stream.iter_input(str(p), piece_bytes=1000, whole_bytes=1000))
    assert pa.concat_tables([r.flows for r in pieces]).equals(whole.flows)
    assert sum(r.read for r in pieces) == whole.read


def test_large_file_is_ingested_in_pieces_like_a_whole_one(shared_data, tmp_path, monkeypatch, caplog):
    """Archive, quarantine, manifest and counts match a whole ingest; progress is logged; a
    rerun adds nothing; a nightly commit carries every piece's quarantine."""
    from nadray.ingest import core
    from nadray.nightly import staging

    path = _inputs(shared_data, tmp_path)[0]
    ingest([str(path)], str(tmp_path / "whole"))
    monkeypatch.setattr(stream, "PIECE_BYTES", 4000)
    monkeypatch.setattr(stream, "WHOLE_BYTES", 4000)
    monkeypatch.setattr(core, "PROGRESS_S", 0.0)
    with caplog.at_level("INFO", logger="nadray.ingest.core"):
        rep = ingest([str(path)], str(tmp_path / "pieces"))
    progress = [r.getMessage() for r in caplog.records if "records in" in r.getMessage()]
    assert len(progress) > 2 and progress[-1].startswith(f"ingest: {path}: {rep.read} records in")
    (fr,) = rep.files
    assert rep.ok and fr.status == "ingested" and fr.quarantined >= 2
    assert fr.read == fr.archived + fr.quarantined == read_input(str(path)).read
    w, p = str(tmp_path / "whole"), str(tmp_path / "pieces")
    assert arc.read_flows(p).equals(arc.read_flows(w))
    assert _no_time(arc.read_quarantine(p)).equals(_no_time(arc.read_quarantine(w)))
    (entry,) = arc.list_manifest(p)
    assert (entry["read"], entry["archived"], entry["quarantined"]) == (fr.read, fr.archived, fr.quarantined)
    assert len({Path(u).name for u in entry["parts"]}) > 2  # part-<sha>-<piece>.parquet
    assert all(Path(u).name.startswith(f"part-{entry['sha256']}-") for u in entry["parts"])
    again = ingest([str(path)], p)
    assert again.files[0].status == "already ingested" and again.archived == 0
    # Had the ingest stopped before its manifest entry, readers would see none of its pieces.
    sha = entry["sha256"]
    arc.mark_pending(p, sha, {"sha256": sha})
    Path(arc.manifest_uri(p, sha)).rename(tmp_path / "entry.json")
    assert arc.dataset_paths(p) == [] and arc.read_quarantine(p).num_rows == 0
    # A night stages the same file in pieces and commits it: every quarantine part moves.
    night = str(tmp_path / "night")
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / path.name).write_bytes(path.read_bytes())
    staged = staging.stage(staging.scan_landing(str(landing), night), night, "2026-11-27")
    assert staged.ingest.ok
    staging.commit(night, "2026-11-27")
    def same(a: pa.Table, b: pa.Table) -> bool:  # the night read the file from its landing folder
        return a.drop_columns(["source"]).equals(b.drop_columns(["source"]))

    assert same(_no_time(arc.read_quarantine(night)), _no_time(arc.read_quarantine(w)))
    assert same(arc.read_flows(night), arc.read_flows(w))


def test_a_rerun_after_a_crash_cut_elsewhere_leaves_no_stale_piece(shared_data, tmp_path, monkeypatch):
    """An ingest stopped before its manifest entry left piece parts; the rerun cuts the file
    at other places (another PIECE_BYTES): the old parts must not be committed beside it."""
    import shutil

    path = _inputs(shared_data, tmp_path)[0]
    expected = read_input(str(path)).flows.num_rows
    a = str(tmp_path / "a")
    monkeypatch.setattr(stream, "WHOLE_BYTES", 3000)
    monkeypatch.setattr(stream, "PIECE_BYTES", 3000)
    ingest([str(path)], a)
    (entry,) = arc.list_manifest(a)
    sha = entry["sha256"]
    crashed = tmp_path / "crashed"  # what a crash before the manifest entry leaves: parts + .pending
    shutil.copytree(a, crashed)
    Path(arc.manifest_uri(str(crashed), sha)).unlink()
    arc.mark_pending(str(crashed), sha, {"sha256": sha})
    assert arc.dataset_paths(str(crashed)) == []
    monkeypatch.setattr(stream, "PIECE_BYTES", 5000)
    rep = ingest([str(path)], str(crashed))
    assert rep.ok and rep.archived == expected
    assert arc.count_rows(str(crashed)) == expected  # not the old pieces' rows a second time
    assert arc.read_quarantine(str(crashed)).num_rows == rep.quarantined


def test_an_unreadable_later_piece_refuses_the_file_and_leaves_nothing(shared_data, tmp_path, monkeypatch):
    path = _inputs(shared_data, tmp_path)[0]
    broken = tmp_path / "cut.csv.gz"
    data = gzip.compress(path.read_bytes())
    broken.write_bytes(data[: len(data) * 3 // 4])  # the gzip stream ends early
    monkeypatch.setattr(stream, "PIECE_BYTES", 4000)
    monkeypatch.setattr(stream, "WHOLE_BYTES", 4000)
    # Its first pieces parse; a later one cannot be read.
    with pytest.raises(InputError, match=r"cut\.csv\.gz: broken gzip data"):
        for r in stream.iter_input(str(broken)):
            assert r.piece is not None
    a = str(tmp_path / "a")
    rep = ingest([str(broken), str(path)], a)
    assert not rep.ok and len(rep.failed_inputs) == 1 and "cut.csv.gz: broken gzip data" in rep.failed_inputs[0]
    # Nothing of the refused file is left: not hidden parts, not a pending marker.
    manifest = arc.list_manifest(a)
    assert [e["source"] for e in manifest] == [str(path)]
    parts = {Path(u).name for u in arc.dataset_paths(a)} | {
        q.name for q in (tmp_path / "a" / "_quarantine").iterdir()}
    assert all(n.startswith(f"part-{manifest[0]['sha256']}") for n in parts), parts
    assert not arc.uncommitted_keys(a)
    assert sorted(n.name for d in (tmp_path / "a").glob("date=*") for n in d.iterdir()) == sorted(
        Path(u).name for u in arc.dataset_paths(a))


def test_a_large_s3_object_is_read_in_pieces(s3_server, shared_data, tmp_path, monkeypatch):
    from nadray import storage

    path = _inputs(shared_data, tmp_path)[0]
    uri = f"s3://{s3_server.make_bucket()}/landing/{path.name}"
    storage.write_bytes_atomic(uri, path.read_bytes())
    whole = read_input(str(path))
    pieces = list(stream.iter_input(uri, piece_bytes=5000, whole_bytes=5000))
    assert len(pieces) > 2
    flows = pa.concat_tables([r.flows for r in pieces])
    assert flows.drop_columns(["source"]).equals(whole.flows.drop_columns(["source"]))
    assert set(flows["source"].to_pylist()) == {uri}
    monkeypatch.setattr(stream, "PIECE_BYTES", 5000)
    monkeypatch.setattr(stream, "WHOLE_BYTES", 5000)
    a = f"s3://{s3_server.make_bucket()}/archive"
    rep = ingest([uri], a)
    assert rep.ok and rep.archived == whole.flows.num_rows and rep.quarantined == whole.quarantined
    assert arc.count_rows(a) == whole.flows.num_rows


@pytest.mark.parametrize("capture", [f"{SLIPS}/test7-malicious.pcap", "pcaps_chrissanders/synscan.pcapng"])
def test_a_large_capture_is_read_from_disk_not_held(shared_data, tmp_path, monkeypatch, capture):
    """pcap is binary, never cut: a large one is walked through a memory map and metered from
    its file (a gzip one from a temporary copy); the flows and the truncation note are the whole
    parse's."""
    from nadray.ingest import pcap

    src = shared_data / capture
    cut = tmp_path / f"cut-{src.name}"
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])  # truncated mid-record
    gz = tmp_path / f"{src.name}.gz"
    gz.write_bytes(gzip.compress(data))
    from_file = []
    real = pcap.read_file
    monkeypatch.setattr(pcap, "read_file", lambda path, source: (from_file.append(path), real(path, source))[1])
    for p in (src, cut, gz):
        whole = read_input(str(p))
        (r,) = stream.iter_input(str(p), piece_bytes=4096, whole_bytes=4096)
        assert r.piece is None and r.format == "pcap" and r.read == whole.read
        assert r.flows.equals(whole.flows)
        assert _no_time(r.quarantine).equals(_no_time(whole.quarantine))
    assert whole.flows.num_rows > 100
    assert from_file[:2] == [str(src), str(cut)] and from_file[2] != str(gz)  # the gzip's temporary copy
    assert not Path(from_file[2]).exists()  # removed after
    q = read_input(str(cut)).quarantine
    assert q.num_rows == 1 and q["reason"][0].as_py().startswith("truncated capture after packet")


def test_a_large_text_file_named_as_pcap_is_refused_naming_it(shared_data, tmp_path):
    """``--format pcap`` on a large text file: one line naming it, plain or gzip (whose
    temporary copy is removed), never the flow meter's own error."""
    import tempfile

    path = _inputs(shared_data, tmp_path)[0]
    gz = path.with_name(path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes()))
    before = set(Path(tempfile.gettempdir()).glob("nadray-*.pcap"))
    for p in (path, gz):
        with pytest.raises(InputError, match=rf"{p.name}: not a pcap or pcapng capture"):
            list(stream.iter_input(str(p), "pcap", piece_bytes=4096, whole_bytes=4096))
    assert set(Path(tempfile.gettempdir()).glob("nadray-*.pcap")) == before


def test_parts_a_refused_file_could_not_remove_go_at_its_rerun(shared_data, tmp_path, monkeypatch):
    """Removing a refused file's parts is best effort (the storage may be what failed): what is
    left stays hidden behind its .pending marker, and the next ingest of that file removes it."""
    from nadray import storage

    path = _inputs(shared_data, tmp_path)[0]
    broken = tmp_path / "cut.csv.gz"
    data = gzip.compress(path.read_bytes())
    broken.write_bytes(data[: len(data) * 3 // 4])
    monkeypatch.setattr(stream, "PIECE_BYTES", 4000)
    monkeypatch.setattr(stream, "WHOLE_BYTES", 4000)
    a = str(tmp_path / "a")
    real_rm = storage.rm

    def failing_rm(uri, *args, **kwargs):  # fault injection: the delete fails, as on a store gone read-only
        raise PermissionError(f"{uri}: read-only")

    monkeypatch.setattr(storage, "rm", failing_rm)
    rep = ingest([str(broken)], a)
    assert not rep.ok and "broken gzip data" in rep.failed_inputs[0]
    left = sorted(p.name for p in (tmp_path / "a").rglob("part-*.parquet"))
    assert left and arc.uncommitted_keys(a)  # parts left, hidden
    assert arc.dataset_paths(a) == [] and arc.count_rows(a) == 0
    monkeypatch.setattr(storage, "rm", real_rm)
    rep = ingest([str(broken)], a)
    assert not rep.ok and "broken gzip data" in rep.failed_inputs[0]
    assert sorted(p.name for p in (tmp_path / "a").rglob("part-*.parquet")) == []
    assert not arc.uncommitted_keys(a)
