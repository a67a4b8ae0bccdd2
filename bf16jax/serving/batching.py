"""Continuous batching (JetStream's scheme): a host loop admits requests into free decode slots
between decode steps.

`ContinuousBatcher(runner, slots)` keeps a KV cache of `slots` rows on the device and one
thread that loops: admit waiting requests (`prefill_<L>` in the smallest prompt-length bucket
holding the prompt, then `insert` into a free slot), then one `step` program over every slot.
A request that finishes or is cancelled frees its slot at once, so a short request never waits
for a long one to end. Invariants:

- fixed shapes: each prefill bucket at batch 1, `insert`, and `step` at batch `slots` compile
  once (`warm`); free slots compute garbage that is never read;
- each decode step runs the smallest context bucket `step_<L>` (the artifact's
  "step_buckets") with L > every active slot's fed position, else `step` (the whole cache):
  attention reads L positions, and the tokens are the same as `step`'s; when every active
  slot has room for k more tokens (k: "multi_step") it runs `step_<L>x<k>`, k steps in one
  call, so a slot that ends early by EOS or a stop string idles for at most k - 1 steps;
- a request's tokens are the `generate` program's for the same settings and seed: token i is
  sampled with fold_in(key(seed), i) from the same logits (`inference.Programs.step`);
- stopping is `sampling.decode_loop`'s (EOS, token-id stop sequence, max_tokens, context) and
  so are the finish reasons; with token-id stops the last (longest - 1) tokens are held back
  until they cannot start a match; stop strings are matched on the text
  (`text.TextStream`), which holds back only text that could start one;
- events reach the request's asyncio queue in order: ("token", id, logprob, top, text) ...
  then ("done", finish_reason, text, kept) or ("error", exception): `text` is the completion
  text released with that event, `kept` the tokens of the returned text; a turn's events go to
  each event loop in one call (one wake-up per turn, not one per token);
- requests admitted in the same turn whose prompts fall in the same bucket are prefilled in
  one call (batches of up to PREFILL_BATCH rows, padded to a power of two with copies), then
  inserted row by row; the cache is donated to `insert` and `step` (updated in place).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from bf16jax.serving.artifact import step_programs
from bf16jax.serving.text import TextStream

__all__ = ["GenRequest", "ContinuousBatcher", "PREFILL_BATCH"]

log = logging.getLogger(__name__)
PREFILL_BATCH = 4  # most prompts per prefill call (batch sizes 1, 2, 4 compile per bucket)


@dataclasses.dataclass(eq=False)
class GenRequest:
    """One generation request (validated token ids and settings) and its progress."""

    prompt_ids: np.ndarray
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: list = dataclasses.field(default_factory=list)
    stop: list = dataclasses.field(default_factory=list)  # stop strings (matched on the text)
    seed: int = 0
    # progress (the host loop's)
    queue: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    finished: bool = False
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    last_token: float | None = None
    start: int = 0
    count: int = 0
    kept: list = dataclasses.field(default_factory=list)  # (id, logprob, top) not yet sent
    text: TextStream | None = None

    def cancel(self) -> None:
        """Frees the request's slot (or its queue place) at the host loop's next turn."""
        self.cancelled = True


class ContinuousBatcher:
    """See the module docstring. `observe(metric, seconds)` receives "queue", "ttft", "itl"
    and "e2e" observations; `gauges(running, waiting, stepped)` the slot use after each turn
    (stepped: the rows of its decode step, 0 without one); `context_buckets=False` runs every
    step over the whole cache, `multi_step=False` one step per call."""

    def __init__(self, runner, slots: int, *, observe: Callable[[str, float], None] | None = None,
                 gauges: Callable[[int, int], None] | None = None,
                 context_buckets: bool = True, multi_step: bool = True):  # fmt: skip
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1.")
        self.runner, self.slots = runner, slots
        lim = runner.limits
        self.buckets = list(lim["prefill_buckets"])
        self.step_buckets = list(lim.get("step_buckets", ())) if context_buckets else []
        self.multi = lim.get("multi_step", 1) if multi_step else 1
        self.cache_len = lim["cache_len"]
        self.t5 = runner.family == "t5"
        self.eos = runner.tokenizer.get("eos_id")
        self._observe = observe or (lambda *_: None)
        self._gauges = gauges or (lambda *_: None)
        self._slot: list[GenRequest | None] = [None] * slots
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._cache = None
        self._host = {k: np.zeros(slots, d) for k, d in (
            ("token", np.int32), ("index", np.int32), ("count", np.int32), ("seed", np.uint32),
            ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32))}  # fmt: skip
        self._host["top_p"][:] = 1.0
        self._thread: threading.Thread | None = None
        self._axes = None  # per cache leaf, its batch axis (set by `warm`)
        self._events: list[tuple[GenRequest, tuple]] = []  # this turn's, sent at its end

    # ----------------------------------------------------------------- lifecycle
    def warm(self) -> None:
        """Builds the slot cache and compiles every prefill bucket (at each prefill batch
        size), insert and step."""
        s = self.slots
        zeros = [np.zeros(s, d) for d in (np.uint32, np.float32, np.int32)]
        first = self.runner.call(f"prefill_{self.buckets[0]}",
                                 np.zeros((s, self.buckets[0]), np.int32),
                                 np.ones(s, np.int32), *zeros, np.ones(s, np.float32))  # fmt: skip
        cache = first["cache"]
        sizes = [n for n in (1, 2, 4, 8) if n <= min(s, PREFILL_BATCH)]
        dummy = GenRequest(np.ones(1, np.int32), 1)
        for length in self.buckets:
            for n in sizes:
                rows = self._prefill([np.ones(1, np.int32)] * n, length, [dummy] * n)
            if self._axes is None:  # the batch axis of each cache leaf (1 for scanned layers)
                one = self._prefill([np.ones(1, np.int32)], length, [dummy])["cache"]
                self._axes = jax.tree.map(_batch_axis, cache, one) if s > 1 else None
            row = self._row(rows["cache"], 0) if len(sizes) > 1 else rows["cache"]
            cache = self.runner.call("insert", cache, row, np.int32(0))
        h = self._host
        for name in ["step", *step_programs(self.step_buckets, self.multi, self.cache_len)]:
            out = self.runner.call(name, cache, h["token"], h["index"], h["count"], h["seed"],
                                   h["temperature"], h["top_k"], h["top_p"])  # fmt: skip
            np.asarray(out["token"])
            cache = out["cache"]
        self._cache = cache

    def start(self) -> None:
        if self._cache is None:
            self.warm()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._slot)

    def submit(self, request: GenRequest) -> None:
        """Queues `request` (its `queue` and `loop` set by the caller's event loop)."""
        request.text = TextStream(self.runner.decode, request.stop)
        with self._cv:
            self._waiting.append(request)
            self._cv.notify()

    # ----------------------------------------------------------------- the host loop
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self.running:
                    self._cv.wait()
                if self._stopping:
                    break
                admit = []
                free = [i for i, r in enumerate(self._slot) if r is None]
                while self._waiting and len(admit) < len(free):
                    request = self._waiting.popleft()
                    if request.cancelled:
                        self._finish(request, "cancelled")
                    else:
                        admit.append(request)
            stepped = 0
            try:
                self._admit(list(zip(free, admit, strict=False)))
                for slot, request in enumerate(self._slot):
                    if request is not None and request.cancelled:
                        self._release(slot, "cancelled")
                stepped = self.running
                if stepped:
                    self._step()
            except Exception as e:  # a failed program call fails its requests, not the loop
                log.exception("Continuous batching step failed.")
                for slot, request in enumerate(self._slot):
                    if request is not None:
                        self._slot[slot] = None
                        self._emit(request, ("error", e))
                        request.finished = True
                for request in admit:
                    if not request.finished and request not in self._slot:
                        self._emit(request, ("error", e))
                        request.finished = True
                if self._cache is not None and any(
                    x.is_deleted() for x in jax.tree.leaves(self._cache)
                ):  # donated to the call that failed: build it again
                    self.warm()
            self._deliver()
            self._gauges(self.running, self.waiting, stepped)

    def _prefill(self, prompts: list, length: int, rs: list[GenRequest]) -> dict:
        """One `prefill_<length>` call on `prompts` (a power-of-two batch)."""
        n = len(prompts)
        batch = np.zeros((n, length), np.int32)
        for i, ids in enumerate(prompts):
            batch[i, : ids.size] = ids
        return self.runner.call(
            f"prefill_{length}", batch, np.asarray([p.size for p in prompts], np.int32),
            np.asarray([r.seed for r in rs], np.uint32),
            np.asarray([r.temperature for r in rs], np.float32),
            np.asarray([r.top_k for r in rs], np.int32),
            np.asarray([r.top_p for r in rs], np.float32),
        )  # fmt: skip

    def _row(self, cache, i: int):
        """Row i of a batched prefill's cache, as a batch-1 cache for `insert`."""
        return jax.tree.map(lambda x, axis: x[(slice(None),) * axis + (slice(i, i + 1),)],
                            cache, self._axes)  # fmt: skip

    def _admit(self, pairs: list[tuple[int, GenRequest]]) -> None:
        """Prefills `pairs` (slot, request), grouped by prompt bucket, and inserts them."""
        groups: dict[int, list] = {}
        for slot, r in pairs:
            ids = np.asarray(r.prompt_ids, np.int32)
            if self.t5:
                ids = np.append(ids, np.int32(self.eos))  # the encoder input ends with EOS
            length = next((b for b in self.buckets if b >= ids.size), None)
            if length is None:
                raise ValueError(f"prompt of {ids.size} tokens exceeds {self.buckets[-1]}.")
            groups.setdefault(length, []).append((slot, r, ids))
        most = min(self.slots, PREFILL_BATCH) if self._axes is not None else 1
        for length, group in groups.items():
            while group:
                part, group = group[:most], group[most:]
                n = 1 << (len(part) - 1).bit_length()  # padded with copies of the first
                rows = part + [part[0]] * (n - len(part))
                now = time.perf_counter()
                for _, r, _ in part:
                    r.admitted = now
                    self._observe("queue", now - r.arrived)
                out = self._prefill([ids for _, _, ids in rows], length, [r for _, r, _ in rows])
                token, logprob, top_ids, top_lp, start = (np.asarray(out[k]) for k in (
                    "token", "logprob", "top_ids", "top_logprobs", "start"))  # fmt: skip
                for i, (slot, r, _) in enumerate(part):
                    row = self._row(out["cache"], i) if n > 1 else out["cache"]
                    self._cache = self.runner.call("insert", self._cache, row, np.int32(slot))
                    self._slot[slot] = r
                    r.start = int(start[i])
                    h = self._host
                    h["seed"][slot], h["temperature"][slot] = r.seed, r.temperature
                    h["top_k"][slot], h["top_p"][slot] = r.top_k, r.top_p
                    self._accept(slot, token[i], logprob[i], top_ids[i], top_lp[i])

    def _step(self) -> None:
        """One decode step, or `multi` steps in one call when every active slot has room for
        them (no slot can reach max_tokens or the context inside them)."""
        h, k = self._host, self.multi
        rows = [(i, r) for i, r in enumerate(self._slot) if r is not None]
        need = 1 + max(int(h["index"][i]) for i, _ in rows)
        if (
            k > 1
            and all(r.max_tokens - r.count >= k for _, r in rows)
            and (need + k - 1 <= self.cache_len)
        ):
            length = next((b for b in self.step_buckets if b >= need + k - 1), self.cache_len)
            name = f"step_{length}x{k}"
        else:
            k = 1
            name = next((f"step_{b}" for b in self.step_buckets if b >= need), "step")
        out = self.runner.call(name, self._cache, h["token"], h["index"], h["count"],
                               h["seed"], h["temperature"], h["top_k"], h["top_p"])  # fmt: skip
        self._cache = out["cache"]
        token, logprob, top_ids, top_lp = (np.asarray(out[key]).reshape(k, self.slots, -1)
                                           for key in ("token", "logprob", "top_ids",
                                                       "top_logprobs"))  # fmt: skip
        for j in range(k):  # a slot released at step j ignores its later tokens
            for slot, r in enumerate(self._slot):
                if r is not None:
                    self._accept(slot, token[j, slot, 0], logprob[j, slot, 0], top_ids[j, slot],
                                 top_lp[j, slot])  # fmt: skip

    def _accept(self, slot: int, token, logprob, top_ids, top_lp) -> None:
        """Token number r.count of the request in `slot`: stop checks, then send what is safe."""
        r, now = self._slot[slot], time.perf_counter()
        self._observe("ttft" if r.count == 0 else "itl", now - (r.last_token or r.arrived))
        r.last_token = now
        i, token = r.count, int(token)
        r.count += 1
        reason = None
        if token == self.eos:
            reason = "eos"
        else:
            top = list(zip(top_ids.tolist(), top_lp.tolist(), strict=True))
            r.kept.append((token, float(logprob), top))
            matched = self._stop_match(r)
            if matched:
                del r.kept[len(r.kept) - matched :]
                reason = "stop"
            elif r.count >= r.max_tokens:
                reason = "length"
            elif r.start + i >= self.cache_len:
                reason = "context"  # token i cannot be fed: no position left
        hold = 0 if reason else max((len(s) for s in r.stop_ids), default=1) - 1
        ready, r.kept = r.kept[: max(len(r.kept) - hold, 0)], r.kept[max(len(r.kept) - hold, 0) :]
        for item in ready:
            piece, stopped = r.text.add(item[0])
            self._emit(r, ("token", *item, piece))
            if stopped:
                reason = "stop"
                break
        if reason:
            self._release(slot, reason)
            return
        h = self._host
        h["token"][slot], h["index"][slot], h["count"][slot] = token, r.start + i, r.count

    @staticmethod
    def _stop_match(r: GenRequest) -> int:
        """Length of a stop sequence the generated tokens end with (0: none)."""
        tail = [t for t, _, _ in r.kept[-16:]]
        best = 0
        for stop in r.stop_ids:
            n = len(stop)
            if 0 < n <= len(tail) and tail[-n:] == [int(x) for x in stop]:
                best = max(best, n)
        return best

    def _release(self, slot: int, reason: str) -> None:
        r = self._slot[slot]
        self._slot[slot] = None
        h = self._host
        for key in ("token", "index", "count"):
            h[key][slot] = 0
        self._finish(r, reason)

    def _finish(self, r: GenRequest, reason: str) -> None:
        r.finished = True
        self._observe("e2e", time.perf_counter() - r.arrived)
        text = r.text.finish() if r.text is not None else ""
        self._emit(r, ("done", reason, text, r.text.kept if r.text is not None else 0))

    def _emit(self, r: GenRequest, event: tuple[Any, ...]) -> None:
        self._events.append((r, event))

    def _deliver(self) -> None:
        """Sends this turn's events: one call per event loop (each call wakes it up)."""
        events, self._events = self._events, []
        by_loop: dict[Any, list] = {}
        for r, event in events:
            if r.loop is not None:
                by_loop.setdefault(r.loop, []).append((r.queue, event))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def _batch_axis(a, b) -> int:
    """The axis where a slots-batch cache leaf `a` and a batch-1 leaf `b` differ."""
    return next(i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y)
