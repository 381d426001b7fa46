"""pcap and pcapng captures, turned into flows by a real flow meter: nfstream.

nfstream (``NFStreamer(source=path, statistical_analysis=False, n_meters=1)``)
groups packets into bidirectional flows (5-tuple, idle timeout 120 s, active
timeout 1800 s, nfstream's defaults). Its flows are iterated in place (its
``to_pandas`` writes a temporary CSV into the current folder, so it is not used).

Field mapping: ``src_ip``/``dst_ip``/``src_port``/``dst_port`` as nfstream sees
them (the first packet's sender is the source; ports null for protocols other
than TCP/UDP/SCTP); ``protocol`` (IANA number) -> proto name (``tcp``, ``udp``,
``icmp``, ``ipv6-icmp``, ... or the number as text); ``bidirectional_first_seen_ms``
-> ts (millisecond resolution); ``bidirectional_duration_ms`` / 1000 -> duration;
``src2dst_bytes``/``dst2src_bytes`` -> src_bytes/dst_bytes (IP-level bytes, as
nfstream counts them, not payload); ``src2dst_packets``/``dst2src_packets`` ->
src_pkts/dst_pkts. conn_state and service: null. ``source_row`` = the flow's
index in nfstream's output.

Labels: null (captures are labelled per file, by name; see SOURCES.md).

Truncated captures: nfstream stops silently at a cut record, so the capture's
record headers are walked first (cheap, no packet decoding). The flows nfstream
produced are archived and the truncation is reported as a quarantine row with a
null ``source_row`` and the reason ``truncated capture after packet N``.
"""

from __future__ import annotations

import os
import struct
import tempfile

import numpy as np
import pyarrow as pa

from nadray.errors import InputError
from nadray.ingest.common import PROTO_NAMES, ReadResult, assemble

FORMAT = "pcap"
_PORT_PROTOS = {6, 17, 132}


def check_capture(data: bytes) -> tuple[int, str | None]:
    """Walk a pcap/pcapng's record headers: (complete packets, truncation message or None)."""
    if len(data) < 4:
        return 0, "capture shorter than its magic number"
    magic = data[:4]
    if magic == b"\x0a\x0d\x0d\x0a":
        return _check_pcapng(data)
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError("not a pcap or pcapng capture (unknown magic number)")
    if len(data) < 24:
        return 0, "truncated capture after packet 0 (global header cut)"
    pos, n, size = 24, 0, len(data)
    unpack = struct.Struct(endian + "IIII").unpack_from
    while pos < size:
        if pos + 16 > size:
            return n, f"truncated capture after packet {n} (record header cut at byte {pos})"
        _, _, incl, _ = unpack(data, pos)
        if pos + 16 + incl > size:
            return n, f"truncated capture after packet {n} (packet {n + 1} cut at byte {pos})"
        pos += 16 + incl
        n += 1
    return n, None


def _check_pcapng(data: bytes) -> tuple[int, str | None]:
    pos, n, size = 0, 0, len(data)
    endian = "<"
    while pos < size:
        if pos + 12 > size:
            return n, f"truncated capture after packet {n} (block header cut at byte {pos})"
        btype_raw = data[pos:pos + 4]
        if btype_raw == b"\x0a\x0d\x0d\x0a":
            bom = data[pos + 8:pos + 12]
            endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
        btype, blen = struct.unpack_from(endian + "II", data, pos)
        if blen < 12 or blen % 4 or pos + blen > size:
            return n, f"truncated capture after packet {n} (block at byte {pos} cut or corrupt)"
        if btype in (2, 3, 6):
            n += 1
        pos += blen
    return n, None


def read(data: bytes, source: str, path: str | None = None) -> ReadResult:
    """A capture held in memory; ``path``: the same bytes on local disk, which nfstream reads."""
    try:
        packets, trunc = check_capture(data)
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None
    tmp = None
    if path is None:
        fd, tmp = tempfile.mkstemp(suffix=".pcap", prefix="nadray-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path = tmp
    try:
        return _flows(path, source, packets, trunc)
    finally:
        if tmp:
            os.remove(tmp)


def read_file(path: str, source: str) -> ReadResult:
    """A capture on local disk, never held in memory: its record headers are walked through a
    read-only memory map (pages the kernel can drop), and nfstream reads the file itself."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            packets, trunc = check_capture(view)  # type: ignore[arg-type]
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None
    return _flows(path, source, packets, trunc)


def _flows(path: str, source: str, packets: int, trunc: str | None) -> ReadResult:
    cols = _meter(path, source)
    n = len(cols["ts"])
    proto_num = np.asarray(cols["protocol"], dtype=np.int64)
    has_ports = np.isin(proto_num, list(_PORT_PROTOS))
    out = {
        "ts": pa.array(np.asarray(cols["ts"], dtype=np.int64) * 1000, pa.int64()),
        "src_ip": pa.array(cols["src_ip"], pa.string()),
        "dst_ip": pa.array(cols["dst_ip"], pa.string()),
        "proto": pa.array([PROTO_NAMES.get(int(p), str(int(p))) for p in proto_num], pa.string()),
        "src_port": pa.array(np.asarray(cols["src_port"], dtype=np.int32), pa.int32(), mask=~has_ports),
        "dst_port": pa.array(np.asarray(cols["dst_port"], dtype=np.int32), pa.int32(), mask=~has_ports),
        "duration": pa.array(np.asarray(cols["dur"], dtype=np.float64) / 1000.0, pa.float64()),
        "src_bytes": pa.array(cols["src_bytes"], pa.int64()),
        "dst_bytes": pa.array(cols["dst_bytes"], pa.int64()),
        "src_pkts": pa.array(cols["src_pkts"], pa.int64()),
        "dst_pkts": pa.array(cols["dst_pkts"], pa.int64()),
    }
    bad = [(None, None, trunc)] if trunc else []
    res = assemble(source, FORMAT, n, np.arange(n, dtype=np.int64), out, None, None, bad)
    if trunc:
        res.notes.append(trunc)
    if n == 0 and (packets or not trunc):  # "read 0" alone would look like a lost file
        res.notes.append(_no_flows_note(packets))
    return res


def _no_flows_note(packets: int) -> str:
    """Why a capture gave no flow: it is empty, or none of its packets is IP."""
    if packets == 0:
        return "the capture holds no packets"
    return (f"no IP flow in its {packets} packet{'s' if packets != 1 else ''}: the flow meter reads IPv4 and "
            f"IPv6 only, so ARP or 802.11 management frames make none")


def _meter(path: str, source: str) -> dict[str, list]:
    from nfstream import NFStreamer

    keys = ["ts", "src_ip", "dst_ip", "protocol", "src_port", "dst_port", "dur",
            "src_bytes", "dst_bytes", "src_pkts", "dst_pkts"]
    cols: dict[str, list] = {k: [] for k in keys}
    try:
        streamer = NFStreamer(source=path, statistical_analysis=False, n_meters=1, n_dissections=0,
                              splt_analysis=0, performance_report=0)
        for f in streamer:
            cols["ts"].append(f.bidirectional_first_seen_ms)
            cols["src_ip"].append(f.src_ip)
            cols["dst_ip"].append(f.dst_ip)
            cols["protocol"].append(f.protocol)
            cols["src_port"].append(f.src_port)
            cols["dst_port"].append(f.dst_port)
            cols["dur"].append(f.bidirectional_duration_ms)
            cols["src_bytes"].append(f.src2dst_bytes)
            cols["dst_bytes"].append(f.dst2src_bytes)
            cols["src_pkts"].append(f.src2dst_packets)
            cols["dst_pkts"].append(f.dst2src_packets)
    except Exception as e:  # nfstream raises ValueError/OSError variants for unreadable captures
        raise InputError(f"{source}: the flow meter (nfstream) cannot read this capture: {e}") from None
    return cols
