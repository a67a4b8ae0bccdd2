"""HTTP serving of artifacts: `python -m bf16jax.serve --registry=DIR` (or `--artifact=DIR`).

Built on aiohttp (one well-known asyncio library for the server, the in-process test client
and the load generator; `pip install bf16jax[serve]`). Endpoints:

- `POST /generate` {"prompt", "max_tokens"=min(64, context), "temperature"=0 (greedy),
  "top_k"=0, "top_p"=1, "stop"=[...], "seed"=0, "version"?} -> {"text", "tokens",
  "finish_reason", "version"};
- `POST /score` (GPT: {"text"}; T5: {"input", "target"}) -> {"logprob", "tokens",
  "token_logprobs", "version"};
- `POST /classify` (image models: {"image": [[...]] in [0, 1]}) -> {"label", "probs", "version"};
- `GET /healthz` -> the active version; `GET /metrics` -> Prometheus text
(`bf16jax.serving.engine`).

Invariants: every request is validated before it joins a batch, and bad input gets a 4xx
with {"error": message naming the field and the fix} — 400 malformed JSON / wrong type /
bad value / unknown field, 404 unknown version or endpoint, 413 too long, 503 overloaded;
an unexpected failure is a 500 with a message, never a crashed server. Batching, versions
(promote / rollback switch without dropping requests) and shadow mode live in `Engine`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
from aiohttp import web

from bf16jax.serving.engine import Engine, Overloaded, UnknownVersion

__all__ = ["make_app", "ENGINE", "MAX_BODY_BYTES"]

log = logging.getLogger(__name__)
ENGINE = web.AppKey("engine", Engine)
MAX_BODY_BYTES = 1 << 20


class BadRequest(ValueError):
    """A request error with its HTTP status (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- validation
def _typed(body: dict, key: str, kind: str, default: Any = ..., *, lo=None, hi=None) -> Any:
    """body[key] checked as `kind` ("int", "number", "str") and range; default if absent."""
    if key not in body or body[key] is None:
        if default is ...:
            raise BadRequest(f"'{key}' is required.")
        return default
    value = body[key]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise BadRequest(f"'{key}' must be {'an' if kind == 'int' else 'a'} {kind}, got "
                         f"{type(value).__name__} {json.dumps(value)[:40]}.")  # fmt: skip
    if kind == "number" and not math.isfinite(value):
        raise BadRequest(f"'{key}' must be finite.")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"'{key}'={value} must lie in [{lo}, {hi}].")
    return value


def _only(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"Unknown field(s) {unknown}: this endpoint takes {sorted(allowed)}.")


def _ids(art, text: str, key: str, limit: int) -> np.ndarray:
    ids = art.encode(text)
    if len(ids) > limit:
        raise BadRequest(f"'{key}' is {len(ids)} tokens; the model takes at most {limit}.", 413)
    return ids


def parse_generate(art, body: dict) -> dict[str, Any]:
    if art.family not in ("gpt", "t5"):
        raise BadRequest(f"/generate needs a language model; this one is a {art.family}.", 404)
    lim = art.limits
    _only(body, {"prompt", "max_tokens", "temperature", "top_k", "top_p", "stop", "seed",
                 "version"})  # fmt: skip
    prompt = _typed(body, "prompt", "str")
    width = lim["prompt_len"] - (1 if art.family == "t5" else 0)  # T5 appends EOS
    prompt_ids = _ids(art, prompt, "prompt", width)
    if art.family == "gpt" and len(prompt_ids) == 0:
        raise BadRequest("'prompt' is empty: a GPT continues text, give it some.")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings.")
    if len(stop) > lim["max_stop_sequences"]:
        raise BadRequest(f"'stop' has {len(stop)} sequences; at most "
                         f"{lim['max_stop_sequences']}.")  # fmt: skip
    stop_ids = []
    for s in stop:
        ids = art.encode(s)
        if not 1 <= len(ids) <= lim["max_stop_length"]:
            raise BadRequest(f"each stop sequence must be 1..{lim['max_stop_length']} tokens; "
                             f"{s[:20]!r} is {len(ids)}.")  # fmt: skip
        stop_ids.append(ids)
    return {
        "prompt_ids": prompt_ids,
        "max_tokens": _typed(
            body, "max_tokens", "int", min(64, lim["cache_len"]), lo=1, hi=lim["cache_len"]
        ),  # fmt: skip
        "temperature": float(_typed(body, "temperature", "number", 0.0, lo=0.0, hi=100.0)),
        "top_k": _typed(body, "top_k", "int", 0, lo=0, hi=lim["vocab_size"]),
        "top_p": float(_typed(body, "top_p", "number", 1.0, lo=1e-6, hi=1.0)),
        "stop_ids": stop_ids,
        "seed": _typed(body, "seed", "int", 0, lo=0, hi=2**32 - 1),
    }


def parse_score(art, body: dict) -> dict[str, Any]:
    lim = art.limits
    if art.family == "gpt":
        _only(body, {"text", "version"})
        ids = _ids(art, _typed(body, "text", "str"), "text", lim["seq_len"])
        if len(ids) < 2:
            raise BadRequest("'text' must be at least 2 tokens (the first one is not scored).")
        return {"text_ids": ids}
    if art.family == "t5":
        _only(body, {"input", "target", "version"})
        return {
            "input_ids": _ids(art, _typed(body, "input", "str"), "input", lim["enc_len"] - 1),
            "target_ids": _ids(
                art, _typed(body, "target", "str"), "target", lim["decode_len"] - 1
            ),  # fmt: skip
        }
    raise BadRequest(f"/score needs a language model; this one is a {art.family}: /classify.", 404)


def parse_classify(art, body: dict) -> dict[str, Any]:
    if art.family != "vit":
        raise BadRequest(f"/classify needs an image model; this one is a {art.family}.", 404)
    _only(body, {"image", "version"})
    shape = tuple(art.limits["image_shape"])
    try:
        image = np.asarray(body.get("image"), np.float32)
    except (TypeError, ValueError):
        raise BadRequest("'image' must be a nested list of numbers.") from None
    if image.ndim == 2 and shape[-1] == 1:
        image = image[..., None]
    if image.shape != shape:
        raise BadRequest(f"'image' must have shape {list(shape)}, got {list(image.shape)}.")
    if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
        raise BadRequest("'image' pixels must be finite and lie in [0, 1].")
    return {"image": image}


_PARSERS = {"generate": parse_generate, "score": parse_score, "classify": parse_classify}


# ----------------------------------------------------------------------------- handlers
def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler):
    """Every failure becomes a JSON error; nothing escapes to crash the server."""
    engine = request.app[ENGINE]
    endpoint = request.path.strip("/") or "root"
    try:
        response = await handler(request)
    except BadRequest as e:
        response = _error(e.status, str(e))
    except UnknownVersion as e:
        response = _error(404, str(e))
    except Overloaded as e:
        response = _error(503, str(e))
    except web.HTTPException as e:  # aiohttp's own: 404 route, 405 method, 413 body size
        response = _error(e.status, e.reason or e.text or "HTTP error")
    except Exception as e:
        log.exception("Unhandled error on %s", request.path)
        response = _error(500, f"internal error ({type(e).__name__}): {e}")
    engine.m_requests.labels(endpoint, str(response.status)).inc()
    return response


async def _read_json(request: web.Request) -> dict:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"body larger than {MAX_BODY_BYTES} bytes.", 413) from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}.") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}.")
    return body


def _endpoint(kind: str):
    async def handle(request: web.Request) -> web.Response:
        engine = request.app[ENGINE]
        start = time.perf_counter()
        body = await _read_json(request)
        version = body.get("version")
        if version is not None and not isinstance(version, str):
            raise BadRequest("'version' must be a string such as 'v0002'.")
        loaded = await engine.resolve(version)
        try:
            parsed = _PARSERS[kind](loaded.artifact, body)
        except BadRequest:
            raise
        except ValueError as e:  # from the artifact's own checks
            raise BadRequest(str(e)) from None
        result = await engine.submit(kind, loaded, parsed)
        engine.m_latency.labels(kind, loaded.name).observe(time.perf_counter() - start)
        return web.json_response({**result, "version": loaded.name})

    return handle


async def _healthz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    active = engine.active
    if active is None:
        return _error(503, "no model loaded yet")
    m = active.artifact.manifest
    return web.json_response({"status": "ok", "version": active.name, "family": m["family"],
                              "precision": m["precision"], "source": m["source"]})  # fmt: skip


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[ENGINE].metrics_text()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def make_app(engine: Engine) -> web.Application:
    """The aiohttp application around `engine` (started and stopped with the app)."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine

    async def lifecycle(app):
        await engine.start()
        yield
        await engine.stop()

    app.cleanup_ctx.append(lifecycle)
    for kind in _PARSERS:
        app.router.add_post(f"/{kind}", _endpoint(kind))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app
