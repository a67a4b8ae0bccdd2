"""Bytes per parameter of params + optimizer state for each precision setup, from the real
(abstract) train state of a model: nothing is allocated.

    python experiments/memory_table.py [--config=configs/gpt2_124m.py]

Prints a markdown table; gradients (one more copy in the param dtype during the step, FP32 for
mixed precision) are listed separately because they are transient.
"""

from __future__ import annotations

import argparse

SETUPS = [
    ("fp32 AdamW", "fp32", dict()),
    ("bf16 mixed (FP32 master + moments)", "bf16", dict()),
    ("bf16-pure, FP32 moments", "bf16-pure", dict()),
    ("bf16-pure-kahan, FP32 moments", "bf16-pure-kahan", dict()),
    (
        "bf16-pure-kahan, BF16 moments (SR)",
        "bf16-pure-kahan",
        dict(mu_dtype="bf16", nu_dtype="bf16", moment_rounding="stochastic"),
    ),
    (
        "bf16-pure-sr, BF16 moments (SR)",
        "bf16-pure-sr",
        dict(mu_dtype="bf16", nu_dtype="bf16", moment_rounding="stochastic"),
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/gpt2_124m.py")
    args = parser.parse_args()
    from bf16jax import config as config_lib
    from bf16jax import metrics, train

    print(f"config: {args.config}\n")
    print("| setup | params | optimizer state | total | + grads |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, policy, optim_changes in SETUPS:
        config = config_lib.load_config(args.config, [f"precision={policy}"])
        config.optim.update(optim_changes)
        trainer = train.create_trainer(config)
        a, n = trainer.abstract, trainer.n_params
        p = metrics.bytes_per_param(a.params, n)
        o = metrics.bytes_per_param(a.opt_state, n)
        g = metrics.bytes_per_param(a.params, n)  # grads arrive in the param dtype
        print(f"| {label} | {p:.2f} | {o:.2f} | {p + o:.2f} | {p + o + g:.2f} |")


if __name__ == "__main__":
    main()
