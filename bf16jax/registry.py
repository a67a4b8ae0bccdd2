"""Command: `python -m bf16jax.registry` (library: `bf16jax.serving.registry`).

See `bf16jax.serving.registry` for what it computes; this module holds its flags and `main`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bf16jax.serving.registry import GateFailed, Registry


def _gate_dirs(candidate: str, reference: str, **kwargs) -> dict[str, Any]:
    from bf16jax.serving import gate
    from bf16jax.serving.scoring import Scorer, resolve_data

    cand = Scorer.from_artifact(candidate)
    # The candidate's training data (a corpus rewritten since is refused), for both.
    config, data = resolve_data(cand.config, cand.trained)
    ref = Scorer.from_artifact(reference).use_data(config, data)
    return gate.gate(cand.use_data(config, data), ref, **kwargs)


def _main(argv) -> None:
    from absl import flags

    from bf16jax import cli

    f = flags.FLAGS
    cli.quiet_logs()
    if len(argv) != 2 or argv[1] not in ("init", "list", "promote", "rollback"):
        raise ValueError("Usage: python -m bf16jax.registry --registry=DIR "
                         "init|list|promote|rollback [flags]")  # fmt: skip
    if not f.registry:
        raise ValueError("Pass --registry=DIR.")
    reg, command = Registry(f.registry), argv[1]
    if command == "init":
        if not f.reference:
            raise ValueError("init needs --reference=ARTIFACT (an fp32 export).")
        reg.init(f.reference)
        print(json.dumps({"registry": reg.directory, "reference": reg.reference_dir}))
    elif command == "list":
        state = reg.state()
        print(json.dumps({"active": state["active"], "versions": reg.listing(),
                          "rejected": len(state["rejected"])}, indent=1))  # fmt: skip
    elif command == "promote":
        if not f.artifact:
            raise ValueError("promote needs --artifact=DIR.")
        from bf16jax import gate as gate_cmd

        try:
            name, report = reg.promote(f.artifact, _gate_dirs,
                                       thresholds=gate_cmd.thresholds_from_flags(),
                                       num_batches=f.num_batches)  # fmt: skip
        except GateFailed as e:
            print(json.dumps(e.report, indent=1, default=float))
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps({"promoted": name, "active": name,
                          "checks": report["checks"]}, indent=1, default=float))  # fmt: skip
    else:
        print(json.dumps({"active": reg.rollback(f.to)}))


def _define_flags() -> None:
    from absl import flags

    from bf16jax.serving import gate

    flags.DEFINE_string("registry", None, "The registry directory.")
    flags.DEFINE_string("reference", None, "init: the fp32 reference artifact.")
    flags.DEFINE_string("artifact", None, "promote: the candidate artifact.")
    flags.DEFINE_string("to", None, "rollback: activate this version (default: the previous).")
    flags.DEFINE_integer("num_batches", None, "promote: gate eval batches.")
    flags.DEFINE_string("thresholds", None, "promote: JSON file of gate thresholds.")
    for key, value in gate.DEFAULT_THRESHOLDS.items():
        flags.DEFINE_float(key, value, f"promote: gate threshold {key}.")


if __name__ == "__main__":
    from bf16jax import cli

    _define_flags()
    cli.run(_main)
