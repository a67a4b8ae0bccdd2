"""The precision regression gate: a candidate artifact against its FP32 reference.

`python -m bf16jax.gate --candidate=ART --reference=ART_FP32` scores both on the same held-out
examples (clean and shifted, `bf16jax.serving.scoring`), checks every drift against its threshold
and
exits 0 (pass), 1 (a regression: the report says which check failed and by how much) or 2 (bad
input). Checks, all paired on identical examples:

- `accuracy_drop`: reference - candidate clean accuracy (points of 1.0), with the paired 95%
  interval of the difference in the report;
- `shifted_accuracy_drop`: the same on each shifted condition (the worst one is checked);
- `ece_increase`: candidate - reference expected calibration error (15 bins);
- `agreement`: fraction of examples where the two argmax predictions agree (clean);
- `nll_drift`: mean |NLL_candidate - NLL_reference| per example in nats — a graded measure of
  how far the candidate's probabilities moved, which catches regressions (a 16-bit softmax)
  long before they flip enough argmaxes to move accuracy.

Default thresholds sit between measured honest exports and planted regressions
(docs/guides/serving.md);
every one is a flag, or a JSON file (`--thresholds=FILE`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bf16jax.evaluation import heldout as evaluation
from bf16jax.serving.scoring import Scorer, evaluate

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PLANTS",
    "gate",
    "paired_difference",
    "plant",
    "softmax_bf16_policy",
]

# Keys: the check names above. On gpt_tiny (w8a8 QAT, 4 layers) honest bf16 / int8 exports
# measured agreement 98.9% and NLL drift 0.016 nats; planted regressions 89.8-90.8% and
# 0.15-0.16 (experiments/results/serving/gate_table.md).
DEFAULT_THRESHOLDS: dict[str, float] = {
    "max_accuracy_drop": 0.01,
    "max_shifted_accuracy_drop": 0.02,
    "max_ece_increase": 0.01,
    "min_agreement": 0.97,
    "max_nll_drift": 0.05,
}


def paired_difference(a, b, weights) -> tuple[float, float]:
    """Weighted mean of a - b and the half-width of its 95% normal interval (paired samples)."""
    a, b, w = (np.asarray(x, np.float64) for x in (a, b, weights))
    total = w.sum()
    if total <= 0:
        raise ValueError("No weighted examples to compare.")
    d = a - b
    mean = float(np.sum(w * d) / total)
    var = float(np.sum(w * (d - mean) ** 2) / total)
    n_eff = total**2 / max(float(np.sum(w**2)), 1e-12)
    return mean, 1.96 * math.sqrt(var / max(n_eff, 1.0))


def _check(name: str, value: float, threshold: float, higher_is_worse: bool) -> dict[str, Any]:
    ok = value <= threshold if higher_is_worse else value >= threshold
    bound = "max" if higher_is_worse else "min"
    return {"check": name, "value": value, bound: threshold, "passed": bool(ok)}


def gate(
    candidate: Scorer,
    reference: Scorer,
    thresholds: dict[str, float] | None = None,
    *,
    num_batches: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluates both models and checks the drifts (see the module docstring).

    Returns:
      {"passed", "checks": [{check, value, max|min, passed}], "candidate", "reference",
      "accuracy_difference_95ci", "examples"}.
    """
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    unknown = sorted(set(limits) - set(DEFAULT_THRESHOLDS))
    if unknown:
        raise ValueError(f"Unknown gate thresholds {unknown}: use {sorted(DEFAULT_THRESHOLDS)}.")
    if candidate.config.data.to_dict() != reference.config.data.to_dict():
        raise ValueError(
            "Candidate and reference were trained on different data configs: gate a candidate "
            "against the FP32 export of the same run."
        )
    report, preds = evaluate(candidate, reference, num_batches=num_batches, seed=seed)
    cand, ref = preds["candidate"], preds["reference"]
    clean = evaluation.CLEAN
    w = cand[clean]["weight"]
    acc_diff, acc_ci = paired_difference(ref[clean]["correct"], cand[clean]["correct"], w)
    shifted_drops = {
        name: report["reference"]["shifted"][name]["accuracy"] - m["accuracy"]
        for name, m in report["shifted"].items()
    }
    worst_shift = max(shifted_drops.values()) if shifted_drops else 0.0
    nll_drift = float(np.sum(w * np.abs(cand[clean]["nll"] - ref[clean]["nll"])) / w.sum())
    checks = [
        _check("accuracy_drop", acc_diff, limits["max_accuracy_drop"], True),
        _check("shifted_accuracy_drop", worst_shift, limits["max_shifted_accuracy_drop"], True),
        _check(
            "ece_increase",
            report["clean"]["ece"] - report["reference"]["clean"]["ece"],
            limits["max_ece_increase"],
            True,
        ),  # fmt: skip
        _check("agreement", report["agreement"][clean], limits["min_agreement"], False),
        _check("nll_drift", nll_drift, limits["max_nll_drift"], True),
    ]
    return {
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
        "accuracy_difference_95ci": [acc_diff - acc_ci, acc_diff + acc_ci],
        "shifted_accuracy_drops": shifted_drops,
        "examples": report["examples"],
        "candidate": {
            **candidate.description,
            "clean": report["clean"],
            "shifted": report["shifted"],
        },  # fmt: skip
        "reference": report["reference"],
        "agreement": report["agreement"],
        "thresholds": limits,
        "data": report.get("data"),
    }


# ----------------------------------------------------------------------------- planted regressions
# What the gate is validated against (tests/test_serving.py, experiments/results/serving.md):
# params edited the way a
# careless serving change would, exported and gated like any candidate.
def _int4_head(params: dict) -> None:
    """The untied output head rounded to 4-bit per-channel codes (a too-eager quantization)."""
    from bf16jax.nn import quant

    if "head" not in params:
        raise ValueError("int4_head needs an untied head: train with model.tie_embeddings=False.")
    w = np.asarray(params["head"]["kernel"], np.float32)
    s = np.asarray(quant.init_step_size(w, 4, axis=0))
    params["head"]["kernel"] = np.round(np.clip(w / s, -8, 7)) * s


def _stale_int8_scales(params: dict) -> None:
    """Every LSQ activation step size 8x too large (a stale calibration): int8 activations keep
    5 of their 8 bits."""

    def visit(node):
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value)
            elif key == "a_log_scale":  # s = exp(param): log 8 added
                node[key] = np.asarray(value) + np.float32(np.log(8.0))

    visit(params)


PLANTS = {"int4_head": _int4_head, "stale_int8_scales": _stale_int8_scales}


def plant(params: dict, kind: str) -> dict:
    """A copy of a checkpoint's pure-dict params with planted regression `kind` (PLANTS)."""
    import jax

    if kind not in PLANTS:
        raise ValueError(f"Unknown plant {kind!r}: use one of {sorted(PLANTS)}.")
    params = jax.tree.map(np.array, params)
    PLANTS[kind](params)
    return params


def softmax_bf16_policy(train_policy) -> str:
    """The bf16 serving policy of a run with its attention logits and softmax in BF16 (the
    attention modules' accum dtype; their q/k/v/o projections stay as served)."""
    from bf16jax.serving.inference import serving_policy

    base = serving_policy(train_policy, "bf16")
    q = f",q={base.quant}" if base.quant not in (None, "none") else ""
    return (f"{base.dtypes_str()}; blocks/\\d+/attn/[qkvo]->p=bf16,c=bf16,a=f32{q}; "
            f"blocks/\\d+/attn->p=bf16,c=bf16,a=bf16{q}")  # fmt: skip
