"""Bytes per parameter of params + optimizer state for each precision setup, from the real
(abstract) train state of a model: nothing is allocated.

    python experiments/memory_table.py [--config=configs/gpt2_124m.py]

Prints a markdown table; gradients (one more copy in the param dtype during the step, FP32 for
mixed precision) are listed separately because they are transient. "weights + master" counts the
params and the update rule's buffers (Kahan's FP32 compensation, split's int16 low halves): the
bytes that hold the weights; "tiny update" says what becomes of an update below half a BF16 ulp.
"""

from __future__ import annotations

import argparse

SR_MOMENTS = dict(mu_dtype="bf16", nu_dtype="bf16", moment_rounding="stochastic")
# (label, policy, optim changes, what an update below half a BF16 ulp becomes)
SETUPS = [
    ("fp32 AdamW", "fp32", dict(), "applied (FP32)"),
    ("bf16 mixed (FP32 master + moments)", "bf16", dict(), "applied (FP32 master)"),
    ("bf16-pure, FP32 moments", "bf16-pure", dict(), "lost"),
    ("bf16-pure-sr, FP32 moments", "bf16-pure-sr", dict(), "applied in expectation"),
    ("bf16-pure-kahan (FP32 buffer), FP32 moments", "bf16-pure-kahan", dict(), "carried"),
    ("bf16-pure-split, FP32 moments", "bf16-pure-split", dict(), "exact FP32 master"),
    ("bf16-pure-sr, BF16 moments (SR)", "bf16-pure-sr", SR_MOMENTS, "applied in expectation"),
    ("bf16-pure-kahan, BF16 moments (SR)", "bf16-pure-kahan", SR_MOMENTS, "carried"),
    ("bf16-pure-split, BF16 moments (SR)", "bf16-pure-split", SR_MOMENTS, "exact FP32 master"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/gpt2_124m.py")
    args = parser.parse_args()
    from bf16jax import config as config_lib
    from bf16jax.training import metrics
    from bf16jax.training import trainer as train

    print(f"config: {args.config}\n")
    print("| setup | params | optimizer state | total | + grads | weights + master | tiny update |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, policy, optim_changes, tiny in SETUPS:
        config = config_lib.load_config(args.config, [f"precision={policy}"])
        config.optim.update(optim_changes)
        trainer = train.create_trainer(config)
        a, n = trainer.abstract, trainer.n_params
        p = metrics.bytes_per_param(a.params, n)
        o = metrics.bytes_per_param(a.opt_state, n)
        g = metrics.bytes_per_param(a.params, n)  # grads arrive in the param dtype
        rule = metrics.bytes_per_param(a.opt_state.rule_state, n)  # Kahan / split buffers
        w = p + rule
        print(f"| {label} | {p:.2f} | {o:.2f} | {p + o:.2f} | {p + o + g:.2f} | {w:.2f} | {tiny} |")


if __name__ == "__main__":
    main()
