"""How much CPU the hypervisor gave to other guests while a benchmark ran.

On a shared VM the ``steal`` column of /proc/stat counts the time a virtual CPU wanted to run
and the host ran someone else. A run that lost much of it says more about the neighbours
than about either side of a ratio: runtimed spreads a run over both CPUs (the daemon, the
runner, the next spare), and a stolen CPU stalls whichever step waits on it. Each bench
prints what its run lost, so that its figures are read with their conditions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Final

HEAVY: Final = 0.05
"""The share of the VM's CPU time stolen above which a run is flagged: on the 2-core VM these
benches were written on, the ratios of such runs spread far wider than those of quiet ones
(docs/daemon.md, docs/snapshots.md)."""


def _stolen_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = stat.readline().split()  # cpu user nice system idle iowait irq softirq steal
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Steal:
    """CPU seconds stolen over a span of wall-clock seconds, on ``cpus`` CPUs."""

    seconds: float
    wall: float
    cpus: int

    @property
    def share(self) -> float:
        """The part of the VM's CPU time stolen (0 to 1)."""
        return self.seconds / (self.wall * self.cpus) if self.wall > 0 else 0.0

    def describe(self) -> str:
        line = (
            f"CPU stolen by the hypervisor during the run: {self.seconds:.1f} s over "
            f"{self.wall:.0f} s on {self.cpus} CPUs ({self.share:.0%})"
        )
        if self.share > HEAVY:
            line += ": the neighbours were busy, ratios from this run are unreliable"
        return line


class StealMeter:
    """Started at creation; :meth:`read` gives the steal so far."""

    def __init__(self) -> None:
        self._stolen = _stolen_seconds()
        self._start = time.monotonic()

    def read(self) -> Steal:
        return Steal(
            seconds=_stolen_seconds() - self._stolen,
            wall=time.monotonic() - self._start,
            cpus=os.cpu_count() or 1,
        )
