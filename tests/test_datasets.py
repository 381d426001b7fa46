"""The data shipped inside the package: present, readable by ingest, matching SOURCES.md."""

from __future__ import annotations

import datetime as dt
import gzip

import pyarrow.compute as pc

from nadray import datasets
from nadray.ingest import ingest, read_input


def test_files_and_size():
    for n in datasets.names():
        assert datasets.path(n).exists(), n
    total = sum(datasets.path(n).stat().st_size for n in datasets.names())
    assert total < 2_000_000
    assert (datasets.path("cs448b_ipasn").parent / "SOURCES.md").exists()


def test_cs448b_bundled(shared_data):
    p = datasets.path("cs448b_ipasn")
    text = gzip.decompress(p.read_bytes()).decode()
    assert text.splitlines()[0] == "date,l_ipn,r_asn,f"
    original = (shared_data / "cs448b_ipasn" / "cs448b_ipasn.mo7903.csv").read_text()
    assert text.splitlines()[1:] == original.splitlines()[1:]
    r = read_input(str(p))
    assert r.format == "cs448b" and r.read == r.flows.num_rows == 20803
    hosts = {d["values"]: d["counts"] for d in r.flows["src_ip"].value_counts().to_pylist()}
    assert hosts == {"0": 3980, "1": 2159, "2": 2416, "3": 1186, "4": 1308, "5": 1249, "6": 1305,
                     "7": 2233, "8": 2230, "9": 2737}


def test_ground_truth():
    gt = datasets.cs448b_ground_truth()
    assert gt["1"] == dt.date(2006, 8, 24) and gt["5"] == dt.date(2006, 9, 4)
    assert gt["4"] == dt.date(2006, 9, 18) and gt["3"] == gt["6"] == dt.date(2006, 9, 26)
    assert {h for h, d in gt.items() if d is None} == {"0", "2", "7", "8", "9"}


def test_iot23_bundled_ingest(tmp_path, shared_data):
    rep = ingest([str(p) for p in datasets.iot23_paths()], str(tmp_path / "a"))
    assert rep.ok and rep.quarantined == 0
    assert rep.archived == 452 + 1374 + 130 + 10403 + 3209 + 3286 + 4426 + 237
    for p in datasets.iot23_paths():
        name = p.name.replace("iot23-", "").replace(".csv.gz", "-labeled.csv")
        assert gzip.decompress(p.read_bytes()) == (shared_data / "iot23_small_scenarios" / name).read_bytes()
    r = read_input(str(datasets.path("iot23-CTU-Malware-Capture-8-1")))
    assert {d["values"]: d["counts"] for d in r.flows["label"].value_counts().to_pylist()} == {0: 2181, 1: 8222}
    assert pc.all(pc.equal(r.flows["source"], str(datasets.path("iot23-CTU-Malware-Capture-8-1")))).as_py()
