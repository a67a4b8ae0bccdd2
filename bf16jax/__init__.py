"""bf16jax: train JAX/Flax NNX models in BF16 and lower without losing accuracy.

The public names live here; everything else is imported from its module
(`bf16jax.nn.layers`, `bf16jax.models`, `bf16jax.training.trainer`, ...). jmp's policy API is a
subset:
`import bf16jax as jmp` keeps `jmp.Policy`, `jmp.get_policy`, `jmp.half_dtype`,
`jmp.cast_to_full` and `jmp.cast_to_half` working (docs/guides/jmp.md).
"""

from bf16jax.precision import (
    PRESETS,
    Policy,
    cast_to_full,
    cast_to_half,
    get_policy,
    half_dtype,
)

__version__ = "0.1.0"
__all__ = [
    "Policy",
    "get_policy",
    "PRESETS",
    "half_dtype",
    "cast_to_full",
    "cast_to_half",
    "__version__",
]
