"""Releasing the placement groups a dead Ray Train controller leaves behind.

The real mechanism, not a stand-in: an actor creates a group the way Train's
controller does, the actor is killed the way Tune kills a stopped trial, and the
group's CPU must come back, while groups with a living owner are left alone.
"""

from __future__ import annotations

import time

import pytest

from nadray import placement


def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(120)
def test_orphaned_group_is_released_and_owned_groups_are_not(ray_session):
    ray = ray_session
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class Controller:
        def make(self, cpu: float) -> str:
            pg = placement_group([{"CPU": cpu}])
            ray.get(pg.ready())
            return pg.id.hex()

    state = lambda pg: ray.util.placement_group_table().get(pg, {}).get("state")  # noqa: E731
    driver_pg = placement_group([{"CPU": 0.1}])
    ray.get(driver_pg.ready())
    alive, doomed = Controller.remote(), Controller.remote()
    kept = ray.get(alive.make.remote(0.1))
    orphan = ray.get(doomed.make.remote(0.5))
    try:
        assert placement.orphaned_placement_groups() == []
        ray.kill(doomed)
        assert _wait(lambda: orphan in placement.orphaned_placement_groups())
        assert placement.release_orphaned_placement_groups() >= 1
        assert _wait(lambda: state(orphan) == "REMOVED")
        # A driver's group (nil creator) and a living actor's group stay.
        assert state(driver_pg.id.hex()) == "CREATED"
        assert state(kept) == "CREATED"
        assert placement.orphaned_placement_groups() == []
    finally:
        ray.kill(alive)
        remove_placement_group(driver_pg)
        # Leave the session's 2 CPUs whole for the tests that follow.
        _wait(lambda: kept in placement.orphaned_placement_groups())
        placement.release_orphaned_placement_groups()


@pytest.mark.timeout(120)
def test_group_of_a_controller_destroyed_with_its_trial_group_is_released(ray_session):
    """Tune runs a trial's Train controller inside the trial's group; stopping the trial
    removes that group, which destroys the controller without the GCS marking the
    controller's own worker group as orphaned (Ray 2.60). It must still be found."""
    ray = ray_session
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0.01)
    class Controller:
        def make(self) -> str:
            pg = placement_group([{"CPU": 0.5}])
            ray.get(pg.ready())
            return pg.id.hex()

    trial_pg = placement_group([{"CPU": 0.01}])
    ray.get(trial_pg.ready())
    ctl = Controller.options(scheduling_strategy=PlacementGroupSchedulingStrategy(trial_pg)).remote()
    workers = ray.get(ctl.make.remote())
    try:
        remove_placement_group(trial_pg)  # what Tune does when ASHA stops the trial
        assert _wait(lambda: workers in placement.orphaned_placement_groups())
        placement.release_orphaned_placement_groups()
        assert _wait(lambda: ray.util.placement_group_table().get(workers, {}).get("state") == "REMOVED")
    finally:
        # Should the assertions fail, the 0.5-CPU group must not starve every later test.
        from ray.util.placement_group import PlacementGroup

        if ray.util.placement_group_table().get(workers, {}).get("state") not in (None, "REMOVED"):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(workers))))
