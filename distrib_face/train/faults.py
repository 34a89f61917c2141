"""Test-only fault injection, read from the environment: never part of the product config.

The fault-injection tests set ``DISTRIB_FACE_TEST_FAULTS`` to a JSON object before a training process
starts (spawned ranks and Ray workers inherit it)::

    DISTRIB_FACE_TEST_FAULTS='{"nan_micro_steps": [2, 3]}'

Keys:

- ``nan_micro_steps``: make the loss NaN at these micro-steps (0-based count of batches drawn by this
  process's run, resumes included), as a diverging run would.
- ``nan_weights_at_step``: after this optimiser step, write NaN into one class-shard row on rank
  ``nan_rank`` (default 0), once per process: every later loss is NaN (a divergence the loss shows).
- ``nan_buffer_at_step``: the same for the backbone's first floating buffer (a BatchNorm running mean):
  training losses stay finite, only the state is poisoned (a divergence only the checkpoint check sees).
- ``exit_at_step``: right after this optimiser step (and its checkpoint, if one is due), the process kills
  itself with SIGKILL (``exit_code`` 137, the default) or leaves with ``os._exit(exit_code)``.
- ``exit_in_checkpoint_at_step``: the same in the middle of writing this step's checkpoint, after every
  part is written and before the folder is published.

Unset (the normal case) everything is off and costs one dictionary lookup per step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ENV_VAR = "DISTRIB_FACE_TEST_FAULTS"


@dataclass(frozen=True)
class InjectedFaults:
    """The faults to inject (all off by default)."""

    nan_micro_steps: frozenset[int] = field(default_factory=frozenset)
    nan_weights_at_step: int | None = None
    nan_buffer_at_step: int | None = None
    nan_rank: int = 0
    exit_at_step: int | None = None
    exit_in_checkpoint_at_step: int | None = None
    exit_code: int = 137

    @classmethod
    def from_env(cls) -> "InjectedFaults":
        """Parse :data:`ENV_VAR` (unset or empty: no faults)."""
        raw = os.environ.get(ENV_VAR, "").strip()
        if not raw:
            return cls()
        try:
            spec = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{ENV_VAR} is not JSON: {err}") from err
        known = {"nan_micro_steps", "nan_weights_at_step", "nan_buffer_at_step", "nan_rank", "exit_at_step",
                 "exit_in_checkpoint_at_step", "exit_code"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        logger.warning("test fault injection is on (%s=%s)", ENV_VAR, raw)
        return cls(
            nan_micro_steps=frozenset(int(s) for s in spec.get("nan_micro_steps", ())),
            nan_weights_at_step=spec.get("nan_weights_at_step"),
            nan_buffer_at_step=spec.get("nan_buffer_at_step"),
            nan_rank=int(spec.get("nan_rank", 0)),
            exit_at_step=spec.get("exit_at_step"),
            exit_in_checkpoint_at_step=spec.get("exit_in_checkpoint_at_step"),
            exit_code=int(spec.get("exit_code", 137)),
        )

    def maybe_exit(self, step: int, in_checkpoint: bool = False) -> None:
        """Leave the process abruptly when an exit is due at ``step``."""
        due = self.exit_in_checkpoint_at_step if in_checkpoint else self.exit_at_step
        if due is not None and step == due:
            logger.warning("test fault: exiting at step %d%s", step, " inside the checkpoint write" if in_checkpoint else "")
            logging.shutdown()
            if self.exit_code == 128 + signal.SIGKILL:
                os.kill(os.getpid(), signal.SIGKILL)  # what kill -9 does: no handler, no clean-up runs
            os._exit(self.exit_code)
