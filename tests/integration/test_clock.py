"""The guest clock: children run tickless on a high-resolution clocksource; a ticking parent is refused."""

from __future__ import annotations

import dataclasses

import pytest

from forkd.engine import Engine, clock
from forkd.errors import SnapshotError

pytestmark = pytest.mark.vm


def test_child_is_tickless_with_a_high_resolution_clocksource(spawn) -> None:
    (child,) = spawn(1)
    report = clock.measure(child.vm.channel, window_s=2.0)
    assert report.clocksource in clock.GOOD_CLOCKSOURCES, report
    assert report.hres_active == 1 and report.nohz_mode == clock.NOHZ_MODE_HIGHRES, report
    assert report.tick_device_mode == clock.TICKDEV_MODE_ONESHOT, report
    assert report.timer_irq_per_s is not None and report.timer_irq_per_s < clock.MAX_IDLE_TIMER_HZ, report
    assert report.problems() == []


def test_snapshot_records_the_clock(engine: Engine, snapshot: str) -> None:
    meta = engine.store.open(snapshot).meta
    assert meta.guest["clock"]["tickless"] is True
    assert meta.guest["clock"]["clocksource"] in clock.GOOD_CLOCKSOURCES


def test_a_parent_that_ticks_periodically_is_refused(engine: Engine, image) -> None:
    ticking = dataclasses.replace(image, cmdline=image.cmdline + " nohz=off highres=off")
    with pytest.raises(SnapshotError) as e:
        engine.create_snapshot("ticking", image=ticking, settle_max_s=5)
    msg = str(e.value)
    assert "not tickless" in msg and "high-resolution timers are not active" in msg, msg
    assert not engine.store.exists("ticking")
