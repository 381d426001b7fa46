"""Shared fixtures: one local Ray for the session, a real S3 server, the shared data.

Environment is set before Ray can start (RAY.md: token auth, attach-to-running
cluster, slow health checks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "180"
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
os.environ["RAY_DEDUP_LOGS"] = "0"
os.environ.pop("RAY_ADDRESS", None)

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]


def _find_shared_data() -> Path | None:
    for cand in (
        os.environ.get("NADRAY_SHARED_DATA"),
        REPO.parent / "shared" / "data",
        Path("/work/shared/data"),
    ):
        if cand and Path(cand, "SOURCES.md").exists():
            return Path(cand)
    return None


SHARED_DATA = _find_shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The third-party data sets (../shared/data; NADRAY_SHARED_DATA overrides)."""
    if SHARED_DATA is None:
        pytest.skip("shared data not found: set NADRAY_SHARED_DATA to the folder holding SOURCES.md")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: num_cpus=2, no dashboard, capped object store."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            logging_level="WARNING",
            log_to_driver=True,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 gateway on loopback for the session; AWS_* variables point at it."""
    from s3server import S3Server

    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.cleanup()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket; returns its s3:// URI."""
    return f"s3://{s3_server.make_bucket()}"
