"""Adversarial robustness under a precision policy: FGSM and PGD (L-infinity) attacks.

- FGSM (Goodfellow et al. 2015, arXiv:1412.6572): x + eps * sign(grad_x CE), one step.
- PGD (Madry et al. 2018, arXiv:1706.06083): a uniform random start in the eps-ball, then
  `steps` signed-gradient steps of size 2.5 eps / steps, each projected back onto the eps-ball
  and the valid input range.

The attack's gradient comes from `attack_model` (the model under its own policy: BF16 compute
rounds the input gradient too, which is part of what is measured) and the accuracy from
`eval_model`, usually the same model. For a quantized model deployed as int8
(`quant_model.to_int8`), the int8 model has no useful gradient (rounding): attack the fake-quant
model, whose LSQ straight-through gradients are what training used, and evaluate the int8 one
(they agree bit for bit, so this is a white-box attack on the deployed model; a weaker
gradient through the quantizers can still mask some of the attack's strength).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["fgsm", "pgd", "adversarial_accuracy", "ATTACKS"]

ATTACKS = ("fgsm", "pgd")
_F32 = jnp.float32


def _input_grad(logits_fn, x: jax.Array, labels: jax.Array) -> jax.Array:
    def loss(x):
        # why: FP32 island: the attack's loss, like the training loss, is taken in FP32.
        logits = logits_fn(x).astype(_F32)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))

    return jax.grad(loss)(x)


def fgsm(logits_fn, x: jax.Array, labels: jax.Array, eps, *, lo: float = 0.0, hi: float = 1.0):
    """One signed-gradient step of size `eps`, clipped to [lo, hi].

    Args:
      logits_fn: images -> logits (pure; e.g. an nnx model merged from its state).
      x: clean inputs (FP32) in [lo, hi].
      labels: int class ids [B].
      eps: the L-infinity budget (scalar, may be traced).
    """
    g = _input_grad(logits_fn, x, labels)
    return jnp.clip(x + eps * jnp.sign(g), lo, hi)


def pgd(
    logits_fn,
    x: jax.Array,
    labels: jax.Array,
    eps,
    *,
    key: jax.Array,
    steps: int = 10,
    lo: float = 0.0,
    hi: float = 1.0,
):
    """Projected gradient descent (ascent on the loss) in the L-infinity eps-ball around `x`.

    Random start uniform in the ball, `steps` steps of 2.5 eps / steps (Madry et al.), each
    projected onto the ball and [lo, hi].
    """
    alpha = 2.5 * eps / steps
    start = x + jax.random.uniform(key, x.shape, _F32, -1.0, 1.0) * eps
    adv = jnp.clip(start, lo, hi)

    def body(_, adv):
        g = _input_grad(logits_fn, adv, labels)
        adv = adv + alpha * jnp.sign(g)
        return jnp.clip(jnp.clip(adv, x - eps, x + eps), lo, hi)

    return jax.lax.fori_loop(0, steps, body, adv)


def adversarial_accuracy(
    attack_model: nnx.Module,
    eval_model: nnx.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    epsilons: Iterable[float],
    *,
    pgd_steps: int = 10,
    seed: int = 0,
    lo: float = 0.0,
    hi: float = 1.0,
) -> dict[str, dict[float, float]]:
    """Accuracy of `eval_model` on FGSM and PGD examples crafted against `attack_model`.

    Args:
      attack_model: the model whose input gradients drive the attacks (its policy's numerics).
      eval_model: the model scored on the adversarial inputs (e.g. the int8 deployment of a
        QAT `attack_model`, or `attack_model` itself).
      batches: (images [B, ...] FP32 in [lo, hi], labels [B]) pairs, e.g. the eval split.
      epsilons: L-infinity budgets; 0 gives the clean accuracy.
      pgd_steps: PGD iterations.
      seed: PGD's random starts: `fold_in(key(seed), batch index)`, the same for every model.

    Returns:
      {"fgsm": {eps: accuracy}, "pgd": {eps: accuracy}} over all examples.
    """
    a_def, a_state = nnx.split(attack_model)
    e_def, e_state = nnx.split(eval_model)

    @jax.jit
    def run(a_state, e_state, x, y, eps, key):
        def f(images):
            return nnx.merge(a_def, a_state)(images)

        fg = fgsm(f, x, y, eps, lo=lo, hi=hi)
        pg = pgd(f, x, y, eps, key=key, steps=pgd_steps, lo=lo, hi=hi)
        model = nnx.merge(e_def, e_state)
        correct = [jnp.sum(jnp.argmax(model(a), -1) == y) for a in (fg, pg)]
        return jnp.stack(correct)

    epsilons = [float(e) for e in epsilons]
    hits = {name: dict.fromkeys(epsilons, 0) for name in ATTACKS}
    total = 0
    for i, (images, labels) in enumerate(batches):
        x = jnp.asarray(images, _F32)
        y = jnp.asarray(labels, jnp.int32)
        key = jax.random.fold_in(jax.random.key(seed), i)
        for eps in epsilons:
            fg, pg = np.asarray(run(a_state, e_state, x, y, jnp.float32(eps), key))
            hits["fgsm"][eps] += int(fg)
            hits["pgd"][eps] += int(pg)
        total += int(y.shape[0])
    if total == 0:
        raise ValueError("adversarial_accuracy got no examples: pass at least one batch.")
    return {name: {e: n / total for e, n in per.items()} for name, per in hits.items()}
