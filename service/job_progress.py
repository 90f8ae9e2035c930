"""One job's progress rules: phases never go back, percent never goes down, and progress within
a phase is recorded at most every PROGRESS_INTERVAL_S (a long job's event log stays small)."""

from __future__ import annotations

import time
from dataclasses import dataclass

PROGRESS_INTERVAL_S = 0.25


@dataclass
class ProgressGate:
    max_percent: float = 0.0
    phase_floor: int = 0  # the furthest phase of this run
    last_at: float = 0.0  # monotonic time of the last recorded progress

    def restart(self) -> None:
        """A resumed job walks its phases again (its percent still never goes down)."""
        self.phase_floor = 0

    def admit(self, phase: int, percent: float, state: int, force: bool,
              now: float | None = None) -> tuple[int, float] | None:
        """The (phase, percent) to record for a report of `phase` at `percent` while the job is
        in `state`, or None when the report is dropped (same phase, too soon). A download
        thread may report a phase the pipeline has moved past: the phase is raised to the
        furthest one seen."""
        phase = max(phase, self.phase_floor)
        self.phase_floor = phase
        now = time.monotonic() if now is None else now
        if not (force or phase != state) and now - self.last_at < PROGRESS_INTERVAL_S:
            return None
        self.last_at = now
        self.max_percent = max(self.max_percent, min(100.0, float(percent)))
        return phase, self.max_percent
