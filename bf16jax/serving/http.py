"""HTTP serving of artifacts: `python -m bf16jax.serve --registry=DIR` (or `--artifact=DIR`).

Built on aiohttp (`pip install bf16jax[serve]`). Endpoints:

- `POST /v1/completions`, `GET /v1/models`: the OpenAI API (`bf16jax.serving.openai_api`),
  streaming over server-sent events;
- `POST /generate` {"prompt" (text or token ids), "max_tokens"=min(64, room), "temperature"=0
  (greedy), "top_k"=0, "top_p"=1, "stop"=[...], "seed"=0, "version"?} -> {"text", "tokens",
  "finish_reason", "version"} (a stop string cuts "text" at its start; "tokens" are those
  whose text starts before the cut);
- `POST /score` (GPT: {"text"}; T5: {"input", "target"}) -> {"logprob", "tokens",
  "token_logprobs", "version"};
- `POST /classify` (image models: {"image": [[...]] in [0, 1]}) -> {"label", "probs", "version"};
- `GET /healthz` -> {"status", "version"} (503 until every program is compiled and warm);
  `GET /metrics` -> Prometheus text (`bf16jax.serving.engine`).

Invariants: every request is validated (`bf16jax.serving.validation`) before it reaches the
engine; every error is OpenAI's shape {"error": {"message", "type", "param", "code"}} with the
message capped — 400 malformed JSON (however deeply nested) / wrong type / bad value / unknown
field, 401 missing or wrong API key, 404 unknown version or route, 413 too long, 429 queue full
(Retry-After), 503 not ready, 504 past the request timeout; an unexpected failure is a 500,
never a crashed server. With an API key every route but /healthz and /metrics needs
`Authorization: Bearer KEY` (compared in constant time). Prompts are never logged. Metrics
label known routes only.
"""

from __future__ import annotations

import hmac
import logging
import time

from aiohttp import web

from bf16jax.serving import openai_api
from bf16jax.serving.engine import Engine, NotReady, Overloaded, RequestTimeout, UnknownVersion
from bf16jax.serving.validation import (
    ENGINE,
    MAX_BODY_BYTES,
    PARSERS,
    BadRequest,
    read_json,
    resolve,
)

__all__ = ["make_app", "ENGINE", "API_KEY", "MAX_BODY_BYTES", "MAX_ERROR_CHARS", "error"]

log = logging.getLogger(__name__)
API_KEY = web.AppKey("api_key", str)
MAX_ERROR_CHARS = 400
_OPEN = ("/healthz", "/metrics")  # routes that need no API key
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error", 504: "timeout_error"}  # fmt: skip


# ----------------------------------------------------------------------------- errors
def error(status: int, message: str, *, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> web.Response:  # fmt: skip
    """An error response in OpenAI's shape; the message is capped at MAX_ERROR_CHARS."""
    if len(message) > MAX_ERROR_CHARS:
        message = f"{message[:MAX_ERROR_CHARS]}... ({len(message) - MAX_ERROR_CHARS} more chars)"
    body = {"message": message, "type": _TYPES.get(status, "server_error"),
            "param": param, "code": code}  # fmt: skip
    return web.json_response({"error": body}, status=status, headers=headers)


def _classify(e: BaseException) -> web.Response | None:
    """The response of an error whose origin is known, else None."""
    retry = {"Retry-After": "1"}
    if isinstance(e, BadRequest):
        return error(e.status, str(e), param=e.param, code=e.code)
    if isinstance(e, UnknownVersion):
        return error(404, str(e), param="model", code="model_not_found")
    if isinstance(e, Overloaded):
        return error(429, str(e), code="queue_full", headers=retry)
    if isinstance(e, NotReady):
        return error(503, str(e), code="not_ready", headers=retry)
    if isinstance(e, RequestTimeout):
        return error(504, str(e), code="timeout")
    if isinstance(e, web.HTTPException):  # aiohttp's own: 404 route, 405 method, 413 body size
        return error(e.status, e.reason or e.text or "HTTP error")
    return None


def _endpoint_label(request: web.Request) -> str:
    """The route's path for known routes, "other" for anything else (bounded label values)."""
    resource = request.match_info.route.resource
    return resource.canonical.strip("/") if resource is not None else "other"


@web.middleware
async def _errors(request: web.Request, handler):
    """Every failure becomes a JSON error; nothing escapes to crash the server."""
    engine = request.app[ENGINE]
    try:
        response = await handler(request)
    except Exception as e:
        response = _classify(e)
        if response is None:
            log.exception("Unhandled error on %s", _endpoint_label(request))
            response = error(500, f"internal error ({type(e).__name__}): {e}")
    engine.m_requests.labels(_endpoint_label(request), str(response.status)).inc()
    return response


@web.middleware
async def _auth(request: web.Request, handler):
    key = request.app[API_KEY]
    if key and request.path not in _OPEN:
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("utf-8", "replace"), key.encode("utf-8")
        )
        if not ok:
            return error(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                         code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    return await handler(request)


# ----------------------------------------------------------------------------- handlers
def _endpoint(kind: str):
    async def handle(request: web.Request) -> web.Response:
        engine = request.app[ENGINE]
        start = time.perf_counter()
        body = await read_json(request)
        loaded = await resolve(engine, body.get("version"))
        try:
            parsed = PARSERS[kind](loaded.artifact, body)
        except BadRequest:
            raise
        except ValueError as e:  # from the artifact's own checks
            raise BadRequest(str(e)) from None
        if kind == "generate":
            out = await engine.generate(loaded, parsed)
            result = {"text": out["text"], "tokens": out["tokens"],
                      "finish_reason": out["finish_reason"]}  # fmt: skip
        else:
            result = await engine.submit(kind, loaded, parsed)
        engine.m_latency.labels(kind, loaded.name).observe(time.perf_counter() - start)
        return web.json_response({**result, "version": loaded.name})

    return handle


async def _healthz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    active = engine.active
    version = active.name if active is not None else None
    if active is None or not engine.ready:
        return web.json_response({"status": "loading", "version": version}, status=503,
                                 headers={"Retry-After": "1"})  # fmt: skip
    return web.json_response({"status": "ok", "version": version})


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[ENGINE].metrics_text()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def make_app(engine: Engine, *, api_key: str | None = None) -> web.Application:
    """The aiohttp application around `engine` (started and stopped with the app).

    Args:
      engine: the serving engine.
      api_key: if given, every route but /healthz and /metrics needs `Authorization: Bearer
        api_key`.
    """
    app = web.Application(middlewares=[_errors, _auth], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[API_KEY] = api_key or ""

    async def lifecycle(app):
        await engine.start()
        yield
        await engine.stop()

    app.cleanup_ctx.append(lifecycle)
    for kind in PARSERS:
        app.router.add_post(f"/{kind}", _endpoint(kind))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    openai_api.add_routes(app)
    return app
