"""Ingest on the real files in ../shared/data, bad input, the CLI, pcap, S3.

Counts are reconciled against the files themselves (data lines counted here
independently of the parser). CICFlowMeter and UNSW-NB15 have no sample in
../shared/data: their test files are hand-made from the documented column sets.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from nadray import archive
from nadray.errors import InputError
from nadray.ingest import ingest, read_input
from nadray.schema import FLOW_SCHEMA, QUARANTINE_SCHEMA

REPO = Path(__file__).resolve().parents[1]
NADRAY = str(Path(sys.executable).parent / "nadray")
SLIPS = "stratosphere_slips_testdata"


def data_lines(path: Path, header_lines: int = 0, comment: str | None = None) -> int:
    with open(path, "rb") as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    if comment:
        lines = [ln for ln in lines if not ln.lstrip().startswith(comment.encode())]
    return len(lines) - header_lines


def labels(table) -> dict:
    return {d["values"]: d["counts"] for d in table["label"].value_counts().to_pylist()}


def reconcile(report) -> None:
    assert report.read == report.archived + report.quarantined + report.skipped
    assert report.rows_per_s >= 0
    last = report.summary().splitlines()
    assert last[-2].startswith(f"read {report.read} = archived {report.archived}")
    assert last[-1].startswith("throughput:") and last[-1].endswith("rows/s")


# ------------------------------------------------------------------- real files


def test_iot23_csv_counts_and_labels(shared_data, tmp_path):
    folder = shared_data / "iot23_small_scenarios"
    expected = {p.name: data_lines(p, header_lines=1) for p in folder.glob("*.csv")}
    rep = ingest([str(folder)], str(tmp_path / "a"))
    assert rep.ok, rep.failed_inputs
    reconcile(rep)
    assert rep.read == rep.archived == sum(expected.values()) == 46662
    assert rep.quarantined == 0
    for f in rep.files:
        assert f.format == "zeek" and f.read == expected[Path(f.source).name]
    flows = archive.read_flows(str(tmp_path / "a"))
    assert flows.schema.equals(FLOW_SCHEMA)
    mirai = flows.filter(pc.match_substring(flows["source"], "CTU-Malware-Capture-34-1"))
    assert labels(mirai) == {0: 1923, 1: 21222}
    assert set(mirai["label_detail"].unique().to_pylist()) >= {"Benign", "Malicious: DDoS", "Malicious: C&C"}
    honeypot = flows.filter(pc.match_substring(flows["source"], "Honeypot-Capture-4-1"))
    assert labels(honeypot) == {0: 452}  # lower-case 'benign' upstream
    # time order and the source_row of every record
    ts = flows["ts"].to_numpy()
    assert (ts[1:] >= ts[:-1]).all()
    row = mirai.filter(pc.equal(mirai["source_row"], 0)).to_pylist()[0]
    first = (folder / "CTU-Malware-Capture-34-1-labeled.csv").read_text().splitlines()[1].split(",")
    assert row["src_ip"] == first[2] and row["dst_ip"] == first[4] and row["proto"] == first[6]
    # re-ingest is a no-op
    rep2 = ingest([str(folder)], str(tmp_path / "a"))
    assert rep2.skipped == rep2.read == 46662 and rep2.archived == 0
    assert archive.count_rows(str(tmp_path / "a")) == 46662


def test_stratosphere_labelled_tsv(shared_data):
    p = shared_data / SLIPS / "test18-malicious-ctu-sme-11-win" / "zeek-labeled" / "conn.log.labeled"
    r = read_input(str(p))
    assert r.format == "zeek" and r.read == data_lines(p, comment="#") == 766
    assert r.flows.num_rows == 766
    assert labels(r.flows) == {1: 719, 0: 44, None: 3}
    assert r.flows["local_orig"].to_pylist()[0] is True and r.flows["local_resp"].to_pylist()[0] is False
    assert r.flows["label_detail"][0].as_py() == \
        "Malicious: From_malicious-To_malicious-Malware_data_exfiltration-RemcosRAT"


@pytest.mark.parametrize("rel,n", [
    ("test9-mixed-zeek-dir/conn.log", 576),           # JSON lines, relative clock
    ("test10-mixed-zeek-dir/conn.log", 141),          # TSV, header indented by a tab
    ("port-scans/horizontal/conn.log", 41),
    ("port-scans/vertical/conn.log", 50),             # JSON with local_orig/local_resp
])
def test_zeek_logs(shared_data, rel, n):
    p = shared_data / SLIPS / rel
    counted = data_lines(p, comment="#")
    r = read_input(str(p))
    assert r.format == "zeek" and r.read == counted == n
    assert r.flows.num_rows == n and r.quarantined == 0
    assert r.flows["source_row"].to_pylist() == list(range(n))


def test_zeek_folder_skips_other_logs(shared_data, tmp_path):
    rep = ingest([str(shared_data / SLIPS / "test9-mixed-zeek-dir")], str(tmp_path / "a"))
    assert rep.ok
    ingested = [f for f in rep.files if f.status == "ingested"]
    assert [Path(f.source).name for f in ingested] == ["conn.log"]
    skipped = {Path(f.source).name: f.status for f in rep.files if f.status != "ingested"}
    assert skipped["dns.log"] == "skipped: not a flow log"
    assert "dns.log: skipped: not a flow log" in rep.summary()


ARGUS = {
    "test2-malicious.binetflow": 6751, "test3-mixed.binetflow": 89, "test4-malicious.binetflow": 394,
    "test5-mixed.binetflow": 300, "test11-portscan.binetflow": 66,
    "historical/Normal/CTU-Normal-7-2013-13-07.binetflow": 9797,
    "historical/Normal/2013-10-21_capture-1.binetflow": 2398,
    "historical/Normal/2015-03-24_capture1-only-dns.binetflow": 2914,
    "historical/Malicious/CTU-Malware-Capture-Botnet-207-1.binetflow": 23602,
    "historical/Malicious/2016-09-09_win1.binetflow": 4801,
    "historical/Malicious/test-sality.binetflow": 1005,
}


def test_argus_binetflows(shared_data, tmp_path):
    paths = [str(shared_data / SLIPS / rel) for rel in ARGUS]
    rep = ingest(paths, str(tmp_path / "a"))
    assert rep.ok, rep.failed_inputs
    reconcile(rep)
    for f in rep.files:
        rel = f.source.split(SLIPS + "/")[1]
        assert f.format == "argus"
        assert f.read == data_lines(shared_data / SLIPS / rel, header_lines=1) == ARGUS[rel]
        assert f.archived + f.quarantined == f.read
    flows = archive.read_flows(str(tmp_path / "a"))
    t5 = flows.filter(pc.match_substring(flows["source"], "test5-mixed"))
    lab5 = labels(t5)  # 277 flow=Malware..., 21 flow=Background, 2 empty -> null
    assert lab5 == {1: 277, None: 23}
    t2 = flows.filter(pc.match_substring(flows["source"], "test2-malicious"))
    row = t2.filter(pc.equal(t2["source_row"], 0)).to_pylist()[0]
    # 2019/04/04 16:23:00.325010,0.027947,udp,10.8.0.69,48427,<->,8.8.8.8,53,CON,0,0,2,142,63,1,
    assert row["ts"].isoformat() == "2019-04-04T16:23:00.325010+00:00"
    assert (row["src_bytes"], row["dst_bytes"], row["src_pkts"], row["dst_pkts"]) == (63, 79, 1, 1)
    assert (row["src_port"], row["dst_port"], row["proto"]) == (48427, 53, "udp")
    old = flows.filter(pc.match_substring(flows["source"], "2013-10-21_capture-1"))
    assert old["src_bytes"].null_count == old.num_rows  # no SrcBytes column in that file
    rel = flows.filter(pc.match_substring(flows["source"], "test-sality"))
    assert rel["ts"][0].as_py().year == 1970  # relative clock kept


def test_argus_hex_ports_and_labels(tmp_path):
    p = tmp_path / "x.binetflow"
    p.write_text(
        "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,TotPkts,TotBytes,SrcBytes,SrcPkts,Label\n"
        "2011/08/10 09:46:59.607825,1.026539,icmp,147.32.84.165,0x0303,   ->,147.32.80.9,0x0008,ECO,0,0,4,276,156,2,"
        "flow=From-Botnet-V42-ICMP\n"
        "2011/08/10 09:46:59.607825,1.0,tcp,147.32.84.1,80,   ->,147.32.80.9,,CON,0,0,4,276,156,2,flow=From-Normal-V42\n"
        "2011/08/10 09:46:59.607825,1.0,tcp,147.32.84.1,80,   ->,147.32.80.9,,CON,0,0,4,276,156,2,LEGITIMATE\n"
        "2011/08/10 09:46:59.607825,1.0,tcp,147.32.84.1,70000,   ->,147.32.80.9,1,CON,0,0,4,276,156,2,\n"
        "2011/08/10 09:46:59.607825,1.0,tcp,147.32.84.1,1,   ->,147.32.80.9,1,CON,0,0,4,100,156,2,Attack\n")
    r = read_input(str(p))
    assert r.format == "argus" and r.read == 5
    assert r.flows["src_port"].to_pylist() == [0x0303, 80, 80]
    assert r.flows["dst_port"].to_pylist() == [8, None, None]
    assert r.flows["label"].to_pylist() == [1, 0, 0]
    reasons = r.quarantine["reason"].to_pylist()
    assert r.quarantine["source_row"].to_pylist() == [3, 4]
    assert reasons[0] == "field 'Sport': expected an integer in 0..65535, got '70000'"
    assert "SrcBytes" in reasons[1] and "at most TotBytes" in reasons[1]


def test_cs448b_copies(shared_data, tmp_path):
    folder = shared_data / "cs448b_ipasn"
    for name in ("cs448b_ipasn.mo7903.csv", "cs448b_ipasn.Solostriker.csv"):
        r = read_input(str(folder / name))
        assert r.format == "cs448b" and r.read == data_lines(folder / name, 1) == 20803
        assert r.flows.num_rows == 20803
        assert pc.sum(r.flows["flows"]).as_py() == 1953698
        assert r.flows["label"].null_count == 20803
        first = r.flows.slice(0, 1).to_pylist()[0]
        assert (first["src_ip"], first["dst_ip"], first["proto"], first["flows"]) == ("0", "AS701", "unknown", 1)
        assert first["ts"].isoformat() == "2006-07-01T00:00:00+00:00"
    rep = ingest([str(folder / "cs448b_ipasn.mo7903.csv")], str(tmp_path / "a"))
    assert archive.list_dates(str(tmp_path / "a"))[0] == "2006-07-01"
    assert len(archive.list_dates(str(tmp_path / "a"))) == 92
    assert rep.archived == 20803


CIC_HEADER = ("Flow ID, Source IP, Source Port, Destination IP, Destination Port, Protocol, Timestamp, "
              "Flow Duration, Total Fwd Packets, Total Backward Packets,Total Length of Fwd Packets, "
              "Total Length of Bwd Packets, Fwd Packet Length Max, Flow Bytes/s, Fwd Header Length, "
              "Fwd Header Length, Label")


def test_cicflowmeter_handmade(tmp_path):
    # Hand-made from the documented CIC-IDS2017 GeneratedLabelledFlows column set (a subset of it,
    # with its leading spaces and the repeated 'Fwd Header Length'); no sample exists in shared/data.
    p = tmp_path / "Friday-WorkingHours.pcap_ISCX.csv"
    p.write_bytes((CIC_HEADER + "\r\n"
                   "192.168.10.5-104.16.207.165-54865-443-6,104.16.207.165,443,192.168.10.5,54865,6,"
                   "7/7/2017 3:30,3,2,0,12,0,6,4000000,40,40,BENIGN\r\n"
                   "172.16.0.1-192.168.10.50-33898-80-6,172.16.0.1,33898,192.168.10.50,80,6,"
                   "07/07/2017 03:30:00 PM,1500000,3,1,100,0,6,Infinity,40,40,DDoS\r\n").encode()
                  + b"1-2-80-6,172.16.0.1,44,192.168.10.50,80,6,6/7/2017 9:20,10,1,1,0,0,0,NaN,40,40,"
                  + b"Web Attack \x96 Brute Force\r\n"
                  + b"1-2-80-6,172.16.0.1,44,192.168.10.50,80,6,6/7/2017 9:20,-1,1,1,0,0,0,NaN,40,40,BENIGN\r\n"
                  + b"1-2-80-6,,44,192.168.10.50,80,17,6/7/2017 9:20,1,1,1,0,0,0,NaN,40,40,BENIGN\r\n")
    r = read_input(str(p))
    assert r.format == "cicflowmeter" and r.read == 5
    f = r.flows.to_pylist()
    assert [x["label"] for x in f] == [0, 1, 1]
    assert f[2]["label_detail"] == "Web Attack \u2013 Brute Force"
    assert f[0]["ts"].isoformat() == "2017-07-07T03:30:00+00:00"
    assert f[1]["ts"].isoformat() == "2017-07-07T15:30:00+00:00"
    assert (f[1]["duration"], f[1]["src_pkts"], f[1]["dst_pkts"], f[1]["src_bytes"]) == (1.5, 3, 1, 100)
    assert f[1]["proto"] == "tcp"
    assert r.quarantine["source_row"].to_pylist() == [3, 4]
    assert "field 'Flow Duration'" in r.quarantine["reason"][0].as_py()
    assert "field 'Source IP'" in r.quarantine["reason"][1].as_py()
    # the MachineLearningCSV version (no addresses, no times) is refused clearly
    ml = tmp_path / "ml.csv"
    ml.write_text(" Destination Port, Flow Duration, Total Fwd Packets, Total Backward Packets, Label\n80,1,1,1,BENIGN\n")
    with pytest.raises(InputError, match="ml.csv.*Source IP.*MachineLearningCSV"):
        read_input(str(ml))


UNSW_ROW = ("59.166.0.0,1390,149.171.126.6,53,udp,CON,0.001055,132,164,31,29,0,0,dns,500473.9375,621800.9375,"
            "2,2,0,0,0,0,66,82,0,0,0,0,1421927414,1421927414,0.017,0.013,0,0,0,0,0,0,0,0,3,7,1,3,1,1,1,,0")
UNSW_ATTACK = ("175.45.176.3,0x000b,149.171.126.16,-,tcp,FIN,0.5,100,200,31,29,0,0,-,5,5,2,2,0,0,0,0,66,82,0,0,"
               "0,0,1421927420,1421927421,0.017,0.013,0,0,0,0,0,0,0,0,3,7,1,3,1,1,1, Exploits ,1")


def test_unsw_handmade(tmp_path):
    # Hand-made from the documented 49-column UNSW-NB15 raw layout (BOM, CRLF, hex and '-' ports).
    p = tmp_path / "UNSW-NB15_1.csv"
    bad_port = UNSW_ROW.replace(",1390,", ",70000,")
    bad_label = UNSW_ROW[:-1] + "7"
    p.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([UNSW_ROW, UNSW_ATTACK, bad_port, bad_label, "1,2,3"]).encode() + b"\r\n")
    r = read_input(str(p))
    assert r.format == "unsw-nb15" and r.read == 5
    f = r.flows.to_pylist()
    assert [x["label"] for x in f] == [0, 1]
    assert [x["label_detail"] for x in f] == [None, "Exploits"]
    assert (f[1]["src_port"], f[1]["dst_port"], f[1]["service"]) == (11, None, None)
    assert f[0]["ts"].isoformat() == "2015-01-22T11:50:14+00:00"
    assert (f[0]["src_bytes"], f[0]["dst_bytes"], f[0]["src_pkts"], f[0]["service"]) == (132, 164, 2, "dns")
    q = r.quarantine.to_pylist()
    assert [x["source_row"] for x in q] == [2, 3, 4]
    assert q[0]["reason"] == "field 'sport': expected an integer in 0..65535, got '70000'"
    assert q[1]["reason"].startswith("field 'Label'")
    assert q[2]["reason"] == "truncated line: expected 49 UNSW-NB15 fields, got 3"
    # with a header line
    names = ("srcip,sport,dstip,dsport,proto,state,dur,sbytes,dbytes,sttl,dttl,sloss,dloss,service,Sload,Dload,"
             "Spkts,Dpkts,swin,dwin,stcpb,dtcpb,smeansz,dmeansz,trans_depth,res_bdy_len,Sjit,Djit,Stime,Ltime,"
             "Sintpkt,Dintpkt,tcprtt,synack,ackdat,is_sm_ips_ports,ct_state_ttl,ct_flw_http_mthd,is_ftp_login,"
             "ct_ftp_cmd,ct_srv_src,ct_srv_dst,ct_dst_ltm,ct_src_ltm,ct_src_dport_ltm,ct_dst_sport_ltm,"
             "ct_dst_src_ltm,attack_cat,Label")
    h = tmp_path / "with_header.csv"
    h.write_text(names + "\n" + UNSW_ROW + "\n" + UNSW_ATTACK + "\n")
    r = read_input(str(h))
    assert r.format == "unsw-nb15" and r.read == 2 and r.flows.num_rows == 2


# --------------------------------------------------------------------- bad input


def test_broken_zeek_lines_are_quarantined(shared_data, tmp_path):
    src = shared_data / SLIPS / "test10-mixed-zeek-dir" / "conn.log"
    lines = src.read_bytes().split(b"\n")
    data_idx = [i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith(b"#")]
    # break records 5, 20 and 60 in three different ways
    lines[data_idx[5]] = b"\t".join(lines[data_idx[5]].split(b"\t")[:7])            # truncated line
    f = lines[data_idx[20]].split(b"\t"); f[9] = b"-5"; lines[data_idx[20]] = b"\t".join(f)  # negative count
    f = lines[data_idx[60]].split(b"\t"); f[0] = b"yesterday"; lines[data_idx[60]] = b"\t".join(f)  # bad ts
    p = tmp_path / "conn.log"
    p.write_bytes(b"\n".join(lines))
    rep = ingest([str(p)], str(tmp_path / "a"))
    assert rep.ok and rep.read == 141 and rep.archived == 138 and rep.quarantined == 3
    q = archive.read_quarantine(str(tmp_path / "a"))
    assert q.schema.equals(QUARANTINE_SCHEMA)
    assert q["source_row"].to_pylist() == [5, 20, 60]
    assert q["source"].to_pylist() == [str(p)] * 3
    reasons = q["reason"].to_pylist()
    assert reasons[0] == "truncated line: expected 21 Zeek fields, got 7"
    assert reasons[1] == "field 'orig_bytes': expected a non-negative integer, got '-5'"
    assert reasons[2] == "field 'ts': expected epoch seconds or an ISO 8601 time, got 'yesterday'"
    assert q["raw"][1].as_py() == lines[data_idx[20]].decode()
    rows = archive.read_flows(str(tmp_path / "a"))["source_row"].to_pylist()
    assert sorted(rows) == [i for i in range(141) if i not in (5, 20, 60)]


def test_out_of_range_and_nan_values(tmp_path):
    p = tmp_path / "c.csv"
    head = "ts,id.orig_h,id.orig_p,id.resp_h,id.resp_p,proto,duration,orig_bytes,label,detailed-label\n"
    p.write_text(head +
                 "1540469303.5,10.0.0.1,1,10.0.0.2,2,tcp,1.5,10,Benign,-\n"
                 "99999999999,10.0.0.1,1,10.0.0.2,2,tcp,1.5,10,Benign,-\n"    # year 5138
                 "1540469303,10.0.0.1,1,10.0.0.2,2,tcp,nan,10,Benign,-\n"
                 "1540469303,10.0.0.1,1,10.0.0.2,2,tcp,inf,10,Benign,-\n"
                 "1540469303,,1,10.0.0.2,2,tcp,1,10,Benign,-\n"
                 "1540469303,10.0.0.1,1,10.0.0.2,2,tcp,-1,10,Benign,-\n"
                 "2018-10-25T12:06:00Z,10.0.0.1,1,10.0.0.2,2,udp,1,10,Malicious,C&C\n")
    r = read_input(str(p))
    assert r.read == 7 and r.flows.num_rows == 2
    assert r.flows["ts"][1].as_py().isoformat() == "2018-10-25T12:06:00+00:00"
    reasons = dict(zip(r.quarantine["source_row"].to_pylist(), r.quarantine["reason"].to_pylist()))
    assert "between 1970-01-01 and 2100-01-01" in reasons[1] and "'99999999999'" in reasons[1]
    assert reasons[2] == "field 'duration': expected a finite non-negative number, got 'nan'"
    assert reasons[3] == "field 'duration': expected a finite non-negative number, got 'inf'"
    assert reasons[4].startswith("field 'id.orig_h': expected a value (required field)")
    assert reasons[5] == "field 'duration': expected a finite non-negative number, got '-1'"


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"),
    (bytes(range(256)) * 20, "cannot recognise the format"),
    (b"alpha,beta,gamma\n1,2,3\n", "cannot recognise the format"),
    (b"#separator \\x09\n#path\tdns\n#fields\tts\tuid\tquery\n1\tC\tx.org\n", "not a flow log"),
])
def test_whole_file_failures(tmp_path, content, needle):
    p = tmp_path / "input.bin"
    p.write_bytes(content)
    with pytest.raises(InputError, match=needle) as e:
        read_input(str(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    rep = ingest([str(p)], str(tmp_path / "a"))
    assert not rep.ok and len(rep.failed_inputs) == 1 and str(p) in rep.failed_inputs[0]
    assert rep.read == 0


@pytest.mark.parametrize("name", ["KDDTrain+_20Percent.txt", "KDDTest+.txt", "KDDTest-21.txt"])
def test_nsl_kdd_is_refused_with_the_reason(shared_data, tmp_path, name):
    """NSL-KDD is the best-known IDS data set, but its records have no time and no host: say so,
    not "cannot recognise the format"."""
    src = shared_data / "nsl_kdd" / name
    with pytest.raises(InputError, match="NSL-KDD connection records hold no timestamp and no host address"):
        read_input(str(src))
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(src, folder / name)
    rep = ingest([str(folder)], str(tmp_path / "a"))
    assert rep.ok and [f.status for f in rep.files] == ["skipped: unrecognised format"]


def test_missing_input_and_explicit_wrong_format(tmp_path, shared_data):
    rep = ingest([str(tmp_path / "nope.log")], str(tmp_path / "a"))
    assert not rep.ok and rep.failed_inputs == [f"{tmp_path / 'nope.log'}: no such file or folder"]
    argus = shared_data / SLIPS / "test11-portscan.binetflow"
    rep = ingest([str(argus)], str(tmp_path / "a"), fmt="cs448b")
    assert not rep.ok and "not a cs448b ipasn file" in rep.failed_inputs[0]
    # explicit format on the right file works, gz transparently
    gz = tmp_path / "flows.binetflow.gz"
    gz.write_bytes(gzip.compress(argus.read_bytes()))
    r = read_input(str(gz), "argus")
    assert r.read == 66 and r.flows.num_rows == 66


def test_cli_exit_codes(tmp_path, shared_data):
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(os.urandom(3000))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([NADRAY, "ingest", str(garbage), "--archive", str(tmp_path / "a")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and str(garbage) in err[0] and "Traceback" not in res.stderr
    assert "read 0 = archived 0 + quarantined 0 + skipped 0" in res.stdout
    ok = shared_data / SLIPS / "port-scans" / "horizontal" / "conn.log"
    res = subprocess.run([NADRAY, "ingest", str(ok), "--archive", str(tmp_path / "a")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "read 41 = archived 41 + quarantined 0 + skipped 0" in res.stdout


def test_zeek_logs_joined_with_cat_keep_each_header(shared_data, tmp_path):
    """``cat`` of Zeek TSV logs repeats the header block; where the fields differ (a restart with
    other fields, another sensor), each block holds for the records after it."""
    plain = shared_data / SLIPS / "port-scans" / "horizontal" / "conn.log"  # 21 fields
    labelled = shared_data / SLIPS / "test18-malicious-ctu-sme-11-win" / "zeek-labeled" / "conn.log.labeled"  # 23
    joined = tmp_path / "conn.log"
    joined.write_bytes(plain.read_bytes() + labelled.read_bytes() + plain.read_bytes())
    a, b = read_input(str(plain)), read_input(str(labelled))
    res = read_input(str(joined))
    assert res.quarantined == 0 and res.read == res.flows.num_rows == 2 * a.read + b.read
    assert res.flows["source_row"].to_pylist() == list(range(res.read))
    got = res.flows.drop_columns(["source", "source_row"])
    want = pa.concat_tables([t.flows for t in (a, b, a)]).drop_columns(["source", "source_row"])
    assert got.equals(want)
    assert res.flows["label"].null_count == 2 * a.read + b.flows["label"].null_count < res.read


# -------------------------------------------------------------------------- pcap


def test_pcap_and_pcapng(shared_data, tmp_path):
    paths = [shared_data / SLIPS / "test7-malicious.pcap",
             shared_data / "pcaps_chrissanders" / "http_espn.pcapng",
             shared_data / "pcaps_stopddos" / "amp.UDP.snmp.src161.pcapng"]  # really classic pcap
    rep = ingest([str(p) for p in paths], str(tmp_path / "a"))
    assert rep.ok, rep.failed_inputs
    reconcile(rep)
    assert all(f.format == "pcap" and f.read > 0 and f.archived == f.read for f in rep.files)
    flows = archive.read_flows(str(tmp_path / "a"))
    assert flows["label"].null_count == flows.num_rows
    espn = flows.filter(pc.match_substring(flows["source"], "http_espn"))
    assert sorted(espn["source_row"].to_pylist()) == list(range(espn.num_rows))
    assert "tcp" in espn["proto"].to_pylist()


def test_capture_without_ip_flows_says_why(shared_data, tmp_path):
    """An ARP-only or 802.11 capture gives no flow; "read 0" alone would look like a lost file."""
    arp = shared_data / "pcaps_ntopng_e2e" / "arp_spoofing.pcap"
    wifi = shared_data / "pcaps_chrissanders" / "80211beacon.pcapng"
    empty = tmp_path / "empty.pcap"
    empty.write_bytes((shared_data / SLIPS / "test7-malicious.pcap").read_bytes()[:24])  # global header only
    rep = ingest([str(arp), str(wifi), str(empty)], str(tmp_path / "a"))
    assert rep.ok, rep.failed_inputs
    assert [(f.status, f.read) for f in rep.files] == [("ingested", 0)] * 3
    from nadray.ingest.pcap import check_capture

    n_arp = check_capture(arp.read_bytes())[0]
    assert n_arp > 1000
    assert rep.files[0].notes == [f"no IP flow in its {n_arp} packets: the flow meter reads IPv4 and IPv6 only, "
                                  f"so ARP or 802.11 management frames make none"]
    assert rep.files[1].notes[0].startswith("no IP flow in its 1 packet:")
    assert rep.files[2].notes == ["the capture holds no packets"]
    assert "no IP flow in its" in rep.summary()


def test_truncated_pcap(shared_data, tmp_path):
    src = shared_data / SLIPS / "test-cc" / "test-cc-capture-1.pcap"
    data = src.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) // 2])
    full = read_input(str(src))
    rep = ingest([str(cut)], str(tmp_path / "a"))
    assert rep.ok
    f = rep.files[0]
    assert 0 < f.archived == f.read < full.read
    assert f.notes and f.notes[0].startswith("truncated capture after packet ")
    q = archive.read_quarantine(str(tmp_path / "a"))
    assert q.num_rows == 1 and q["source_row"][0].as_py() is None
    assert q["reason"][0].as_py().startswith("truncated capture after packet ")
    assert "truncated capture" in rep.summary()


# ---------------------------------------------------------------------------- s3


def test_s3_archive_and_input(s3_bucket, shared_data):
    from nadray import storage

    src = shared_data / "iot23_small_scenarios" / "CTU-Malware-Capture-44-1-labeled.csv"
    fs, _ = storage.get_fs(s3_bucket)
    fs.put(str(src), f"{s3_bucket[5:]}/landing/day1/c44.csv")
    arch = f"{s3_bucket}/archive"
    rep = ingest([str(src), f"{s3_bucket}/landing"], arch)
    assert rep.ok, rep.failed_inputs
    # the same content twice: the second copy (from S3) is skipped
    assert rep.read == 474 and rep.archived == 237 and rep.skipped == 237
    flows = archive.read_flows(arch)
    assert flows.num_rows == 237 and labels(flows) == {0: 211, 1: 26}
    assert archive.count_rows(arch) == 237
    assert all(p.startswith("s3://") for p in archive.dataset_paths(arch))
    rep2 = ingest([f"{s3_bucket}/landing"], arch)
    assert rep2.skipped == 237 and rep2.archived == 0
    r = read_input(f"{s3_bucket}/landing/day1/c44.csv")
    assert r.flows.num_rows == 237 and r.flows["source"][0].as_py() == f"{s3_bucket}/landing/day1/c44.csv"


def _rows(res) -> tuple:
    q = res.quarantine
    return (res.read, res.flows.drop_columns([]).to_pylist(),
            sorted(zip(q["source_row"].to_pylist(), q["raw"].to_pylist(), q["reason"].to_pylist()),
                   key=lambda r: (r[0] is None, r[0] or 0)))


def _zeek_csv_variant(variant: str) -> tuple[bytes, list[bytes]]:
    """A small Zeek CSV conn log with one kind of damage (or none): (file bytes, records)."""
    header = (b"ts,uid,id.orig_h,id.orig_p,id.resp_h,id.resp_p,proto,service,duration,orig_bytes,resp_bytes,"
              b"conn_state,local_orig,local_resp,label,detailed-label")
    recs = [b"1540469303.5,C%d,192.168.1.%d,5868%d,8.8.8.8,53,udp,dns,0.1,48,96,SF,T,F,benign,-" % (i, i, i)
            for i in range(8)]
    recs[3] = recs[3].replace(b"benign,-", b"Malicious,PartOfAHorizontalPortScan")
    if variant == "bad-value":
        recs[2] = recs[2].replace(b",48,", b",-5,")
        recs[6] = recs[6].replace(b",T,F,", b",yes,F,")
    elif variant == "blank-middle":
        recs.insert(4, b"")
    elif variant == "blank-end":
        recs.append(b"")
    elif variant == "padded":
        recs[1] = recs[1].replace(b",udp,", b", udp ,").replace(b",T,", b", T,")
    elif variant == "empty-fields-row":
        recs.insert(5, b"," * 15)
    elif variant == "wrong-field-count":
        recs[4] = recs[4] + b",extra"
    data = b"\n".join([header, *recs]) + (b"" if variant == "no-final-newline" else b"\n")
    if variant == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif variant == "bom":
        data = b"\xef\xbb\xbf" + data
    return data, recs


@pytest.mark.parametrize("variant", ["clean", "bad-value", "blank-middle", "blank-end", "crlf", "bom", "padded",
                                     "no-final-newline", "empty-fields-row", "wrong-field-count"])
def test_zeek_csv_fast_path_matches_line_path(variant):
    """The clean-CSV path (bytes straight to pyarrow) gives the rows, source_row numbers and
    quarantine of the line-by-line path, and defers to it for anything unusual."""
    from nadray.ingest import zeek
    from nadray.ingest.common import split_lines

    data, recs = _zeek_csv_variant(variant)
    fast = zeek.read(data, "conn.csv")
    slow = zeek._read_csv(split_lines(data), "conn.csv")
    took_fast = zeek._read_csv_fast(data, "conn.csv") is not None
    assert took_fast == (variant in ("clean", "bad-value", "crlf", "bom", "padded", "no-final-newline",
                                     "empty-fields-row"))
    assert _rows(fast) == _rows(slow)
    assert fast.read == len([r for r in recs if r.strip()])
    if variant == "bad-value":
        assert fast.quarantine["source_row"].to_pylist() == [2, 6]
        assert "orig_bytes" in fast.quarantine["reason"][0].as_py() and b",-5," in fast.quarantine["raw"][0].as_py().encode()
    if variant == "padded":
        assert fast.flows["proto"][1].as_py() == "udp" and fast.flows["local_orig"][1].as_py() is True
    if variant == "empty-fields-row":
        assert 5 in fast.quarantine["source_row"].to_pylist()


@pytest.mark.parametrize("variant", ["clean", "close", "close-no-final-newline", "no-final-newline", "bad-value",
                                     "comment-middle", "spaced", "padded-number"])
def test_zeek_tsv_fast_path_matches_line_path(shared_data, variant):
    """The plain-TSV path (the records between the header and '#close' straight to pyarrow,
    by offset into the file) gives the rows and quarantine of the line-by-line path."""
    from nadray.ingest import zeek
    from nadray.ingest.common import split_lines

    lines = (shared_data / SLIPS / "port-scans" / "horizontal" / "conn.log").read_bytes().split(b"\n")
    header, recs = lines[:8], lines[8:28]
    if variant == "bad-value":
        recs[0] = recs[0].replace(b"\t261\t", b"\t-5\t")
        recs[5] = recs[5].replace(b"\t80\t", b"\t0x50\t", 1)  # Zeek ports are decimal
    elif variant == "comment-middle":
        recs.insert(4, b"#note\tsomething")
    elif variant == "spaced":
        recs[3] = recs[3].replace(b"\ttcp\t", b"\t   tcp\t")
    elif variant == "padded-number":  # trimmed on both paths (before, the fast path quarantined it)
        recs[0] = recs[0].replace(b"\t261\t", b"\t261 \t")
    data = b"\n".join(header + recs) + b"\n"
    if variant.startswith("close"):
        data += b"#close\t2015-11-18-16-40-00" + (b"" if variant.endswith("no-final-newline") else b"\n")
    elif variant == "no-final-newline":
        data = data[:-1]
    fast = zeek.read(data, "conn.log")
    slow = zeek._read_tsv(split_lines(data), "conn.log")
    took_fast = zeek._read_tsv_fast(data, "conn.log") is not None
    assert took_fast == (variant not in ("comment-middle", "spaced"))
    assert _rows(fast) == _rows(slow)
    assert fast.read == len(recs) - (variant == "comment-middle")
    if variant == "bad-value":
        assert fast.quarantine["source_row"].to_pylist() == [0, 5]
    if variant == "padded-number":
        assert fast.quarantined == 0 and 261 in fast.flows.slice(0, 1).to_pylist()[0].values()


@pytest.mark.parametrize("variant", ["bad-value", "wrong-field-count", "empty-fields-row", "padded", "mixed"])
def test_conversion_in_row_chunks_equals_one_piece(variant, monkeypatch):
    """Large inputs are converted on several threads (``convert_in_chunks``): the same flows
    in the same order, the same quarantine rows in the same order, the same counts."""
    from nadray.ingest import common, zeek
    from nadray.ingest.common import split_lines

    data, _ = _zeek_csv_variant("bad-value" if variant == "mixed" else variant)
    data = data + b"".join(data.split(b"\n", 1)[1:]) * 3  # 4 copies of the records: 32+ rows
    if variant == "mixed":  # quarantined while splitting (last row) and while converting (every piece)
        data += data.rsplit(b"\n", 2)[1] + b",extra\n"
    one = zeek.read(data, "conn.csv"), zeek._read_csv(split_lines(data), "conn.csv")
    monkeypatch.setattr(common, "CONVERT_CHUNK_ROWS", 5)
    monkeypatch.setattr(common, "local_cpus", lambda: 4)
    calls = []
    real = common.ThreadPoolExecutor.map
    monkeypatch.setattr(common.ThreadPoolExecutor, "map", lambda self, fn, pieces: calls.append(len(pieces)) or
                        real(self, fn, pieces))
    chunked = zeek.read(data, "conn.csv"), zeek._read_csv(split_lines(data), "conn.csv")
    # Both paths really ran in 4 pieces; where a number breaks a rule the fast path converts
    # twice (numbers read by pyarrow first, then the text, to quote the raw value).
    assert calls == ([4, 4, 4] if variant in ("bad-value", "empty-fields-row") else [4, 4]), calls
    for a, b in zip(one, chunked):
        assert b.read == a.read and b.flows.to_pylist() == a.flows.to_pylist()
        assert b.quarantine.drop_columns(["ingested_at"]).to_pylist() == a.quarantine.drop_columns(["ingested_at"]).to_pylist()
        assert b.quarantine.num_rows == {"bad-value": 8, "wrong-field-count": 4, "empty-fields-row": 4, "padded": 0,
                                         "mixed": 9}[variant]


@pytest.mark.parametrize("value", ["0x10", "0X1f", "-0", "+7", "007", "-5", "1e3", "5", "99999999999999999999"])
def test_integer_rule_does_not_depend_on_other_rows(value):
    """Arrow's fast cast and the per-row rule must agree: a value is accepted or refused the
    same whether its file (or its conversion piece) holds a malformed row or not."""
    import pyarrow as pa

    from nadray.ingest.common import Validator

    for hex_ok in (False, True):
        alone, mixed = Validator(1), Validator(2)
        a = alone.integer(pa.array([value]), "f", hex_ok=hex_ok).to_pylist()[0]
        m = mixed.integer(pa.array([value, "abc"]), "f", hex_ok=hex_ok).to_pylist()[0]
        assert (a, 0 in alone.errors) == (m, 0 in mixed.errors), (value, hex_ok)
        assert 1 in mixed.errors


@pytest.mark.parametrize("value", ["+1540469303", ".5", "1e9", "-5", "1540469303.25", "1e99999", "nan", "1540469303."])
def test_epoch_rule_does_not_depend_on_other_rows(value):
    import pyarrow as pa

    from nadray.ingest.common import Validator

    alone, mixed = Validator(1), Validator(2)
    a = alone.epoch_seconds(pa.array([value]), "ts").to_pylist()[0]
    m = mixed.epoch_seconds(pa.array([value, "yesterday"]), "ts").to_pylist()[0]
    assert (a, alone.errors.get(0)) == (m, mixed.errors.get(0)), value


def test_may_contain_looks_only_at_the_values_of_a_slice():
    """The fast integer path's hex check: exact on slices (pieces of a larger column),
    so a clean piece is not sent down the slow path by its neighbours' bytes."""
    import pyarrow as pa

    from nadray.ingest.common import _may_contain

    a = pa.array(["12", "0x1", "34", "56", None, "ab"])
    assert _may_contain(a, (b"x",)) and _may_contain(a.slice(1, 1), (b"x",))
    assert not _may_contain(a.slice(2, 3), (b"x",)) and not _may_contain(a.slice(0, 1), (b"x",))
    assert _may_contain(pa.chunked_array([["1"], ["0X2"]]), (b"X",))
    assert _may_contain(pa.array(["0x1"], pa.large_string()), (b"x",))
    assert not _may_contain(pa.array([], pa.string()), (b"x",))


@pytest.mark.parametrize("nulls", [("", "-"), ("", "-", "(empty)"), ("-",), ("",), ("NA", "-"), ("a", "b", "c", "d", "e"), ()])
def test_null_mask_matches_is_in(nulls):
    """The length-and-equality null test gives what Arrow's is_in gives, nulls included."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from nadray.ingest.common import Validator

    for arr in (pa.array(["", "-", "x", None, "--", " ", "NA"]), pa.chunked_array([["-", "a"], ["", None]]),
                pa.array(["-", "", "y"], pa.large_string())):
        ref = pc.is_null(arr)
        if nulls:
            ref = pc.or_kleene(ref, pc.is_in(arr, value_set=pa.array(list(nulls), pa.string())))
        assert Validator.null_mask(arr, nulls).to_pylist() == ref.to_pylist()
