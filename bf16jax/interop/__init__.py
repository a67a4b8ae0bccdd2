"""Interop: Hugging Face checkpoints in and out (GPT-2, T5 v1.0 / v1.1 / FLAN-T5).

Owns the translation between Hugging Face files (config.json, safetensors, tokenizer files) and
bf16jax models and converted directories, and reading those directories for `init_from`.
May import: checkpoint, config, data, models, nn, precision, parallel.
"""
