"""Starting or joining Ray, the same way for every command.

With ``RAY_ADDRESS`` set, commands join that cluster (``ray job submit`` sets it
for jobs). Without it, they start an embedded local Ray: the default, so nothing
needs a cluster.
"""

from __future__ import annotations

import logging
import os


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
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
