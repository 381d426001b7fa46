"""Starting or joining Ray, the same way for every command.

With ``RAY_ADDRESS`` set, commands join that cluster (``ray job submit`` sets it
for jobs). Without it, they start an embedded local Ray: the default, so nothing
needs a cluster.
"""

from __future__ import annotations

import logging
import os
import threading


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    # Ray 2.60 turns token auth on after the first ray.init() writes ~/.ray/auth_token;
    # local embedded runs keep it off unless the user chose a mode (RAY.md).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # One local node cannot be preempted, and Ray Train 2.60's preemption watcher logs
        # an error-level line at every start ("PreemptionWatcher ... has constructor
        # arguments in the object store"): off in the embedded Ray, on a cluster as Ray has it.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": "nadray.runtime.quiet_worker_logs"})
    ray.data.DataContext.get_current().enable_progress_bars = False


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


# Ray Train 2.60's PlacementGroupCleaner asks the State API every second whether the
# training controller is still alive. An embedded Ray has no dashboard, so no State
# API, and each check logs this warning instead: 75 of the 91 lines a `nadray train`
# printed on 216k flows. When another Ray runs on the machine (a `nadray serve` beside
# the nightly job), the check raises ConnectionError instead and the cleaner's thread
# dies with a 25-line traceback. The cleaner can never act there; nadray.placement
# releases the groups it would have.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CLEANER_NOISE = "State API may be temporarily unavailable"
CLEANER_THREAD = "PlacementGroupCleanerMonitor"


# Ray Train 2.60 also logs two INFO lines per epoch from each worker, about 400
# characters each (the checkpoint's path, every metric): 22 of the 33 lines of a
# `nadray train` on the bundled logs. The train loop logs one short line per epoch
# instead (nadray.train.epoch_line), so the embedded Ray drops these two. The second
# logger is named by its file's path (logging.getLogger(__file__)), hence the tuple.
CHECKPOINT_LOGGER = "ray.train.v2._internal.execution.storage"
CHECKPOINT_NOISE = "Checkpoint successfully created at: "
REPORT_LOGGER_FILE = ("train", "v2", "_internal", "execution", "context.py")
REPORT_NOISE = "Reporting training result "


class _Drop(logging.Filter):
    """Drops records whose message contains ``text`` (``prefix``: starts with it)."""

    def __init__(self, text: str, prefix: bool = False):
        super().__init__()
        self.text, self.prefix = text, prefix

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.text) if self.prefix else self.text in message)


def report_logger_name() -> str:
    """The name of the logger that logs "Reporting training result": its file's path."""
    import ray

    return os.path.join(os.path.dirname(ray.__file__), *REPORT_LOGGER_FILE)


def quiet_worker_logs() -> None:
    """Ray worker setup hook of the embedded Ray: drop the cleaner's warning and its
    thread's death by a State API it cannot reach, and Ray Train's two long lines per
    epoch (above); nothing else."""
    logging.getLogger(CLEANER_LOGGER).addFilter(_Drop(CLEANER_NOISE))
    logging.getLogger(CHECKPOINT_LOGGER).addFilter(_Drop(CHECKPOINT_NOISE, prefix=True))
    logging.getLogger(report_logger_name()).addFilter(_Drop(REPORT_NOISE, prefix=True))
    previous = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        unreachable = isinstance(args.exc_value, ConnectionError) or (
            type(args.exc_value).__name__ == "RayStateApiException")
        if not (unreachable and args.thread is not None and args.thread.name == CLEANER_THREAD):
            previous(args)

    threading.excepthook = excepthook


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def local_cpus() -> int:
    """CPUs this process may use for its own threads."""
    # Inside a Ray task OMP_NUM_THREADS is the task's CPU allotment: don't take the node.
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(omp)) if omp.isdigit() else (os.cpu_count() or 1)


# The AWS SDK's INFO lines ("Found credentials in environment variables", once per new S3
# client, so several per command) say nothing a user acts on; -v shows them again (their DEBUG
# lines, every HTTP exchange, never).
QUIET_LOGGERS = ("aiobotocore", "botocore", "s3fs")


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
