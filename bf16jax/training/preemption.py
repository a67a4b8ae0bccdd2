"""Stopping cleanly on SIGTERM / SIGINT: finish the step, save, exit with a distinct code.

`StopRequest` is a context manager around the training loop. SIGTERM and SIGINT (Ctrl-C, a
notebook's interrupt) set a flag; the loop asks `requested(tick)` after every step, then saves that
step, waits for the save to commit and returns `preempted`; `bf16jax.main` exits with
`PREEMPTED_EXIT` (75, EX_TEMPFAIL of sysexits.h: "temporary failure, retry"), never 0, which
schedulers would read as success. A second SIGINT gives up at once (KeyboardInterrupt). A grace
timer (`train.preemption_grace_s`, from the first signal) exits with the same code if the save has
not committed in time: the newest committed checkpoint is then the resume point.

Multi-host (`jax.distributed`), a signal reaches one host, or several at different steps, yet
every process must stop after the same step (the save is a collective). `StopAgreement` decides
it over JAX's coordination service, in the main thread, every `train.preemption_check_every`
ticks: a signalled process writes the key `<prefix>/<tick>`, every process waits at one
(reusable) barrier, then reads that key. Keys of tick k are written only before barrier round k
and read only after it, so every process reads the same answer at every tick, whatever the hosts'
relative speed: all stop after the same tick, none can pass it undecided. (JAX's own sync point,
`multihost_utils.reached_preemption_sync_point`, is right when one thread calls it with
consecutive steps, but it keeps one counter per process that Orbax also sets, from
`CheckpointManager.save` with the step and from its async finalize thread with the saved step.
Measured, 2 CPU processes, process 0 ahead: with a second caller setting the counter back by one
step, 1 of 3 runs disagreed (process 1 stopped at 309, process 0 never); 0 of 3 without.)
Under jax.distributed, JAX's notifier owns SIGTERM outside the loop (a SIGTERM it caught before
the loop is honoured at the first check); after the loop SIGTERM gets the default action.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from typing import Any

import jax

__all__ = ["PREEMPTED_EXIT", "StopAgreement", "StopRequest"]

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved and stopped on a signal; rerun the command to resume
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A barrier waits for the slowest process; they all do the same work between two checks, so this
# only fires for a host that is gone or hung (the coordination service usually reports a dead one
# sooner, as an error).
BARRIER_TIMEOUT_S = 30 * 60
# Where JAX's preemption notifier (on by default under jax.distributed) records a SIGTERM it caught
# before our handler was installed (xla/tsl/.../preemption_sync_manager.cc, kPreemptionNoticeKey).
_JAX_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
# One prefix per StopAgreement: every process creates them in the same order.
_GENERATIONS = itertools.count()


class StopAgreement:
    """Every `every` ticks, agrees across processes whether any of them was signalled.

    Correct by construction: `decide(k, flag)` is called with the same ticks, in the same order,
    on every process (the loop is the same program). A process writes `<prefix>/<k>` (if
    signalled) before it enters barrier round k and reads it after leaving round k; no process can
    write it after round k (it writes only at tick k, before the barrier). So every process reads
    the same value at tick k. A process that has not reached tick k keeps the others waiting at the
    barrier, never past it. Deadlock-free: a process blocks only after dispatching its step k, so
    every collective up to step k can complete and every process reaches the barrier of tick k.
    The barrier id is reused (jax 0.10's coordination service counts rounds per process: a
    repeated id waits for every process again, measured). Keys are written only when signalled.

    Cost per check, i.e. per step at `every=1` (experiments/stop_agreement_cost.py, CPU
    processes on one 2-core machine at load 8): 0.87 ms of host time with 2 processes, 2.4 ms
    with 4 (more processes than cores). No device sync: the step already dispatched keeps
    running, and the next batch was fetched before the check.
    """

    def __init__(self, client: Any, process_index: int, every: int = 1):
        """Args:
        client: JAX's coordination-service client (`jax._src.distributed.global_state.client`).
        process_index: this process's index.
        every: check at ticks that are multiples of this.
        """
        if every < 1:
            raise ValueError(f"preemption_check_every={every} must be >= 1.")
        self.client, self.process_index, self.every = client, process_index, every
        self.prefix = f"bf16jax/stop/{next(_GENERATIONS)}"
        self.checks = 0

    def decide(self, tick: int, signal_name: str | None) -> str | None:
        """At every tick on every process: None to go on, or who was signalled ("process 1:
        SIGINT"), the same on every process, to stop after this tick."""
        if tick % self.every:
            return None
        self.checks += 1
        key = f"{self.prefix}/{tick}"
        if signal_name is not None:
            who = f"process {self.process_index}: {signal_name}"
            self.client.key_value_set(key, who, allow_overwrite=True)
        self.client.wait_at_barrier(f"{self.prefix}/barrier", BARRIER_TIMEOUT_S * 1000)
        return _try_get(self.client, key)


def _try_get(client: Any, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:  # noqa: BLE001 - JaxRuntimeError; only NOT_FOUND means "absent"
        if "NOT_FOUND" in str(e):
            return None
        raise


def _coordination_client() -> Any:
    from jax._src import distributed

    return distributed.global_state.client


class StopRequest:
    """Turns SIGTERM / SIGINT into a request the training loop honours at a step boundary."""

    def __init__(self, grace_s: float = 25.0, *, check_every: int = 1, on_expire=None):
        """Args:
        grace_s: seconds from the first signal to a forced exit (<= 0: no timer).
        check_every: multi-host: agree on a stop every this many ticks (see StopAgreement).
        on_expire: called (in the timer thread) before the forced exit; for a last message.
        """
        self.grace_s = float(grace_s)
        self.check_every = int(check_every)
        self.signal: str | None = None  # the first signal's name, once one arrived
        self.received_at: float | None = None
        self.agreement: StopAgreement | None = None
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        self._on_expire = on_expire

    def __enter__(self) -> StopRequest:
        if jax.process_count() > 1:
            client = _coordination_client()
            if client is None:
                log.warning(
                    "%d processes but no jax.distributed coordination service: the hosts "
                    "cannot agree on a step to stop at, so SIGTERM/SIGINT keep their default "
                    "handlers.",
                    jax.process_count(),
                )
                return self
            # Even a process that cannot take signals takes part: another host may be signalled.
            self.agreement = StopAgreement(client, jax.process_index(), self.check_every)
        if threading.current_thread() is not threading.main_thread():
            log.info("Not on the main thread: SIGTERM/SIGINT keep their default handlers.")
            return self
        if self.agreement is not None:
            # JAX's notifier owned SIGTERM until now: one it caught before the loop is honoured.
            notice = _try_get(self.agreement.client, _JAX_NOTICE_KEY)
            if notice is not None:
                log.warning("A host got SIGTERM before training started (%s).", notice)
                self._note("SIGTERM")
        # Python's handler replaces JAX's C-level SIGTERM notifier while the loop runs; Python
        # does not know that one, so __exit__ restores what Python knew (the default).
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
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
        self._note(name)

    def _note(self, name: str) -> None:
        self.signal, self.received_at = name, time.monotonic()
        log.warning(
            "%s received: finishing the current step, saving it, then exiting (grace %.0f s).",
            name,
            self.grace_s,
        )
        self._start_timer()

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

    def requested(self, tick: int) -> bool:
        """Whether to stop after this loop iteration. Call it at every tick (a counter of loop
        iterations, the same on every process) on every process.

        One process: True once a signal arrived. Multi-host: True on every process at the same
        tick, the first checked tick at which any process had been signalled.
        """
        if self.agreement is None:
            return self.signal is not None
        who = self.agreement.decide(tick, self.signal)
        if who is None:
            return False
        if self.signal is None:  # the signal reached another host
            log.warning("Stopping: %s.", who)
            self.signal, self.received_at = f"{who} (on another host)", time.monotonic()
            self._start_timer()
        return True
