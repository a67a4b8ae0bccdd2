"""Shared by the training tests: a tiny GPT config that compiles in seconds, and meshes."""

from bf16jax import config as config_lib
from bf16jax.parallel import sharding


def tiny_gpt_config(policy: str = "fp32", steps: int = 4, **train_overrides):
    """A locked GPT config (1 layer, width 32, batch 16 x 32 tokens), constant LR 1e-2."""
    c = config_lib.base_config("gpt")
    c.precision = policy
    c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_len=32)
    c.data.update(seq_len=32, batch_size=16, eval_batch_size=16)
    c.optim.update(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    # Diagnostics only add metrics (tested in test_numerics) and ~40% compile time.
    c.train.update(steps=steps, log_every=1, eval_steps=1, diagnostics=False)
    c.train.update(train_overrides)
    c.lock()
    return c


def make_mesh(shape, devices=None):
    """The (data, fsdp, tensor) mesh of `shape` over `devices` (all by default)."""
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape, strict=True)), devices)
