"""Numerics at the edges: one figure per defect of issue #13, measured the same way before and
after the fixes, so each fix has a before/after number.

    python experiments/numerics_edges.py --out=experiments/results/numerics_edges/after.json
    # the same measurements on an older checkout (e.g. `git archive main | tar -x -C /tmp/old`):
    PYTHONPATH=/tmp/old python experiments/numerics_edges.py --out=.../before.json

Each measurement uses only APIs that both versions have, or says "n/a" / the error it met
(a refused configuration is the fix for some of them). Prints and writes a JSON object:

1. lsq: gpt_tiny under `bf16; q=w4a8` at its learning rate (3e-3), 80 steps: weight step sizes
   that were <= 0 at any step, of how many, and the smallest s / s0.
2. decay_mask: weight-decay mask of a scanned (`scan_layers=True`) QAT GPT: step-size leaves
   marked for decay.
3. overrides: `bf16-pure; blocks/1/.*->fp32` under scan_layers (FP32 params it made, or the
   error), and warnings for a rule that matches nothing.
4. kahan: w = 1.0 (BF16) + u per step through make_optimizer under jit, 20,000 steps: the
   fraction of the intended change applied, for u = 1e-5, 3e-6, 1e-6 (kahan, SR, split).
5. fp16_rules: FP16 params with u=sr / u=kahan: accepted? SR: fraction of 1e-4 x 1000 applied;
   Kahan: FP16 subnormal weights (3e-5, 1e-6) plus a zero update.
6. cross_entropy: loss with label -100 at weight 0; whether label -1 wraps to V - 1.
7. grad_subnormal: `grad/subnormal` of an fp16 run (static loss scale 2^15) vs the fraction of
   subnormals among the loss-scaled 16-bit gradients, computed directly.
8. weight_decay: bf16-pure, zero gradients, lr 1e-3, wd 0.1, 2,000 AdamW steps: w / w0
   (exp(-0.2) = 0.8187 expected); the `swamped/decay` diagnostic if any.
9. residual_gelu_fp8: 12-layer GPT logits vs FP32 (mean |diff| / mean |logit|) under bf16 and
   bf16 with an FP32 residual; int8 codes used by fc2's input quantizer after GELU; the FP8
   amax history length.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

jax.config.update("jax_numpy_dtype_promotion", "strict")
BF16, F16 = jnp.bfloat16, jnp.float16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, overrides=()):
    from bf16jax import config as config_lib

    return config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"), list(overrides))


def _step_sizes(params) -> dict[str, np.ndarray]:
    """Weight step sizes s per layer (exp of the log-domain param, or the raw param)."""
    out = {}
    for path, v in nnx.to_flat_state(params):
        name = str(path[-1])
        if name in ("w_scale", "w_log_scale"):
            x = np.asarray(v[...], np.float64)
            out["/".join(map(str, path[:-1]))] = np.exp(x) if name == "w_log_scale" else x
    return out


def lsq(steps: int = 80) -> dict:
    from bf16jax.data import datasets as data
    from bf16jax.parallel import sharding
    from bf16jax.training import trainer as train

    cfg = _config("gpt_tiny", ["precision=bf16; q=w4a8", "train.diagnostics=false"])
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    trainer = train.create_trainer(cfg, mesh)
    it = iter(data.make_dataset(cfg.data, "train"))
    state = trainer.init_state()
    s0 = _step_sizes(jax.device_get(state.params))
    low = {k: v.copy() for k, v in s0.items()}
    for _ in range(steps):
        state, _ = trainer.step(state, trainer.global_batch(next(it)))
        for k, v in _step_sizes(jax.device_get(state.params)).items():
            low[k] = np.minimum(low[k], v)
    ratio = np.concatenate([low[k] / s0[k] for k in s0])
    return {
        "steps": steps,
        "nonpositive": int(np.sum(ratio <= 0)),
        "total": int(ratio.size),
        "min_s_over_s0": float(ratio.min()),
    }


def decay_mask() -> dict:
    from bf16jax.models import build_model
    from bf16jax.training import optim

    cfg = _config("gpt_tiny", ["model.scan_layers=true", "model.num_layers=2"]).model
    model = nnx.eval_shape(lambda: build_model(cfg, "bf16; q=w4a8", rngs=nnx.Rngs(0)))
    mask = optim.weight_decay_mask(nnx.state(model, nnx.Param))
    leaves = [(p, m) for p, m in nnx.to_flat_state(mask) if "scale" in str(p[-1])]
    steps = [(p, m) for p, m in leaves if str(p[-1]) != "scale"]
    decayed = [p for p, m in steps if bool(m.get_value() if hasattr(m, "get_value") else m)]
    return {"step_size_leaves": len(steps), "decayed": len(decayed)}


def overrides() -> dict:
    from bf16jax.models import build_model

    cfg = _config("gpt_tiny", ["model.scan_layers=true", "model.num_layers=2"]).model
    out = {}
    try:
        model = build_model(cfg, "bf16-pure; blocks/1/.*->fp32", rngs=nnx.Rngs(0))
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        out["scan_rule"] = f"accepted; FP32 params: {sum(x.dtype == jnp.float32 for x in leaves)}"
    except ValueError as e:
        out["scan_rule"] = f"refused: {str(e)[:120]}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(cfg.to_dict() | {"scan_layers": False}, "bf16; blockz/.*->fp32",
                    rngs=nnx.Rngs(0))  # fmt: skip
    out["unmatched_rule_warnings"] = sum("matches no module" in str(w.message) for w in caught)
    return out


def _accumulate(rule: str, u: float, steps: int, dtype=BF16) -> tuple[float, float]:
    """w = 1 plus u per step through make_optimizer (SGD, lr = u, gradient -1) under jit.

    Returns the fraction of the intended change n * u applied to the stored weight w, and to
    the value the rule keeps (w + c for Kahan, the FP32 master for split, w otherwise).
    """
    from bf16jax.config import base_config
    from bf16jax.training import optim

    cfg = base_config().optim
    cfg.update(name="sgd", momentum=0.0, learning_rate=u, weight_decay=0.0, clip_norm=0.0,
               schedule="constant", warmup_steps=0, update_rule=rule)  # fmt: skip
    opt = optim.make_optimizer(cfg, total_steps=steps)
    params = {"w": jnp.ones((256,), dtype)}
    grads = {"w": -jnp.ones((256,), jnp.float32)}  # update = -lr * grad = +u

    @jax.jit
    def run(params):
        def body(i, carry):
            p, s = carry
            return opt.update(grads, s, p, key=jax.random.fold_in(jax.random.key(0), i))

        return jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))

    p, s = run(params)
    w = np.asarray(p["w"], np.float64)
    kept = w
    if hasattr(s.rule_state, "compensation"):
        kept = w + np.asarray(s.rule_state.compensation["w"], np.float64)
    elif hasattr(opt, "master"):
        kept = np.asarray(opt.master(p, s)["w"], np.float64)
    intended = steps * u
    return float(np.mean(w - 1.0) / intended), float(np.mean(kept - 1.0) / intended)


def kahan(steps: int = 20_000) -> dict:
    from bf16jax.training import optim

    rules = [r for r in ("kahan", "stochastic", "split") if r in optim.update_rules()]
    out = {}
    for u in (1e-5, 3e-6, 1e-6):
        m = np.float32(1.0)
        for _ in range(steps):  # an FP32 master copy: each add rounds to FP32
            m = np.float32(m + np.float32(u))
        out[f"fp32 master@{u:g}"] = f"{100 * (float(m) - 1.0) / (steps * u):.2f}%"
    for rule in rules:
        for u in (1e-5, 3e-6, 1e-6):
            w, kept = _accumulate(rule, u, steps)
            out[f"{rule}@{u:g}"] = f"w {100 * w:.1f}%, kept {100 * kept:.2f}%"
    out["note"] = (
        "w is the stored BF16 weight (within half an ulp, 0.0039 at 1, of the kept value at "
        "best); kept is w + c (Kahan), the FP32 master (split) or w"
    )
    return out


def fp16_rules() -> dict:
    from bf16jax.precision import get_policy
    from bf16jax.training import optim

    out = {}
    sub = {"w": jnp.asarray([3e-5, 1e-6], F16)}  # FP16 subnormals (smallest normal 6.1e-5)
    try:
        rule = optim.get_update_rule("kahan")
        new, _ = rule.apply(sub, jax.tree.map(jnp.zeros_like, sub), rule.init(sub), None, 0)
        out["kahan: fp16 subnormal w + 0"] = str(np.asarray(new["w"], np.float32).tolist())
    except ValueError as e:
        out["kahan: fp16 subnormal w + 0"] = f"refused: {str(e)[:60]}"
    for rule in ("sr", "kahan"):
        try:
            get_policy(f"p=f16,c=f16,u={rule}")
            out[f"policy u={rule}"] = "accepted"
        except ValueError as e:
            out[f"policy u={rule}"] = f"refused: {str(e)[:80]}"
        name = {"sr": "stochastic"}.get(rule, rule)
        try:
            out[f"{name} 1e-4 x 1000 applied %"] = round(
                100 * _accumulate(name, 1e-4, 1000, F16)[0], 2
            )
        except ValueError as e:
            out[f"{name} 1e-4 x 1000 applied %"] = f"refused: {str(e)[:60]}"
    return out


def cross_entropy() -> dict:
    from bf16jax.nn.loss import cross_entropy as ce

    logits = jax.random.normal(jax.random.key(0), (3, 5))
    out = {}
    loss, _ = jax.jit(lambda x, t, w: ce(x, t, w))(
        logits, jnp.array([1, -100, 2]), jnp.array([1.0, 0.0, 1.0])
    )
    out["ignored -100 loss"] = float(loss)
    t = jnp.array([1, -1, 2])
    try:
        wrapped, _ = ce(logits, t, jnp.ones(3))
        last, _ = ce(logits, jnp.array([1, 4, 2]), jnp.ones(3))
        out["label -1 (weight 1)"] = "wraps to V-1" if float(wrapped) == float(last) else "other"
    except ValueError as e:
        out["label -1 (weight 1)"] = f"refused: {str(e)[:70]}"
    return out


def grad_subnormal() -> dict:
    from bf16jax.data import datasets as data
    from bf16jax.nn.loss import cross_entropy as ce
    from bf16jax.parallel import sharding
    from bf16jax.training import trainer as train

    over = ["precision=fp16", "train.loss_scale=static", "train.loss_scale_init=32768.0",
            "model.num_layers=1", "model.embed_dim=32", "model.mlp_dim=64", "model.max_len=32",
            "data.seq_len=32", "data.batch_size=8", "train.diagnostics=true"]  # fmt: skip
    cfg = _config("gpt_tiny", over)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    trainer = train.create_trainer(cfg, mesh)
    batch = trainer.global_batch(next(iter(data.make_dataset(cfg.data, "train"))))
    state = trainer.init_state()
    params = jax.tree.map(jnp.copy, state.params)

    def scaled_loss(p):  # the step's own loss (fused or materialised) times the loss scale
        model = nnx.merge(trainer.graphdef, p, state.fp8_meta)
        if hasattr(trainer, "loss"):
            from bf16jax.nn.loss import model_loss

            return model_loss(model, batch, trainer.loss, grad_scale=32768.0)[0] * 32768.0
        return ce(*model.logits_and_targets(batch))[0] * 32768.0  # checkouts before issue 11

    grads = jax.tree.leaves(jax.jit(jax.grad(scaled_loss))(params))
    tiny = float(jnp.finfo(F16).tiny)
    sub = sum(int(jnp.sum((jnp.abs(g) > 0) & (jnp.abs(g) < tiny))) for g in grads)
    truth = sub / sum(g.size for g in grads)
    if "diagnostics" in inspect.signature(trainer.step).parameters:  # logging-step variant
        _, metrics = trainer.step(state, batch, diagnostics=True)
    else:
        _, metrics = trainer.step(state, batch)
    return {"metric": float(metrics["grad/subnormal"]), "scaled 16-bit truth": truth}


def weight_decay(steps: int = 2000) -> dict:
    from bf16jax.config import base_config
    from bf16jax.training import optim

    out = {}
    for rule in [r for r in ("nearest", "split") if r in optim.update_rules()]:
        cfg = base_config().optim
        cfg.update(learning_rate=1e-3, weight_decay=0.1, clip_norm=0.0, schedule="constant",
                   warmup_steps=0, update_rule=rule)  # fmt: skip
        opt = optim.make_optimizer(cfg, total_steps=steps)
        params = {"dense": {"kernel": jnp.full((16, 16), 0.5, BF16)}}
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        @jax.jit
        def run(params, opt=opt, zeros=zeros):
            def body(i, c):
                return opt.update(zeros, c[1], c[0])

            return jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))

        p, s = run(params)
        ratio = float(np.mean(np.asarray(p["dense"]["kernel"], np.float64)) / 0.5)
        out[rule] = {"w/w0": round(ratio, 4)}
        if hasattr(opt, "decay_swamped"):
            master = opt.master(p, s)["dense"]["kernel"]
            out[rule]["master/w0"] = round(float(np.mean(np.asarray(master, np.float64))) / 0.5, 4)
            out[rule]["swamped/decay"] = float(opt.decay_swamped(params, opt.init(params)))
    out["expected"] = round(math.exp(-1e-3 * 0.1 * steps), 4)
    return out


def residual_gelu_fp8() -> dict:
    from bf16jax.models import build_model
    from bf16jax.nn import quant

    cfg = _config("gpt_tiny", ["model.num_layers=12"]).model
    tokens = jax.random.randint(jax.random.key(1), (4, 128), 0, 256)
    ref_model = build_model(cfg, "fp32", rngs=nnx.Rngs(0))
    ref = np.asarray(ref_model(tokens), np.float64)
    out = {}
    for policy in ("bf16", "bf16; r=f32"):
        try:
            model = build_model(cfg, policy, rngs=nnx.Rngs(0))
        except ValueError as e:
            out[policy] = f"n/a ({str(e)[:50]})"
            continue
        err = np.mean(np.abs(np.asarray(model(tokens), np.float64) - ref)) / np.mean(np.abs(ref))
        out[f"logit error {policy}"] = float(err)
    # fc2's input codes (after GELU), w8a8, at init: which of the 256 int8 codes can occur.
    model = build_model(cfg, "bf16; q=w8a8", rngs=nnx.Rngs(0))
    block = model.blocks[0]
    h = block.mlp.fc1(block.norm2(model.embed(tokens)))
    gelu = np.asarray(jax.nn.gelu(h.astype(jnp.float32)).astype(BF16), np.float32)
    fc2, gelu_min = block.mlp.fc2, -0.16997  # min of the tanh-form GELU
    if hasattr(fc2, "a_log_scale"):  # offset range [offset, offset + 255 s]
        s, lo, offset = float(np.exp(fc2.a_log_scale[...])), 0, float(fc2.input_min)
        codes = np.clip(np.round((gelu - offset) / s), 0, 255)
    else:  # signed range [-128 s, 127 s]
        s, lo, offset = float(fc2.a_scale[...]), -128, 0.0
        codes = np.clip(np.round(gelu / s), -128, 127)
    out["fc2 codes used on a batch (of 256)"] = int(np.unique(codes).size)
    out["fc2 codes GELU can never reach"] = int(round((gelu_min - offset) / s)) - lo
    fp8 = build_model(cfg.to_dict() | {"num_layers": 1}, "bf16; q=fp8", rngs=nnx.Rngs(0))
    out["fp8 amax history"] = int(fp8.blocks[0].mlp.fc1.fp8_history[...].shape[-1])
    try:
        q = quant.fp8_config("fp8:h16:m1:e4m3")
        out["fp8 configurable"] = f"yes {q}"
    except AttributeError:
        out["fp8 configurable"] = "no"
    return out


MEASUREMENTS = {
    "1_lsq": lsq,
    "2_decay_mask": decay_mask,
    "3_overrides": overrides,
    "4_kahan": kahan,
    "5_fp16_rules": fp16_rules,
    "6_cross_entropy": cross_entropy,
    "7_grad_subnormal": grad_subnormal,
    "8_weight_decay": weight_decay,
    "9_residual_gelu_fp8": residual_gelu_fp8,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="", help="comma list of measurement names")
    args = parser.parse_args()
    import bf16jax

    results = {"bf16jax": os.path.dirname(bf16jax.__file__), "jax": jax.__version__}
    names = [n for n in MEASUREMENTS if not args.only or n in args.only.split(",")]
    for name in names:
        try:
            results[name] = MEASUREMENTS[name]()
        except Exception as e:  # noqa: BLE001 — an old version may lack an API: report it
            results[name] = f"error: {type(e).__name__}: {str(e)[:160]}"
        print(name, json.dumps(results[name]), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
