"""Command: `python -m bf16jax.evaluate` (library: `bf16jax.serving.scoring`).

See `bf16jax.serving.scoring` for what it computes; this module holds its flags and `main`.
"""

from __future__ import annotations

import os
import sys

from bf16jax.serving import inference
from bf16jax.serving import scoring as scoring_lib
from bf16jax.serving.artifact import Artifact
from bf16jax.serving.scoring import TRAIN_PRECISION, Scorer, evaluate, reference_for, report_json


def _main(argv) -> None:
    from absl import flags

    from bf16jax import cli

    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    cli.quiet_logs()
    if f.artifact:
        art = Artifact(f.artifact)
        scorer = Scorer.from_artifact(art)
        # The data first: a changed corpus is refused before any model runs.
        config, data = scoring_lib.resolve_data(
            scorer.config, scoring_lib.trained_data(art), f.data
        )
        reference = reference_for(art, f.reference)
    else:
        from bf16jax.training import workdir as workdir_lib

        config, workdir = cli.run_from_flags()
        trained = workdir_lib.trained_data(workdir)
        config, data = scoring_lib.resolve_data(config, trained, f.data)
        params, meta, step = inference.restore_params(config, workdir, f.step)
        source = {"workdir": os.path.abspath(workdir), "step": step}
        scorer = Scorer.from_params(config, params, meta, f.precision, source)
        reference = None
        if f.reference != "none":
            reference = (Scorer.from_artifact(f.reference) if f.reference
                         else Scorer.from_params(config, params, meta, "fp32", source))  # fmt: skip
    print(scoring_lib.data_line(data), file=sys.stderr, flush=True)
    scorer.use_data(config, data)
    if reference is not None:
        reference.use_data(config, data)
    report, _ = evaluate(scorer, reference, num_batches=f.num_batches, seed=f.seed)
    cli.write_report(report_json(report))


def _define_flags() -> None:
    from absl import flags

    from bf16jax import cli

    cli.define_source_flags()
    flags.DEFINE_string(
        "precision", TRAIN_PRECISION,
        f"A run's serving precision: {TRAIN_PRECISION} (its own policy) or one of "
        f"{', '.join(inference.PRECISIONS)}.",
    )  # fmt: skip
    flags.DEFINE_string(
        "reference", None,
        "FP32 reference artifact for agreement; default: the source checkpoint at fp32; "
        "'none': no agreement.",
    )  # fmt: skip
    cli.define_eval_flags()
    cli.define_data_flag()


if __name__ == "__main__":
    from bf16jax import cli

    _define_flags()
    cli.run(_main)
