"""Serving: from a trained checkpoint to answered requests.

Owns the inference programs and serving precisions, sampling and the decode loop, export of
`jax.export` artifacts and their JAX-only loader, scoring (packed rows one document
per row: segments) and the precision gate against FP32,
the registry of versions (promote / rollback), the serving engine (continuous batching) and its
HTTP app (the bf16jax routes and the OpenAI-compatible API).
May import: training, evaluation, checkpoint, interop, config, data, models, nn, precision,
parallel.
"""
