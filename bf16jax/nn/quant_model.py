"""Quantization on a whole model: find its quantized `layers.Linear`s, switch them to real int8
dots, replace kernels by their int8 / E4M3 codes, export and load int8 weights.

`bf16jax.nn.quant` holds the math the layers call (LSQ codes, int8 dots, FP8 delayed scaling) and
imports no layer; this module works on built models, so it imports both. Conversions happen in
place on the model given (clone it first to keep the float one): `to_int8` stores each LSQ kernel
as the int8 codes its fake-quant forward computes (exact: the same codes, the same dot), `to_fp8`
each FP8 kernel as its E4M3 codes at the run's delayed weight scale. Used by
`bf16jax.serving.export` /
`bf16jax.serving.inference` (artifacts), the precision study and the quantization notebook.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bf16jax.nn.layers import Linear
from bf16jax.nn.quant import FP8_FORWARD, fp8_quantize, quant_range, step_size
from bf16jax.precision import is_fp8, quant_bits

__all__ = [
    "quantized_layers",
    "set_int8_mode",
    "to_int8",
    "fp8_layers",
    "to_fp8",
    "export_int8",
    "load_int8",
]

_F32 = jnp.float32


def quantized_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """(path, layer) for every `layers.Linear` in `model` with LSQ quantization (has
    `w_log_scale`)."""
    return [
        (path, m)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, Linear) and quant_bits(m.quant) is not None
    ]


def set_int8_mode(model: nnx.Module, on: bool = True) -> nnx.Module:
    """Switches every quantized Linear to real int8 dots (`on`) or to fake-quant; in place."""
    for _, layer in quantized_layers(model):
        layer.int8 = bool(on)
    return model


def to_int8(model: nnx.Module) -> nnx.Module:
    """Replaces each quantized kernel by its int8 codes and turns int8 mode on; in place.

    Activation-quantized layers then run int8 x int8 -> int32 dots; weight-only layers dot the
    int8 codes in compute dtype. Other params are left as they are.
    """
    for _, layer in quantized_layers(model):
        w = layer.kernel[...]
        if not jnp.issubdtype(w.dtype, jnp.integer):
            wn, wp = quant_range(quant_bits(layer.quant)[0])
            s = step_size(layer.w_log_scale[...])
            codes = jnp.round(jnp.clip(w.astype(_F32) / s, wn, wp))
            layer.kernel = nnx.Param(codes.astype(jnp.int8))
    return set_int8_mode(model, True)


def fp8_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """(path, layer) for every `layers.Linear` in `model` that runs `fp8_dot` (`q=fp8`)."""
    return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and is_fp8(m.quant)]


def to_fp8(model: nnx.Module) -> nnx.Module:
    """Replaces each FP8 Linear's kernel by its E4M3 codes at the layer's weight scale; in place.

    The codes are what `fp8_dot`'s forward computes from the float kernel (the scale of row w,
    `fp8_scale[1]`, from the training run's amax history), so the forward is unchanged while
    the kernel takes 1 byte per weight. For inference: the codes carry no gradient.
    """
    for _, layer in fp8_layers(model):
        w = layer.kernel[...]
        if w.dtype != FP8_FORWARD:
            layer.kernel = nnx.Param(fp8_quantize(w, layer.fp8_scale[...][1]))
    return model


def export_int8(model: nnx.Module, directory: str | os.PathLike) -> None:
    """Saves `model`'s params with int8 kernels + FP32 scales (Orbax) for inference.

    `model` itself is not changed. Restore with `load_int8(directory, make_model)`.
    """
    import orbax.checkpoint as ocp

    exported = to_int8(nnx.clone(model))
    state = nnx.to_pure_dict(nnx.state(exported, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(directory), state)


def load_int8(directory: str | os.PathLike, make_model: Callable[[], nnx.Module]) -> nnx.Module:
    """The int8 inference model saved by `export_int8`.

    Args:
      directory: the export directory.
      make_model: builds the same (float, QAT) model, e.g.
        `lambda: build_model(cfg.model, policy, rngs=nnx.Rngs(0))`; run under `nnx.eval_shape`,
        so nothing is initialized.

    Returns:
      The model with int8 kernels, FP32 scales and int8 mode on.
    """
    import orbax.checkpoint as ocp

    abstract = nnx.eval_shape(lambda: to_int8(make_model()))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(directory), target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
