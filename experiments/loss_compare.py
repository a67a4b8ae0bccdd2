"""The fused output-projection + cross-entropy loss alone (forward + backward), schedule against
schedule, compiled for one TPU chip on this CPU machine, and timed on the CPU at a small shape.

    .venv-tpu/bin/python experiments/loss_compare.py                       # TPU v5e programs
    .venv-tpu/bin/python experiments/loss_compare.py --shapes=16x1024 --schedules=new,vocab
    python experiments/loss_compare.py --cpu_time                          # CPU step times

Schedules: `old` (bf16jax/nn/loss.py at `--old_rev`, loaded from git: token chunks of whole
divisors of T, two passes over each chunk's FP32 logits for max/argmax then the exponentials),
`new` (this checkout's loss: one online pass for log Z and argmax, a padded last chunk) and
`vocab` (defined here, not in the library: a forward loop over vocabulary chunks with online
(max, sum, argmax) [N] carries, and a backward loop that recomputes each [N, Vc] logit block and
writes its dW block once, no [V, D] carry, with dh in an FP32 [N, D] carry: one head GEMM more).
Per program: XLA's FLOPs and bytes accessed with every chunk counted (a while body counts once
in `cost_analysis`; one iteration's cost is the unroll=2 compile minus the unroll=1 compile),
peak / temp HBM (`memory_analysis`), op counts of the optimized HLO (program_compare.py's
`hlo_counts`) and libtpu's own estimated cycles (each op's `estimated_cycles`, while bodies
times their trip count: the compiler's cost model, not a timing). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax import lax

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # program_compare.py beside this file
OLD_REV = "53fe2e4"  # the token-chunked loss with a two-pass log Z (issue 24's baseline)
V, D = 50304, 768  # gpt2_124m's head

_HEAD = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r" while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_SIZES = {
    "f32": 4,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_ARRAY = re.compile(r"\b(" + "|".join(_SIZES) + r")\[([\d,]*)\]")
_FREE = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "copy-done",
    "after-all",
    "partition-id",
    "replica-id",
}


def _bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _SIZES[dtype]
    return total


def _closing(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        depth += (s[i] == "(") - (s[i] == ")")
        if depth == 0:
            return i
    return len(s) - 1


def _instruction(line: str):
    """(name, shape, opcode, operand names, attributes) of one HLO instruction line."""
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
    if not m:
        return None
    name, rest = m.groups()
    if rest.startswith("("):
        end = _closing(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1 :].strip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _closing(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end() - 1 : end + 1])
    return name, shape, op.group(1), operands, rest[end + 1 :], line.lstrip().startswith("ROOT")


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} of an optimized HLO module, and the entry's."""
    bodies, current, entry = {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEAD.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(1)
                bodies[current] = []
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        bodies[current].append(line)
    return bodies, entry


def _trips(lines: list[str]) -> int:
    """A while loop's trip count: the constant its condition compares the counter with."""
    return max((int(c) for ln in lines for c in re.findall(r"constant\((\d+)\)", ln)), default=1)


def estimated_cycles(text: str) -> int:
    """libtpu's `estimated_cycles` summed over the ops that run (entry and while bodies, each
    body times its trip count)."""
    bodies, entry = _computations(text)

    def total(name: str) -> int:
        out = 0
        for line in bodies[name]:
            if w := _WHILE.search(line):
                out += _trips(bodies[w.group(1)]) * total(w.group(2))
            elif m := re.search(r'"estimated_cycles":"(\d+)"', line):
                out += int(m.group(1))
        return out

    return total(entry)


def hbm_bytes(text: str, once: bool = False) -> float:
    """Bytes the ops of an optimized HLO module read and write, each while body counted as
    many times as it runs (`once`: one time, as XLA's cost analysis does): each op's operands
    and result; in a fusion a parameter that is only dynamic-sliced counts the slice and an
    in-place dynamic-update-slice its update. Memory spaces are not told apart."""
    bodies, entry = _computations(text)
    comps = {c: [i for ln in lines if (i := _instruction(ln))] for c, lines in bodies.items()}
    shapes = {ins[0]: ins[1] for body in comps.values() for ins in body}

    def fusion(called: str, out_shape: str) -> int:
        body = comps[called]
        users: dict[str, list] = {}
        root = body[-1]
        for name, shape, op, operands, _, is_root in body:
            for k, o in enumerate(operands):
                users.setdefault(o, []).append((op, k, shape))
            root = (name, shape, op, operands, _, is_root) if is_root else root
        in_place = root[3][0] if root[2] == "dynamic-update-slice" else None
        total = _bytes(shapes.get(root[3][1], "")) if in_place else _bytes(out_shape)
        for name, shape, op, *_ in body:
            if op != "parameter":
                continue
            use = users.get(name, [])
            if name == in_place and all(u[:2] == ("dynamic-update-slice", 0) for u in use):
                continue
            if use and all(u[:2] == ("dynamic-slice", 0) for u in use):
                total += sum(_bytes(u[2]) for u in use)
            else:
                total += _bytes(shape)
        return total

    def run(name: str) -> int:
        total = 0
        for _, shape, op, operands, attrs, _ in comps[name]:
            if op in _FREE or (op == "custom-call" and "AllocateBuffer" in attrs):
                continue
            if op == "while":
                w = _WHILE.search(" while(" + attrs)
                total += (1 if once else _trips(bodies[w.group(1)])) * run(w.group(2))
            elif op == "fusion":
                total += fusion(re.search(r"calls=%?([\w.\-]+)", attrs).group(1), shape)
            elif op == "dynamic-update-slice":
                total += 2 * _bytes(shapes.get(operands[1], ""))
            elif op == "dynamic-slice":
                total += 2 * _bytes(shape)
            else:
                total += _bytes(shape) + sum(_bytes(shapes.get(o, "")) for o in operands)
        return total

    return float(run(entry))


def old_loss_module(rev: str):
    """bf16jax/nn/loss.py as of `rev`, imported as a module of its own."""
    src = subprocess.run(["git", "show", f"{rev}:bf16jax/nn/loss.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(), "loss_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("loss_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["loss_old"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- vocab schedule
def _vocab_blocks(w, vc: int, compute):
    """[V, D] -> [n, vc, D] compute-dtype blocks, V padded to n * vc with zero rows."""
    n = -(-w.shape[0] // vc)
    w = jnp.pad(w.astype(compute), ((0, n * vc - w.shape[0]), (0, 0)))
    return w.reshape(n, vc, w.shape[1])


def _block_logits(h, wj, j, vc: int, vocab: int):
    """FP32 logits of block j ([N, vc]), padded columns at -inf, and their column ids."""
    logits = lax.dot_general(h, wj, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    col = j * vc + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return jnp.where(col < vocab, logits, -jnp.inf), col


def _online_max_sum_index(a, b):
    """(max, sum of exp(x - max), first argmax) pairs combined (as bf16jax/nn/loss.py's)."""
    (m1, s1, i1), (m2, s2, i2) = a, b
    m = jnp.maximum(m1, m2)
    s = s1 * jnp.exp(jnp.where(m1 == m, 0.0, m1 - m)) + s2 * jnp.exp(
        jnp.where(m2 == m, 0.0, m2 - m)
    )
    return m, s, jnp.where(m1 > m2, i1, jnp.where(m2 > m1, i2, jnp.minimum(i1, i2)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def vocab_loss(h, w, targets, weights, vc: int, compute):
    """Mean NLL of a tied head w [V, D] on h [N, D] (FP32 logits), vocabulary-chunked."""
    return _vocab_fwd(h, w, targets, weights, vc, compute)[0]


def _vocab_fwd(h, w, targets, weights, vc, compute):
    blocks, hc = _vocab_blocks(w, vc, compute), h.astype(compute)

    def body(carry, xs):
        (m, s, best), tl = carry
        logits, col = _block_logits(hc, xs[1], xs[0], vc, w.shape[0])
        init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.int32(2**30))
        block = lax.reduce((logits, jnp.ones_like(logits), col), init, _online_max_sum_index, (1,))
        tl = tl + jnp.sum(jnp.where(col == targets[:, None], logits, 0.0), axis=1)
        return (_online_max_sum_index((m, s, best), block), tl), None

    n = h.shape[0]
    zero = jnp.zeros((n,), jnp.float32)
    init = ((jnp.full((n,), -jnp.inf), zero, jnp.zeros((n,), jnp.int32)), zero)
    ((m, s, best), tl), _ = lax.scan(body, init, (jnp.arange(blocks.shape[0]), blocks))
    lse = m + jnp.log(s)
    total = jnp.sum(weights)
    denom = jnp.where(total > 0, total, 1.0)
    loss = jnp.sum(jnp.where(weights > 0, lse - tl, 0.0) * weights) / denom
    accuracy = jnp.sum((best == targets) * weights) / denom
    return (loss, accuracy), (h, w, targets, weights, lse, denom)


def _vocab_bwd(vc, compute, res, cts):
    h, w, targets, weights, lse, denom = res
    coef = weights * cts[0] / denom
    blocks, hc = _vocab_blocks(w, vc, compute), h.astype(compute)

    def body(dh, xs):
        logits, col = _block_logits(hc, xs[1], xs[0], vc, w.shape[0])
        onehot = col == targets[:, None]  # an iota compare, never materialised
        g = (coef[:, None] * (jnp.exp(logits - lse[:, None]) - onehot)).astype(compute)
        dwj = lax.dot_general(g, hc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        dh = dh + lax.dot_general(g, xs[1], (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)  # fmt: skip
        return dh, dwj

    zero = jnp.zeros(h.shape, jnp.float32)
    dh, dw = lax.scan(body, zero, (jnp.arange(blocks.shape[0]), blocks))
    dw = dw.reshape(-1, w.shape[1])[: w.shape[0]]
    return dh.astype(h.dtype), dw.astype(w.dtype), None, None


vocab_loss.defvjp(lambda *a: _vocab_fwd(*a), _vocab_bwd)


# ----------------------------------------------------------------------------- programs
def loss_and_grads(schedule: str, vocab: int, dim: int, policy_name="bf16", chunk_tokens=1024):
    """f(kernel [V, D] param dtype, h [B, T, D], targets, weights) -> ((loss, aux), grads) of
    gpt2_124m's tied head under `schedule`."""
    from flax import nnx

    from bf16jax.nn import loss as new
    from bf16jax.nn.layers import Embed
    from bf16jax.precision import get_policy

    policy = get_policy(policy_name)
    with nnx.use_eager_sharding(False):
        head = nnx.eval_shape(lambda: Embed(vocab, dim, policy=policy, name="embed",
                                            rngs=nnx.Rngs(0)))  # fmt: skip
    graphdef, state = nnx.split(head)
    lib = old_loss_module(ARGS.old_rev) if schedule == "old" else new

    def loss(kernel, h, targets, weights):
        if schedule == "vocab":
            n = targets.size  # [N, vc] FP32 blocks the size of the token schedule's chunks
            vc = -(-vocab // -(-n // chunk_tokens))
            vc = -(-vc // 128) * 128  # whole lanes
            flat = h.reshape(n, dim), kernel, targets.reshape(n), weights.reshape(n)
            return vocab_loss(*flat, vc, policy.compute_dtype)
        module = nnx.merge(graphdef, jax.tree.map(lambda _: kernel, state))
        return lib.fused_cross_entropy(h, module, targets, weights, chunk_tokens=chunk_tokens)

    return jax.value_and_grad(loss, (0, 1), has_aux=True), policy


def abstract_args(mesh, b: int, t: int, policy, vocab=V, dim=D):
    from jax.sharding import NamedSharding, PartitionSpec

    rep = NamedSharding(mesh, PartitionSpec())
    shapes = ((vocab, dim), policy.param_dtype), ((b, t, dim), policy.compute_dtype)
    shapes += ((b, t), jnp.int32), ((b, t), jnp.float32)
    return [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in shapes]


def _compile(fn, args, mesh, unroll: int):
    scan = jax.lax.scan
    jax.lax.scan = functools.partial(scan, unroll=unroll)  # the loss's loops read it at trace
    try:
        with jax.set_mesh(mesh):
            # a fresh function: jit's trace cache would return the first unroll's program
            return jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    finally:
        jax.lax.scan = scan


def tpu_row(schedule: str, b: int, t: int, mesh) -> dict:
    """One schedule's program at [B, T]: `flops` and `hbm_bytes` with every chunk counted (FLOPs
    from the unroll=2 compile: one iteration more; bytes from the HLO walk), XLA's figures as
    it reports them (`*_xla`: while bodies once), peak / temp HBM, op counts, est. cycles."""
    from program_compare import program_figures

    name, _, chunk = schedule.partition("@")  # e.g. new@2048: chunk_tokens 2048
    fn, policy = loss_and_grads(name, V, D, chunk_tokens=int(chunk or 1024))
    args = abstract_args(mesh, b, t, policy)
    start = time.perf_counter()
    once = _compile(fn, args, mesh, unroll=1)
    compile_s = time.perf_counter() - start
    row, text = program_figures(once), once.as_text()
    bodies, _ = _computations(text)
    loops = [_trips(bodies[w.group(1)]) for w in _WHILE.finditer(text)]
    n = loops[0] if loops else 1  # the loops of one program run the same trip count
    twice = program_figures(_compile(fn, args, mesh, unroll=2))
    row["flops_xla"], row["bytes_xla"] = row.pop("flops"), row.pop("bytes_accessed")
    # unroll=2 runs one iteration more inside its body (and, for an odd count, one outside)
    row["flops"] = row["flops_xla"] + (n - 1) * (twice["flops"] - row["flops_xla"]) / (1 + n % 2)
    row["hbm_bytes"] = hbm_bytes(text)
    row["hbm_bytes_once"] = hbm_bytes(text, once=True)  # beside bytes_xla: the walk's calibration
    row["est_cycles"] = estimated_cycles(text)
    row["loop_trips"] = loops
    return {"schedule": schedule, "B": b, "T": t, **row, "compile_s": round(compile_s, 1)}


# ----------------------------------------------------------------------------- CPU timing
def cpu_times(schedules, b: int, t: int, vocab: int, dim: int, repeats: int) -> list[dict]:
    """Median seconds of one jitted forward + backward per schedule, alternated in one process."""
    import numpy as np

    rng = np.random.default_rng(0)
    fns = {}
    for s in schedules:
        name, _, chunk = s.partition("@")
        fn, policy = loss_and_grads(
            name, vocab, dim, chunk_tokens=int(chunk or ARGS.cpu_chunk_tokens)
        )
        fns[s] = jax.jit(fn)
    args = (jnp.asarray(rng.standard_normal((vocab, dim)) * 0.02, policy.param_dtype),
            jnp.asarray(rng.standard_normal((b, t, dim)), policy.compute_dtype),
            jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
            jnp.asarray(rng.uniform(size=(b, t)) > 0.1, jnp.float32))  # fmt: skip
    times = {s: [] for s in schedules}
    for s in schedules:
        jax.block_until_ready(fns[s](*args))  # compile
    for _ in range(repeats):
        for s in schedules:
            start = time.perf_counter()
            jax.block_until_ready(fns[s](*args))
            times[s].append(time.perf_counter() - start)
    return [{"schedule": s, "device": "cpu", "B": b, "T": t, "V": vocab, "D": dim,
             "median_s": float(np.median(v)), "min_s": float(np.min(v)), "repeats": repeats}
            for s, v in times.items()]  # fmt: skip


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="16x1024,16x1021", help="BxT per program")
    p.add_argument("--schedules", default="old,new,vocab", help="NAME[@chunk_tokens],...")
    p.add_argument("--old_rev", default=OLD_REV, help="git revision of the `old` loss")
    p.add_argument("--chip", default="v5e")
    p.add_argument("--cpu_time", action="store_true", help="time the schedules on the CPU")
    p.add_argument("--cpu_shapes", default="8x512x8192x256,8x509x8192x256", help="BxTxVxD,...")
    p.add_argument("--cpu_chunk_tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    ARGS = p.parse_args()
    schedules = ARGS.schedules.split(",")
    import bf16jax

    print(json.dumps({"bf16jax": bf16jax.__file__, "jax": jax.__version__}), flush=True)
    if ARGS.cpu_time:
        for shape in ARGS.cpu_shapes.split(","):
            b, t, vocab, dim = map(int, shape.split("x"))
            for row in cpu_times(schedules, b, t, vocab, dim, ARGS.repeats):
                print(json.dumps(row), flush=True)
        return
    from program_compare import chip_mesh

    mesh = chip_mesh(ARGS.chip)
    for shape in ARGS.shapes.split(","):
        b, t = map(int, shape.split("x"))
        for s in schedules:
            print(json.dumps(tpu_row(s, b, t, mesh) | {"chip": ARGS.chip}), flush=True)


ARGS = argparse.Namespace(old_rev=OLD_REV, cpu_chunk_tokens=1024)
if __name__ == "__main__":
    main()
