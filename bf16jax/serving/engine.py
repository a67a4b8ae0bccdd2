"""The serving engine behind `bf16jax.serving.http`: versions, request batching, shadow mode,
metrics.

`Engine` holds the loaded artifacts (the registry's active version, versions asked for by
name, the FP32 reference). Generation runs by continuous batching (`batching.
ContinuousBatcher`: one decode slot per request, tokens streamed as they come) or, with
batching="window" or an artifact without the step programs, in batches of the requests that
arrived within a window, each running its whole decode loop; score / classify requests always
batch by window, on one compute thread. A sample of requests is compared with the FP32
reference afterwards. Invariants:

- a request is bound to a version when it arrives and its batch runs on that version to the
  end: a promote / rollback (the registry's `active` changes) loads and warms the new version
  on a loader thread and then switches new requests over; nothing in flight is dropped;
- a batch is padded to a power of two (at most `max_batch`) so each program compiles for a
  few batch sizes only; padding rows are copies that finish at once;
- shadow comparisons run after the batch has answered (they add no latency to it): the FP32
  reference scores the same tokens teacher-forced and `bf16jax_shadow_agreement` (argmax
  agreement) and `bf16jax_shadow_logprob_drift` (mean |log p_candidate - log p_reference| of
  the actual tokens, nats) record how far the served model has moved — the silent-regression
  monitor;
- `ready` turns true once the active version's programs are compiled and warm;
- metrics live in the engine's own Prometheus registry (several engines per process work);
  the request-level series (TTFT, inter-token latency, end-to-end, queue time, running /
  waiting requests, slot use) carry the version and precision.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import prometheus_client as prom

from bf16jax.serving.artifact import Artifact
from bf16jax.serving.batching import ContinuousBatcher, GenRequest
from bf16jax.serving.registry import Registry
from bf16jax.serving.text import complete

__all__ = ["Engine", "UnknownVersion", "Overloaded", "RequestTimeout", "NotReady", "KINDS",
           "BATCHING"]  # fmt: skip

log = logging.getLogger(__name__)
KINDS = ("generate", "score", "classify")
BATCHING = ("continuous", "window")
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_GEN_FIELDS = ("prompt_ids", "max_tokens", "temperature", "top_k", "top_p", "stop_ids", "stop",
               "seed")  # fmt: skip
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WINDOW = 256  # shadowed requests in the rolling agreement / drift gauges


class UnknownVersion(ValueError):
    """A request named a version the registry does not have."""


class Overloaded(RuntimeError):
    """The queue is full: the client should retry later (HTTP 429)."""


class NotReady(RuntimeError):
    """The programs are still compiling (HTTP 503)."""


class RequestTimeout(RuntimeError):
    """A request ran past the engine's request_timeout_s (HTTP 504)."""


class _Loaded:
    def __init__(self, name: str, artifact: Artifact, batcher: ContinuousBatcher | None = None):
        self.name = name
        self.artifact = artifact
        self.batcher = batcher
        self.precision = artifact.manifest["precision"]


class Engine:
    """See the module docstring. Use `await start()` before serving and `await stop()` after.

    Args:
      registry: a registry directory (serves its active version, follows promote / rollback,
        and its reference is the shadow reference), or None with `artifact`.
      artifact: serve this one artifact (version name "static").
      reference: the FP32 reference artifact for shadow mode (default: the registry's).
      max_batch: largest batch; max_wait_ms: how long a batch waits for more requests.
      shadow_rate: fraction of requests also compared with the reference (0 = off).
      max_queue: requests waiting beyond this get `Overloaded`.
      poll_s: how often the registry's active version is checked.
      warmup: compile each program for every batch bucket when a version loads.
      batching: "continuous" (decode slots, max_batch of them) or "window".
      request_timeout_s: a generate request still running after this fails with 504.
    """

    def __init__(self, *, registry: str | None = None, artifact: str | None = None,
                 reference: str | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
                 shadow_rate: float = 0.0, max_queue: int = 256, poll_s: float = 0.5,
                 warmup: bool = True, seed: int = 0, batching: str = "continuous",
                 request_timeout_s: float = 60.0):  # fmt: skip
        if (registry is None) == (artifact is None):
            raise ValueError("Serve either --registry=DIR or --artifact=DIR (one of them).")
        if not 0.0 <= shadow_rate <= 1.0:
            raise ValueError(f"shadow_rate={shadow_rate} must lie in [0, 1].")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1.")
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r}: use one of {BATCHING}.")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s={request_timeout_s} must be > 0.")
        self.batching, self.request_timeout_s = batching, request_timeout_s
        self.ready = False
        self.registry = Registry(registry) if registry else None
        self._static = artifact
        self._reference_dir = reference or (self.registry.reference_dir if registry else None)
        if shadow_rate > 0 and self._reference_dir is None:
            raise ValueError("Shadow mode needs an FP32 reference: pass --reference=DIR.")
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.shadow_rate, self.max_queue, self.poll_s = shadow_rate, max_queue, poll_s
        self.warmup = warmup
        self._rng = random.Random(seed)
        self.active: _Loaded | None = None
        self.reference: Artifact | None = None
        self._cache: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()
        self._pending: dict[tuple[str, str], list] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._queued = 0
        self._compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loader")
        self._watch: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._agreement = collections.deque(maxlen=_WINDOW)
        self._drift = collections.deque(maxlen=_WINDOW)
        self._warm_task: asyncio.Task | None = None
        self._metrics()

    # ----------------------------------------------------------------- metrics
    def _metrics(self) -> None:
        self.prometheus = r = prom.CollectorRegistry()
        self.m_latency = prom.Histogram("bf16jax_request_seconds", "Request latency.",
                                        ["endpoint", "version"], buckets=_LATENCY_BUCKETS,
                                        registry=r)  # fmt: skip
        self.m_requests = prom.Counter("bf16jax_requests", "Requests by endpoint and status.",
                                       ["endpoint", "status"], registry=r)  # fmt: skip
        self.m_tokens = prom.Counter("bf16jax_generated_tokens", "Generated tokens.",
                                     ["version"], registry=r)  # fmt: skip
        self.m_tps = prom.Gauge("bf16jax_tokens_per_second",
                                "Generated tokens per second of the last generate batch.",
                                registry=r)  # fmt: skip
        self.m_batch = prom.Histogram("bf16jax_batch_size", "Requests per batch.", ["endpoint"],
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)  # fmt: skip
        self.m_queue = prom.Gauge("bf16jax_queue_depth", "Requests waiting.", registry=r)
        self.m_active = prom.Gauge("bf16jax_active_version", "1 for the active version.",
                                   ["version", "precision"], registry=r)  # fmt: skip
        self.m_switches = prom.Counter("bf16jax_version_switches", "Active version changes.",
                                       registry=r)  # fmt: skip
        self.m_load_errors = prom.Counter(
            "bf16jax_version_load_errors", "Versions that failed to load.", registry=r
        )
        self.m_shadow = prom.Counter("bf16jax_shadow_requests", "Requests shadowed.", registry=r)
        self.m_agree = prom.Histogram("bf16jax_shadow_agreement",
                                      "Per shadowed request: argmax agreement with FP32.",
                                      buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0),
                                      registry=r)  # fmt: skip
        self.m_drift = prom.Histogram("bf16jax_shadow_logprob_drift",
                                      "Per shadowed request: mean |log p - log p_fp32| (nats).",
                                      buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3),
                                      registry=r)  # fmt: skip
        self.m_agree_mean = prom.Gauge("bf16jax_shadow_agreement_mean",
                                       f"Mean agreement of the last {_WINDOW} shadowed requests.",
                                       registry=r)  # fmt: skip
        self.m_drift_mean = prom.Gauge("bf16jax_shadow_logprob_drift_mean",
                                       f"Mean drift of the last {_WINDOW} shadowed requests.",
                                       registry=r)  # fmt: skip
        vp = ["version", "precision"]
        self.m_request = {
            name: prom.Histogram(f"bf16jax_{metric}_seconds", doc, vp, buckets=buckets, registry=r)
            for name, metric, doc, buckets in (
                ("ttft", "time_to_first_token", "Arrival to first generated token.",
                 _LATENCY_BUCKETS),
                ("itl", "inter_token_latency", "Between consecutive tokens of a request.",
                 _TOKEN_BUCKETS),
                ("e2e", "e2e_request_latency", "Arrival to the last token.", _LATENCY_BUCKETS),
                ("queue", "queue_time", "Arrival to a decode slot.", _LATENCY_BUCKETS),
            )
        }  # fmt: skip
        self.m_running = prom.Gauge("bf16jax_requests_running", "Requests in decode slots.", vp,
                                    registry=r)  # fmt: skip
        self.m_waiting = prom.Gauge("bf16jax_requests_waiting", "Requests waiting for a slot.",
                                    vp, registry=r)  # fmt: skip
        self.m_step_rows = prom.Histogram("bf16jax_decode_step_rows",
                                          "Requests in each continuous-batching decode step.", vp,
                                          buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)  # fmt: skip
        self.m_slots = prom.Gauge("bf16jax_slot_use", "Fraction of decode slots in use.", vp,
                                  registry=r)  # fmt: skip

    # ----------------------------------------------------------------- versions
    def _load(self, name: str, directory: str, sha: str | None, prepare: bool = True) -> _Loaded:
        art = Artifact(directory, manifest_sha256=sha)
        batcher = None
        if self.batching == "continuous" and "step" in art.programs:
            labels = (name, art.manifest["precision"])
            batcher = ContinuousBatcher(
                art,
                self.max_batch,
                observe=lambda m, s: self.m_request[m].labels(*labels).observe(s),
                gauges=functools.partial(self._slot_gauges, labels),
            )
        loaded = _Loaded(name, art, batcher)
        if prepare:
            self._prepare(loaded)
        return loaded

    def _slot_gauges(self, labels, running: int, waiting: int, stepped: int) -> None:
        if stepped:
            self.m_step_rows.labels(*labels).observe(stepped)
        self.m_running.labels(*labels).set(running)
        self.m_waiting.labels(*labels).set(waiting)
        self.m_slots.labels(*labels).set(running / self.max_batch)

    def _prepare(self, loaded: _Loaded) -> None:
        """Starts the version's batcher (compiling its programs) and warms the rest."""
        if loaded.batcher is not None:
            loaded.batcher.start()
        if self.warmup:
            self._warm(loaded.artifact, generate=loaded.batcher is None)

    async def _prepare_active(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._loader, self._prepare, self.active)
            self.ready = True
        except Exception:
            log.exception("Warming up version %s failed: not ready.", self.active.name)

    def _warm(self, art: Artifact, generate: bool = True) -> None:
        """Compiles the served programs for every batch bucket (first requests stay fast)."""
        for size in self._buckets():
            if art.family == "vit":
                art.classify(np.zeros((size, *art.limits["image_shape"]), np.float32))
                continue
            if generate:
                art.generate(["a"] * size, max_tokens=1)
            if art.family == "gpt":
                art.score(["ab"] * size)
            else:
                art.score(["a"] * size, ["b"] * size)

    def _buckets(self) -> list[int]:
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return [*sizes, self.max_batch]

    def _set_active(self, loaded: _Loaded) -> None:
        previous, self.active = self.active, loaded
        self._cache[loaded.name] = loaded
        self._cache.move_to_end(loaded.name)
        while len(self._cache) > 3:
            _, evicted = self._cache.popitem(last=False)
            if evicted.batcher is not None and not (evicted.batcher.running
                                                    or evicted.batcher.waiting):  # fmt: skip
                evicted.batcher.stop()
        self.m_active.clear()
        self.m_active.labels(loaded.name, loaded.precision).set(1)
        if previous is not None and previous.name != loaded.name:
            self.m_switches.inc()
            log.info("Serving version %s (was %s).", loaded.name, previous.name)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._static:
            active = (self.static_name, self._static, None)
        else:
            active = self.registry.active()
            if active is None:
                raise ValueError(f"Registry {self.registry.directory} has no active version: "
                                 "promote an artifact first.")  # fmt: skip
        # Verify and load now (errors stop the server); compile in the background (/healthz
        # answers 503 until then).
        self._set_active(await loop.run_in_executor(self._loader, self._load, *active, False))
        self._warm_task = asyncio.create_task(self._prepare_active())
        if self.registry is not None:
            self._watch = asyncio.create_task(self._watch_registry())
        if self.shadow_rate > 0:
            self.reference = await loop.run_in_executor(self._loader, Artifact,
                                                        self._reference_dir)  # fmt: skip

    @property
    def static_name(self) -> str:
        """The version name of a served `artifact` (its directory's name)."""
        return os.path.basename(os.path.normpath(self._static)) if self._static else ""

    async def stop(self) -> None:
        if self._warm_task is not None:
            await asyncio.gather(self._warm_task, return_exceptions=True)
        for loaded in self._cache.values():
            if loaded.batcher is not None:
                loaded.batcher.stop()
        if self._watch is not None:
            self._watch.cancel()
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        self._compute.shutdown(wait=True)
        self._loader.shutdown(wait=True)

    async def _watch_registry(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                active = self.registry.active()
                if active is None or active[0] == self.active.name:
                    continue
                loaded = self._cache.get(active[0])
                if loaded is None:
                    loaded = await loop.run_in_executor(self._loader, self._load, *active)
                self._set_active(loaded)
            except Exception:  # keep serving the current version; the next poll retries
                self.m_load_errors.inc()
                log.exception("Could not switch to the registry's active version.")

    def loaded_versions(self) -> list[_Loaded]:
        """The versions in memory (the active one and recently asked-for ones)."""
        return list(self._cache.values())

    async def resolve(self, name: str | None) -> _Loaded:
        """The version a request asked for (None: the active one)."""
        if name is None or name == self.active.name:
            return self.active
        if name in self._cache:
            return self._cache[name]
        if self.registry is None:
            raise UnknownVersion(f"Unknown version {name!r}: this server serves one artifact "
                                 f"(version {self.static_name!r}).")  # fmt: skip
        try:
            directory, sha = self.registry.resolve(name)
        except ValueError as e:
            raise UnknownVersion(str(e)) from None
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(self._loader, self._load, name, directory, sha)
        self._cache[name] = loaded
        return loaded

    # ----------------------------------------------------------------- generation
    async def stream(self, version: _Loaded, request: dict[str, Any]) -> AsyncIterator[tuple]:
        """Events of one generate request: ("token", id, logprob, top, text) ..., ("done",
        reason, text, kept) (see `batching`; the same under window batching). Closing the
        iterator early cancels the request and frees its slot."""
        if not self.ready:
            raise NotReady("the server is compiling its programs: retry shortly.")
        batcher = version.batcher
        if batcher is None:  # window batching: every token comes at the end
            start = time.perf_counter()
            result = await self.submit("generate", version, request)
            for histogram in ("ttft", "e2e"):
                self.m_request[histogram].labels(version.name, version.precision).observe(
                    time.perf_counter() - start)  # fmt: skip
            for token, piece in zip(result["tokens"], result["pieces"], strict=True):
                yield ("token", token, None, None, piece)
            yield ("done", result["finish_reason"], result["tail"], result["kept"])
            return
        if batcher.waiting >= self.max_queue:
            raise Overloaded(f"{batcher.waiting} requests are waiting: retry later.")
        r = GenRequest(queue=asyncio.Queue(), loop=asyncio.get_running_loop(),
                       **{k: request[k] for k in _GEN_FIELDS})  # fmt: skip
        batcher.submit(r)
        tokens = self.m_tokens.labels(version.name)
        try:
            while True:
                event = await r.queue.get()
                if event[0] == "error":
                    raise event[1]
                if event[0] == "token":
                    tokens.inc()
                yield event
                if event[0] == "done":
                    return
        finally:
            if not r.finished:
                r.cancel()

    @contextlib.asynccontextmanager
    async def deadline(self):
        """Fails the block with RequestTimeout after request_timeout_s."""
        try:
            async with asyncio.timeout(self.request_timeout_s):
                yield
        except TimeoutError:
            raise RequestTimeout(
                f"the request ran past the server's {self.request_timeout_s:g} s limit: ask "
                "for fewer tokens or retry."
            ) from None

    async def generate(self, version: _Loaded, request: dict[str, Any]) -> dict[str, Any]:
        """One generate request to the end: {"text", "tokens" (those of the text),
        "logprobs", "top_logprobs" (None under window batching), "finish_reason",
        "completion_tokens" (every token generated, a matched stop string's included)}."""
        out = {"tokens": [], "logprobs": [], "top_logprobs": [], "finish_reason": None}
        pieces = []
        async with self.deadline(), contextlib.aclosing(self.stream(version, request)) as events:
            async for event in events:
                if event[0] == "token":
                    out["tokens"].append(int(event[1]))
                    out["logprobs"].append(event[2])
                    out["top_logprobs"].append(event[3])
                    pieces.append(event[4])
                else:
                    out["finish_reason"] = event[1]
                    pieces.append(event[2])
                    out["completion_tokens"] = len(out["tokens"])
                    for key in ("tokens", "logprobs", "top_logprobs"):
                        del out[key][event[3] :]
        out["text"] = "".join(pieces)
        if (version.batcher is not None and self.reference is not None
                and self._rng.random() < self.shadow_rate):  # fmt: skip
            loop = asyncio.get_running_loop()
            pairs = [(request, out)]
            task = asyncio.ensure_future(
                loop.run_in_executor(
                    self._compute, self._shadow, "generate", version.artifact, pairs
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return out

    # ----------------------------------------------------------------- window batching
    async def submit(self, kind: str, version: _Loaded, request: dict[str, Any]) -> dict:
        """Queues one validated request and waits for its result."""
        if self._queued >= self.max_queue:
            raise Overloaded(f"{self._queued} requests are waiting: retry later.")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = (version.name, kind)
        batch = self._pending.setdefault(key, [])
        batch.append((request, future))
        self._queued += 1
        self.m_queue.set(self._queued)
        if len(batch) >= self.max_batch:
            self._flush(key, version)
        elif key not in self._timers:
            self._timers[key] = loop.call_later(self.max_wait, self._flush, key, version)
        return await future

    def _flush(self, key, version: _Loaded) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        items = self._pending.pop(key, [])
        while items:
            batch, items = items[: self.max_batch], items[self.max_batch :]
            task = asyncio.ensure_future(self._run(key[1], version, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, kind: str, version: _Loaded, batch: list) -> None:
        loop = asyncio.get_running_loop()
        requests = [r for r, _ in batch]
        self.m_batch.labels(kind).observe(len(requests))
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._compute, self._compute_batch, kind,
                                                 version.artifact, requests)  # fmt: skip
        except Exception as e:  # the whole batch failed: every request gets the error
            log.exception("Batch of %d %s requests failed.", len(requests), kind)
            results = [e] * len(requests)
        elapsed = time.perf_counter() - start
        self._queued -= len(batch)
        self.m_queue.set(self._queued)
        if kind == "generate":
            tokens = sum(len(r["tokens"]) for r in results if isinstance(r, dict))
            self.m_tokens.labels(version.name).inc(tokens)
            self.m_tps.set(tokens / max(elapsed, 1e-9))
        shadowed = []
        for (request, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
                if self.reference is not None and self._rng.random() < self.shadow_rate:
                    shadowed.append((request, result))
        if shadowed:
            await loop.run_in_executor(self._compute, self._shadow, kind, version.artifact,
                                       shadowed)  # fmt: skip

    def _compute_batch(self, kind: str, art: Artifact, requests: list[dict]) -> list[dict]:
        n = len(requests)
        rows = self._padded(requests)  # padding rows: copies, cut off below
        if kind == "generate":
            rows = requests + [{**r, "max_tokens": 1} for r in rows[n:]]  # they finish at once
            out = art.generate_arrays(
                [r["prompt_ids"] for r in rows],
                max_tokens=[r["max_tokens"] for r in rows],
                temperature=[r["temperature"] for r in rows],
                top_k=[r["top_k"] for r in rows],
                top_p=[r["top_p"] for r in rows],
                stop=[r["stop_ids"] for r in rows],
                seed=[r["seed"] for r in rows],
            )
            return [_stopped(art, o, r["stop"]) for o, r in zip(out[:n], requests, strict=True)]
        if kind == "score":
            if art.family == "t5":
                out = art.score_ids([r["input_ids"] for r in rows], [r["target_ids"] for r in rows])
            else:
                out = art.score_ids([r["text_ids"] for r in rows])
            return [{"logprob": float(np.sum(o["token_logprobs"])),
                     "tokens": int(len(o["token_logprobs"])),
                     "token_logprobs": o["token_logprobs"].astype(float).tolist()}
                    for o in out[:n]]  # fmt: skip
        out = art.classify(np.stack([r["image"] for r in rows]))
        return out[:n]

    # ----------------------------------------------------------------- shadow
    def _shadow(self, kind: str, art: Artifact, pairs: list) -> None:
        """Scores shadowed requests with the served model and the FP32 reference."""
        try:
            if kind == "classify":
                images = self._padded([r["image"] for r, _ in pairs])
                ours, ref = (
                    art.classify(np.stack(images)),
                    self.reference.classify(np.stack(images)),
                )
                for a, b in zip(ours[: len(pairs)], ref, strict=False):
                    label = b["label"]
                    self._record(
                        float(a["label"] == label),
                        abs(np.log(a["probs"][label]) - np.log(b["probs"][label])),
                    )
                return
            if art.family == "t5":
                inputs = [r.get("input_ids", r.get("prompt_ids")) for r, _ in pairs]
                targets = [r.get("target_ids", res.get("tokens")) for r, res in pairs]
                args = (self._padded(inputs), self._padded(targets))
            else:
                seqs = [r["text_ids"] if kind == "score"
                        else np.concatenate([r["prompt_ids"], res["tokens"]]).astype(np.int32)
                        for r, res in pairs]  # fmt: skip
                seqs = [s for s in seqs if len(s) >= 2]
                if not seqs:
                    return
                args = (self._padded(seqs),)
            ours, ref = art.score_ids(*args), self.reference.score_ids(*args)
            for a, b in list(zip(ours, ref, strict=True))[: len(pairs)]:
                self._record(
                    float(np.mean(a["predictions"] == b["predictions"])),
                    float(np.mean(np.abs(a["token_logprobs"] - b["token_logprobs"]))),
                )
        except Exception:  # the monitor must never take the server down
            log.exception("Shadow comparison failed.")

    def _padded(self, rows: list) -> list:
        """`rows` padded with copies of the last to a batch bucket (few compiled shapes)."""
        size = next(b for b in self._buckets() if b >= len(rows))
        return list(rows) + [rows[-1]] * (size - len(rows))

    def _record(self, agreement: float, drift: float) -> None:
        self.m_shadow.inc()
        self.m_agree.observe(agreement)
        self.m_drift.observe(drift)
        self._agreement.append(agreement)
        self._drift.append(drift)
        self.m_agree_mean.set(float(np.mean(self._agreement)))
        self.m_drift_mean.set(float(np.mean(self._drift)))

    def metrics_text(self) -> bytes:
        return prom.generate_latest(self.prometheus)


def _stopped(art: Artifact, out: dict, stops: list[str]) -> dict:
    """A whole-batch generation cut at its first stop string (the program samples past it):
    {"tokens" (up to the one completing the stop), "pieces", "tail", "kept", "text",
    "finish_reason"}."""
    text = complete(art.decode, out["tokens"], stops)
    reason = "stop" if text["stopped"] else out["finish_reason"]
    return {"tokens": out["tokens"][: len(text["pieces"])], "pieces": text["pieces"],
            "tail": text["tail"], "kept": text["kept"], "text": text["text"],
            "finish_reason": reason}  # fmt: skip
