"""Precision: the policy and the 16-bit arithmetic every other subsystem relies on.

Owns the `Policy` (param / compute / output / accum dtypes, presets, policy strings and per-module
overrides, the `q=` quantization grammar), the 16-bit matmul VJP with FP32 accumulation, rounding
(stochastic, split, Kahan), the update rules that write FP32 updates into 16-bit params, and loss
scaling. Imports nothing from bf16jax: every other subpackage may import it.

The policy API is re-exported here (`from bf16jax.precision import Policy, get_policy`).
"""

from bf16jax.precision.policy import *  # noqa: F403
from bf16jax.precision.policy import __all__  # noqa: F401
