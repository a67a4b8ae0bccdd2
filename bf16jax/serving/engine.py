"""The serving engine behind `bf16jax.serving.http`: versions, request batching, shadow mode,
metrics.

`Engine` holds the loaded artifacts (the registry's active version, versions asked for by
name, the FP32 reference), groups concurrent requests into batches per (version, endpoint),
runs each batch on one compute thread, and compares a sample of requests with the FP32
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
- metrics live in the engine's own Prometheus registry (several engines per process work).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import random
import time
from typing import Any

import numpy as np
import prometheus_client as prom

from bf16jax.serving.artifact import Artifact
from bf16jax.serving.registry import Registry

__all__ = ["Engine", "UnknownVersion", "Overloaded", "KINDS"]

log = logging.getLogger(__name__)
KINDS = ("generate", "score", "classify")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WINDOW = 256  # shadowed requests in the rolling agreement / drift gauges


class UnknownVersion(ValueError):
    """A request named a version the registry does not have."""


class Overloaded(RuntimeError):
    """The queue is full: the client should retry later (HTTP 503)."""


class _Loaded:
    def __init__(self, name: str, artifact: Artifact):
        self.name = name
        self.artifact = artifact


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
    """

    def __init__(self, *, registry: str | None = None, artifact: str | None = None,
                 reference: str | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
                 shadow_rate: float = 0.0, max_queue: int = 256, poll_s: float = 0.5,
                 warmup: bool = True, seed: int = 0):  # fmt: skip
        if (registry is None) == (artifact is None):
            raise ValueError("Serve either --registry=DIR or --artifact=DIR (one of them).")
        if not 0.0 <= shadow_rate <= 1.0:
            raise ValueError(f"shadow_rate={shadow_rate} must lie in [0, 1].")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1.")
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

    # ----------------------------------------------------------------- versions
    def _load(self, name: str, directory: str, sha: str | None) -> _Loaded:
        loaded = _Loaded(name, Artifact(directory, manifest_sha256=sha))
        if self.warmup:
            self._warm(loaded.artifact)
        return loaded

    def _warm(self, art: Artifact) -> None:
        """Compiles the served programs for every batch bucket (first requests stay fast)."""
        for size in self._buckets():
            if art.family == "vit":
                art.classify(np.zeros((size, *art.limits["image_shape"]), np.float32))
                continue
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
            self._cache.popitem(last=False)
        self.m_active.clear()
        self.m_active.labels(loaded.name, loaded.artifact.manifest["precision"]).set(1)
        if previous is not None and previous.name != loaded.name:
            self.m_switches.inc()
            log.info("Serving version %s (was %s).", loaded.name, previous.name)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._static:
            loaded = await loop.run_in_executor(self._loader, self._load, "static",
                                                self._static, None)  # fmt: skip
            self._set_active(loaded)
        else:
            active = self.registry.active()
            if active is None:
                raise ValueError(f"Registry {self.registry.directory} has no active version: "
                                 "promote an artifact first.")  # fmt: skip
            self._set_active(await loop.run_in_executor(self._loader, self._load, *active))
            self._watch = asyncio.create_task(self._watch_registry())
        if self.shadow_rate > 0:
            self.reference = await loop.run_in_executor(self._loader, Artifact,
                                                        self._reference_dir)  # fmt: skip

    async def stop(self) -> None:
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

    async def resolve(self, name: str | None) -> _Loaded:
        """The version a request asked for (None: the active one)."""
        if name is None or name == self.active.name:
            return self.active
        if name in self._cache:
            return self._cache[name]
        if self.registry is None:
            raise UnknownVersion(f"Unknown version {name!r}: this server serves one artifact "
                                 f"(version 'static').")  # fmt: skip
        try:
            directory, sha = self.registry.resolve(name)
        except ValueError as e:
            raise UnknownVersion(str(e)) from None
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(self._loader, self._load, name, directory, sha)
        self._cache[name] = loaded
        return loaded

    # ----------------------------------------------------------------- batching
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
            return [{**o, "text": art.decode(o["tokens"])} for o in out[:n]]
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
