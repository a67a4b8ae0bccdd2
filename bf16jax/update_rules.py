"""Update rules: how an optimizer writes FP32 updates into params stored in 16 (or 32) bits.

`nearest` rounds w + update to the param's dtype (what optax does: an update below half an ulp
of w is lost), `stochastic` rounds that FP32 sum stochastically (unbiased; Gupta et al. 2015,
arXiv:1502.02551) and `kahan` keeps a compensation buffer per param in the param's dtype (Kahan
summation; Zamirai et al. 2020, arXiv:2010.06192). A rule's state is part of the optimizer
state, so it is checkpointed and sharded like the params. `bf16jax.optim` uses these and
re-exports the public names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bf16jax import numerics

__all__ = [
    "UpdateRule",
    "NearestRule",
    "StochasticRule",
    "KahanRule",
    "KahanState",
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
    """Adds FP32 updates to params and rounds to each param's dtype.

    `init(params)` returns the rule's state (e.g. Kahan compensation buffers; may be empty);
    `apply(params, updates, rule_state, key, step)` returns `(new_params, new_rule_state)`.
    `key` is a PRNG key (None allowed when `requires_key` is False); `step` an int32 scalar.
    """

    requires_key: bool

    def init(self, params) -> Any: ...

    def apply(self, params, updates, rule_state, key, step) -> tuple[Any, Any]: ...


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
            return (w.astype(_F32) + u.astype(_F32)).astype(w.dtype)  # sum in FP32, round once

        return jax.tree.map(leaf, params, updates), rule_state


@dataclasses.dataclass(frozen=True)
class StochasticRule:
    """w <- SR(w + update): the FP32 sum stochastically rounded to a BF16 param (unbiased).

    FP32 params get the plain sum. Keys: `fold_in(key, leaf_index)`, where the caller's `key` is
    the train state's key folded with the step, so every data-parallel replica draws the same
    bits and replicas stay identical.
    """

    requires_key: bool = True

    def init(self, params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def apply(self, params, updates, rule_state, key, step):
        del step
        leaves, treedef = jax.tree.flatten(params)
        keys = numerics.leaf_keys(key, params)
        new = [
            numerics.stochastic_round(w.astype(_F32) + u.astype(_F32), k, w.dtype)
            if w.dtype == _BF16
            else (w.astype(_F32) + u.astype(_F32)).astype(w.dtype)
            for w, u, k in zip(leaves, treedef.flatten_up_to(updates), keys, strict=True)
        ]
        return treedef.unflatten(new), rule_state


class KahanState(NamedTuple):
    compensation: Any  # per param, in the param's dtype: the update the weight could not take


@dataclasses.dataclass(frozen=True)
class KahanRule:
    """Kahan-compensated w + update with a compensation buffer per param in the param dtype.

    Halves the memory of an FP32 master copy (16 + 16 bits instead of 32) and keeps updates far
    below half an ulp of w (see `numerics.kahan_add`). The buffer is optimizer state, so it is
    checkpointed and sharded like its param.
    """

    requires_key: bool = False

    def init(self, params) -> KahanState:
        return KahanState(jax.tree.map(jnp.zeros_like, params))

    def apply(self, params, updates, rule_state, key, step):
        del key, step
        new, comp = map_unzip(numerics.kahan_add, 2, params, updates, rule_state.compensation)
        return new, KahanState(comp)


_UPDATE_RULES: dict[str, UpdateRule] = {
    "nearest": NearestRule(),
    "stochastic": StochasticRule(),
    "kahan": KahanRule(),
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
