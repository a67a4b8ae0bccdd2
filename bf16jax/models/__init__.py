"""Model families and the one factory that builds them from a config.

`build_model(model_cfg, policy, rngs=..., platform=...)` dispatches on `model_cfg.name` ("gpt",
"t5", "vit"), checks the sizes it reads (all positive integers, heads dividing widths, patches
tiling images), the attention implementation for the platform and the remat policy, and raises
ValueError naming the key and the fix. Every model has `features(...)` (hidden states
in the policy's output_dtype), `logits_and_targets(batch)` (logits in accum_dtype, targets
int32, weights float32), `head_and_targets(batch)` (the output head's input and the head itself,
for `loss.fused_cross_entropy`) and `output_head`. A packed batch adds per-token segment ids and
positions (`gpt.PACKING_KEYS`, `t5.PACKING_KEYS`), which the models read from
the batch; without them a model runs its unpacked program. `param_count(model)` is N in the 6N
FLOPs-per-token MFU convention.
Every policy override must decide some module of the built model, or a UserWarning says so
(`overrides.check_rules`).
May import: nn, precision, parallel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from flax import nnx

from bf16jax.models.gpt import GPT, REMAT_POLICIES
from bf16jax.models.t5 import T5
from bf16jax.models.vit import ViT
from bf16jax.nn.attention import normalize_implementation
from bf16jax.nn.layers import MLP_ACTIVATIONS
from bf16jax.precision import Policy, get_policy, record_paths
from bf16jax.precision.overrides import check_rules

__all__ = ["GPT", "T5", "ViT", "MODEL_NAMES", "build_model", "param_count"]

# Per family: required size keys, then optional keys with their defaults.
_REQUIRED = {
    "gpt": ("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_dim", "max_len"),
    "t5": (
        "vocab_size",
        "embed_dim",
        "num_heads",
        "mlp_dim",
        "num_encoder_layers",
        "num_decoder_layers",
    ),
    "vit": (
        "image_size",
        "patch_size",
        "num_classes",
        "embed_dim",
        "num_layers",
        "num_heads",
        "mlp_dim",
    ),
}
_DROPOUT = dict(dropout_rate=0.0, attention_dropout_rate=0.0, mlp_dropout_rate=0.0)
_OPTIONAL = {
    "gpt": dict(
        scan_layers=False,
        remat="none",
        attention_impl="auto",
        tie_embeddings=True,
        norm_eps=1e-5,
        mlp_activation="gelu",
        **_DROPOUT,
    ),
    "t5": dict(
        head_dim=None,
        tie_embeddings=False,
        relpos_buckets=32,
        relpos_max_distance=128,
        attention_impl="auto",
        norm_eps=1e-6,
        mlp_activation="gated-gelu",
        **_DROPOUT,
    ),
    "vit": dict(
        channels=1, attention_impl="auto", norm_eps=1e-5, mlp_activation="gelu", **_DROPOUT
    ),
}
MODEL_NAMES = tuple(_REQUIRED)


def build_model(
    model_cfg: ml_collections.ConfigDict | Mapping,
    policy: Policy | str,
    *,
    rngs: nnx.Rngs,
    platform: str | None = None,
) -> nnx.Module:
    """Builds the model named by `model_cfg.name` with params in the policy's dtypes.

    Args:
      model_cfg: `config.model` (ConfigDict or mapping): `name` plus the family's sizes.
        gpt: vocab_size, num_layers, num_heads, embed_dim, mlp_dim, max_len [, scan_layers,
        remat, attention_impl, tie_embeddings]. t5: vocab_size, embed_dim, num_heads, mlp_dim,
        num_encoder_layers, num_decoder_layers [, head_dim, tie_embeddings, relpos_buckets,
        relpos_max_distance, attention_impl]. vit: image_size, patch_size, num_classes,
        embed_dim, num_layers, num_heads, mlp_dim [, channels, attention_impl]. Every family
        also takes norm_eps (gpt/vit 1e-5, t5 1e-6), mlp_activation (one of
        `layers.MLP_ACTIVATIONS`; t5 "gated-gelu", others "gelu") and dropout_rate,
        attention_dropout_rate, mlp_dropout_rate (default 0; active only with a dropout key).
      policy: a Policy or policy string (resolved per module path by the layers).
      rngs: parameter RNGs.
      platform: where the model will run ("cpu", "gpu", "tpu"; default
        `jax.default_backend()`): `attention_impl="auto"` picks that platform's kernel, and a
        forced kernel it lacks (cuDNN on CPU) raises here.

    Returns:
      A GPT, T5 or ViT module.

    Raises:
      ValueError: unknown name, missing size, sizes that do not fit together, an unknown
        remat policy, or an attention implementation the platform lacks; a per-layer override
        under `scan_layers=True`.
    """
    policy = get_policy(policy)
    if not hasattr(model_cfg, "get"):
        raise ValueError(f"model_cfg must be a ConfigDict or dict, got {type(model_cfg).__name__}.")
    name = model_cfg.get("name")
    if name not in _REQUIRED:
        raise ValueError(
            f"Unknown model.name={name!r}: use one of {', '.join(map(repr, MODEL_NAMES))}."
        )
    cfg = _read_config(name, model_cfg)
    cfg["platform"] = platform
    # Params carry logical axis names ("embed", ...) as metadata; bf16jax.parallel.sharding maps
    # them to
    # mesh axes. NNX eager sharding would read them as mesh axes (and fails without a mesh).
    with nnx.use_eager_sharding(False), record_paths() as paths:
        if name == "gpt":
            model = GPT(**cfg, policy=policy, rngs=rngs)
        elif name == "t5":
            model = T5(cfg, policy=policy, rngs=rngs)
        else:
            model = ViT(cfg, policy=policy, rngs=rngs)
    check_rules(policy, paths)  # a rule that decides nothing is a silent no-op: warn
    return model


def param_count(model: nnx.Module) -> int:
    """Number of parameter elements (nnx.Param leaves) in `model`."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _read_config(name: str, model_cfg: Mapping) -> dict[str, Any]:
    missing = [k for k in _REQUIRED[name] if model_cfg.get(k) is None]
    if missing:
        raise ValueError(
            f"model.name={name!r} needs model.{', model.'.join(missing)}: set them in the config."
        )
    cfg: dict[str, Any] = {}
    for key in _REQUIRED[name]:
        cfg[key] = _positive_int(model_cfg[key], key)
    for key, default in _OPTIONAL[name].items():
        value = model_cfg.get(key, default)
        cfg[key] = default if value is None else value
    cfg["attention_impl"] = _attention_impl(cfg["attention_impl"])
    _check_regularization(cfg)
    d, h = cfg["embed_dim"], cfg["num_heads"]
    if name == "t5":
        if cfg["head_dim"] is None or cfg["head_dim"] == 0:
            _check_divides(h, d, "num_heads", "embed_dim")
            cfg["head_dim"] = d // h
        cfg["head_dim"] = _positive_int(cfg["head_dim"], "head_dim")
        cfg["relpos_buckets"] = _positive_int(cfg["relpos_buckets"], "relpos_buckets")
        cfg["relpos_max_distance"] = _positive_int(
            cfg["relpos_max_distance"], "relpos_max_distance"
        )
        cfg["tie_embeddings"] = bool(cfg["tie_embeddings"])
    else:
        _check_divides(h, d, "num_heads", "embed_dim")
    if name == "gpt":
        for key in ("scan_layers", "tie_embeddings"):
            cfg[key] = bool(cfg[key])
        cfg["remat"] = _remat(cfg["remat"])
    if name == "vit":
        cfg["channels"] = _positive_int(cfg["channels"], "channels")
        _check_divides(cfg["patch_size"], cfg["image_size"], "patch_size", "image_size")
    return cfg


def _check_regularization(cfg: dict) -> None:
    """norm_eps > 0, dropout rates in [0, 1), a known MLP activation; floats made floats."""
    eps = cfg["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"model.norm_eps={eps!r} must be a number in (0, 1), e.g. 1e-6.")
    cfg["norm_eps"] = float(eps)
    for key in _DROPOUT:
        rate = cfg[key]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"model.{key}={rate!r} must lie in [0, 1) (0 = no dropout).")
        cfg[key] = float(rate)
    if cfg["mlp_activation"] not in MLP_ACTIVATIONS:
        raise ValueError(
            f"model.mlp_activation={cfg['mlp_activation']!r} is not valid: use one of "
            f"{', '.join(map(repr, MLP_ACTIVATIONS))}."
        )


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{key}={value!r} must be a positive integer.")
    return value


def _check_divides(small: int, big: int, small_key: str, big_key: str) -> None:
    if big % small:
        raise ValueError(
            f"model.{big_key}={big} is not divisible by model.{small_key}={small}: "
            f"pick a {big_key} that is a multiple of {small_key}."
        )


def _attention_impl(value) -> str:
    try:
        return normalize_implementation(value)
    except ValueError as e:
        raise ValueError(f"model.attention_impl: {e}") from None


def _remat(value) -> str:
    # Booleans from older configs and Python callers: True was whole-block remat.
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(
            f"model.remat={value!r} is not valid: use one of "
            f"{', '.join(map(repr, REMAT_POLICIES))}."
        )
    return value
