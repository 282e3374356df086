"""Stopping a run between steps without losing them.

A scheduler sends SIGTERM before it takes the machine away (a preempted TPU VM or spot GPU, SLURM's
time limit, Kubernetes' eviction), and a user presses Ctrl-C. Inside the training loop either one
asks the run to stop after the step it is in: it logs the steps since its last metrics line, saves a
checkpoint at that step and raises `Stopped`, and the same command resumes from there. A second
Ctrl-C interrupts at once (KeyboardInterrupt), for a step that hangs.

On several processes the signal reaches each process at its own moment, so they must agree
on the step they save at. `jax.distributed.initialize` starts JAX's preemption service,
which watches for SIGTERM itself and propagates it to every process;
`multihost_utils.reached_preemption_sync_point` answers True on every process at the same
step. There this module installs no handler of its own (Ctrl-C keeps its default).

Stops are checked where a rollout begins (every `train.updates_per_rollout` steps), as
checkpoints are, so a resumed run never starts in the middle of a reused rollout. JAX names
the agreed step by a count of these checks, which must grow on every process alike across
all the runs of a process (the stages of an experiment), so the count is this module's: a
notice that arrives at the last step of a stage stops the next stage at its first check.

A resumed run continues bitwise as the uninterrupted one would have, except with
`train.rollout_ahead`: the rollout sampled ahead for the step after the stop is not saved,
so the resumed run samples it on-policy from the saved parameters, one update fresher
(regular checkpoints sample no rollout ahead, so resuming from them is exact).
"""

from __future__ import annotations

import itertools
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

_checks = itertools.count()  # every process counts its loops' checks alike


class Stopped(Exception):
  """The run stopped on a signal, after saving its checkpoint at `step`."""

  def __init__(self, signum: int, step: int, directory):
    self.signum, self.step, self.directory = signum, step, directory
    super().__init__(
        f"stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is in "
        f"{directory}; the same command (or call) resumes from it"
    )

  @property
  def exit_code(self) -> int:
    """A shell's code for a process that a signal ended: 128 + the signal's number."""
    return 128 + self.signum


class StopOnSignal:
  """`with StopOnSignal() as stop:` around the loop, `stop.reached()` where it may stop.

  On one process it catches SIGTERM and a first SIGINT (Ctrl-C) while the block runs, and
  restores the previous handlers when it ends, however it ends.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None  # the first signal's number
    self._previous: dict = {}

  def __enter__(self) -> StopOnSignal:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
    self.received = self.received or signum
    print(
        f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
        "(Ctrl-C again to stop at once, without one)",
        file=sys.stderr,
        flush=True,
    )

  def reached(self) -> bool:
    """Whether to stop here; on several processes, whether all of them stop here."""
    check = next(_checks)
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(check)
      except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False
    return self.received is not None
