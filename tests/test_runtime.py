"""The embedded Ray that every command starts without RAY_ADDRESS (nadray.runtime)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from nadray.runtime import CLEANER_LOGGER, CLEANER_NOISE, CLEANER_THREAD

REPO = Path(__file__).resolve().parents[1]


def test_the_filtered_warning_is_still_the_one_ray_train_logs():
    # A Ray upgrade that renames the module or rewords the message would make the
    # filter silently useless: this fails first.
    spec = importlib.util.find_spec(CLEANER_LOGGER)
    assert spec is not None and spec.origin
    source = Path(spec.origin).read_text()
    assert CLEANER_NOISE in source and f'name="{CLEANER_THREAD}"' in source


def test_embedded_ray_workers_drop_only_the_cleaner_noise():
    # Its own embedded Ray in a subprocess (this session's Ray is already up), one CPU,
    # a real worker logging through the cleaner's logger; the driver prints what
    # workers log.
    code = textwrap.dedent(f"""
        import logging, threading, time
        import ray
        from nadray.runtime import ensure_ray
        ensure_ray(1)

        def die(exc):
            raise exc

        @ray.remote
        def emit():
            log = logging.getLogger({CLEANER_LOGGER!r})
            log.warning("Failed to query Ray Train Controller actor state. {CLEANER_NOISE}.")
            log.warning("nadray-test: a different warning from the same logger")
            # The cleaner's thread dying on an unreachable State API, and two deaths that
            # must still be printed: another error in that thread, the same one elsewhere.
            for name, exc in (({CLEANER_THREAD!r}, ConnectionError("Found multiple active Ray instances")),
                              ({CLEANER_THREAD!r}, ValueError("nadray-test: another error")),
                              ("nadray-test-thread", ConnectionError("nadray-test: elsewhere"))):
                t = threading.Thread(target=die, args=(exc,), name=name)
                t.start()
                t.join()
            return True

        assert ray.get(emit.remote())
        time.sleep(1.5)  # the log monitor forwards worker lines to the driver
        ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # only the processes this test started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "nadray-test: a different warning from the same logger" in out, out[-3000:]
    assert "nadray-test: another error" in out and "nadray-test: elsewhere" in out, out[-3000:]
    assert CLEANER_NOISE not in out and "Found multiple active Ray instances" not in out, out[-3000:]
