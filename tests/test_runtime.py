"""The embedded Ray that every command starts without RAY_ADDRESS (nadray.runtime)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from nadray.runtime import (
    CHECKPOINT_LOGGER, CHECKPOINT_NOISE, CLEANER_LOGGER, CLEANER_NOISE, CLEANER_THREAD, REPORT_NOISE, report_logger_name,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_filtered_warning_is_still_the_one_ray_train_logs():
    # A Ray upgrade that renames the module or rewords the message would make the
    # filter silently useless: this fails first.
    spec = importlib.util.find_spec(CLEANER_LOGGER)
    assert spec is not None and spec.origin
    source = Path(spec.origin).read_text()
    assert CLEANER_NOISE in source and f'name="{CLEANER_THREAD}"' in source


def test_the_dropped_progress_lines_are_still_the_ones_ray_train_logs():
    spec = importlib.util.find_spec(CHECKPOINT_LOGGER)
    assert spec is not None and spec.origin
    assert f'logger.info(f"{CHECKPOINT_NOISE}' in Path(spec.origin).read_text()
    report = Path(report_logger_name()).read_text()  # that logger is named by its file's path
    assert "logger = logging.getLogger(__file__)" in report and f'f"{REPORT_NOISE}' in report


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
            # Ray Train's two long lines per epoch, and other lines of the same loggers
            from nadray.runtime import report_logger_name
            for name, noise in (({CHECKPOINT_LOGGER!r}, {CHECKPOINT_NOISE!r}), (report_logger_name(), {REPORT_NOISE!r})):
                # Ray logs them at INFO, which a plain task's handlers don't print; the filter
                # goes by the message alone.
                logging.getLogger(name).warning(noise + "nadray-test-noise")
                logging.getLogger(name).warning("nadray-test: progress kept " + name[-10:])
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
    assert "nadray-test-noise" not in out and out.count("nadray-test: progress kept") == 2, out[-3000:]


def test_the_aws_sdks_info_lines_are_quiet_unless_verbose():
    """"Found credentials in environment variables", once per new S3 client: shown with -v only."""
    code = textwrap.dedent("""
        import logging, sys
        from nadray.runtime import configure_logging
        configure_logging(verbose=sys.argv[1] == "v")
        logging.getLogger("aiobotocore.credentials").info("Found credentials in environment variables.")
        logging.getLogger("botocore.credentials").warning("a real problem")
        logging.getLogger("nadray.ingest").info("ours")
    """)
    for mode, shown in (("", False), ("v", True)):
        err = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=60).stderr
        assert ("Found credentials" in err) == shown, err
        assert "a real problem" in err and "ours" in err, err


def test_the_embedded_ray_turns_the_preemption_watcher_off():
    """A single local node is never preempted; Ray Train's watcher only logs an error-level line
    there. Its switch is still the variable Ray Train reads, and the embedded Ray's workers
    (where the training controller runs) see it off unless the user set it."""
    from nadray.runtime import PREEMPTION_WATCHER_ENV

    spec = importlib.util.find_spec("ray.train.v2._internal.constants")
    assert f'ENABLE_PREEMPTION_WATCHER_ENV_VAR = "{PREEMPTION_WATCHER_ENV}"' in Path(spec.origin).read_text()
    code = textwrap.dedent(f"""
        import os, ray
        from nadray.runtime import ensure_ray
        ensure_ray(1)
        print("seen:", ray.get(ray.remote(lambda: os.environ.get({PREEMPTION_WATCHER_ENV!r})).remote()))
        ray.shutdown()
    """)
    for preset, seen in ((None, "0"), ("1", "1")):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", PREEMPTION_WATCHER_ENV)}
        if preset:
            env[PREEMPTION_WATCHER_ENV] = preset
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120).stdout
        assert f"seen: {seen}" in out, out
