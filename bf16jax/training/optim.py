"""Optimizers from config: an optax chain with FP32 math, explicit state dtypes, an update rule.

`make_optimizer(config.optim, total_steps=...)` builds AdamW (arXiv:1711.05101), Adafactor as T5
used it (factored second moments, arXiv:1804.04235) or SGD + heavy-ball momentum, behind optional
global-norm clipping (arXiv:1211.5063; it reuses the train step's gradient norm when given one)
and decoupled, masked weight decay. Invariants:
- The chain sees FP32 grads and params; moment math is FP32 with Python-float decays; moments are
  *stored* in `mu_dtype` / `nu_dtype`. (optax.adam keeps nu in the param dtype, where
  bf16(0.999) == 1.0 and nu stops being an average; that cannot happen here.)
- Updates leave the chain in FP32; an `UpdateRule` (`bf16jax.precision.update_rules`, re-exported
here:
  "nearest", "stochastic", "kahan", "split")
  computes w + update in FP32 and stores it in each param's dtype. Its state (Kahan's FP32
  compensation, split's low 16 bits of the FP32 master) is part of `OptimizerState`, so it is
  checkpointed with the rest. The chain sees each rule's best FP32 view of the weights
  (`UpdateRule.master`): for split, the exact FP32 master.
- Weight decay is masked by parameter kind (`numerics.param_kind`): kernels and embeddings are
  decayed; biases, norm gains and LSQ step sizes never, also when scanned layers stack them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bf16jax.precision import numerics, parse_dtype
from bf16jax.precision.update_rules import (
    KahanRule,
    KahanState,
    NearestRule,
    SplitRule,
    SplitState,
    StochasticRule,
    UpdateRule,
    apply_updates,
    get_update_rule,
    map_unzip,
    register_update_rule,
    update_rules,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "NO_DECAY_NAMES",
    "Optimizer",
    "OptimizerState",
    "ScaleByAdamState",
    "TraceState",
    "UpdateRule",
    "NearestRule",
    "StochasticRule",
    "KahanRule",
    "KahanState",
    "SplitRule",
    "SplitState",
    "check_decay_precision",
    "make_optimizer",
    "make_schedule",
    "scale_by_adam",
    "clip_by_global_norm",
    "global_norm",
    "global_sum_of_squares",
    "trace_momentum",
    "weight_decay_mask",
    "register_update_rule",
    "get_update_rule",
    "update_rules",
    "apply_updates",
]

log = logging.getLogger(__name__)
_F32 = np.dtype(jnp.float32)
_BF16 = np.dtype(jnp.bfloat16)
_MOMENT_SEED = 0x3057  # stochastic rounding of 16-bit moments
_INT32_MAX = np.iinfo(np.int32).max
OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "constant")
# Decay by parameter kind (numerics.param_kind), whatever the shape: scanned layers stack norm
# gains and step sizes into 2-D [layers, n]. A name bf16jax does not use falls back to ndim >= 2.
DECAY_KINDS = frozenset({"kernel", "embedding"})
NO_DECAY_KINDS = frozenset({"bias", "norm_gain", "step_size"})
NO_DECAY_NAMES = frozenset(k for k, v in numerics.PARAM_KINDS.items() if v in NO_DECAY_KINDS)
_ADAFACTOR_DECAY_RATE = 0.8  # T5: second-moment decay 1 - t^-0.8
_ADAFACTOR_EPS = 1e-30  # T5's epsilon1, added to g^2
_ADAFACTOR_CLIP = 1.0  # T5: update RMS clipped to 1 per block


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(_F32) if _is_float(x) else x, tree)


def _increment(count: jax.Array) -> jax.Array:
    return jnp.where(count < _INT32_MAX, count + 1, count)


# ------------------------------------------------------------------- FP32 transforms
class ScaleByAdamState(NamedTuple):
    count: jax.Array  # int32 [], number of updates
    mu: Any  # first moment, stored in mu_dtype
    nu: Any  # second moment, stored in nu_dtype


def scale_by_adam(
    b1: float,
    b2: float,
    eps: float,
    *,
    mu_dtype=_F32,
    nu_dtype=_F32,
    stochastic_moments: bool = False,
) -> optax.GradientTransformation:
    """Adam's direction m_hat / (sqrt(v_hat) + eps) with FP32 math and chosen storage dtypes.

    Args:
      b1: first-moment decay (a Python float: never rounded to a 16-bit dtype).
      b2: second-moment decay.
      eps: added to sqrt(v_hat).
      mu_dtype: storage dtype of the first moment.
      nu_dtype: storage dtype of the second moment.
      stochastic_moments: store 16-bit moments with stochastic rounding (unbiased, so a BF16
        `nu` with b2 = 0.999 still averages); keys from a fixed seed folded with the count, the
        same on every replica.

    Returns:
      A GradientTransformation whose updates are FP32 (no learning rate, no sign flip).
    """
    b1, b2, eps = float(b1), float(b2), float(eps)
    mu_dtype, nu_dtype = np.dtype(mu_dtype), np.dtype(nu_dtype)

    def init_fn(params):
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params),
            nu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=nu_dtype), params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = _increment(state.count)
        t = count.astype(_F32)
        # Bias corrections in FP32 from FP32 decays; in bf16, 1 - 0.999**t would be 0.
        c1 = 1.0 - jnp.float32(b1) ** t
        c2 = 1.0 - jnp.float32(b2) ** t

        step_key = jax.random.fold_in(jax.random.key(_MOMENT_SEED), count)
        keys = numerics.leaf_keys(step_key, updates)

        def store(x, dtype, key):
            if stochastic_moments and np.dtype(dtype) == _BF16:
                return numerics.stochastic_round(x, key, dtype)
            return x.astype(dtype)

        def leaf(g, m, v, key):
            g = g.astype(_F32)
            # FP32 math: b2 = 0.999 must not round to 1.0.
            m = (1.0 - b1) * g + b1 * m.astype(_F32)
            v = (1.0 - b2) * (g * g) + b2 * v.astype(_F32)
            u = (m / c1) / (jnp.sqrt(v / c2) + eps)
            km, kv = jax.random.split(key)
            return u, store(m, mu_dtype, km), store(v, nu_dtype, kv)

        key_tree = jax.tree.structure(updates).unflatten(keys)
        out, mu, nu = map_unzip(leaf, 3, updates, state.mu, state.nu, key_tree)
        return out, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class TraceState(NamedTuple):
    trace: Any  # momentum buffer, stored in its dtype


def trace_momentum(decay: float, *, dtype=_F32) -> optax.GradientTransformation:
    """Heavy-ball momentum m <- g + decay * m (PyTorch SGD convention), FP32 math.

    Args:
      decay: momentum coefficient in [0, 1).
      dtype: storage dtype of the momentum buffer.

    Returns:
      A GradientTransformation whose updates (the new buffer) are FP32.
    """
    decay, dtype = float(decay), np.dtype(dtype)

    def init_fn(params):
        return TraceState(trace=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype), params))

    def update_fn(updates, state, params=None):
        del params

        def leaf(g, m):
            m = g.astype(_F32) + decay * m.astype(_F32)
            return m, m.astype(dtype)

        out, trace = map_unzip(leaf, 2, updates, state.trace)
        return out, TraceState(trace=trace)

    return optax.GradientTransformation(init_fn, update_fn)


def global_norm(tree) -> jax.Array:
    """The L2 norm over all leaves of `tree` (`optax.tree.norm`'s), every leaf read as FP32: an
    FP32 scalar, summed in few reductions (`numerics.sum_over_leaves`)."""
    # why: optax sums the squares in the leaves' dtype and returns it: on 0.84M BF16 gradient
    # entries it gave a BF16 norm 9.3e-4 off the float64 value; on the FP32 view, 5e-10.
    # The cast fuses into the reduction (no FP32 copy of the gradients is kept).
    return jnp.sqrt(global_sum_of_squares(tree))


def global_sum_of_squares(tree) -> jax.Array:
    """The squared `global_norm` (an FP32 scalar): Inf or NaN iff an element is, or iff the
    squares of finite elements overflow FP32 (a norm above ~1.8e19)."""
    return numerics.sum_over_leaves(jnp.square, tree)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm (same state, same arithmetic) that can reuse a norm the caller
    already has: `update(..., grad_norm=n)`. The train step computes the gradient norm once and
    shares it between clipping and its metrics instead of reducing the gradients twice."""
    max_norm = float(max_norm)

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra):
        del params, extra
        norm = global_norm(updates) if grad_norm is None else grad_norm
        trigger = norm < max_norm

        def clip(t):
            return jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _fp32_inputs(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs `tx` on FP32 copies of grads and params, so its state and math are FP32."""
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        return tx.init(_to_f32(params))

    def update_fn(updates, state, params=None, **extra):
        params = None if params is None else _to_f32(params)
        return tx.update(_to_f32(updates), state, params, **extra)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def weight_decay_mask(params):
    """True for leaves that get weight decay, by parameter kind (`numerics.param_kind`).

    Kernels and embeddings are decayed; biases, norm gains and LSQ step sizes are not, whatever
    their shape (scanned layers stack them into [layers, n]; decaying a log step size would
    pull every step size towards 1). A leaf with a name bf16jax's layers do not use is decayed
    iff ndim >= 2. Works on nnx.State (the trailing `.value` of a Variable is skipped) and on
    plain dicts.
    """

    def decay(path, x) -> bool:
        kind = numerics.param_kind(path)
        if kind in DECAY_KINDS:
            return True
        if kind in NO_DECAY_KINDS:
            return False
        return bool(jnp.ndim(x) >= 2)

    return jax.tree.map_with_path(decay, params)


# ------------------------------------------------------------------- optimizer
class OptimizerState(NamedTuple):
    count: jax.Array  # int32 [], applied updates; the schedule is evaluated here
    tx_state: Any  # state of `Optimizer.tx` (FP32 unless mu_dtype/nu_dtype say otherwise)
    rule_state: Any  # state of the update rule


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax direction `tx` (FP32 in/out, no LR), a schedule and an update rule.

    Attributes:
      name: "adamw", "adafactor" or "sgd".
      tx: clipping -> optimizer direction -> masked decoupled weight decay; runs in FP32.
      schedule: step -> learning rate (FP32 scalar); log `learning_rate(state)`.
      rule: the UpdateRule that adds `-lr * direction` to the params.
      weight_decay: the decoupled weight decay coefficient in `tx` (0: none).
    """

    name: str
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    rule: UpdateRule
    weight_decay: float = 0.0

    def init(self, params) -> OptimizerState:
        """The initial state for `params` (a pytree or nnx.State of arrays)."""
        return OptimizerState(
            count=jnp.zeros([], jnp.int32),
            tx_state=self.tx.init(params),
            rule_state=self.rule.init(params),
        )

    def learning_rate(self, state: OptimizerState) -> jax.Array:
        """The learning rate the next `update` with `state` uses."""
        return self.schedule(state.count)

    def master(self, params, state: OptimizerState):
        """The FP32 view of the weights the update rule keeps (`UpdateRule.master`; the params
        themselves for a registered rule without one)."""
        master = getattr(self.rule, "master", None)
        return params if master is None else master(params, state.rule_state)

    def decay_swamped(self, params, state: OptimizerState) -> jax.Array:
        """Fraction of decayed weights whose next decay step (lr * wd * w) is below half an ulp
        of the stored weight: lost under round-to-nearest, carried under SR / Kahan, ~0 for
        FP32 (or split's FP32 master). See `numerics.decay_swamped_fraction`."""
        if not self.weight_decay:
            return jnp.zeros([], _F32)
        master = self.master(params, state)
        step = self.schedule(state.count) * self.weight_decay
        return numerics.decay_swamped_fraction(master, step, weight_decay_mask(master))

    def update(
        self,
        grads,
        state: OptimizerState,
        params,
        *,
        key=None,
        return_updates=False,
        grad_norm=None,
    ):
        """One optimizer step; pure, so call it inside the jitted train step.

        Args:
          grads: gradients (any float dtype; cast to FP32), same structure as params.
          state: from `init` or a previous `update`.
          params: current params; new params keep their dtypes.
          key: PRNG key for the update rule (needed by stochastic rounding only).
          return_updates: also return the FP32 updates the rule added (for diagnostics).
          grad_norm: `global_norm(grads)` if the caller has it (clipping reuses it).

        Returns:
          `(new_params, new_state)`, plus the updates when `return_updates`.
        """
        extra = {} if grad_norm is None else {"grad_norm": grad_norm}
        direction, tx_state = self.tx.update(
            grads, state.tx_state, self.master(params, state), **extra
        )
        lr = self.schedule(state.count)
        updates = jax.tree.map(lambda d: -lr * d, direction)
        new_params, rule_state = apply_updates(
            params, updates, rule=self.rule, rule_state=state.rule_state, key=key, step=state.count
        )
        new_state = OptimizerState(_increment(state.count), tx_state, rule_state)
        if return_updates:
            return new_params, new_state, updates
        return new_params, new_state


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` (or constant): optax schedules.

    lr(s) = lr * (s + 1) / W for s < W (W = warmup_steps; step 0 already trains, so the warmup
    reaches lr at step W - 1, not W as `optax.warmup_cosine_decay_schedule` would), then
    cosine: min + (lr - min) * (1 + cos(pi * min(1, (s - W) / (total_steps - W)))) / 2;
    constant: lr. `optax.join_schedules` of `optax.linear_schedule` and
    `optax.cosine_decay_schedule` / `optax.constant_schedule`. Returns a FP32 scalar for an int
    step.
    """
    _check_schedule(optim_cfg, total_steps)
    lr = float(optim_cfg.learning_rate)
    warmup = int(optim_cfg.warmup_steps)
    if optim_cfg.schedule == "cosine":
        decay_steps = max(int(total_steps) - warmup, 1)
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim_cfg.min_lr_ratio))
    else:
        after = optax.constant_schedule(lr)
    if warmup > 1:
        warm = optax.linear_schedule(lr / warmup, lr, transition_steps=warmup - 1)
        after = optax.join_schedules([warm, after], boundaries=[warmup])
    elif warmup == 1:  # step 0 at lr (1 / W of it), then the decay from step 1
        after = optax.join_schedules([optax.constant_schedule(lr), after], boundaries=[1])

    def schedule(step):
        # The step as FP32 (exact below 2^24): optax's cosine mixes it with Python floats, which
        # strict dtype promotion refuses for an int32 count.
        return jnp.asarray(after(jnp.asarray(step).astype(_F32)), _F32)

    return schedule


def make_optimizer(optim_cfg, *, total_steps: int, update_rule: str | None = None) -> Optimizer:
    """Builds the Optimizer described by `config.optim` for a run of `total_steps`.

    Args:
      optim_cfg: config.optim (name, learning_rate, b1, b2, eps, weight_decay, momentum,
        mu_dtype, nu_dtype, clip_norm, schedule, warmup_steps, min_lr_ratio, update_rule).
        AdamW uses b1, b2, eps, mu/nu dtypes; SGD uses momentum (0 = none) stored in mu_dtype;
        Adafactor is T5's (decay 1 - t^-0.8, eps 1e-30, block-RMS clip 1, update scaled by
        param RMS, no first moment) with FP32 statistics. Weight decay is decoupled
        (multiplied by the LR, as optax.adamw) and masked by `weight_decay_mask`.
      total_steps: the run's length (end of the cosine).
      update_rule: the policy's update rule (`Policy.update_rule`), used when
        `optim_cfg.update_rule` is empty; the two may not disagree.

    Raises:
      ValueError: naming the bad key and the accepted values.
    """
    cfg = optim_cfg
    _check_optim(cfg)
    schedule = make_schedule(cfg, total_steps)
    rule = get_update_rule(_rule_name(cfg.update_rule, update_rule))
    stochastic_moments = cfg.get("moment_rounding", "nearest") == "stochastic"
    mu_dtype, nu_dtype = _dtype(cfg, "mu_dtype"), _dtype(cfg, "nu_dtype")
    chain = []
    if cfg.clip_norm > 0:
        chain.append(clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        if not stochastic_moments:  # unbiased rounding keeps a 16-bit average moving
            _check_storage(mu_dtype, cfg.b1, "mu_dtype", "b1")
            _check_storage(nu_dtype, cfg.b2, "nu_dtype", "b2")
        chain.append(
            scale_by_adam(
                cfg.b1,
                cfg.b2,
                cfg.eps,
                mu_dtype=mu_dtype,
                nu_dtype=nu_dtype,
                stochastic_moments=stochastic_moments,
            )
        )
    elif cfg.name == "sgd":
        if cfg.momentum > 0:
            _check_storage(mu_dtype, cfg.momentum, "mu_dtype", "momentum")
            chain.append(trace_momentum(cfg.momentum, dtype=mu_dtype))
    else:  # adafactor
        if nu_dtype != _F32:
            raise ValueError(
                f"config.optim.nu_dtype={cfg.nu_dtype!r}: adafactor keeps its factored second "
                "moments in FP32 (their decay 1 - t^-0.8 tends to 1, which 16 bits cannot "
                "store); set config.optim.nu_dtype='f32'."
            )
        chain += [
            optax.scale_by_factored_rms(
                decay_rate=_ADAFACTOR_DECAY_RATE, epsilon=_ADAFACTOR_EPS
            ),  # FP32 stats: `_fp32_inputs` feeds it FP32 params
            optax.clip_by_block_rms(_ADAFACTOR_CLIP),
            optax.scale_by_param_block_rms(),
        ]
    if cfg.weight_decay > 0:
        chain.append(optax.add_decayed_weights(float(cfg.weight_decay), mask=weight_decay_mask))
    tx = _fp32_inputs(optax.chain(*chain) if chain else optax.identity())  # plain SGD: identity
    return Optimizer(
        name=cfg.name,
        tx=tx,
        schedule=schedule,
        rule=rule,
        weight_decay=float(cfg.weight_decay),
    )


def check_decay_precision(optim_cfg, params, rule, *, total_steps: int) -> float:
    """Warns when decoupled weight decay cannot change 16-bit weights under round-to-nearest.

    Each step multiplies a decayed weight by (1 - lr * wd); stored in BF16 that change is lost
    whenever lr * wd is below half an ulp, 2^-9 of |w| at best, and the weights never decay
    (bf16-pure, lr 1e-3, wd 0.1: w / w0 = 1.0 after 2,000 steps instead of 0.82). Checked at
    every step's learning rate against the params' dtypes; SR / Kahan / split carry the decay.

    Args:
      optim_cfg: config.optim (learning rate, schedule, weight_decay).
      params: the params (or their ShapeDtypeStructs).
      rule: the update rule (name or UpdateRule); only round-to-nearest loses the decay.
      total_steps: the run's length (the schedule's end).

    Returns:
      The fraction of the run's steps whose decay is lost (0 when nothing is wrong).
    """
    wd = float(optim_cfg.weight_decay)
    dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params) if hasattr(x, "dtype")}
    sixteen = [d for d in dtypes if d in (np.dtype(_BF16), np.dtype(jnp.float16))]
    if wd <= 0 or not isinstance(get_update_rule(rule), NearestRule) or not sixteen:
        return 0.0
    half_ulp = min(float(jnp.finfo(d).eps) for d in sixteen) / 2  # relative, at best
    schedule = make_schedule(optim_cfg, total_steps)
    steps = np.arange(total_steps)
    lost = float(np.mean(np.asarray(jax.vmap(schedule)(steps)) * wd < half_ulp))
    if lost > 0:
        peak = float(optim_cfg.learning_rate) * wd
        msg = (
            f"Weight decay does nothing on {', '.join(sorted(d.name for d in sixteen))} params "
            f"in {100 * lost:.0f}% of the steps: lr * wd (peak {peak:.2g}) is below half an ulp "
            f"({half_ulp:.2g} of |w|), so round-to-nearest loses every decay step. Use update "
            "rule u=split, u=kahan or u=sr, FP32 params (p=f32), or no decay; "
            "`swamped/decay` in the train metrics tracks it."
        )
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return lost


# ------------------------------------------------------------------- validation
def _rule_name(configured: str, from_policy: str | None) -> str:
    configured = configured or ""
    if configured and from_policy and from_policy != "nearest" and configured != from_policy:
        raise ValueError(
            f"config.optim.update_rule={configured!r} conflicts with the policy's update rule "
            f"u={from_policy}: set one of them (empty optim.update_rule follows the policy)."
        )
    return configured or from_policy or "nearest"


def _dtype(cfg, key: str) -> np.dtype:
    try:
        return parse_dtype(cfg[key])
    except ValueError as e:
        raise ValueError(f"config.optim.{key}: {e}") from None


def _check_storage(dtype: np.dtype, decay: float, dtype_key: str, decay_key: str) -> None:
    # An EMA stored in `dtype` stalls when (1 - decay) is below its relative rounding step.
    eps = float(jnp.finfo(dtype).eps)
    if decay > 0 and 1.0 - decay < eps:
        raise ValueError(
            f"config.optim.{dtype_key}={np.dtype(dtype).name} cannot hold an average with "
            f"config.optim.{decay_key}={decay}: 1 - {decay_key} < {eps:g} rounds every decay "
            f"away. Use {dtype_key}='f32' or {decay_key} <= {1 - eps:g}."
        )


def _in_range(cfg, key: str, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    v = cfg[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        bounds = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"config.optim.{key}={v!r} is out of range: use a value in {bounds}.")


def _one_of(cfg, key: str, accepted) -> None:
    if cfg[key] not in accepted:
        raise ValueError(
            f"config.optim.{key}={cfg[key]!r} is not valid: use one of "
            f"{', '.join(map(repr, accepted))}."
        )


def _check_schedule(cfg, total_steps: int) -> None:
    _one_of(cfg, "schedule", SCHEDULES)
    _in_range(cfg, "learning_rate", 0.0, math.inf, hi_open=True)
    _in_range(cfg, "min_lr_ratio", 0.0, 1.0)
    _in_range(cfg, "warmup_steps", 0, math.inf, hi_open=True)
    if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be an int >= 1 (config.train.steps).")


def _check_optim(cfg) -> None:
    _one_of(cfg, "name", OPTIMIZERS)
    if "moment_rounding" in cfg:
        _one_of(cfg, "moment_rounding", ("nearest", "stochastic"))
    _in_range(cfg, "b1", 0.0, 1.0, hi_open=True)
    _in_range(cfg, "b2", 0.0, 1.0, hi_open=True)
    _in_range(cfg, "eps", 0.0, math.inf, lo_open=True, hi_open=True)
    _in_range(cfg, "momentum", 0.0, 1.0, hi_open=True)
    _in_range(cfg, "weight_decay", 0.0, math.inf, hi_open=True)
    _in_range(cfg, "clip_norm", 0.0, math.inf, hi_open=True)
