"""Preemption: SIGTERM/SIGINT turn into a flag the fit loop checks after each step (in a
multi-process run, at a step every process agrees on, through jax's preemption sync manager)."""

import os
import signal
import threading
from typing import Optional, Sequence

import jax
from jax.experimental import multihost_utils


def _jax_preemption_sync_manager():
  """jax's preemption sync manager in a multi-process run with jax.distributed up, else None.

  Its C++ notifier owns SIGTERM then; a Python SIGTERM handler would silently replace it.
  """
  if jax.process_count() == 1:
    return None
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(jax_distributed.global_state, "preemption_sync_manager", None)


class PreemptionHandler:
  """Turns SIGTERM/SIGINT into a flag the training loop polls; the handler only records the signal.

  Single process: Python handlers for both signals. Multi-process with jax.distributed: jax's
  notifier keeps SIGTERM, SIGINT is forwarded to it, and `preempted(step)` is jax's preemption sync
  point, so every process answers True at the same step (all must call it every step). A second
  SIGINT while the first is pending falls through to the previous handler (Ctrl-C twice interrupts).
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self.received: Optional[int] = None  # the first signal number seen
    self._previous: dict = {}
    self._forwarded = False
    self._sync_manager = None

  def install(self) -> "PreemptionHandler":
    """Installs the handlers; must run on the main thread (a Python signal rule)."""
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("install_preemption_handler: signal handlers can only be installed from "
                         "the main thread")
    self._sync_manager = _jax_preemption_sync_manager()
    for sig in self.signals:
      if sig == signal.SIGTERM and self._sync_manager is not None:
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    if self.received is not None and signum == signal.SIGINT:  # impatient second Ctrl-C
      previous = self._previous.get(signum)
      if callable(previous):
        previous(signum, frame)
      elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt
      return
    self.received = signum

  def preempted(self, step: Optional[int] = None) -> bool:
    """True once a preemption signal arrived (multi-process: at the agreed step; pass `step`)."""
    if jax.process_count() == 1:
      return self.received is not None
    if step is None:
      raise ValueError("preempted(): multi-process runs must pass the current step on every "
                       "process")
    if self._sync_manager is None:
      # No jax sync manager: agree with a small collective (a host sync on every call).
      return _any_process(self.received is not None)
    if self.received is not None and not self._forwarded:
      self._forwarded = True
      os.kill(os.getpid(), signal.SIGTERM)  # hand SIGINT to jax's notifier (runs the agreement)
    return multihost_utils.reached_preemption_sync_point(int(step))

  def uninstall(self) -> None:
    """Restores the handlers that were installed before."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}


def install_preemption_handler(
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> PreemptionHandler:
  """Installs and returns a `PreemptionHandler` for `signals` (call from the main thread)."""
  return PreemptionHandler(signals).install()
