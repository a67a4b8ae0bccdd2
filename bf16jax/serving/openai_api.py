"""The OpenAI-compatible API: `POST /v1/completions` and `GET /v1/models`.

Any OpenAI client works against the server (`openai.OpenAI(base_url="http://HOST:PORT/v1",
api_key=KEY)`). Completions take `model` (a version; default the active one), `prompt` (a
string, a list of token ids, or a list of either), `max_tokens` (16), `temperature` (1),
`top_p`, `top_k` (an extension), `stop`, `seed` (random when absent), `logprobs` (0-5), `echo`,
`stream`, `stream_options`, `n`=1, `best_of`=1, zero penalties and `user`. T5: the prompt is
the encoder input. Invariants:

- a stream sends one server-sent event per token whose text is final (a partial UTF-8 /
  byte-fallback character, or text that could still start a stop string, waits; with
  `logprobs` every token gets one), then one with `finish_reason` and `usage`, then `data:
  [DONE]`; the streamed text joined equals the non-streamed text; a client that disconnects
  cancels its request, which frees its decode slot;
- `stop` strings are matched on the decoded text (`bf16jax.serving.text`) and cut the
  text at their start; `usage.completion_tokens` counts every generated token, the stop
  string's included;
- errors before the first event have HTTP statuses (see `bf16jax.serving.http`); an error
  after it (e.g. the request timeout) is an event `{"error": {...}}` before `[DONE]`;
- finish_reason is "stop" (EOS or a stop sequence) or "length" (max_tokens or the context).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from typing import Any

from aiohttp import web

from bf16jax.serving.validation import (
    ENGINE,
    BadRequest,
    clip,
    only,
    read_json,
    resolve,
    sampling_request,
    typed,
)

__all__ = ["add_routes", "FIELDS"]

FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
          "logprobs", "echo", "stream", "stream_options", "n", "best_of", "presence_penalty",
          "frequency_penalty", "logit_bias", "user", "suffix"}  # fmt: skip
_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)


def _model_card(loaded, active: bool) -> dict[str, Any]:
    m = loaded.artifact.manifest
    lim = m["limits"]
    card = {"id": loaded.name, "object": "model", "created": 0, "owned_by": "bf16jax",
            "family": m["family"], "precision": m["precision"], "active": active}  # fmt: skip
    if m["family"] == "gpt":
        card["context_length"] = lim["cache_len"]
    elif m["family"] == "t5":
        card.update(context_length=lim["enc_len"], max_output_tokens=lim["cache_len"])
    return card


async def _models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    loaded = [engine.active] if engine.active is not None else []
    loaded += [v for v in engine.loaded_versions() if v is not engine.active]
    cards = [_model_card(v, v is engine.active) for v in loaded]
    return web.json_response({"object": "list", "data": cards})


def _prompts(value: Any) -> list:
    """The request's prompts: a string, a list of ids, or a list of strings / id lists."""
    if value is None:
        raise BadRequest("'prompt' is required.", param="prompt")
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(i, int) for i in value)
    ):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > 16:
            raise BadRequest(f"'prompt' holds {len(value)} prompts; at most 16.", param="prompt")
        return value
    raise BadRequest(f"'prompt' must be a string, a list of token ids, or a list of those; got "
                     f"{clip(value)}.", param="prompt")  # fmt: skip


def _parse(art, body: dict) -> tuple[list[dict], dict]:
    """(engine requests, one per prompt; options: stream, logprobs, echo, include_usage)."""
    only(body, FIELDS)
    for key, allowed in (("n", 1), ("best_of", 1)):
        if typed(body, key, "int", 1) != allowed:
            raise BadRequest(f"'{key}' must be 1: this server returns one completion per "
                             "prompt.", param=key)  # fmt: skip
    for key in ("presence_penalty", "frequency_penalty"):
        if typed(body, key, "number", 0.0) != 0:
            raise BadRequest(f"'{key}' is not supported (only 0).", param=key)
    if body.get("logit_bias") or body.get("suffix"):
        key = "logit_bias" if body.get("logit_bias") else "suffix"
        raise BadRequest(f"'{key}' is not supported.", param=key)
    typed(body, "user", "str", "")
    options = {"stream": typed(body, "stream", "bool", False),
               "echo": typed(body, "echo", "bool", False),
               "logprobs": typed(body, "logprobs", "int", None, lo=0,
                                 hi=art.limits.get("top_logprobs", 5))}  # fmt: skip
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise BadRequest("'stream_options' takes {'include_usage': bool} only.",
                         param="stream_options")  # fmt: skip
    if options["echo"] and options["logprobs"] is not None:
        raise BadRequest("'echo' with 'logprobs' is not supported (prompt logprobs: POST "
                         "/score).", param="echo")  # fmt: skip
    prompts = _prompts(body.get("prompt"))
    if options["stream"] and len(prompts) > 1:
        raise BadRequest("'stream' takes one prompt per request.", param="prompt")
    seed = secrets.randbelow(2**32)
    requests = [sampling_request(art, body, p, default_tokens=16, default_temperature=1.0,
                                 seed=seed) for p in prompts]  # fmt: skip
    return requests, options


def _logprobs(art, out: dict, top: int, offset: int) -> dict[str, Any]:
    """OpenAI's completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    pieces = [art.decode([t]) for t in out["tokens"]]
    offsets, at = [], offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    tops = [None if not top else {art.decode([i]): lp for i, lp in alternatives[:top]}
            for alternatives in out["top_logprobs"]]  # fmt: skip
    return {"tokens": pieces, "token_logprobs": out["logprobs"], "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def _head(loaded) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": loaded.name}  # fmt: skip


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


async def _completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await read_json(request)
    loaded = await resolve(engine, body.get("model"), "model")
    art = loaded.artifact
    try:
        requests, options = _parse(art, body)
    except BadRequest:
        raise
    except ValueError as e:  # the artifact's own checks
        raise BadRequest(str(e)) from None
    if options["logprobs"] is not None and loaded.batcher is None:
        raise BadRequest("'logprobs' needs continuous batching (serve with "
                         "--batching=continuous).", param="logprobs")  # fmt: skip
    if options["stream"]:
        return await _stream(request, engine, loaded, requests[0], options)
    outs = await asyncio.gather(*(engine.generate(loaded, r) for r in requests))
    choices = []
    for index, (req, out) in enumerate(zip(requests, outs, strict=True)):
        prefix = art.decode(req["prompt_ids"]) if options["echo"] else ""
        logprobs = None
        if options["logprobs"] is not None:
            logprobs = _logprobs(art, out, options["logprobs"], len(prefix))
        choices.append({"text": prefix + out["text"], "index": index,
                        "logprobs": logprobs,
                        "finish_reason": _REASONS[out["finish_reason"]]})  # fmt: skip
    usage = _usage(sum(len(r["prompt_ids"]) for r in requests),
                   sum(o["completion_tokens"] for o in outs))  # fmt: skip
    return web.json_response({**_head(loaded), "choices": choices, "usage": usage})


async def _stream(request, engine, loaded, req: dict, options: dict) -> web.StreamResponse:
    """Server-sent events of one completion (see the module docstring)."""
    art, head = loaded.artifact, _head(loaded)
    tokens = 0
    sent = 0  # characters of completion text sent so far

    def chunk(text: str, reason: str | None = None, logprobs=None, usage=None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": logprobs,
                  "finish_reason": _REASONS.get(reason) if reason else None}  # fmt: skip
        data = {**head, "choices": [choice]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n".encode()

    async with contextlib.aclosing(engine.stream(loaded, req)) as events:
        async with engine.deadline():  # errors before the first event keep their HTTP status
            event = await anext(events)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})  # fmt: skip
        await response.prepare(request)
        prefix = art.decode(req["prompt_ids"]) if options["echo"] else ""
        try:
            if prefix:
                await response.write(chunk(prefix))
            async with engine.deadline():
                while event[0] == "token":
                    tokens += 1
                    delta = event[4]
                    lp = None
                    if options["logprobs"] is not None:
                        one = {"tokens": [event[1]], "logprobs": [event[2]],
                               "top_logprobs": [event[3]]}  # fmt: skip
                        lp = _logprobs(art, one, options["logprobs"], len(prefix) + sent)
                    if delta or lp is not None:
                        await response.write(chunk(delta, logprobs=lp))
                    sent += len(delta)
                    event = await anext(events)
            usage = _usage(len(req["prompt_ids"]), tokens)
            await response.write(chunk(event[2], event[1], usage=usage))
        except ConnectionResetError:  # the client left: closing `events` frees the slot
            return response
        except Exception as e:  # after the headers: report it in the stream, then end it
            message = str(e)[:400]
            await response.write(f"data: {json.dumps({'error': {'message': message}})}\n\n"
                                 .encode())  # fmt: skip
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response
