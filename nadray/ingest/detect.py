"""Recognise an input's format from its content (``--format auto``).

* pcap / pcapng: magic bytes (``d4c3b2a1``/``a1b2c3d4`` and the nanosecond
  variants; ``0a0d0d0a`` for pcapng).
* Zeek TSV: a ``#separator`` or ``#fields`` line; ``#path`` other than ``conn``
  (dns.log, ssl.log, ...) is "not a flow log". Zeek JSON: a first record with
  ``id.orig_h``, ``proto`` and conn fields; other JSON logs are "not a flow log".
* Text with a header line, by its columns: Argus (``StartTime``, ``SrcAddr``,
  ``DstAddr``), Zeek CSV (``ts``, ``id.orig_h``, ``id.resp_h``), CICFlowMeter
  (``Flow Duration``, ``Total Fwd Packets``), UNSW-NB15 with header (``srcip``,
  ``dstip``, ``dsport``), cs448b (``date``, ``l_ipn``, ...).
* Headerless UNSW-NB15: a first line of exactly 49 comma-separated fields.
* KDD Cup 99 / NSL-KDD records (42 or 43 fields, no header, ``0,tcp,http,SF,...``) are
  recognised only to be refused with the reason (``KDD``): they hold no time and no host.
"""

from __future__ import annotations

import json

from nadray.ingest import cs448b, zeek

PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"}
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
NOT_FLOW_LOG = "not-a-flow-log"
KDD = "kdd"
_KDD_PROTOCOLS = {"tcp", "udp", "icmp"}


def _first_line(text: str) -> str:
    for ln in text.splitlines():
        if ln.strip():
            return ln.strip()
    return ""


def _is_binary(head: bytes) -> bool:
    """NUL bytes, many control characters, or invalid UTF-8 with many high bytes."""
    sample = head[:4096]
    if not sample or b"\x00" in sample:
        return bool(sample)
    ctrl = sum(1 for b in sample if b < 0x20 and b not in (9, 10, 13))
    if ctrl > len(sample) * 0.02:
        return True
    try:
        sample.decode("utf-8")
        return False
    except UnicodeDecodeError as e:
        if e.start >= len(sample) - 4:
            return False  # a multibyte character cut by the sample's end
        high = sum(1 for b in sample if b >= 0x80)
        return high > len(sample) * 0.1  # a stray Windows-1252 byte is text


def detect(head: bytes) -> str | None:
    """The format of content starting with ``head`` (decompressed), ``NOT_FLOW_LOG``, or None."""
    if head[:4] in PCAP_MAGIC:
        return "pcap"
    if head[:4] == PCAPNG_MAGIC:
        return "pcap"
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if not head.strip() or _is_binary(head):
        return None
    text = head.decode("utf-8", errors="replace")
    first = _first_line(text)
    if first.startswith("#separator") or first.startswith("#fields") or first.startswith("#"):
        fields: list[str] = []
        path = None
        for ln in text.splitlines():
            s = ln.strip()
            if s.startswith("#path"):
                path = s.split(None, 1)[1].strip() if len(s.split(None, 1)) > 1 else ""
            elif s.startswith("#fields"):
                fields = s.split()[1:]
        if path is not None and path != "conn":
            return NOT_FLOW_LOG
        if fields:
            return "zeek" if zeek.is_conn_columns(fields) else NOT_FLOW_LOG
        return None
    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        if obj.get("_path", "conn") == "conn" and zeek.is_conn_columns(obj.keys()):
            return "zeek"
        return NOT_FLOW_LOG if ("ts" in obj or "timestamp" in obj) else None
    sep = "\t" if first.count("\t") > first.count(",") else ","
    cols = [c.strip() for c in first.split(sep)]
    low = {c.lower() for c in cols}
    if {"starttime", "srcaddr", "dstaddr"} <= low:
        return "argus"
    if {"ts", "id.orig_h", "id.resp_h"} <= low:
        return "zeek"
    if {"flow duration", "total fwd packets"} <= low:
        return "cicflowmeter"
    if {"srcip", "dstip", "dsport"} <= low:
        return "unsw-nb15"
    if cs448b.header_kind(cols) is not None:
        return "cs448b"
    if sep == "," and len(cols) == 49:
        return "unsw-nb15"
    if sep == "," and len(cols) in (42, 43) and cols[1] in _KDD_PROTOCOLS and cols[0].isdigit():
        return KDD
    return None
