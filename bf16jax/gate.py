"""Command: `python -m bf16jax.gate` (library: `bf16jax.serving.gate`).

See `bf16jax.serving.gate` for what it computes; this module holds its flags and `main`.
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
        with open(f.thresholds) as fh:
            loaded = json.load(fh)
        if not isinstance(loaded, dict):
            raise ValueError(f"--thresholds={f.thresholds} must hold a JSON object.")
        values.update(loaded)
    for key in DEFAULT_THRESHOLDS:
        if f[key].present:
            values[key] = f[key].value
    return values


# ----------------------------------------------------------------------------- CLI
def _main(argv) -> None:
    from absl import flags

    from bf16jax import cli
    from bf16jax.serving.artifact import Artifact
    from bf16jax.serving.scoring import reference_for

    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    cli.quiet_logs()
    if not f.candidate:
        raise ValueError("Pass --candidate=ARTIFACT (and --reference=ARTIFACT, its FP32 export).")
    art = Artifact(f.candidate)
    reference = reference_for(art, f.reference)
    if reference is None:
        raise ValueError(
            "No FP32 reference: pass --reference=ARTIFACT (bf16jax.serving.export --precision=fp32 "
            "of "
            "the same run)."
        )
    report = gate(Scorer.from_artifact(art), reference, thresholds_from_flags(),
                  num_batches=f.num_batches, seed=f.seed)  # fmt: skip
    cli.write_report(json.dumps(report, indent=1, sort_keys=True, default=float))
    for c in report["checks"]:
        bound = f"max {c['max']}" if "max" in c else f"min {c['min']}"
        status = "ok  " if c["passed"] else "FAIL"
        print(f"{status} {c['check']:<22} {c['value']:.6g} ({bound})", file=sys.stderr)
    sys.exit(0 if report["passed"] else 1)


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


if __name__ == "__main__":
    from bf16jax import cli

    _define_flags()
    cli.run(_main)
