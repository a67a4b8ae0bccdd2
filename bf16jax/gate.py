"""Command: `python -m bf16jax.gate` (library: `bf16jax.serving.gate`).

See `bf16jax.serving.gate` for what it computes; this module holds its flags and `main`.
Prints the verdict (one line per check, then `gate: PASSED` or `gate: FAILED (checks)`); the
JSON report goes to `--out` / `--report=FILE`, or after the verdict with `--json`. Exit 0
passed, 1 failed, 2 bad input.
"""

from __future__ import annotations

import json
import sys

from bf16jax.serving.gate import DEFAULT_THRESHOLDS, gate
from bf16jax.serving.scoring import Scorer


def thresholds_from_flags() -> dict[str, float]:
    from absl import flags

    f = flags.FLAGS
    values = dict(DEFAULT_THRESHOLDS)
    if f.thresholds:
        try:
            with open(f.thresholds, encoding="utf-8") as fh:
                loaded = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ValueError(
                f"--thresholds={f.thresholds} cannot be read ({why}): pass a JSON file like "
                '{"max_nll_drift": 0.05}.'
            ) from None
        if not isinstance(loaded, dict):
            raise ValueError(
                f"--thresholds={f.thresholds} must hold a JSON object like "
                '{"max_nll_drift": 0.05}.'
            )
        unknown = sorted(set(loaded) - set(DEFAULT_THRESHOLDS))
        if unknown:
            raise ValueError(
                f"--thresholds={f.thresholds} names unknown thresholds {unknown}: use "
                f"{sorted(DEFAULT_THRESHOLDS)}."
            )
        values.update(loaded)
    for key in DEFAULT_THRESHOLDS:
        if f[key].present:
            values[key] = f[key].value
    return values


# ----------------------------------------------------------------------------- CLI
def _main(argv) -> None:
    from absl import flags

    from bf16jax import cli
    from bf16jax.data import provenance
    from bf16jax.serving import scoring as scoring_lib
    from bf16jax.serving.artifact import Artifact
    from bf16jax.serving.scoring import reference_for

    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    cli.quiet_logs()
    if not f.candidate:
        raise ValueError("Pass --candidate=ARTIFACT (and --reference=ARTIFACT, its FP32 export).")
    thresholds = thresholds_from_flags()  # a bad file is refused before any model loads
    art = Artifact(f.candidate)
    reference = reference_for(art, f.reference)
    if reference is None:
        raise ValueError(
            "No FP32 reference: pass --reference=ARTIFACT (bf16jax.serving.export --precision=fp32 "
            "of "
            "the same run)."
        )
    candidate = Scorer.from_artifact(art)
    trained = scoring_lib.trained_data(art)
    if f.reference:  # an FP32 export of another corpus is no reference for this one
        diff = provenance.compare(trained, reference.trained) if reference.trained else None
        if diff:
            raise ValueError(
                f"--reference={f.reference} is not the candidate's run ({diff}): pass the FP32 "
                "export of the same run."
            )
    config, data = scoring_lib.resolve_data(candidate.config, trained, f.data)
    candidate.use_data(config, data)
    reference.use_data(config, data)
    print(scoring_lib.data_line(data), file=sys.stderr, flush=True)
    report = gate(candidate, reference, thresholds, num_batches=f.num_batches, seed=f.seed)
    print(verdict(report), flush=True)
    text = json.dumps(report, indent=1, sort_keys=True, default=float)
    if f.out:
        with open(f.out, "w") as fh:
            fh.write(text + "\n")
        print(f"report: {f.out}")
    if f.json:
        print(text)
    sys.exit(0 if report["passed"] else 1)


def verdict(report: dict) -> str:
    """The few lines a person reads: one per check, then PASSED / FAILED."""
    lines = []
    for c in report["checks"]:
        bound = f"max {c['max']}" if "max" in c else f"min {c['min']}"
        status = "ok  " if c["passed"] else "FAIL"
        lines.append(f"{status} {c['check']:<22} {c['value']:.6g} ({bound})")
    failed = [c["check"] for c in report["checks"] if not c["passed"]]
    lines.append(f"gate: FAILED ({', '.join(failed)})" if failed else "gate: PASSED")
    return "\n".join(lines)


def _define_flags() -> None:
    from absl import flags

    from bf16jax import cli

    flags.DEFINE_string("candidate", None, "The artifact to gate.")
    flags.DEFINE_string(
        "reference", None, "The FP32 reference artifact (default: the candidate's source "
        "checkpoint served at fp32, when that run is still on disk).",
    )  # fmt: skip
    flags.DEFINE_string("thresholds", None, "JSON file of thresholds (flags override it).")
    for key, value in DEFAULT_THRESHOLDS.items():
        flags.DEFINE_float(key, value, f"Gate threshold {key}.")
    cli.define_eval_flags()
    cli.define_data_flag()
    flags.DEFINE_alias("report", "out")
    flags.DEFINE_bool("json", False, "Also print the full JSON report, after the verdict.")


if __name__ == "__main__":
    from bf16jax import cli

    _define_flags()
    cli.run(_main)
