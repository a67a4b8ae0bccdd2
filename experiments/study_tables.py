"""The precision study's tables: per model and policy, the mean and spread over seeds of every
number (`summarize`) and the markdown that reports them (`markdown`), the adversarial accuracy
of image models included. Imports nothing from the study (it hands over its results) and
nothing that draws: `precision_study.py` runs it after the sweep, and `--replot` from a
results.json.

A spread over one seed is no spread: one-seed rows show the mean alone; a model whose policies
all reach the same accuracy with 100 % agreement is flagged (`study_plots.degenerate`).
"""

from __future__ import annotations

import numpy as np
from study_plots import degenerate

# The precision diagnostics each run reports (means over the last DIAG_TAIL of logged steps).
DIAG_KEYS = ("swamped/all", "swamped/matrices", "swamped/norm_gains", "swamped/decay")
DIAG_TAIL = 0.4  # diagnostics: mean over the last 40% of the logged steps


def _mean_std(values) -> list[float] | None:
    values = [v for v in values if v is not None]
    return [float(np.mean(values)), float(np.std(values))] if values else None


def summarize(results: list[dict]) -> dict:
    """Per model and policy: mean and std over seeds of every reported number."""
    table: dict = {}
    for r in results:
        table.setdefault(r["model"], {}).setdefault(r["policy"], []).append(r)
    out: dict = {}
    for model, by_policy in table.items():
        out[model] = {}
        for policy, rows in by_policy.items():
            entry: dict = {"seeds": sorted(r["seed"] for r in rows)}
            for cond in rows[0]["quality"]:
                for key in ("accuracy", "loss", "ece", "confidence"):
                    entry[f"{cond}/{key}"] = _mean_std(r["quality"][cond][key] for r in rows)
                entry[f"{cond}/agreement"] = _mean_std(
                    r.get("agreement", {}).get(cond) for r in rows
                )
            for key in (
                "step_time_s",
                "throughput",
                "train_bytes_per_param",
                "inference_bytes_per_param",
                "drift_rel_gap",
                "swamped_all",
            ):
                entry[key] = _mean_std(r.get(key) for r in rows)
            for key in DIAG_KEYS:
                entry[key] = _mean_std((r.get("diagnostics") or {}).get(key) for r in rows)
            for target in ("policy", "int8"):
                robust = [(r.get("robustness") or {}).get(target) for r in rows]
                if all(robust):
                    entry[f"robust/{target}"] = {
                        attack: {e: _mean_std(x[attack][e] for x in robust) for e in per}
                        for attack, per in robust[0].items()
                    }
            entry["throughput_unit"] = rows[0]["throughput_unit"]
            out[model][policy] = entry
    return out


def _pm(entry: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    return _pm_value(entry.get(key), scale, digits, len(entry.get("seeds", [0, 1])))


def _pm_value(value, scale: float = 1.0, digits: int = 1, seeds: int = 2) -> str:
    """ "mean ± std" over seeds; the mean alone for one seed (a spread of 0.00 would mislead)."""
    if value is None:
        return "–"
    if seeds < 2:
        return f"{scale * value[0]:.{digits}f}"
    return f"{scale * value[0]:.{digits}f} ± {scale * value[1]:.{digits}f}"


def robustness_markdown(model: str, by_policy: dict) -> list[str]:
    """FGSM / PGD accuracy per budget: each policy attacked under itself, and QAT models as
    their int8 deployment (attacked through the fake-quant model's STE gradients)."""
    rows = [
        (f"`{policy}`" + (" int8" if target == "int8" else ""), e[f"robust/{target}"],
         len(e.get("seeds", [0, 1])))
        for policy, e in by_policy.items()
        for target in ("policy", "int8")
        if f"robust/{target}" in e
    ]  # fmt: skip
    if not rows:
        return []
    eps = [e for e in rows[0][1]["fgsm"] if float(e) > 0]
    head = " | ".join(f"{a} ε={e}" for a in ("FGSM", "PGD") for e in eps)
    lines = [
        f"#### {model}: adversarial accuracy % (L∞ budget ε on [0, 1] pixels)",
        "",
        f"| policy | clean | {head} |",
        "| --- | ---: | " + " | ".join(["---:"] * 2 * len(eps)) + " |",
    ]
    for name, robust, seeds in rows:
        cells = [_pm_value(robust["fgsm"][next(iter(robust["fgsm"]))], 100, seeds=seeds)]
        cells += [_pm_value(robust[a][e], 100, seeds=seeds) for a in ("fgsm", "pgd") for e in eps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(table: dict, baseline: dict[str, float]) -> str:
    """One table per model: quality, shifted inputs, agreement, diagnostics, cost; then the
    adversarial robustness of image models."""
    lines: list[str] = []
    for model, by_policy in table.items():
        any_entry = next(iter(by_policy.values()))
        shifts = sorted(
            k.split("/")[0] for k in any_entry if k.endswith("/accuracy") and "clean" not in k
        )
        unit = any_entry["throughput_unit"]
        lines += [
            f"### {model}",
            "",
            "| policy | seeds | accuracy % | loss | ECE % | "
            + "".join(f"acc {s} % | " for s in shifts)
            + "agree w/ fp32 % | swamped % | swamped norm gains % | decay lost % | "
            + f"step ms | {unit} | train B/param | infer B/param |",
            "| --- | ---: | ---: | ---: | ---: | "
            + "---: | " * len(shifts)
            + "---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for policy, e in by_policy.items():
            cells = [
                f"`{policy}`",
                str(len(e["seeds"])),
                _pm(e, "clean/accuracy", 100),
                _pm(e, "clean/loss", 1, 4),
                _pm(e, "clean/ece", 100),
                *[_pm(e, f"{s}/accuracy", 100) for s in shifts],
                _pm(e, "clean/agreement", 100),
                _pm(e, "swamped/all", 100, 1),
                _pm(e, "swamped/norm_gains", 100, 1),
                _pm(e, "swamped/decay", 100, 1),
                _pm(e, "step_time_s", 1e3, 1),
                _pm(e, "throughput", 1, 0),
                _pm(e, "train_bytes_per_param", 1, 1).split(" ±")[0],
                _pm(e, "inference_bytes_per_param", 1, 2).split(" ±")[0],
            ]
            lines.append("| " + " | ".join(cells) + " |")
        flag = degenerate(by_policy)
        if flag:
            lines.append(f"\n**{flag[0].upper() + flag[1:]}**: these rows compare nothing.")
        if model in baseline:
            lines.append(
                f"\nFor scale: FP32 runs of different seeds agree on {100 * baseline[model]:.2f}% "
                "of the predictions."
            )
        lines.append(
            f"\nswamped: mean over the last {100 * DIAG_TAIL:.0f}% of the logged steps of "
            "`swamped/all` (updates that left the stored weight unchanged: lost under "
            "round-to-nearest, deferred under SR / Kahan; split reads its FP32 master) and "
            "`swamped/norm_gains`; decay lost: `swamped/decay`."
        )
        lines.append("")
        lines += robustness_markdown(model, by_policy)
    return "\n".join(lines)
