"""Batch scoring: raw files through Ray Data actors, one row per record, same scores as the Scorer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nadray import registry
from nadray.config import load_config
from nadray.errors import NadrayError
from nadray.features import FeatureEncoder
from nadray.model import EventLSTM, ModelArgs
from nadray.scorer import Scorer
from nadray.threshold import Threshold

CAPTURES = ["CTU-Honeypot-Capture-7-1", "CTU-Malware-Capture-44-1"]


@pytest.fixture(scope="module")
def model_ref(tmp_path_factory, shared_data):
    """A registered (untrained) model: scoring mechanics do not need a fit."""
    from _iot23 import read_captures

    flows = read_captures(shared_data, CAPTURES)
    cfg = load_config(None, ["data.sequence_length=6", "data.context_window=8", "model.hidden_size=8"])
    enc = FeatureEncoder.fit(flows, cfg)
    torch.manual_seed(0)
    model = EventLSTM(ModelArgs.from_config(cfg, enc.n_features))
    reg = str(tmp_path_factory.mktemp("reg"))
    v = registry.register(reg, model.state_dict(), {
        "config": cfg.to_dict(), "model_args": model.args.to_dict(), "encoder": enc.to_dict(),
        "err_norm": [1.0] * enc.n_features, "threshold": Threshold(1.0, "manual").to_dict()})
    registry.promote(reg, v, "test")
    return reg


def _same_scores_as_whole_input(got: pd.DataFrame, scorer: Scorer, flows: pa.Table) -> pd.DataFrame:
    """``got`` (written scores) has one row per flow of ``flows``, scored as one
    ``score_table`` over the whole input scores it; the two merged, for further checks."""
    merged = got.merge(scorer.score_table(flows), on=["source", "source_row"], suffixes=("", "_ref"))
    assert len(merged) == flows.num_rows
    np.testing.assert_allclose(merged.score, merged.score_ref, rtol=1e-5, atol=1e-6)
    return merged


@pytest.mark.parametrize("driver_rows,path", [(None, "driver"), (0, "ray-data"), ("blocks", "driver")])
def test_score_raw_files(ray_session, model_ref, shared_data, tmp_path, monkeypatch, caplog, driver_rows, path):
    """Every path (small inputs in the driver; large ones with Ray Data, or in the driver in
    entity blocks where the pool would be one actor) gives the same rows and scores."""
    from nadray import score as score_mod
    from nadray.ingest import read_input
    from nadray.blocks import entity_blocks
    from nadray.score import score

    paths = [str(shared_data / "iot23_small_scenarios" / f"{c}-labeled.csv") for c in CAPTURES]
    out = str(tmp_path / "scores")
    blocks = driver_rows == "blocks"
    if blocks:  # "large" input on this 2-CPU session: one-actor pool, so the driver, in blocks
        monkeypatch.setattr(score_mod, "DRIVER_SCORE_ROWS", 100)
        driver_rows = None
    with caplog.at_level("INFO", logger="nadray.score"):
        report = score(model_ref, paths, out, driver_rows=driver_rows)
    assert report.path == path and report.files
    assert f"{report.read} records read, 0 quarantined" in caplog.text
    if blocks:  # 367 flows in 4 blocks of entities: progress per block, a file each (+1: flows in two)
        assert "entity block 4/4" in caplog.text and len(report.files) in (4, 5)
    flows = pa.concat_tables([read_input(p).flows for p in paths])
    assert report.rows_scored == flows.num_rows == report.read and report.quarantined == 0
    assert "scored" in report.summary()
    got = pq.read_table(out).to_pandas()
    assert len(got) == flows.num_rows
    assert set(zip(got.source, got.source_row)) == set(zip(flows.column("source").to_pylist(),
                                                          flows.column("source_row").to_pylist()))
    assert np.isfinite(got.score).all() and (got.is_anomaly == (got.score >= got.threshold)).all()
    assert report.anomalies == int(got.is_anomaly.sum())
    # Same scores as one in-process score_table over the whole input.
    ref = Scorer.from_ref(model_ref).score_table(flows)
    merged = got.merge(ref, on=["source", "source_row"], suffixes=("", "_ref"))
    np.testing.assert_allclose(merged.score, merged.score_ref, rtol=1e-5, atol=1e-6)
    # Each entity is scored in one block, which holds every flow of it.
    enc = Scorer.from_ref(model_ref).encoder
    b = entity_blocks(flows, enc, 4)
    fi, ent = enc.flow_entities(flows)
    owner = {e: k for k, names in enumerate(b.owned) for e in names}
    assert len(owner) == sum(len(o) for o in b.owned) == len(set(ent))
    for k, rows in enumerate(b.rows):
        assert set(rows.tolist()) == set(fi[[owner[e] == k for e in ent]].tolist())
    blocks_of_flow = np.bincount(np.concatenate(b.rows), minlength=flows.num_rows)
    assert (blocks_of_flow >= 1).all() and ((blocks_of_flow == 2) == b.split).all()


def test_one_connected_capture_still_splits_into_blocks_with_the_same_scores(model_ref, shared_data, tmp_path,
                                                                                monkeypatch, caplog):
    """A real capture is one connected group (its host and the gateway share flows): blocks
    are entities, so it still spreads over blocks; flows in two blocks take the higher score."""
    from nadray import score as score_mod
    from nadray.ingest import read_input
    from nadray.blocks import entity_blocks
    from nadray.score import score

    path = str(shared_data / "iot23_small_scenarios" / "CTU-Malware-Capture-20-1-labeled.csv")
    flows = read_input(path).flows
    scorer = Scorer.from_ref(model_ref)
    b = entity_blocks(flows, scorer.encoder, 2)
    assert len(b.rows) == 2 and 0 < b.split.sum() < flows.num_rows  # 3 entities, internal flows in both
    monkeypatch.setattr(score_mod, "DRIVER_SCORE_ROWS", flows.num_rows // 2 + 1)
    with caplog.at_level("INFO", logger="nadray.score"):
        report = score(model_ref, [path], str(tmp_path / "s"))
    assert "entity block 2/2" in caplog.text
    got = pq.read_table(str(tmp_path / "s")).to_pandas()
    # A file per block with flows of its own, then one of the merged split flows.
    assert report.rows_scored == len(got) == flows.num_rows and 2 <= len(report.files) <= 3
    merged = _same_scores_as_whole_input(got, scorer, flows)
    assert (merged.entity == merged.entity_ref).mean() > 0.99  # only near-ties may pick the other side


@pytest.mark.parametrize("driver_rows,path", [(None, "driver"), (0, "ray-data")])
def test_an_input_too_large_to_hold_is_spilled_with_the_same_scores(ray_session, model_ref, shared_data, tmp_path,
                                                                   monkeypatch, caplog, driver_rows, path):
    """Over blocks.SPILL_ROWS the input is read a file at a time into local spill files and
    regrouped by entity block: same rows and scores, and the spill folder is gone after."""
    import os
    import tempfile

    from nadray import blocks as blocks_mod
    from nadray import score as score_mod
    from nadray.ingest import read_input
    from nadray.score import score

    paths = [str(shared_data / "iot23_small_scenarios" / f"{c}-labeled.csv") for c in CAPTURES]
    monkeypatch.setattr(blocks_mod, "SPILL_ROWS", 150)  # 130 + 237 flows: the second file spills both
    monkeypatch.setattr(score_mod, "DRIVER_SCORE_ROWS", 100)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    # The flows held by two blocks (107 here, 214 rows) pass SPILL_ROWS too: merged from disk.
    split_spills = []
    real_spill_split = score_mod._Output._spill_split
    monkeypatch.setattr(score_mod._Output, "_spill_split",
                        lambda self: (split_spills.append(self.held), real_spill_split(self))[1])
    with caplog.at_level("INFO", logger="nadray.score"):
        report = score(model_ref, paths, str(tmp_path / "s"), driver_rows=driver_rows)
    spilled = [r.getMessage() for r in caplog.records if "spilled to" in r.getMessage()]
    assert len(spilled) == 1 and str(tmp_path / "tmp") in spilled[0] and report.path == path
    assert split_spills and sum(split_spills) > 150
    assert not os.listdir(tmp_path / "tmp")
    flows = pa.concat_tables([read_input(p).flows for p in paths])
    got = pq.read_table(str(tmp_path / "s")).to_pandas()
    assert report.rows_scored == len(got) == flows.num_rows == report.read
    _same_scores_as_whole_input(got, Scorer.from_ref(model_ref), flows)


def test_one_file_too_large_to_hold_is_read_and_spilled_a_piece_at_a_time(model_ref, shared_data, tmp_path,
                                                                         monkeypatch):
    """A single large file is never held whole: its pieces (nadray.ingest.stream) go to the
    spill one at a time, and the scores are those of the whole file."""
    from nadray import blocks as blocks_mod
    from nadray.ingest import read_input, stream
    from nadray.score import score

    path = str(shared_data / "iot23_small_scenarios" / f"{CAPTURES[1]}-labeled.csv")  # 237 flows
    monkeypatch.setattr(stream, "PIECE_BYTES", 8000)
    monkeypatch.setattr(stream, "WHOLE_BYTES", 8000)
    monkeypatch.setattr(blocks_mod, "SPILL_ROWS", 100)
    added = []
    real_add = blocks_mod.Spill.add
    monkeypatch.setattr(blocks_mod.Spill, "add", lambda self, t: (added.append(t.num_rows), real_add(self, t))[1])
    report = score(model_ref, [path], str(tmp_path / "s"))
    flows = read_input(path).flows
    assert len(added) > 2 and max(added) < flows.num_rows and sum(added) == flows.num_rows
    got = pq.read_table(str(tmp_path / "s")).to_pandas()
    assert report.rows_scored == len(got) == flows.num_rows == report.read
    _same_scores_as_whole_input(got, Scorer.from_ref(model_ref), flows)


@pytest.mark.parametrize("spill_rows", [10**9, 150])
def test_scoring_an_archive_gives_the_raw_files_scores(model_ref, shared_data, tmp_path, monkeypatch, caplog,
                                                       spill_rows):
    """``--format archive``: the archive's partitions are the pieces (held, or spilled one
    partition at a time); the same records get the same scores as from the raw files."""
    from nadray import blocks as blocks_mod
    from nadray.ingest import ingest
    from nadray.score import score

    paths = [str(shared_data / "iot23_small_scenarios" / f"{c}-labeled.csv") for c in CAPTURES]
    ingest(paths, str(tmp_path / "archive"))
    raw = score(model_ref, paths, str(tmp_path / "raw"))
    monkeypatch.setattr(blocks_mod, "SPILL_ROWS", spill_rows)
    with caplog.at_level("INFO", logger="nadray.score"):
        arch = score(model_ref, [str(tmp_path / "archive")], str(tmp_path / "arch"), "archive")
    assert ("spilled to" in caplog.text) == (spill_rows < 367)
    assert arch.read == arch.rows_scored == raw.rows_scored == 367
    a, r = (pq.read_table(str(tmp_path / d)).to_pandas() for d in ("arch", "raw"))
    merged = a.merge(r, on=["source", "source_row"], suffixes=("", "_raw"))
    assert len(merged) == 367
    np.testing.assert_allclose(merged.score, merged.score_raw, rtol=1e-5, atol=1e-6)


def test_every_block_writes_one_schema_even_without_label_details(model_ref, shared_data):
    """A block of records without label details (a plain conn.log beside labelled captures)
    writes the same Arrow types as one with them, so the output's files agree and the split
    flows of the two can be merged (pandas alone would make an all-None column null-typed)."""
    from nadray.blocks import merge_split, with_keys
    from nadray.ingest import read_input
    from nadray.score import SCORE_SCHEMA, _to_arrow

    flows = read_input(str(shared_data / "iot23_small_scenarios" / f"{CAPTURES[0]}-labeled.csv")).flows
    labelled = Scorer.from_ref(model_ref).score_table(flows)
    plain = labelled.assign(label_detail=None, label=pd.array([pd.NA] * len(labelled), dtype="Int8"))
    a, b = _to_arrow(labelled), _to_arrow(plain)
    assert a.schema.equals(SCORE_SCHEMA) and b.schema.equals(SCORE_SCHEMA)
    assert a.column("label_detail").null_count == 0 and b.column("label_detail").null_count == len(plain)
    n = len(labelled)
    keys = np.arange(n), np.ones(n, dtype=bool)
    merged = merge_split([with_keys(t, *keys).drop_columns(["_split"]) for t in (a, b)])
    assert merged.num_rows == n and merged.schema.equals(SCORE_SCHEMA)


def test_a_run_failing_midway_leaves_no_partial_output(ray_session, model_ref, shared_data, tmp_path, monkeypatch):
    import tempfile

    from nadray import blocks as blocks_mod
    from nadray import score as score_mod
    from nadray.score import score

    paths = [str(shared_data / "iot23_small_scenarios" / f"{c}-labeled.csv") for c in CAPTURES]
    out = tmp_path / "scores"
    monkeypatch.setattr(score_mod, "DRIVER_SCORE_ROWS", 100)  # 367 flows: 4 blocks, one file each
    calls = []
    real = Scorer.score_table

    def second_block_fails(self, flows, *args):
        calls.append(flows.num_rows)
        if len(calls) == 2:
            raise MemoryError("block 2")
        return real(self, flows, *args)

    monkeypatch.setattr(Scorer, "score_table", second_block_fails)
    with pytest.raises(MemoryError, match="block 2"):
        score(model_ref, paths, str(out))
    assert len(calls) == 2 and out.is_dir() and not list(out.iterdir())  # block 1's file was removed
    # The same from spill files: they go too.
    monkeypatch.setattr(blocks_mod, "SPILL_ROWS", 150)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    calls.clear()
    with pytest.raises(MemoryError, match="block 2"):
        score(model_ref, paths, str(out))
    assert len(calls) == 2 and not list(out.iterdir()) and not list((tmp_path / "tmp").iterdir())


def test_large_inputs_stay_in_the_driver_only_where_the_pool_would_be_one_actor(monkeypatch):
    import os

    import ray

    from nadray.score import DRIVER_SCORE_ROWS, runs_in_driver

    big = DRIVER_SCORE_ROWS + 1
    assert runs_in_driver(DRIVER_SCORE_ROWS) and not runs_in_driver(big, driver_rows=DRIVER_SCORE_ROWS)
    # Before Ray starts: an embedded Ray would take every core of this machine.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for cores, driver in ((1, True), (2, True), (4, False), (64, False)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        assert runs_in_driver(big) is driver, cores
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster not joined yet: Ray Data sizes the pool
    assert not runs_in_driver(big)


def test_bad_ref_names_it(tmp_path):
    from nadray.errors import ModelError
    from nadray.score import score

    with pytest.raises(ModelError, match=str(tmp_path)):
        score(str(tmp_path / "nothing"), ["x.csv"], str(tmp_path / "o"))


def test_score_counts_only_its_own_files(model_ref, shared_data, tmp_path):
    """A rerun into the same folder counts the rows it wrote, not the earlier run's (no Ray needed)."""
    from nadray.score import score

    path = str(shared_data / "iot23_small_scenarios" / f"{CAPTURES[0]}-labeled.csv")
    out = str(tmp_path / "scores")
    first = score(model_ref, [path], out)
    second = score(model_ref, [path], out)
    assert first.path == second.path == "driver"
    assert first.rows_scored == second.rows_scored == first.read
    assert set(first.files).isdisjoint(second.files)
    assert pq.read_table(out).num_rows == 2 * first.rows_scored


def test_a_zeek_log_folder_is_scored_as_ingest_reads_it(model_ref, shared_data, tmp_path):
    """A Zeek log folder holds dns.log, ssl.log... beside conn.log, and rotated days in subfolders:
    scoring it finds the files ingest finds (recursive), skips and names the logs that are not
    flow logs, and scores the flow logs as if they were named alone. A file named directly that is
    not a flow log is still an error."""
    import shutil

    from nadray.errors import InputError
    from nadray.score import score

    zeek = shared_data / "stratosphere_slips_testdata" / "test9-mixed-zeek-dir"
    day = tmp_path / "logs" / "2026-11-27"
    day.mkdir(parents=True)
    for name in ["conn.log", "dns.log", "ssl.log"]:
        shutil.copy(zeek / name, day / name)
    report = score(model_ref, [str(tmp_path / "logs")], str(tmp_path / "s"))
    assert sorted(report.skipped) == [f"{day / 'dns.log'}: not a flow log", f"{day / 'ssl.log'}: not a flow log"]
    assert f"skipped {day / 'dns.log'}: not a flow log" in report.summary()
    alone = score(model_ref, [str(day / "conn.log")], str(tmp_path / "alone"))
    assert report.read == report.rows_scored == alone.rows_scored > 0 and not alone.skipped
    got = pq.read_table(str(tmp_path / "s")).to_pandas().sort_values("source_row", ignore_index=True)
    want = pq.read_table(str(tmp_path / "alone")).to_pandas().sort_values("source_row", ignore_index=True)
    np.testing.assert_array_equal(got.score, want.score)
    with pytest.raises(InputError, match="dns.log: not a flow log"):
        score(model_ref, [str(day / "dns.log")], str(tmp_path / "o"))
    (day / "conn.log").unlink()
    with pytest.raises(NadrayError, match="no readable records .*2 files in folders skipped"):
        score(model_ref, [str(tmp_path / "logs")], str(tmp_path / "o"))


def test_an_archive_is_scored_over_a_date_range(model_ref, shared_data, tmp_path, capsys):
    """``--start/--end`` score the archive's flows in ``[start, end)`` only (what a nightly
    scoring of yesterday's traffic wants), with the day before read as the hosts' context."""
    from nadray import archive as arc
    from nadray.cli import main
    from nadray.ingest import ingest
    from nadray.score import score

    a = str(tmp_path / "archive")
    ingest([str(shared_data / "iot23_small_scenarios" / "CTU-Honeypot-Capture-4-1-labeled.csv")], a)
    assert arc.list_dates(a) == ["2018-10-25", "2018-10-26"]
    day = arc.read_flows(a, "2018-10-26")
    scorer = Scorer.from_ref(model_ref)
    base = ["score", "--model", model_ref, "--input", a, "--format", "archive", "--start", "2018-10-26"]
    assert main([*base, "--output", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    n_before = arc.read_flows(a).num_rows - day.num_rows
    assert f"scored {day.num_rows} rows" in out and f"({n_before} of them as context before the range)" in out, out
    got = pq.read_table(str(tmp_path / "s")).to_pandas()
    assert len(got) == day.num_rows and (got.ts >= pd.Timestamp("2018-10-26", tz="UTC")).all()
    # Scored as in the whole archive (the day before is its context)...
    in_whole = got.merge(scorer.score_table(arc.read_flows(a)), on=["source", "source_row"], suffixes=("", "_ref"))
    np.testing.assert_allclose(in_whole.score, in_whole.score_ref, rtol=1e-5, atol=1e-6)
    # ...not as the day alone, from a cold start, which --context-days 0 gives.
    assert main([*base, "--context-days", "0", "--output", str(tmp_path / "cold")]) == 0
    cold = _same_scores_as_whole_input(pq.read_table(str(tmp_path / "cold")).to_pandas(), scorer, day)
    assert len(in_whole) == len(cold) == day.num_rows
    assert not np.allclose(in_whole.sort_values("source_row").score, cold.sort_values("source_row").score)
    with pytest.raises(NadrayError, match="holds no flows from 2030-01-01 to its end"):
        score(model_ref, [a], str(tmp_path / "o"), "archive", start="2030-01-01")
    with pytest.raises(NadrayError, match="--start/--end select flows of an archive"):
        score(model_ref, [str(tmp_path)], str(tmp_path / "o"), start="2018-10-26")
    assert main([*base[:-1], "last tuesday", "--output", str(tmp_path / "o")]) == 2
    assert "start: expected a date like 2006-07-01" in capsys.readouterr().err
