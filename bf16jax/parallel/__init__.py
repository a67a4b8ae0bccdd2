"""Parallelism: devices, meshes, logical axis rules and batch sharding.

The one place in bf16jax that knows about devices and hosts (`jax.distributed`, `NamedSharding`
over data / FSDP / tensor axes). Imports nothing from bf16jax: every other subpackage may
import it.
"""
