"""Progress output of rank 0: a tqdm bar in a terminal, otherwise periodic log lines."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any, Mapping

logger = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` for a non-negative number of seconds (``?`` when unknown)."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Reports training progress on rank 0.

    In a terminal (stderr is a TTY) a tqdm bar advances every step and shows the latest metrics;
    otherwise one log line per ``log_every`` steps: step, loss, lr, img/s and ETA.

    Args:
        total_steps: optimiser steps of the whole run.
        start_step: the step this process starts at (after a resume).
        enabled: False on every rank but 0.
        use_bar: force the bar on / off (default: whether stderr is a TTY).
    """

    def __init__(self, total_steps: int, start_step: int, enabled: bool, use_bar: bool | None = None) -> None:
        self.total_steps, self.enabled = total_steps, enabled
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.bar = None
        if enabled and (sys.stderr.isatty() if use_bar is None else use_bar):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def eta(self, step: int) -> float:
        """Seconds left at the average speed of this process so far."""
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.start_time) / done * (self.total_steps - step)

    def step(self, step: int, metrics: Mapping[str, Any] | None, note: str = "") -> None:
        """Record that ``step`` steps are done; ``metrics`` (loss, lr, images_per_sec) on logging steps, else None.

        ``note`` (e.g. what the readers skipped so far) is appended to the line when it is not empty.
        """
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics:
                # "img/s", the unit the log lines and docs/tracking.md use (not a keyword name like img_s).
                postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                           "img/s": f"{metrics['images_per_sec']:.0f}"}
                if note:
                    postfix["data"] = note
                self.bar.set_postfix(postfix, refresh=False)
        elif metrics:
            logger.info(
                "step %d/%d | loss %.4f | lr %.3e | %.1f img/s | ETA %s%s",
                step, self.total_steps, metrics["loss"], metrics["lr"], metrics["images_per_sec"],
                format_eta(self.eta(step)), f" | {note}" if note else "",
            )

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            logger.info("%s", text)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
