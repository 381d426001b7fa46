"""Giving back the CPUs that a finished Ray Train run forgets to release.

Ray Train 2.60 creates each run's worker placement group from its controller
actor. A group created by an (undetached) actor lives as long as the *job*, not
the actor: Ray's ``PlacementGroupCleaner`` removes it when the controller dies, but
it asks the State API whether the controller died, which fails without a
dashboard (embedded Ray, CI). So when a controller dies early (Tune's ASHA stops
a trial, and the controller is fate-shared with the trial's actor) or its group
is recreated after a failure, the group keeps its CPUs and the next run on a
small cluster waits for ever. Measured on 2 CPUs; see docs/ARCHITECTURE.md.

The GCS records, for every group, its creator actor and whether that actor is
dead. A live group whose creator actor is dead can never be used again, so
``release_orphaned_placement_groups`` removes exactly those: safe at any moment,
even while other runs start or run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("nadray")


def _remove(pg_hex: str, why: str) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    log.info("releasing placement group %s (%s)", pg_hex, why)
    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_hex)))


def orphaned_placement_groups() -> list[str]:
    """Ids of live, undetached groups created by an actor that is now dead.

    Groups created by a driver (Tune's trial groups, ``nadray serve``) carry a nil
    creator actor, which the GCS marks dead from the start: they are never touched.
    The group's own ``creator_actor_dead`` flag is not enough: a controller destroyed
    because *its* enclosing group (the Tune trial's) was removed stays "alive" there
    (measured, Ray 2.60), so the actor table has the last word."""
    import ray
    from ray.core.generated import gcs_pb2

    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    # ray.util.placement_group_table() drops the creator fields; the raw GCS table has them.
    accessor = ray._private.state.state._connect_and_get_accessor()
    out, states = [], None
    for raw in accessor.get_placement_group_table():
        d = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if d.state == removed or d.is_detached:
            continue
        creator = ray.ActorID(d.creator_actor_id) if d.creator_actor_id else None
        if creator is None or creator.is_nil():  # a driver's group
            continue
        if not d.creator_actor_dead:
            if states is None:
                states = _actor_states()  # one actor-table read per sweep, and only when needed
            if states.get(creator.hex()) != "DEAD":
                continue
        out.append(d.placement_group_id.hex())
    return out


def _actor_states() -> dict[str, str]:
    from ray._private.state import actors

    return {aid: info.get("State") for aid, info in (actors() or {}).items()}


def release_orphaned_placement_groups() -> int:
    """Remove every group whose creator actor is dead; return how many. Never raises:
    housekeeping must not fail the run it serves."""
    try:
        orphans = orphaned_placement_groups()
    except Exception as e:
        log.debug("placement group cleanup: %s", e)
        return 0
    n = 0
    for pg in orphans:
        try:
            _remove(pg, "its Ray Train controller is gone")
            n += 1
        except Exception as e:  # one failure must not keep the others
            log.debug("placement group %s: %s", pg, e)
    return n


@contextlib.contextmanager
def releasing_leaked_placement_groups() -> Iterator[None]:
    """Give back what a Train run holds once its ``fit()`` has returned or failed.

    Besides orphaned groups, from the main thread ``TorchTrainer.fit`` installs a
    SIGINT handler whose closure keeps the run's controller alive after the run; the
    previous handler is restored so the controller can exit (and Ctrl+C works again).
    Use it where fits do not run concurrently on the same cluster (``nadray train``,
    the nightly job, the benchmark): groups created during the call that outlive it
    are removed too. Tune trials, which overlap, use the orphan rule only
    (``tune.ReleaseStoppedTrainRuns``).
    """
    import gc

    import ray

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None

    def live() -> set[str]:
        return {pg for pg, info in ray.util.placement_group_table().items()
                if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING")}

    release_orphaned_placement_groups()  # left by an earlier run, e.g. a killed job
    before = live()
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
            gc.collect()  # drop the handler's closure, and with it the controller's handle
        try:
            for pg in live() - before:
                _remove(pg, "left by a finished Train run")
        except Exception as e:
            log.debug("placement group cleanup: %s", e)
