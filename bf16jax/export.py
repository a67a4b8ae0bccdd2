"""Command: `python -m bf16jax.export` (library: `bf16jax.serving.export`).

See `bf16jax.serving.export` for what it computes; this module holds its flags and `main`.
"""

from __future__ import annotations

import os
import sys

from bf16jax.serving import inference
from bf16jax.serving.export import DEFAULT_PLATFORMS, export_artifact


def _main(argv) -> None:
    from absl import flags

    from bf16jax import cli

    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    cli.quiet_logs()
    if not f.out:
        raise ValueError("Pass --out=DIR, the artifact directory to create.")
    from bf16jax.serving import scoring
    from bf16jax.training import workdir as workdir_lib

    config, workdir = cli.run_from_flags()
    # The metrics' data first: a changed corpus is refused before anything is written.
    data = scoring.resolve_data(config, workdir_lib.trained_data(workdir), f.data)
    print(scoring.data_line(data[1]), file=sys.stderr, flush=True)
    params, meta, step = inference.restore_params(config, workdir, f.step)
    source = {"workdir": os.path.abspath(workdir), "step": step,
              "config_file": cli.config_source(workdir),
              "argv": sys.argv[1:]}  # fmt: skip
    platforms = tuple(p.strip() for p in f.platforms.split(",") if p.strip())
    manifest = export_artifact(
        config, params, meta, f.out, precision=f.precision, source=source, policy=f.policy,
        platforms=platforms, decode_len=f.decode_len, eval_batches=f.eval_batches,
        overwrite=f.overwrite, data=data,
    )  # fmt: skip
    summary = {"artifact": os.path.abspath(f.out), "precision": f.precision, "step": step,
               "bytes": sum(e["bytes"] for e in manifest["files"].values()),
               "params_bytes": manifest["params"]["bytes"],
               "data": scoring.data_line(data[1])}  # fmt: skip
    if manifest["metrics"]:
        summary["clean"] = manifest["metrics"]["clean"]
        summary["agreement"] = manifest["metrics"].get("agreement")
    import json

    print(json.dumps(summary, sort_keys=True))


def _define_flags() -> None:
    from absl import flags

    from bf16jax import cli

    cli.define_source_flags(artifact=False)
    flags.DEFINE_string("out", None, "The artifact directory to create.")
    flags.DEFINE_enum("precision", "bf16", inference.PRECISIONS, "Serving precision.")
    flags.DEFINE_string("policy", None, "Expert: serve with this policy string instead.")
    flags.DEFINE_string("platforms", ",".join(DEFAULT_PLATFORMS), "Lowering platforms.")
    flags.DEFINE_integer("decode_len", None, "T5: decode cache length (default data.dec_len).")
    flags.DEFINE_integer("eval_batches", None, "Eval batches for the manifest (0: skip).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
    cli.define_data_flag()


if __name__ == "__main__":
    from bf16jax import cli

    _define_flags()
    cli.run(_main)
