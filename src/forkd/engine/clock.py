"""The guest's clock: is it tickless with a high-resolution clocksource?

A guest kernel that distrusts the TSC falls back to a jiffies clocksource and a periodic tick (250
interrupts a second, forever): under TCG each tick costs real host CPU, so 100 idle clones saturate
two cores. A snapshot inherits its parent's clock state, so the parent is checked before it is saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from forkd.engine.channel import AgentChannel

#: Clocksources with nanosecond resolution that stay right across a restore.
GOOD_CLOCKSOURCES = ("tsc", "kvm-clock")
NOHZ_MODE_HIGHRES = 2  # kernel/time/tick-sched.h
TICKDEV_MODE_ONESHOT = 1
#: A periodic tick shows as HZ (250) local timer interrupts a second; an idle tickless guest has ~1.
MAX_IDLE_TIMER_HZ = 50.0


@dataclass(frozen=True)
class ClockReport:
    """What the guest said about its clock, and the timer interrupt rate measured over an idle window."""

    clocksource: str
    hres_active: int | None
    nohz_mode: int | None
    tick_device_mode: int | None
    timer_irq_per_s: float | None

    def problems(self) -> list[str]:
        """Why this guest would tick periodically or keep a bad clock (empty: it is fine)."""
        out = []
        if self.clocksource not in GOOD_CLOCKSOURCES:
            out.append(f"clocksource is {self.clocksource or 'unknown'!r}, not one of {', '.join(GOOD_CLOCKSOURCES)} "
                       "(the kernel did not trust the TSC)")
        if self.hres_active != 1:
            out.append("high-resolution timers are not active")
        if self.nohz_mode != NOHZ_MODE_HIGHRES:
            out.append(f"the tick is not stopped when idle (nohz_mode {self.nohz_mode}, want {NOHZ_MODE_HIGHRES})")
        if self.tick_device_mode != TICKDEV_MODE_ONESHOT:
            out.append(f"the tick device is periodic (mode {self.tick_device_mode})")
        if self.timer_irq_per_s is not None and self.timer_irq_per_s > MAX_IDLE_TIMER_HZ:
            out.append(f"{self.timer_irq_per_s:.0f} timer interrupts a second while idle (at most "
                       f"{MAX_IDLE_TIMER_HZ:.0f} expected)")
        return out

    @property
    def tickless(self) -> bool:
        return not self.problems()

    def to_json(self) -> dict[str, Any]:
        return {"clocksource": self.clocksource, "hres_active": self.hres_active, "nohz_mode": self.nohz_mode,
                "tick_device_mode": self.tick_device_mode,
                "timer_irq_per_s": None if self.timer_irq_per_s is None else round(self.timer_irq_per_s, 2),
                "tickless": self.tickless}


def _int_or_none(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def measure(channel: AgentChannel, window_s: float = 2.0, timeout: float = 60.0) -> ClockReport:
    """Ask the agent twice, ``window_s`` seconds apart, and derive the idle timer interrupt rate."""
    a = channel.call("clock_info", reply_timeout=timeout)
    time.sleep(window_s)
    b = channel.call("clock_info", reply_timeout=timeout)
    rate = None
    la, lb = _int_or_none(a.get("local_timer_interrupts")), _int_or_none(b.get("local_timer_interrupts"))
    ta, tb = a.get("monotonic_s"), b.get("monotonic_s")
    if la is not None and lb is not None and isinstance(ta, float) and isinstance(tb, float) and tb > ta:
        rate = (lb - la) / (tb - ta)
    return ClockReport(clocksource=str(b.get("clocksource", ""))[:64], hres_active=_int_or_none(b.get("hres_active")),
                       nohz_mode=_int_or_none(b.get("nohz_mode")),
                       tick_device_mode=_int_or_none(b.get("tick_device_mode")), timer_irq_per_s=rate)
