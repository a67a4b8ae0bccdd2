"""Exports a training run at fp32 / bf16 / int8 plus planted regressions, and gates each one.

    python experiments/serving_gate.py --config=configs/gpt_tiny.py \
        --config.precision='bf16; q=w8a8' --config.model.tie_embeddings=False \
        --workdir=runs/serving_gpt_tiny --out=experiments/results/serving

Artifacts go to WORKDIR/artifacts/<name> (fp32, bf16, int8 are the honest exports; int4_head,
stale_int8_scales, softmax_bf16 the planted ones, `bf16jax.serving.gate.PLANTS`); every candidate is
gated against the fp32 export on the eval split (`--num_batches`). Prints one JSON line per
candidate and writes gate_results.json + gate_table.md (with the exit code `bf16jax.serving.gate`
would return) to --out.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from flax import nnx

from bf16jax import cli
from bf16jax.serving import artifact, export, gate, inference
from bf16jax.serving import scoring as evaluate

cli.define_source_flags(artifact=False)
flags.DEFINE_string("out", None, "Directory for gate_results.json and gate_table.md.")
flags.DEFINE_integer("num_batches", None, "Gate eval batches (default config.train.eval_steps).")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    cli.quiet_logs()
    config, workdir = cli.run_from_flags()
    params, meta, step = inference.restore_params(config, workdir, FLAGS.step)
    source = {"workdir": os.path.abspath(workdir), "step": step}
    root = os.path.join(workdir, "artifacts")
    variants = {
        "fp32": dict(precision="fp32"),
        "bf16": dict(precision="bf16"),
        "int8": dict(precision="int8"),
        "int4_head": dict(precision="bf16", planted="int4_head"),
        "stale_int8_scales": dict(precision="int8", planted="stale_int8_scales"),
        "softmax_bf16": dict(precision="bf16", policy=gate.softmax_bf16_policy(config.precision)),
    }
    pure = nnx.to_pure_dict(params)
    for name, v in variants.items():
        out = os.path.join(root, name)
        if os.path.exists(out):
            continue
        p = gate.plant(pure, v["planted"]) if "planted" in v else pure
        export.export_artifact(
            config,
            p,
            meta,
            out,
            precision=v["precision"],
            policy=v.get("policy"),
            source={**source, "variant": name},
            eval_batches=0 if "planted" in v or "policy" in v else None,
        )
    reference = evaluate.Scorer.from_artifact(os.path.join(root, "fp32"))
    rows = []
    for name in list(variants)[1:]:
        directory = os.path.join(root, name)
        report = gate.gate(evaluate.Scorer.from_artifact(directory), reference,
                           num_batches=FLAGS.num_batches)  # fmt: skip
        manifest = artifact.verify(directory)
        row = {"candidate": name, "exit_code": 0 if report["passed"] else 1,
               "examples": report["examples"], "params_bytes": manifest["params"]["bytes"],
               "artifact_bytes": sum(e["bytes"] for e in manifest["files"].values()),
               **{c["check"]: c["value"] for c in report["checks"]},
               "failed": [c["check"] for c in report["checks"] if not c["passed"]],
               "accuracy": report["candidate"]["clean"]["accuracy"],
               "reference_accuracy": report["reference"]["clean"]["accuracy"]}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    fp32 = artifact.verify(os.path.join(root, "fp32"))
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "gate_results.json"), "w") as f:
            json.dump({"command": " ".join(sys.argv), "step": step, "rows": rows,
                       "fp32_params_bytes": fp32["params"]["bytes"],
                       "thresholds": gate.DEFAULT_THRESHOLDS}, f, indent=1)  # fmt: skip
        with open(os.path.join(FLAGS.out, "gate_table.md"), "w") as f:
            f.write(_table(rows) + "\n")
    print(_table(rows))


def _table(rows) -> str:
    head = (
        "| candidate | exit | accuracy drop | worst shifted drop | ECE increase | agreement | "
        "NLL drift | failed checks |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    lines = [
        f"| {r['candidate']} | {r['exit_code']} | {100 * r['accuracy_drop']:+.2f} pt | "
        f"{100 * r['shifted_accuracy_drop']:+.2f} pt | {100 * r['ece_increase']:+.2f} pt | "
        f"{100 * r['agreement']:.2f}% | {r['nll_drift']:.4f} | {', '.join(r['failed']) or '—'} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


if __name__ == "__main__":
    cli.run(main)
