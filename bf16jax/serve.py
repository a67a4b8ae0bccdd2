"""Command: `python -m bf16jax.serve` (library: `bf16jax.serving.http`).

See `bf16jax.serving.http` for what it computes; this module holds its flags and `main`.
"""

from __future__ import annotations

import errno
import json
import os
import socket

from aiohttp import web

from bf16jax.serving.engine import Engine
from bf16jax.serving.http import make_app

API_KEY_ENV = "BF16JAX_API_KEY"


def _main(argv) -> None:
    from absl import flags

    from bf16jax import cli

    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    check_port(f.host, f.port)  # before loading anything: a bad port is known at once
    cli.quiet_logs()
    engine = Engine(registry=f.registry, artifact=f.artifact, reference=f.reference,
                    max_batch=f.max_batch, max_wait_ms=f.max_wait_ms, shadow_rate=f.shadow_rate,
                    max_queue=f.max_queue, poll_s=f.poll_s, warmup=f.warmup,
                    batching=f.batching, request_timeout_s=f.request_timeout_s)  # fmt: skip
    api_key = f.api_key or os.environ.get(API_KEY_ENV) or None
    print(json.dumps({"serving": f"http://{f.host}:{f.port}", "batching": f.batching,
                      "api_key": api_key is not None}), flush=True)  # fmt: skip
    try:
        web.run_app(make_app(engine, api_key=api_key), host=f.host, port=f.port, print=None,
                    access_log=None)  # fmt: skip
    except OSError as e:  # taken between the check and now
        raise ValueError(_port_message(f.host, f.port, e)) from None


def _port_message(host: str, port: int, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        why = "is already in use"
    else:
        why = f"cannot be listened on ({error.strerror or error})"
    return (
        f"--host={host} --port={port}: the address {why}: pass another --port (or stop the "
        "server that holds it)."
    )


def check_port(host: str, port: int) -> None:
    """Raises ValueError for a port outside 0-65535 or an address that cannot be bound."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port={port} is not a TCP port: pass one in 1-65535 (0 = any free).")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(
            f"--host={host} cannot be resolved ({e.strerror}): pass an address."
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # why: aiohttp binds with SO_REUSEADDR, so a port in TIME_WAIT is free for it too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ValueError(_port_message(host, port, e)) from None


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("registry", None, "Serve this registry's active version.")
    flags.DEFINE_string("artifact", None, "Or serve this one artifact.")
    flags.DEFINE_string("reference", None, "FP32 reference for shadow mode (default: registry's).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port.")
    flags.DEFINE_integer("max_batch", 8, "Decode slots (continuous) or largest batch (window).")
    flags.DEFINE_float("max_wait_ms", 5.0, "How long a batch waits for more requests.")
    flags.DEFINE_float("shadow_rate", 0.0, "Fraction of requests compared with FP32 (0-1).")
    flags.DEFINE_integer("max_queue", 256, "Waiting requests beyond this get 429.")
    flags.DEFINE_float("poll_s", 0.5, "Registry poll interval (promote / rollback).")
    flags.DEFINE_bool("warmup", True, "Compile every batch size when a version loads.")
    flags.DEFINE_enum(
        "batching",
        "continuous",
        ["continuous", "window"],
        "continuous: decode slots refilled between steps; window: batches of "
        "requests that arrive within --max_wait_ms, each run to its end.",
    )
    flags.DEFINE_float("request_timeout_s", 60.0, "A generate request running longer: 504.")
    flags.DEFINE_string("api_key", None, f"Require 'Authorization: Bearer KEY' on every route "
                        f"but /healthz and /metrics (or set ${API_KEY_ENV}).")  # fmt: skip


if __name__ == "__main__":
    from bf16jax import cli

    _define_flags()
    cli.run(_main)
