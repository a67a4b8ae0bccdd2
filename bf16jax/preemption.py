"""Stopping cleanly on SIGTERM / SIGINT: finish the step, save, exit with a distinct code.

`StopRequest` is a context manager around the training loop. One process: SIGTERM and SIGINT
(Ctrl-C, a notebook's interrupt) set a flag; the loop asks `requested(step)` after every step,
then saves that step, waits for the save to commit and returns `preempted`; `bf16jax.main` exits
with `PREEMPTED_EXIT` (75, EX_TEMPFAIL of sysexits.h: "temporary failure, retry"), never 0,
which schedulers would read as success. A second SIGINT gives up at once (KeyboardInterrupt).
Multi-host (`jax.distributed`): JAX's preemption service catches SIGTERM on any host and the
hosts agree on one step to stop at (`multihost_utils.reached_preemption_sync_point`, called at
every step by every process); SIGINT is forwarded to it as a SIGTERM so it is agreed the same
way. A grace timer (`train.preemption_grace_s`, from the first signal) exits with the same code
if the save has not committed in time: the newest committed checkpoint is then the resume point.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import jax

__all__ = ["PREEMPTED_EXIT", "StopRequest"]

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved and stopped on a signal; rerun the command to resume
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _preemption_service() -> bool:
    """True under jax.distributed with JAX's preemption sync manager (it owns SIGTERM)."""
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class StopRequest:
    """Turns SIGTERM / SIGINT into a request the training loop honours at a step boundary."""

    def __init__(self, grace_s: float = 25.0, *, on_expire=None):
        """Args:
        grace_s: seconds from the first signal to a forced exit (<= 0: no timer).
        on_expire: called (in the timer thread) before the forced exit; for a last message.
        """
        self.grace_s = float(grace_s)
        self.signal: str | None = None  # the first signal's name, once one arrived
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        self._on_expire = on_expire
        self._distributed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            log.info("Not on the main thread: SIGTERM/SIGINT keep their default handlers.")
            return self
        self._distributed = jax.process_count() > 1
        if self._distributed and not _preemption_service():
            log.warning(
                "jax_enable_preemption_service is off: hosts cannot agree on a step to "
                "stop at, so SIGTERM/SIGINT keep their default handlers."
            )
            return self
        for sig in _SIGNALS:
            if sig == signal.SIGTERM and self._distributed:
                continue  # JAX's preemption notifier owns it
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second {name}: stopping without saving")
            return
        self.signal, self.received_at = name, time.monotonic()
        log.warning(
            "%s received: finishing the current step, saving it, then exiting (grace %.0f s).",
            name,
            self.grace_s,
        )
        self._start_timer()
        if self._distributed and signum == signal.SIGINT:
            signal.raise_signal(signal.SIGTERM)  # JAX's notifier tells every host

    def _start_timer(self) -> None:
        if self.grace_s <= 0 or self._timer is not None:
            return
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        log.error(
            "The %.0f s grace period after %s ran out before the checkpoint committed: exiting "
            "with code %d; the run resumes from the newest committed checkpoint.",
            self.grace_s,
            self.signal,
            PREEMPTED_EXIT,
        )
        if self._on_expire is not None:
            self._on_expire()
        logging.shutdown()
        os._exit(PREEMPTED_EXIT)

    def requested(self, step: int, checkpointer=None) -> bool:
        """Whether to stop after `step`. Call it at every step on every process.

        Multi-host: True on every process at the same step once any host got SIGTERM (or
        SIGINT); `checkpointer.reached_preemption` asks JAX's preemption service.
        """
        if jax.process_count() > 1 and checkpointer is not None:
            agreed = checkpointer.reached_preemption(step)
            if agreed and self.signal is None:  # the notice came from another host
                self.signal, self.received_at = "SIGTERM", time.monotonic()
                self._start_timer()
            return agreed
        if self.signal is not None and self.received_at is not None:
            return True
        return False
