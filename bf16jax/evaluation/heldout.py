"""Held-out evaluation beyond the loss: calibration, robustness to shifted inputs, and agreement.

`evaluate_quality(trainer, params)` runs the eval split once clean and once under every shift
registered for the dataset (`bf16jax.evaluation.shifts`), and returns per condition the accuracy,
loss,
perplexity, ECE (15 bins) and mean confidence
(`bf16jax.evaluation.calibration.summarize_predictions`), plus
the per-example stats for reliability diagrams and for agreement with a reference run (the FP32
model: `agreement_with`). Shifted inputs are a function of (seed, shift, batch index) only, so
runs under different policies are scored on identical examples.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np

from bf16jax.config import LANGUAGE_MODELS
from bf16jax.data import datasets as data_lib
from bf16jax.evaluation import calibration as metrics_lib
from bf16jax.evaluation import shifts as shifts_lib

__all__ = ["CLEAN", "eval_batches", "collect_predictions", "evaluate_quality", "agreement_with"]

CLEAN = "clean"


def eval_batches(config, num_batches: int | None = None):
    """This process's first `num_batches` (default `train.eval_steps`) local eval batches."""
    ds = data_lib.make_dataset(
        config.data,
        "eval",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        model=config.model.name,
    )
    num_batches = config.train.eval_steps if num_batches is None else num_batches
    for i, local in enumerate(ds):
        if i >= num_batches:
            return
        yield local


def collect_predictions(
    trainer,
    params,
    fp8_meta=None,
    *,
    shift: str = CLEAN,
    seed: int = 0,
    num_batches: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-example stats over the first `num_batches` eval batches, with `shift` applied.

    `trainer` is anything with `config`, `eval_batches(num_batches)` and
    `predict(params, local_batch, fp8_meta)`: a `train.Trainer`, or `bf16jax.serving.scoring.Scorer`
    (a serving artifact or program, which ignores `params`).

    Returns:
      Dict of [N] NumPy arrays (`confidence`, `prediction`, `correct`, `nll`, `weight`).
    """
    name = trainer.config.data.name
    fn = None
    if shift != CLEAN:
        registered = shifts_lib.shifts_for(name)
        if shift not in registered:
            raise ValueError(
                f"Unknown shift {shift!r} for data.name={name!r}: use one of "
                f"{sorted(registered) or 'none (no shifts registered)'} or {CLEAN!r}."
            )
        fn = registered[shift]
    parts: list[dict[str, np.ndarray]] = []
    salt = zlib.crc32(shift.encode())
    for i, local in enumerate(trainer.eval_batches(num_batches)):
        if fn is not None:
            local = fn(local, np.random.default_rng([seed, salt, i]))
        parts.append(trainer.predict(params, local, fp8_meta))
    if not parts:
        raise ValueError("The eval split yielded no batch: lower config.data.eval_batch_size.")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate_quality(
    trainer, params, fp8_meta=None, *, seed: int = 0, num_batches: int | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """Metrics on the clean eval split and under every shift of the dataset.

    Returns:
      (summary, predictions): `summary[condition]` holds accuracy, loss, ece, confidence and,
      for language models, perplexity; `predictions[condition]` the per-example stats
      (`collect_predictions`).
      Conditions: "clean" and the names in `bf16jax.evaluation.shifts.SHIFTS[config.data.name]`.
    """
    conditions = [CLEAN, *shifts_lib.shifts_for(trainer.config.data.name)]
    language_model = trainer.config.model.name in LANGUAGE_MODELS
    summary: dict[str, dict[str, float]] = {}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    for cond in conditions:
        stats = collect_predictions(
            trainer, params, fp8_meta, shift=cond, seed=seed, num_batches=num_batches
        )
        predictions[cond] = stats
        summary[cond] = metrics_lib.summarize_predictions(stats, perplexity=language_model)
    return summary, predictions


def agreement_with(
    predictions: dict[str, dict[str, Any]], reference: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """Per condition, the weighted fraction of examples whose argmax matches `reference`'s.

    Both come from `evaluate_quality` on the same config.data and seed (e.g. a bf16 run and
    the FP32 run of the same seed). Conditions missing from either side are skipped.
    """
    return {
        cond: metrics_lib.agreement(
            predictions[cond]["prediction"],
            reference[cond]["prediction"],
            predictions[cond]["weight"],
        )
        for cond in predictions
        if cond in reference
    }
