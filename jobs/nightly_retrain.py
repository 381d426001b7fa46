"""Ray job entry point: the nightly pipeline (ingest -> retrain -> evaluate -> promote -> notify -> report).

    ray job submit --working-dir . -- python jobs/nightly_retrain.py \\
        --landing s3://flows/landing --archive s3://flows/archive --registry s3://models \\
        [--date YYYY-MM-DD] [--config FILE] [--set k=v ...]

The same flags as ``nadray retrain``, run by the same function,
``nadray.retrain.retrain``. Inside a job ``RAY_ADDRESS`` is set, so training joins
the job's cluster; without it an embedded Ray starts. Exit status: 0 when the
night completed or was already done, 1 when it failed, 2 for a usage error.

``--demo --workdir DIR`` runs two nights and the cs448b experiment on the data
bundled with nadray (docs/NIGHTLY.md, "The demo"); ``make demo`` does that.

SIGTERM (``ray job stop``) is turned into an orderly stop: the staging folder is
removed and neither the archive nor ``champion.json`` changes before the commit
step (docs/NIGHTLY.md, "Safety").
"""

from __future__ import annotations

import signal
import sys


def _stop_on_sigterm() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _stop_on_sigterm()
    if "--demo" in argv:
        import argparse

        p = argparse.ArgumentParser(prog="nightly_retrain.py --demo")
        p.add_argument("--demo", action="store_true")
        p.add_argument("--workdir", default="demo-output", help="folder for landing, archive, registry, reports")
        p.add_argument("--reset", action="store_true", help="delete the workdir first (default: reuse it; "
                       "nights already done are no-ops)")
        args = p.parse_args(argv)
        from nadray.nightly.demo import run_demo
        from nadray.runtime import configure_logging

        configure_logging()
        return run_demo(args.workdir, reset=args.reset)
    from nadray.cli import main as cli_main

    return cli_main(["retrain", *argv])


if __name__ == "__main__":
    sys.exit(main())
