"""Peer: a plain-JAX GPT-2 training step, written the way a user writes one without a library.

Adapted from the shared anchor benchmark (`../shared/bench/jax_gpt_anchor.py`, measured on an
H100): FP32 params, BF16 compute, FP32 LayerNorm statistics, FP32 logits (a matmul with
`preferred_element_type=float32`) and loss, `jax.nn.dot_product_attention(is_causal=True)` with
cuDNN on a GPU (XLA elsewhere), fused q/k/v projection, tied embeddings, no biases, optax AdamW,
the step jitted with params and optimizer state donated. Layers unrolled in Python by default
(the anchor's fastest setting; `--scan` runs them with `lax.scan`).

    python experiments/peers/jax_gpt.py --shape='{"V": 50304, "D": 768, "L": 12, "H": 12,
        "T": 1024, "B": 16}' --steps=20

Prints one JSON line: tokens/s, step time, compile time, peak memory, N (params without the
position embeddings) and the shape, for experiments/benchmark.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time

import jax
import jax.numpy as jnp
import optax


def init(key, V, D, L, T):
    k = jax.random.split(key, 6)

    def n(kk, shape, std=0.02):
        return jax.random.normal(kk, shape, jnp.float32) * std

    out_std = 0.02 / (2 * L) ** 0.5
    return {
        "wte": n(k[0], (V, D)),
        "wpe": n(k[1], (T, D)),
        "lnf": {"g": jnp.ones(D), "b": jnp.zeros(D)},
        "blocks": {
            "ln1": {"g": jnp.ones((L, D)), "b": jnp.zeros((L, D))},
            "ln2": {"g": jnp.ones((L, D)), "b": jnp.zeros((L, D))},
            "wqkv": n(k[2], (L, D, 3 * D)),
            "wo": n(k[3], (L, D, D), out_std),
            "w1": n(k[4], (L, D, 4 * D)),
            "w2": n(k[5], (L, 4 * D, D), out_std),
        },
    }


def layernorm(x, p):
    x32 = x.astype(jnp.float32)
    m = x32.mean(-1, keepdims=True)
    v = ((x32 - m) ** 2).mean(-1, keepdims=True)
    return ((x32 - m) * jax.lax.rsqrt(v + 1e-5) * p["g"] + p["b"]).astype(x.dtype)


def forward(params, tokens, *, H, cdt, attn_impl, scan):
    B, T = tokens.shape

    def c(a):
        return a.astype(cdt)

    x = c(params["wte"])[tokens] + c(params["wpe"])[:T]

    def block(x, p):
        D = x.shape[-1]
        h = layernorm(x, p["ln1"])
        qkv = jnp.dot(h, c(p["wqkv"])).reshape(B, T, 3, H, D // H)
        a = jax.nn.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True, implementation=attn_impl
        )
        x = x + jnp.dot(a.reshape(B, T, D), c(p["wo"]))
        h = jax.nn.gelu(jnp.dot(layernorm(x, p["ln2"]), c(p["w1"])))
        return x + jnp.dot(h, c(p["w2"])), None

    if scan:
        x, _ = jax.lax.scan(block, x, params["blocks"])
    else:
        for i in range(params["blocks"]["wqkv"].shape[0]):
            x, _ = block(x, jax.tree.map(lambda a, i=i: a[i], params["blocks"]))
    x = layernorm(x, params["lnf"])
    return jnp.dot(x, c(params["wte"]).T, preferred_element_type=jnp.float32)


def peak_memory() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS"


def run(shape: dict, *, steps: int = 20, warmup: int = 3, mode: str = "bf16", scan=False):
    """Trains `steps` timed steps of the GPT of `shape` (V, D, L, H, T, B); returns figures."""
    V, D, L, H, T, B = (int(shape[k]) for k in ("V", "D", "L", "H", "T", "B"))
    cdt = jnp.bfloat16 if mode == "bf16" else jnp.float32
    on_gpu = jax.default_backend() == "gpu"
    attn_impl = "cudnn" if on_gpu and mode == "bf16" else None
    params = init(jax.random.key(0), V, D, L, T)
    opt = optax.adamw(3e-4, weight_decay=0.1)
    state = opt.init(params)

    def loss_fn(params, tokens):
        logits = forward(params, tokens[:, :-1], H=H, cdt=cdt, attn_impl=attn_impl, scan=scan)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, tokens):
        loss, g = jax.value_and_grad(loss_fn)(params, tokens)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    tok = jax.random.randint(jax.random.key(1), (B, T + 1), 0, V)
    t0 = time.perf_counter()
    params, state, loss = step(params, state, tok)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        params, state, loss = step(params, state, tok)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        params, state, loss = step(params, state, tok)
    loss.block_until_ready()
    dt = (time.perf_counter() - t0) / steps
    n = sum(x.size for x in jax.tree.leaves(params)) - T * D
    mem, mem_kind = peak_memory()
    return {
        "impl": "plain JAX",
        "setup": f"{mode}, {'cuDNN' if attn_impl else 'XLA'} attention, "
        f"{'lax.scan' if scan else 'unrolled'} layers, FP32 logits, optax AdamW",
        "device": jax.devices()[0].device_kind,
        "versions": {"jax": jax.__version__, "optax": optax.__version__},
        "n_params": int(n),
        "shape": {"V": V, "D": D, "L": L, "H": H, "T": T, "B": B},
        "step_ms": dt * 1e3,
        "tokens_per_s": B * T / dt,
        "compile_s": compile_s,
        "peak_memory_bytes": mem,
        "peak_memory_kind": mem_kind,
        "final_loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, help='JSON: {"V", "D", "L", "H", "T", "B"}')
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mode", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--scan", action="store_true", help="lax.scan over layers")
    args = parser.parse_args()
    out = run(
        json.loads(args.shape), steps=args.steps, warmup=args.warmup, mode=args.mode, scan=args.scan
    )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
