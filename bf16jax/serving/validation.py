"""Request validation for the HTTP server: a JSON body -> the engine's request, or BadRequest.

Every field is checked for presence, type and range before a request reaches the engine, and a
bad one raises `BadRequest` naming the field (`param`) and the fix. Invariants:

- a prompt is a string (encoded with the artifact's tokenizer) or a list of token ids;
- no silent truncation: a prompt longer than the model's input is 413, and a GPT prompt plus
  max_tokens beyond the context is 400 naming the three numbers;
- messages never echo unbounded input: quoted values are cut (`clip`);
- `stop` holds strings (matched on the decoded text, `bf16jax.serving.text`) or
  token-id lists (matched on the generated ids).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from aiohttp import web

from bf16jax.serving.engine import Engine, NotReady

__all__ = ["ENGINE", "MAX_BODY_BYTES", "read_json", "resolve", "BadRequest", "clip", "typed",
           "only", "prompt_ids", "sampling_request", "parse_generate", "parse_score",
           "parse_classify", "PARSERS"]  # fmt: skip

MAX_QUOTE = 40  # characters of a client's value quoted back in an error
MAX_BODY_BYTES = 1 << 20
MAX_STOP_CHARS = 256  # characters per stop string
ENGINE = web.AppKey("engine", Engine)


class BadRequest(ValueError):
    """A request error with its HTTP status (400 unless said otherwise) and the field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def clip(value: Any, limit: int = MAX_QUOTE) -> str:
    """`value` as JSON (or str), cut to `limit` characters with the number left out."""
    try:
        text = value if isinstance(value, str) else json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more)"


def typed(body: dict, key: str, kind: str, default: Any = ..., *, lo=None, hi=None) -> Any:
    """body[key] checked as `kind` ("int", "number", "str", "bool") and range; default if
    absent or null."""
    if key not in body or body[key] is None:
        if default is ...:
            raise BadRequest(f"'{key}' is required.", param=key)
        return default
    value = body[key]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        article = "an" if kind == "int" else "a"
        raise BadRequest(f"'{key}' must be {article} {kind}, got {type(value).__name__} "
                         f"{clip(value)}.", param=key)  # fmt: skip
    if kind == "number" and not math.isfinite(value):
        raise BadRequest(f"'{key}' must be finite.", param=key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"'{key}'={clip(value)} must lie in [{lo}, {hi}].", param=key)
    return value


def only(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        shown = ", ".join(repr(clip(k, 30)) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise BadRequest(f"Unknown field(s) [{shown}]{more}: this endpoint takes "
                         f"{sorted(allowed)}.", param=clip(unknown[0], 30))  # fmt: skip


async def read_json(request: web.Request) -> dict:
    """The request's JSON object body, or BadRequest (malformed, too deep, not an object)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"body larger than {MAX_BODY_BYTES} bytes.", 413) from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {str(e)[:80]}.") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply.") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}.")
    return body


async def resolve(engine: Engine, name, key: str = "version"):
    """The loaded version a request names (None: the active one)."""
    if name is not None and not isinstance(name, str):
        raise BadRequest(f"'{key}' must be a string such as 'v0002'.", param=key)
    if not engine.ready:
        raise NotReady("the server is compiling its programs: retry shortly.")
    return await engine.resolve(name)


def prompt_ids(art, value: Any, key: str, limit: int) -> np.ndarray:
    """Token ids of a string or a list of token ids, at most `limit` of them (413 beyond)."""
    if isinstance(value, str):
        try:
            ids = art.encode(value)
        except ValueError as e:  # e.g. a tokenizer package missing
            raise BadRequest(str(e), param=key) from None
    elif isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        if len(value) > limit:
            ids = np.zeros(len(value), np.int32)  # reported as too long below
        else:
            vocab = art.limits["vocab_size"]
            if any(not 0 <= i < vocab for i in value):
                raise BadRequest(f"'{key}' token ids must lie in [0, {vocab}).", param=key)
            ids = np.asarray(value, np.int32)
    else:
        raise BadRequest(f"'{key}' must be a string or a list of token ids, got "
                         f"{type(value).__name__} {clip(value)}.", param=key)  # fmt: skip
    if len(ids) > limit:
        raise BadRequest(f"'{key}' is {len(ids)} tokens; the model takes at most {limit}.", 413,
                         param=key, code="context_length_exceeded")  # fmt: skip
    return ids


def _stops(art, stop: Any) -> tuple[list[str], list[np.ndarray]]:
    """(stop strings, matched on the decoded text; token-id stop sequences, matched on ids)."""
    lim = art.limits
    stop = [stop] if isinstance(stop, str) else (stop or [])

    def is_ids(s):
        return isinstance(s, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                           for i in s)  # fmt: skip

    if not isinstance(stop, list) or not all(isinstance(s, str) or is_ids(s) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings (or of token-id lists).",
                         param="stop")  # fmt: skip
    if len(stop) > lim["max_stop_sequences"]:
        raise BadRequest(f"'stop' has {len(stop)} sequences; at most "
                         f"{lim['max_stop_sequences']}.", param="stop")  # fmt: skip
    texts, ids = [], []
    for s in stop:
        if isinstance(s, str):
            if not 1 <= len(s) <= MAX_STOP_CHARS:
                raise BadRequest(f"each stop string must be 1..{MAX_STOP_CHARS} characters; "
                                 f"{clip(s, 20)} is {len(s)}.", param="stop")  # fmt: skip
            texts.append(s)
            continue
        vocab = lim["vocab_size"]
        if not 1 <= len(s) <= lim["max_stop_length"] or any(not 0 <= i < vocab for i in s):
            raise BadRequest(f"a token-id stop sequence must be 1..{lim['max_stop_length']} ids "
                             f"in [0, {vocab}); got {clip(s, 20)}.", param="stop")  # fmt: skip
        ids.append(np.asarray(s, np.int32))
    return texts, ids


def sampling_request(art, body: dict, prompt: Any, *, default_tokens: int,
                     default_temperature: float, seed: int) -> dict[str, Any]:  # fmt: skip
    """The engine's generate request for one prompt of `body` (fields shared by /generate and
    /v1/completions)."""
    if art.family not in ("gpt", "t5"):
        raise BadRequest(f"generation needs a language model; this one is a {art.family}.", 404)
    lim = art.limits
    t5 = art.family == "t5"
    ids = prompt_ids(art, prompt, "prompt", lim["prompt_len"] - (1 if t5 else 0))  # T5: + EOS
    if not t5 and len(ids) == 0:
        raise BadRequest("'prompt' is empty: a GPT continues text, give it some.", param="prompt")
    room = lim["cache_len"] if t5 else lim["cache_len"] - len(ids)
    if room < 1:
        raise BadRequest(f"the prompt is {len(ids)} tokens and fills the model's context of "
                         f"{lim['cache_len']}: shorten it.", param="prompt",
                         code="context_length_exceeded")  # fmt: skip
    max_tokens = typed(body, "max_tokens", "int", min(default_tokens, room), lo=1)
    if max_tokens > room:
        if t5:
            what = f"max_tokens={max_tokens} exceeds the decoder's {lim['cache_len']} positions"
        else:
            total = len(ids) + max_tokens
            what = (f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {total} "
                    f"exceeds the model's context of {lim['cache_len']}")  # fmt: skip
        raise BadRequest(f"{what}: lower max_tokens or shorten the prompt.", param="max_tokens",
                         code="context_length_exceeded")  # fmt: skip
    stops = _stops(art, body.get("stop"))
    return {
        "prompt_ids": ids,
        "max_tokens": max_tokens,
        "temperature": float(
            typed(body, "temperature", "number", default_temperature, lo=0.0, hi=100.0)
        ),  # fmt: skip
        "top_k": typed(body, "top_k", "int", 0, lo=0, hi=lim["vocab_size"]),
        "top_p": float(typed(body, "top_p", "number", 1.0, lo=1e-6, hi=1.0)),
        "stop": stops[0],
        "stop_ids": stops[1],
        "seed": typed(body, "seed", "int", seed, lo=0, hi=2**32 - 1),
    }


def parse_generate(art, body: dict) -> dict[str, Any]:
    """/generate: {"prompt" (text or ids), "max_tokens", "temperature", "top_k", "top_p",
    "stop", "seed", "version"}."""
    only(body, {"prompt", "max_tokens", "temperature", "top_k", "top_p", "stop", "seed",
                "version"})  # fmt: skip
    if art.family not in ("gpt", "t5"):
        raise BadRequest(f"/generate needs a language model; this one is a {art.family}.", 404)
    if "prompt" not in body or body["prompt"] is None:
        raise BadRequest("'prompt' is required.", param="prompt")
    return sampling_request(art, body, body["prompt"], default_tokens=64,
                            default_temperature=0.0, seed=0)  # fmt: skip


def parse_score(art, body: dict) -> dict[str, Any]:
    lim = art.limits

    def ids(key, limit):
        if key not in body or body[key] is None:
            raise BadRequest(f"'{key}' is required.", param=key)
        return prompt_ids(art, body[key], key, limit)

    if art.family == "gpt":
        only(body, {"text", "version"})
        text = ids("text", lim["seq_len"])
        if len(text) < 2:
            raise BadRequest("'text' must be at least 2 tokens (the first one is not scored).",
                             param="text")  # fmt: skip
        return {"text_ids": text}
    if art.family == "t5":
        only(body, {"input", "target", "version"})
        return {"input_ids": ids("input", lim["enc_len"] - 1),
                "target_ids": ids("target", lim["decode_len"] - 1)}  # fmt: skip
    raise BadRequest(f"/score needs a language model; this one is a {art.family}: /classify.", 404)


def parse_classify(art, body: dict) -> dict[str, Any]:
    if art.family != "vit":
        raise BadRequest(f"/classify needs an image model; this one is a {art.family}.", 404)
    only(body, {"image", "version"})
    shape = tuple(art.limits["image_shape"])
    try:
        image = np.asarray(body.get("image"), np.float32)
    except (TypeError, ValueError, RecursionError):
        raise BadRequest("'image' must be a nested list of numbers.", param="image") from None
    if image.ndim == 2 and shape[-1] == 1:
        image = image[..., None]
    if image.shape != shape:
        raise BadRequest(f"'image' must have shape {list(shape)}, got {clip(list(image.shape))}.",
                         param="image")  # fmt: skip
    if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
        raise BadRequest("'image' pixels must be finite and lie in [0, 1].", param="image")
    return {"image": image}


PARSERS = {"generate": parse_generate, "score": parse_score, "classify": parse_classify}
