"""The suite compiles with XLA:CPU flags that make compiling cheaper (tests/cli_runs.py
FAST_COMPILE_FLAGS). This checks the promise behind them: they change how fast a program
compiles, not what it computes. The same tiny runs, trained here under the suite's flags and in
a subprocess under XLA's defaults, must agree as closely as two orderings of the same FP32 sums.
"""

import json
import os

import numpy as np
import pytest
from cli_runs import FAST_COMPILE_FLAGS, cli_env, run_python

STEPS = 4

KEYS = ("loss", "grad_norm", "param_norm")
# Trains tiny GPT for STEPS steps on the 8-device data mesh per policy and prints the metrics
# of every step as JSON: each depends on all the parameters the steps before produced.
_PROGRAM = f"""
import json, sys
import jax
jax.config.update("jax_numpy_dtype_promotion", "strict")
sys.path.insert(0, "tests")
from bf16jax.data import datasets as data_lib
from bf16jax.training import trainer as train
from tiny import make_mesh, tiny_gpt_config
out = {{}}
for policy in sys.argv[1:]:
    config = tiny_gpt_config(policy)
    it = iter(data_lib.make_dataset(config.data, "train"))
    trainer = train.create_trainer(config, make_mesh((8, 1, 1)))
    state, out[policy] = trainer.init_state(), {{k: [] for k in {KEYS}}}
    for _ in range({STEPS}):
        state, m = trainer.step(state, trainer.global_batch(next(it)))
        for k in {KEYS}:
            out[policy][k].append(float(m[k]))
print(json.dumps(out))
"""


def _run(policies, flags_off: bool) -> dict:
    env = cli_env()
    if flags_off:
        names = {f.split("=")[0] for f in FAST_COMPILE_FLAGS}
        kept = [f for f in env["XLA_FLAGS"].split() if f.split("=")[0] not in names]
        env["XLA_FLAGS"] = " ".join(kept)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # XLA's defaults, compiled afresh
    proc = run_python("-c", _PROGRAM, *policies, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_suites_fast_compile_flags_do_not_change_the_numbers():
    if not all(f in os.environ["XLA_FLAGS"].split() for f in FAST_COMPILE_FLAGS):
        pytest.skip("BF16JAX_TEST_FAST_COMPILE=0: the suite itself compiles with XLA's defaults")
    policies = ["fp32", "bf16"]
    fast, default = _run(policies, flags_off=False), _run(policies, flags_off=True)
    # Measured: FP32 agrees to 1.3e-7 relative, BF16 (one-ulp rounding differences that Adam
    # carries into the next steps) to 3.7e-5. Computing anything in another dtype moves these
    # metrics by ~1e-2.
    for policy, rtol in (("fp32", 1e-6), ("bf16", 1e-3)):
        for key in KEYS:
            np.testing.assert_allclose(
                fast[policy][key], default[policy][key], rtol=rtol, err_msg=f"{policy}: {key}"
            )
    # The runs train: agreement between two runs that did nothing could not fail.
    assert fast["fp32"]["loss"][-1] < fast["fp32"]["loss"][0]
