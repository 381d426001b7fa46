"""Real traffic data shipped inside the package, for the demo and for tests.

* ``cs448b_ipasn`` (``cs448b_ipasn.csv.gz``): Stanford CS448B "ipasn" daily flow
  counts, 10 hosts x remote ASN, 2006-07-01 .. 2006-09-30, 20,803 rows; the
  mo7903 copy with its original header ``date,l_ipn,r_asn,f`` restored (the
  rows are byte-for-byte that copy's). Ground truth is per host:
  :func:`cs448b_ground_truth`.
* ``iot23-<scenario>`` (``iot23-<scenario>.csv.gz``): eight small IoT-23 Zeek conn
  logs (aucad's CSV conversion, unchanged, gzipped), labelled per flow.

Provenance and licences: ``SOURCES.md`` next to this file. ``nadray ingest``
reads the ``.gz`` files directly (format detected on the decompressed content)::

    from nadray import datasets
    from nadray.ingest import ingest
    ingest([str(datasets.path("cs448b_ipasn"))], "archive/")
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

_HERE = Path(__file__).resolve().parent

IOT23_SCENARIOS = [
    "CTU-Honeypot-Capture-4-1", "CTU-Honeypot-Capture-5-1", "CTU-Honeypot-Capture-7-1",
    "CTU-Malware-Capture-8-1", "CTU-Malware-Capture-20-1", "CTU-Malware-Capture-21-1",
    "CTU-Malware-Capture-42-1", "CTU-Malware-Capture-44-1",
]

# Investigation dates published with the cs448b data (SOURCES.md): the host was
# compromised on or before that day. Hosts 0, 2, 7, 8, 9 were never reported.
_CS448B_INVESTIGATED = {1: "2006-08-24", 5: "2006-09-04", 4: "2006-09-18", 3: "2006-09-26", 6: "2006-09-26"}
CS448B_CLEAN_HOSTS = (0, 2, 7, 8, 9)


def names() -> list[str]:
    """Names accepted by :func:`path`."""
    return ["cs448b_ipasn"] + [f"iot23-{s}" for s in IOT23_SCENARIOS]


def path(name: str) -> Path:
    """The file of a bundled data set: ``cs448b_ipasn`` or ``iot23-<scenario>``
    (``"iot23"`` alone gives the folder holding all IoT-23 files and cs448b)."""
    if name == "iot23":
        return _HERE
    if name.endswith(".csv.gz"):
        name = name[: -len(".csv.gz")]
    if name not in names():
        from nadray.errors import InputError

        raise InputError(f"dataset: expected one of {', '.join(names())}, got {name!r}")
    return _HERE / f"{name}.csv.gz"


def iot23_paths() -> list[Path]:
    """All bundled IoT-23 files."""
    return [path(f"iot23-{s}") for s in IOT23_SCENARIOS]


def cs448b_ground_truth() -> dict[str, _dt.date | None]:
    """Host id (as in ``src_ip``: ``"0"`` .. ``"9"``) -> investigation date, None for clean hosts.

    Only an upper bound on the compromise date is known; how that becomes
    per-day labels is the evaluator's documented choice.
    """
    out: dict[str, _dt.date | None] = {str(h): None for h in CS448B_CLEAN_HOSTS}
    for h, d in _CS448B_INVESTIGATED.items():
        out[str(h)] = _dt.date.fromisoformat(d)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))
