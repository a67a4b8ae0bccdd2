"""Update rules: how an optimizer step writes FP32 updates into params stored in 16 bits.

- `nearest`: w <- round(w + u), what optax does; an update below half an ulp of w is lost.
- `stochastic`: SR of the FP32 sum (unbiased; `numerics.stochastic_round`), stateless.
- `kahan`: a compensation buffer per BF16 param, in FP32 (a BF16 one stalls), carries what the
  weight could not take (Kahan 1965; Zamirai et al. 2020, arXiv:2010.06192).
- `split`: the int16 low half of the FP32 master beside the BF16 param: exact FP32-master
  updates at 2 + 2 bytes per weight (`numerics.split_master`).

Each rule's state lives in `optim.OptimizerState.rule_state` (checkpointed, sharded like the
params); FP32 params get the plain FP32 sum under every rule (their buffers are empty), FP16
params are refused by SR, Kahan and split (they work on BF16's bit pattern).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bf16jax.precision import numerics

__all__ = [
    "UpdateRule",
    "NearestRule",
    "StochasticRule",
    "KahanRule",
    "KahanState",
    "SplitRule",
    "SplitState",
    "register_update_rule",
    "get_update_rule",
    "update_rules",
    "apply_updates",
    "map_unzip",
]

_F32 = np.dtype(jnp.float32)
_BF16 = np.dtype(jnp.bfloat16)


def map_unzip(fn, n: int, tree, *rest):
    """Maps `fn` (returning an n-tuple) over leaves; returns n trees shaped like `tree`."""
    leaves, treedef = jax.tree.flatten(tree)
    others = [treedef.flatten_up_to(t) for t in rest]
    outs = [fn(*xs) for xs in zip(leaves, *others, strict=True)]
    return tuple(treedef.unflatten([o[i] for o in outs]) for i in range(n))


class UpdateRule(Protocol):
    """Adds FP32 updates to params and stores the sums in each param's dtype.

    `init(params)` returns the rule's state (e.g. Kahan compensation buffers; may be empty);
    `apply(params, updates, rule_state, key, step)` returns `(new_params, new_rule_state)`;
    `master(params, rule_state)` is the FP32 view of the weights the rule keeps (the params
    themselves, or split's exact FP32 master): the optimizer's chain (weight decay, Adafactor's
    param scaling) and the swamping diagnostic read it.
    `key` is a PRNG key (None allowed when `requires_key` is False); `step` an int32 scalar.
    """

    requires_key: bool

    def init(self, params) -> Any: ...

    def apply(self, params, updates, rule_state, key, step) -> tuple[Any, Any]: ...

    def master(self, params, rule_state) -> Any: ...


def _refuse_f16(params, rule: str) -> None:
    # SR, Kahan and split work on BF16's bit pattern (the top half of an FP32); FP16 has another
    # exponent range: SR would silently round to nearest, reduce_precision flushes its subnormals.
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        if hasattr(w, "dtype") and np.dtype(w.dtype) == np.dtype(jnp.float16):
            raise ValueError(
                f"Update rule {rule!r} needs bfloat16 (or float32) params, but "
                f"{jax.tree_util.keystr(path)} is float16. Use p=bf16, or FP32 params with "
                "update_rule 'nearest' (FP16 mixed precision: p=f32,c=f16)."
            )


def _sum_f32(w, u):
    return w.astype(_F32) + u.astype(_F32)


@dataclasses.dataclass(frozen=True)
class NearestRule:
    """w <- round_to_nearest(w + update), the sum taken in FP32; stateless."""

    requires_key: bool = False

    def init(self, params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def apply(self, params, updates, rule_state, key, step):
        del key, step

        def leaf(w, u):
            return _sum_f32(w, u).astype(w.dtype)  # sum in FP32, round once

        return jax.tree.map(leaf, params, updates), rule_state

    def master(self, params, rule_state):
        del rule_state
        return params


@dataclasses.dataclass(frozen=True)
class StochasticRule:
    """w <- SR(w + update): the FP32 sum stochastically rounded to a BF16 param (unbiased).

    FP32 params get the plain sum; FP16 params are refused (SR here works on BF16's bits).
    Keys: `fold_in(key, leaf_index)`, where the caller's `key` is the train state's key folded
    with the step, so every data-parallel replica draws the same bits and replicas stay
    identical.
    """

    requires_key: bool = True

    def init(self, params) -> optax.EmptyState:
        _refuse_f16(params, "stochastic")
        return optax.EmptyState()

    def apply(self, params, updates, rule_state, key, step):
        del step
        _refuse_f16(params, "stochastic")
        leaves, treedef = jax.tree.flatten(params)
        keys = numerics.leaf_keys(key, params)
        new = [
            numerics.stochastic_round(_sum_f32(w, u), k, w.dtype)
            if w.dtype == _BF16
            else _sum_f32(w, u).astype(w.dtype)
            for w, u, k in zip(leaves, treedef.flatten_up_to(updates), keys, strict=True)
        ]
        return treedef.unflatten(new), rule_state

    def master(self, params, rule_state):
        del rule_state
        return params


def _bf16_only(fn, params, *rest):
    """Maps `fn(w, *xs) -> (w', x')` over BF16 leaves; other leaves get the plain FP32 sum and
    keep their (empty) state."""

    def leaf(w, *xs):
        if w.dtype == _BF16:
            return fn(w, *xs)
        return _sum_f32(w, xs[0]).astype(w.dtype), xs[1]

    return map_unzip(leaf, 2, params, *rest)


def _bf16_buffer(params, dtype):
    # A buffer per BF16 param; FP32 params (e.g. an override '.*norm.*->fp32') need none.
    return jax.tree.map(lambda p: jnp.zeros(p.shape if p.dtype == _BF16 else (0,), dtype), params)


class KahanState(NamedTuple):
    compensation: Any  # FP32 per BF16 param ([0] for FP32 params): what the weight could not take


@dataclasses.dataclass(frozen=True)
class KahanRule:
    """Kahan-compensated w + update with an FP32 compensation buffer per BF16 param.

    The buffer carries the part of each update that the BF16 weight could not take (see
    `numerics.kahan_add`), so updates far below half an ulp of w accumulate. It is FP32: a
    BF16 buffer stalls once |c| > 2^8 |u| (measured through `make_optimizer`, w = 1, 20k steps:
    1.6% of the intended change applied at u = 3e-6). 2 + 4 bytes per weight; `split` is exact
    at 2 + 2. Optimizer state, so checkpointed and sharded like its param.
    """

    requires_key: bool = False

    def init(self, params) -> KahanState:
        _refuse_f16(params, "kahan")
        return KahanState(_bf16_buffer(params, _F32))

    def apply(self, params, updates, rule_state, key, step):
        del key, step
        _refuse_f16(params, "kahan")
        new, comp = _bf16_only(numerics.kahan_add, params, updates, rule_state.compensation)
        return new, KahanState(comp)

    def master(self, params, rule_state):
        del rule_state
        return params  # the stored weights: what is deferred in c shows as "swamped"


class SplitState(NamedTuple):
    low: Any  # int16 per BF16 param ([0] for FP32 params): the FP32 master's low half


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """Exact FP32-master updates for BF16 params at 4 bytes per weight: the BF16 param (what the
    forward reads) plus the int16 low half of the FP32 master (`numerics.split_master`).

    Each step rebuilds the FP32 master bit for bit, adds the update in FP32 and splits the sum
    again, so the weights follow exactly the trajectory of an FP32 master copy given the same
    updates; the BF16 half is the master rounded to nearest (ties away from zero). FP32 params
    get the plain sum; FP16 params are refused.
    """

    requires_key: bool = False

    def init(self, params) -> SplitState:
        _refuse_f16(params, "split")
        return SplitState(_bf16_buffer(params, jnp.int16))

    def apply(self, params, updates, rule_state, key, step):
        del key, step
        _refuse_f16(params, "split")
        new, low = _bf16_only(numerics.split_add, params, updates, rule_state.low)
        return new, SplitState(low)

    def master(self, params, rule_state):
        def leaf(w, lo):
            return numerics.join_master(w, lo) if w.dtype == _BF16 else w

        return jax.tree.map(leaf, params, rule_state.low)


_UPDATE_RULES: dict[str, UpdateRule] = {
    "nearest": NearestRule(),
    "stochastic": StochasticRule(),
    "kahan": KahanRule(),
    "split": SplitRule(),
}


def register_update_rule(name: str, rule: UpdateRule) -> None:
    """Makes `rule` available as `optim.update_rule=name` (numerics.py registers its rules)."""
    _UPDATE_RULES[name] = rule


def update_rules() -> tuple[str, ...]:
    """Names of the registered update rules."""
    return tuple(_UPDATE_RULES)


def get_update_rule(name: str | UpdateRule) -> UpdateRule:
    """The rule registered as `name`; an UpdateRule is returned as is."""
    if not isinstance(name, str):
        return name
    if name not in _UPDATE_RULES:
        raise ValueError(
            f"Unknown update rule {name!r} (config.optim.update_rule): use one of "
            f"{', '.join(map(repr, _UPDATE_RULES))}."
        )
    return _UPDATE_RULES[name]


def apply_updates(params, updates, *, rule="nearest", rule_state=None, key=None, step=0):
    """Applies FP32 `updates` to `params` with an update rule.

    Args:
      params: pytree of params (any float dtypes).
      updates: pytree of FP32 updates, same structure.
      rule: a registered rule name or an UpdateRule.
      rule_state: the rule's state; `rule.init(params)` when None.
      key: PRNG key, required by rules with `requires_key` (e.g. stochastic rounding).
      step: the update count (int scalar).

    Returns:
      `(new_params, new_rule_state)`; every new param keeps its dtype.
    """
    rule = get_update_rule(rule)
    if rule.requires_key and key is None:
        raise ValueError(f"Update rule {rule!r} needs a PRNG key: pass key=...")
    if rule_state is None:
        rule_state = rule.init(params)
    return rule.apply(params, updates, rule_state, key, jnp.asarray(step, jnp.int32))
