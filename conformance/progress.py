"""What a run is doing, from its first second: a line per set-up phase, then a bar over checks.

Set-up (discovering the backends, measuring the roofline) used to be silent for
minutes on a small CPU; every phase now prints one line before it starts, and
the bar then names the check in progress. Lines go to stderr, as tqdm's bar does.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Phase lines and the check bar of one run; ``enabled`` False prints nothing."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.started = time.perf_counter()
        self.bar: tqdm | None = None

    def say(self, text: str) -> None:
        """One line: ``label [elapsed]: text`` (above the bar once it is shown)."""
        if not self.enabled:
            return
        line = f"{self.label} [{time.perf_counter() - self.started:4.0f} s]: {text}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def start(self, total: int, done: int = 0) -> None:
        """Show the bar over ``total`` checks, ``done`` of them already finished (resumed)."""
        self.bar = tqdm(
            total=total, initial=done, desc=self.label, unit="check", disable=not self.enabled
        )

    def doing(self, text: str) -> None:
        """Name the check in progress on the bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
