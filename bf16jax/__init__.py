"""bf16jax: train JAX/Flax NNX models in BF16 and lower without losing accuracy.

The public names live here; everything else is imported from its module
(`bf16jax.layers`, `bf16jax.models`, `bf16jax.train`, ...).
"""

from bf16jax.precision import PRESETS, Policy, get_policy

__version__ = "0.1.0"
__all__ = ["Policy", "get_policy", "PRESETS", "__version__"]
