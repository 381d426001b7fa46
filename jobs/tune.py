"""Ray job entry point: a hyperparameter search over the LSTM.

    ray job submit --working-dir . -- python jobs/tune.py \\
        --archive s3://flows/archive --registry s3://models --search random --num-samples 16

The same flags as ``nadray tune`` (``--config``, ``--set k=v``, ``--search``,
``--num-samples``, ``--time-budget-s``), parsed by the same parser and run by the
same function, ``nadray.tune.tune``. Inside a job ``RAY_ADDRESS`` is set, so the
search joins the job's cluster. Resubmitting the same command resumes an
interrupted search.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from nadray.cli import main as cli_main

    return cli_main(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
