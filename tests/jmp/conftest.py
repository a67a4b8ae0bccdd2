"""jmp's own policy tests (vendored unchanged but for one import) run against bf16jax.

They are written for JAX's default dtype promotion, as jmp's CI runs them: its
`test_cast_to_half` compares a float16 leaf with a float32 one by value. tests/conftest.py turns
on strict promotion for the rest of the suite; here it is back to "standard".
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _standard_dtype_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield
