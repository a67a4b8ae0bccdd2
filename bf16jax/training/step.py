"""The pure steps: the train state, `train_step`, `eval_step`, `predict_step` and the FP32 shadow
step of the drift diagnostic.

`TrainState` holds everything that must survive a restart: step, params (nnx.State, in the
policy's param dtypes), optimizer state (moments in their own dtypes, update-rule buffers), loss
scale, PRNG key, the counts of skipped steps (total, and in a row) and the FP8 delayed-scaling
state (`fp8_meta`: amax histories and scales of `q=fp8` layers, empty otherwise); the data
iterator's position is checkpointed beside it. `train_step(state, batch) -> (state, metrics)` is
pure: the model's graphdef, the optimizer and the config are fixed outside (`train.Trainer`),
randomness is `fold_in(key, step)`. Invariants: gradients are unscaled and accumulated in FP32
(accum dtype) whatever the params' dtype; k micro-batches give the gradient of the one big batch
(each micro mean weighted by its token weight); FP8 meta leaves the step as its
overwrite-with-gradient "gradient" (the new amax histories / scales, `quant.fp8_dot`; max over
micro-batches), never through the optimizer; a step whose gradients, or whose new params /
optimizer state, are not all finite changes nothing but the loss scale, the step and the skip
counters (`_update_if_finite` says which new values need checking). The loss is
`loss.fused_cross_entropy` (no [B, T, V] logits) or the materialised `loss.cross_entropy`
(`loss.LossOptions`). With `diagnostics=True` the step adds the precision
diagnostics (inside the `DIAGNOSTICS_SCOPE` named scope), which the loop runs on logging steps
only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bf16jax.evaluation import calibration as metrics_lib
from bf16jax.nn import loss as loss_lib
from bf16jax.nn.loss import LossOptions, cross_entropy
from bf16jax.parallel import sharding
from bf16jax.precision import loss_scale as ls
from bf16jax.precision import numerics
from bf16jax.training import optim

__all__ = [
    "TrainState",
    "DIAGNOSTICS_SCOPE",
    "train_step",
    "eval_step",
    "predict_step",
    "shadow_fp32_step",
]

_F32 = jnp.float32

_KEY_SALT = 0x7A1  # the state's key is independent of the param-init stream of the same seed
# Dropout keys are fold_in(step_key, _DROPOUT_SALT[, micro-batch]): apart from the update
# rule's per-leaf keys fold_in(step_key, leaf index).
_DROPOUT_SALT = 0x0D5A_0000
# Name scope of the per-step diagnostics in the lowered program (tests count what is inside).
DIAGNOSTICS_SCOPE = "bf16jax_diagnostics"
_DEFAULT_LOSS = LossOptions()  # the materialised cross-entropy, no z-loss


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (checkpointed whole)."""

    step: jax.Array  # int32 [], steps taken (skipped ones included)
    params: Any  # nnx.State of nnx.Param, param dtypes per policy
    opt_state: optim.OptimizerState
    loss_scale: ls.LossScaleState
    key: jax.Array  # typed PRNG key; step randomness is fold_in(key, step)
    skipped: jax.Array  # int32 [], steps skipped: a gradient or the update was not finite
    skips_in_a_row: jax.Array  # int32 [], consecutive skipped steps up to this one (0: applied)
    fp8_meta: Any  # nnx.State of quant.FP8Meta (replicated); empty unless the policy has q=fp8


def _micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...]; micro-batch i takes rows i, i+k, ... (a strided split).

    Strided, so that each device's contiguous rows spread evenly over the k micro-batches.
    """

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        spec = P(None, sharding.BATCH_AXES)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _loss_and_grads(
    params,
    fp8_meta,
    graphdef,
    batch,
    loss_scale,
    loss_opts: LossOptions,
    dropout_key,
    health_dtype=None,
):
    """(aux metrics, FP32 unscaled grads, new FP8 meta, gradient health) of the weighted-mean
    loss on one batch.

    `dropout_key` turns the model's dropout on (models with all rates 0 ignore it).

    The "gradient" of the FP8 meta is its updated value (overwrite-with-gradient, see
    `quant.fp8_dot`): it is returned as the new meta, not unscaled, not an update direction.
    With `health_dtype`, the health (`numerics.gradient_health`) is measured on the gradients
    as the backward pass produced them, scaled by the loss scale: a param used in 16-bit
    compute gets its gradient as a 16-bit value of the scaled loss, and that is what underflows.
    """

    def loss_fn(p, m):
        model = nnx.merge(graphdef, p, m)
        loss, aux = loss_lib.model_loss(
            model, batch, loss_opts, grad_scale=loss_scale.scale, dropout_key=dropout_key
        )
        return ls.scale_loss(loss_scale, loss), {**aux, "loss": loss}

    (_, aux), (grads, new_meta) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, fp8_meta
    )
    health = None
    if health_dtype is not None:
        with jax.named_scope(DIAGNOSTICS_SCOPE):
            health = numerics.gradient_health(grads, health_dtype)
    return aux, ls.unscale_grads(loss_scale, grads), new_meta, health


def _update_if_finite(state, grads, grad_norm, finite, new_meta, optimizer, step_key):
    """(params, opt_state, fp8_meta, applied, trial) after the optimizer step, or the old ones
    when the gradients or the new params are not finite; `trial` = (new params, new optimizer
    state, updates) as computed, for the diagnostics.

    Which new values need a check: with finite gradients (a finite sum of squares: every g^2
    is finite) and a finite old state, Adam's FP32 moments are convex combinations of finite
    values (g and m; g^2 and v), SGD's momentum is bounded by max|g| / (1 - decay), Adafactor's
    statistics are averages of g^2: all finite in FP32. What can still overflow is the update
    itself (a huge learning rate, m_hat / (sqrt(v_hat) + eps) with m near the FP32 maximum), which
    shows in the new params, and a moment stored in a narrower type (f16's maximum is 65504).
    So the new params and the optimizer state's leaves that are not FP32 are checked
    (`loss_scale.all_finite_flat`: a reduction per large leaf, one for all the small ones).
    The update then runs again inside `lax.cond`, so the trial is only read by that
    reduction: a skipped step returns the old buffers untouched, and no select over the whole
    state keeps the old and the new state live together (gpt2_124m on a TPU v5e: peak HBM
    0.54 GB per layer instead of 0.63 with per-leaf selects;
    `experiments/results/program_compare/results.md`).
    """

    def update():
        return optimizer.update(
            grads,
            state.opt_state,
            state.params,
            key=step_key,
            return_updates=True,
            grad_norm=grad_norm,
        )

    trial = update()
    new_params, new_opt, _ = trial
    narrow = [x for x in jax.tree.leaves(new_opt) if _is_narrow_float(x)]
    applied = finite & ls.all_finite_flat((new_params, narrow))
    old = (state.params, state.opt_state, state.fp8_meta)
    chosen = jax.lax.cond(applied, lambda: (*update()[:2], new_meta), lambda: old)
    return (*chosen, applied, trial)


def _is_narrow_float(x) -> bool:
    """A floating leaf stored in fewer than 32 bits (its FP32 value may overflow on storage)."""
    dtype = jnp.asarray(x).dtype
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


_SUMMED = ("invalid_targets",)  # aux counts summed over micro-batches (not weighted means)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optim.Optimizer,
    grad_accum_steps: int = 1,
    loss: LossOptions = _DEFAULT_LOSS,
    diagnostics: bool = False,
    param_norm: bool = True,
    compute_dtype=jnp.bfloat16,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` (the global batch); pure.

    Returns:
      (new_state, metrics): FP32 scalars loss, nll, accuracy, log_z (mean |log Z| of the output
      logits), grad_norm (before clipping; the one norm clipping and the finite check also
      use), param_norm (with `param_norm`: a reduction per param leaf, so the loop's steps
      that do not log leave it out), learning_rate, loss_scale, finite (1/0: the gradients),
      applied (1/0: the update was finite and taken), skipped (total), skips_in_a_row.
      Also `invalid_targets`: labels outside [0, V) with a positive weight (the loss is then
      NaN and the step skipped; `loop.train_and_evaluate` raises).
      With `diagnostics` (the Trainer runs that variant on logging steps only):
      `swamped/<group>` (nonzero update, unchanged weight; the FP32 master under the split
      rule; see `numerics.swamping_fractions`), `swamped/decay` (decayed weights whose decay
      step is below half an ulp: lost under round-to-nearest) and
      `grad/{zero,subnormal,nonfinite}` fractions of the loss-scaled gradients as the backward
      produced them, subnormal meaning below the smallest normal of `compute_dtype` (the mean
      over micro-batches).
    """
    k = grad_accum_steps
    meta = state.fp8_meta
    step_key = jax.random.fold_in(state.key, state.step)
    dropout_key = jax.random.fold_in(step_key, _DROPOUT_SALT)
    health_dtype = compute_dtype if diagnostics else None
    if k == 1:
        aux, grads, new_meta, health = _loss_and_grads(
            state.params,
            meta,
            graphdef,
            batch,
            state.loss_scale,
            loss,
            dropout_key,
            health_dtype,
        )
    else:
        micro = _micro_batches(batch, k)

        def body(carry, xs):
            acc, totals, meta_max, health_sum = carry
            mb, i = xs
            key = jax.random.fold_in(dropout_key, i)
            aux, g, m, h = _loss_and_grads(
                state.params, meta, graphdef, mb, state.loss_scale, loss, key, health_dtype
            )
            w = aux["weight_sum"]
            # Accumulate sum_i w_i * grad(mean_i) in FP32; divided by sum_i w_i below.
            acc = jax.tree.map(lambda a, gi: a + w * gi, acc, g)
            totals = {
                key: totals[key] + (aux[key] if key in _SUMMED else w * aux[key])
                for key in totals
                if key != "weight_sum"
            } | {"weight_sum": totals["weight_sum"] + w}
            # Every micro-batch rolls the same old history: their max is the history whose
            # newest amax is the step's (scales are monotone in it); all entries are >= 0.
            meta_max = jax.tree.map(jnp.maximum, meta_max, m)
            health_sum = jax.tree.map(lambda a, b: a + b / k, health_sum, h)
            return (acc, totals, meta_max, health_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _F32), state.params)
        meta_zeros = jax.tree.map(jnp.zeros_like, meta)
        keys = ("loss", "nll", "z_loss", "accuracy", "log_z")
        init = {key: jnp.zeros([], _F32) for key in keys + _SUMMED + ("weight_sum",)}
        health0 = None
        if diagnostics:
            health0 = {key: jnp.zeros([], _F32) for key in numerics.GRADIENT_HEALTH_KEYS}
        xs = (micro, jnp.arange(k))
        carry0 = (zeros, init, meta_zeros, health0)
        (acc, totals, new_meta, health), _ = jax.lax.scan(body, carry0, xs)
        denom = jnp.where(totals["weight_sum"] > 0, totals["weight_sum"], 1.0)  # as the loss
        grads = jax.tree.map(lambda a: a / denom, acc)
        aux = {key: totals[key] / denom for key in keys} | {
            key: totals[key] for key in _SUMMED + ("weight_sum",)
        }

    # One sum of squares serves the gradient norm, clipping and the finite check: an Inf or NaN
    # element makes it non-finite, and so does a finite gradient whose squares overflow FP32
    # (norm > 1.8e19), which would turn clipping's norm into Inf: skipped as non-finite.
    grad_sq = optim.global_sum_of_squares(grads)
    finite = jnp.isfinite(grad_sq)
    grad_norm = jnp.sqrt(grad_sq)
    params, opt_state, fp8_meta, applied, trial = _update_if_finite(
        state, grads, grad_norm, finite, new_meta, optimizer, step_key
    )
    skipped = state.skipped + (~applied).astype(jnp.int32)
    in_a_row = jnp.where(applied, 0, state.skips_in_a_row + 1).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        # The loss scale reacts to gradient overflow only (its job), not to a bad update.
        loss_scale=ls.adjust(state.loss_scale, finite),
        skipped=skipped,
        skips_in_a_row=in_a_row,
        fp8_meta=fp8_meta,
    )
    metrics = {
        "loss": aux["loss"],
        "nll": aux["nll"],
        "accuracy": aux["accuracy"],
        "log_z": aux["log_z"],
        "grad_norm": grad_norm,
        "learning_rate": optimizer.learning_rate(state.opt_state),
        "loss_scale": state.loss_scale.scale,
        "finite": finite.astype(_F32),
        "applied": applied.astype(_F32),
        "skipped": skipped,
        "skips_in_a_row": in_a_row,
        "invalid_targets": aux["invalid_targets"],
    }
    if param_norm:
        metrics["param_norm"] = optim.global_norm(params)
    if diagnostics:
        with jax.named_scope(DIAGNOSTICS_SCOPE):
            old_master = optimizer.master(state.params, state.opt_state)
            new_params, new_opt, updates = trial
            new_master = optimizer.master(new_params, new_opt)
            metrics |= numerics.swamping_fractions(old_master, new_master, updates)
            metrics["swamped/decay"] = optimizer.decay_swamped(state.params, state.opt_state)
        metrics |= health
    return new_state, metrics


def shadow_fp32_step(
    params,
    batch: dict,
    fp8_meta=None,
    *,
    graphdef: nnx.GraphDef,
    fp32_graphdef: nnx.GraphDef,
) -> dict[str, jax.Array]:
    """BF16-vs-FP32 drift: the loss of the same params under the run's policy and under FP32.

    Returns FP32 scalars `loss`, `fp32_loss`, `rel_gap` = (loss - fp32_loss) / fp32_loss,
    `log_z` (mean |log Z| of the output logits under the policy) and, when `graphdef` tracks
    them, `attn_logit_max` (the largest |attention logit| in any layer). `fp8_meta`: the FP8
    scales (`TrainState.fp8_meta`) of a `q=fp8` model, used by both models.
    """
    ref_params = jax.tree.map(lambda x: x.astype(_F32), params)
    model = _merge(graphdef, params, fp8_meta)
    ours, sown = nnx.capture(_eval_sums, nnx.Intermediate)(model, batch)
    ref = eval_step(ref_params, batch, fp8_meta, graphdef=fp32_graphdef)
    loss = ours["loss_sum"] / ours["weight"]
    ref_loss = ref["loss_sum"] / ref["weight"]
    out = {
        "loss": loss,
        "fp32_loss": ref_loss,
        "rel_gap": (loss - ref_loss) / ref_loss,
        "log_z": ours["log_z"],
    }
    sown = jax.tree.leaves(sown)
    if sown:
        out["attn_logit_max"] = jnp.max(jnp.stack([jnp.max(x) for x in sown]))
    return out


def eval_step(
    params, batch: dict, fp8_meta=None, *, graphdef: nnx.GraphDef
) -> dict[str, jax.Array]:
    """Weighted sums over one eval batch: loss_sum, correct, weight (FP32 scalars), log_z.

    `fp8_meta` (`TrainState.fp8_meta`) is needed by a `q=fp8` model; eval does not update it.
    """
    return _eval_sums(_merge(graphdef, params, fp8_meta), batch)


def predict_step(
    params, batch: dict, fp8_meta=None, *, graphdef: nnx.GraphDef
) -> dict[str, jax.Array]:
    """Per-example confidence, prediction, correctness, NLL and weight for one eval batch
    (`bf16jax.evaluation.calibration.prediction_stats`), for calibration, robustness and
    agreement."""
    logits, targets, weights = _merge(graphdef, params, fp8_meta).logits_and_targets(batch)
    return metrics_lib.prediction_stats(logits, targets, weights)


def _merge(graphdef: nnx.GraphDef, params, fp8_meta=None) -> nnx.Module:
    """The model from its graphdef, params and (for `q=fp8`) FP8 meta."""
    return nnx.merge(graphdef, params, *([] if fp8_meta is None else [fp8_meta]))


def _eval_sums(model, batch: dict) -> dict[str, jax.Array]:
    logits, targets, weights = model.logits_and_targets(batch)
    _, aux = cross_entropy(logits, targets, weights)
    w = aux["weight_sum"]
    return {
        "loss_sum": aux["nll"] * w,
        "correct": aux["accuracy"] * w,
        "weight": w,
        "log_z": aux["log_z"],
    }
