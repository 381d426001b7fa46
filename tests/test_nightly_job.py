"""The nightly pipeline as a Ray job on a real head: ``ray start`` + ``ray job submit``.

The head runs on loopback with its own ports and temp dir (so it cannot collide
with the session's embedded Ray), from .venv/bin/ray so jobs import the installed
nadray. It is stopped by killing the process group this test started (never
``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from nadray import archive as arc
from nadray import datasets
from nadray import registry as reg

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
TINY = ["train.max_epochs=1", "train.patience=1", "model.hidden_size=8", "data.sequence_length=8",
        "train.max_windows=2000", "nightly.window_days=400", "nightly.min_file_age_s=0"]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="180")
    return env


def _our_pids(marker: str) -> list[int]:
    """Processes whose command line names this test's own Ray temp dir (started by this test)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path("/proc", d, "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and int(d) != os.getpid():
                out.append(int(d))
    return out


@pytest.fixture(scope="module")
def head():
    gcs, dash, client, agent = _free_ports(4)
    temp = tempfile.mkdtemp(prefix="rjob", dir="/tmp")
    log = open(os.path.join(temp, "head.log"), "wb")
    proc = subprocess.Popen(
        [RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--num-cpus=2", "--include-dashboard=true", "--block", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}", "--object-store-memory=300000000",
         "--disable-usage-stats"],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start: {Path(temp, 'head.log').read_text()[-2000:]}")
                time.sleep(1)
        yield url
    finally:
        # On SIGTERM the head drains for up to 30 s (jobs, not our concern here: the test
        # is over and the temp dir goes); a moment for the graceful part, then SIGKILL.
        for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        time.sleep(1)
        for pid in _our_pids(temp):  # workers that left the process group: ours by their temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _submit(url: str, args: list[str], submission_id: str | None = None, wait: bool = True):
    cmd = [RAY, "job", "submit", "--address", url, "--working-dir", str(REPO)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", "python", "jobs/nightly_retrain.py", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=420)


def _night_args(root: Path, date: str) -> list[str]:
    args = ["--landing", str(root / "landing"), "--archive", str(root / "archive"),
            "--registry", str(root / "registry"), "--date", date]
    return args + [a for kv in TINY for a in ("--set", kv)]


def _land(root: Path, *scenarios: str) -> None:
    (root / "landing").mkdir(parents=True, exist_ok=True)
    for s in scenarios:
        src = datasets.path(f"iot23-{s}")
        shutil.copyfile(src, root / "landing" / src.name)


def test_nightly_job_registers_is_idempotent_and_a_stopped_job_changes_nothing(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    _land(tmp_path, "CTU-Malware-Capture-42-1", "CTU-Malware-Capture-44-1")
    registry, archive = str(tmp_path / "registry"), str(tmp_path / "archive")

    first = _submit(head, _night_args(tmp_path, "2019-01-10"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "night 2019-01-10: complete" in first.stdout
    champ = reg.champion(registry)
    assert champ is not None
    champion_bytes = (Path(reg.model_root(registry)) / reg.CHAMPION).read_bytes()
    rows, versions = arc.count_rows(archive), reg.list_versions(registry)
    assert rows == 4426 + 237 and versions == [champ["version"]]

    again = _submit(head, _night_args(tmp_path, "2019-01-10"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert "already done" in again.stdout
    assert arc.count_rows(archive) == rows and reg.list_versions(registry) == versions

    # A later night, stopped once training has started: champion and archive as they were.
    _land(tmp_path, "CTU-Honeypot-Capture-7-1")
    sid = f"nadray-test-stop-{os.getpid()}"
    started = _submit(head, _night_args(tmp_path, "2019-07-03"), submission_id=sid, wait=False)
    assert started.returncode == 0, started.stderr[-2000:]
    client = JobSubmissionClient(head)
    deadline = time.time() + 240
    while "training challenger" not in client.get_job_logs(sid):
        status = client.get_job_status(sid)
        assert status not in (JobStatus.SUCCEEDED, JobStatus.FAILED), client.get_job_logs(sid)[-3000:]
        assert time.time() < deadline, client.get_job_logs(sid)[-3000:]
        time.sleep(0.5)
    stop = subprocess.run([RAY, "job", "stop", "--address", head, sid], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    deadline = time.time() + 60
    while client.get_job_status(sid) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        assert time.time() < deadline
        time.sleep(0.5)
    assert client.get_job_status(sid) == JobStatus.STOPPED
    time.sleep(2)  # let the stopped driver's SIGTERM handler finish its cleanup
    assert (Path(reg.model_root(registry)) / reg.CHAMPION).read_bytes() == champion_bytes
    assert arc.count_rows(archive) == rows
    assert arc.list_dates(archive) == ["2019-01-10"]
    assert reg.champion(registry)["version"] == champ["version"]
