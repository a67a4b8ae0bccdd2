"""The precision policy: which dtype params are stored in, compute runs in, outputs leave in.

`Policy` is the one place bf16jax decides precision. Layers read `param_dtype`, `compute_dtype`,
`output_dtype` and `accum_dtype` from it and never name a float dtype themselves. Invariants:

- `accum_dtype` (FP32 unless asked otherwise) is used for matmul accumulators, reductions,
  softmax, norm statistics, logits + loss, optimizer moments and gradient accumulation.
- A Policy is frozen and hashable: it is a static argument to `jax.jit`, never traced.
- `get_policy` accepts preset names (`fp32`, `bf16`, `bf16-pure`, `fp16`) and jmp/Levanter
  strings (`p=f32,c=bf16,o=f32`) with jmp's defaults (compute follows params, output follows
  compute), plus per-module overrides (`bf16-pure; .*norm.*->fp32`) and a quantization setting
  (`bf16; q=w4a8; head->q=w8a8`, see `bf16jax.nn.quant`). `str(policy)` round-trips.
- Casts touch floating leaves only: integer arrays and PRNG keys pass through unchanged.
- `record_paths()` collects every module path resolved while a model is built, so that
  `bf16jax.precision.overrides` can report and check what each override rule hit.
- A drop-in for jmp's policy API (`import bf16jax as jmp`): `Policy(p, c, o)`, `cast_to_*`,
  `with_output_dtype`, `get_policy` (errors worded as jmp's), `half_dtype`, `cast_to_full`,
  `cast_to_half`; jmp's own policy tests run against this module (tests/jmp/test_jmp_policy.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bf16jax.precision.quant_spec import (  # re-exported: the q= grammar
    FP8,
    FP8_DEFAULTS,
    FP8_FORMATS,
    fp8_options,
    is_fp8,
    parse_quant,
    quant_bits,
)

__all__ = [
    "Policy",
    "get_policy",
    "fp32_reference",
    "half_dtype",
    "cast_to_full",
    "cast_to_half",
    "dtype_to_names",
    "parse_dtype",
    "parse_quant",
    "quant_bits",
    "is_fp8",
    "fp8_options",
    "FP8",
    "FP8_DEFAULTS",
    "FP8_FORMATS",
    "record_paths",
    "note_paths",
    "deciding_rule",
    "PRESETS",
    "DTYPE_NAMES",
    "UPDATE_RULES",
]

_F32 = np.dtype(jnp.float32)
_BF16 = np.dtype(jnp.bfloat16)
_F16 = np.dtype(jnp.float16)

# Spellings accepted in policy strings (jmp's plus numpy's). `half` is resolved lazily below.
DTYPE_NAMES: dict[str, np.dtype] = {
    "f32": _F32,
    "float32": _F32,
    "fp32": _F32,
    "full": _F32,
    "single": _F32,
    "32": _F32,
    "bf16": _BF16,
    "bfloat16": _BF16,
    "f16": _F16,
    "fp16": _F16,
    "float16": _F16,
    "16": _F16,
}
_HALF_NAMES = ("half",)
_SHORT_NAME = {_F32: "f32", _BF16: "bf16", _F16: "f16"}
# jmp's `dtype_to_names` (its `_src` name, used by its tests): dtype -> names, the first being
# the one `str(policy)` writes. Keyed by the scalar types so `np.float16` and `jnp.float16` both
# look up (a `np.dtype` key would not hash like the scalar type).
dtype_to_names: dict[Any, tuple[str, ...]] = {
    jnp.float32: ("f32", "float32", "full", "fp32", "single"),
    jnp.bfloat16: ("bf16", "bfloat16"),
    jnp.float16: ("f16", "float16", "fp16"),
}

# Keys accepted in policy strings: canonical field name for each spelling.
_KEYS = {
    "p": "param_dtype",
    "params": "param_dtype",
    "param": "param_dtype",
    "c": "compute_dtype",
    "compute": "compute_dtype",
    "o": "output_dtype",
    "output": "output_dtype",
    "a": "accum_dtype",
    "accum": "accum_dtype",
    "r": "residual_dtype",
    "residual": "residual_dtype",
    "u": "update_rule",
    "update": "update_rule",
    "q": "quant",
    "quant": "quant",
}
# How a step adds updates to params stored in 16 bits (bf16jax.training.optim /
# bf16jax.precision.numerics).
UPDATE_RULES = ("nearest", "stochastic", "kahan", "split")
# Rules that work on the bit pattern of BF16 (the top half of an FP32): FP16 params are refused.
_BF16_RULES = ("stochastic", "kahan", "split")
_RULE_ALIASES = {"sr": "stochastic", "round": "nearest"}
_RULE_SEP = ";"
_RULE_ARROW = "->"
_AMENDABLE = ("quant", "residual_dtype", "update_rule")  # `BASE; key=value` segments


def _parse_rule(name: str, context: str) -> str:
    key = str(name).strip().lower()
    key = _RULE_ALIASES.get(key, key)
    if key not in UPDATE_RULES:
        raise ValueError(
            f"Unknown update rule {name!r} in policy {context!r}: use one of "
            f"{', '.join(UPDATE_RULES)} (or sr)."
        )
    return key


def half_dtype() -> np.dtype:
    """The half-precision dtype for the current backend: bfloat16 on TPU, float16 elsewhere.

    jmp's meaning of "half"; resolved only when called, because asking for the backend
    initializes it.
    """
    return _BF16 if jax.local_devices()[0].platform == "tpu" else _F16


def cast_to_full(tree):
    """Casts the floating leaves of `tree` to float32 (jmp.cast_to_full); others pass through."""
    return _cast_tree(tree, _F32)


def cast_to_half(tree):
    """Casts the floating leaves of `tree` to `half_dtype()` (jmp.cast_to_half)."""
    return _cast_tree(tree, half_dtype())


def parse_dtype(name: str) -> np.dtype:
    """Parses a dtype name accepted in policy strings (f32, bf16, f16, half, float32, ...)."""
    return _parse_dtype(name, name)


def _parse_dtype(name: str, context: str) -> np.dtype:
    key = name.strip().lower()
    if key in DTYPE_NAMES:
        return DTYPE_NAMES[key]
    if key in _HALF_NAMES:
        return half_dtype()
    if key in ("f64", "float64", "double"):
        raise ValueError(
            f"Unknown dtype {name!r} in policy {context!r}: float64 is not a policy dtype "
            "(jmp accepted it; JAX computes in float32 unless jax_enable_x64): use f32."
        )
    accepted = ", ".join(["f32", "bf16", "f16", "half", "float32", "bfloat16", "float16", "full"])
    raise ValueError(f"Unknown dtype {name!r} in policy {context!r}: use one of {accepted}.")


def _as_float_dtype(value: Any, field: str) -> np.dtype:
    if isinstance(value, str):
        return _parse_dtype(value, value)
    dtype = np.dtype(value)
    if dtype not in _SHORT_NAME:
        raise ValueError(
            f"Policy.{field}={dtype} is not a float dtype: use float32, bfloat16 or float16."
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class Policy:
    """A mixed-precision policy; hashable, so usable as a static `jit` argument.

    Attributes:
      param_dtype: dtype parameters are created and stored in.
      compute_dtype: dtype activations and matmul operands use.
      output_dtype: dtype a model's outputs leave in.
      accum_dtype: dtype of accumulators, reductions, softmax, norm statistics, logits + loss and
        optimizer state. FP32 unless you know why not.
      update_rule: how the optimizer writes updates into params: "nearest" (round to nearest,
        what optax does), "stochastic" (stochastic rounding), "kahan" (compensated, with an FP32
        buffer per param) or "split" (the low 16 bits of the FP32 master kept beside the BF16
        param: exact). Matters for 16-bit params (`bf16-pure-sr`, `bf16-pure-kahan`,
        `bf16-pure-split`); the last three need BF16 (not FP16) params; model-wide, so overrides
        may not set it.
      residual_dtype: dtype of the residual stream between transformer sub-layers (key `r`);
        None follows compute_dtype. `r=f32` keeps the sum of many sub-layer outputs in FP32.
      quant: quantization-aware training of `layers.Linear` ("none", "w8a8", "w4a8", "w8", ...;
        see `bf16jax.nn.quant`). In an override, None means "inherit the base policy's setting".
      overrides: ordered `(regex, Policy)` rules; `for_module(path)` uses the first rule whose
        regex fully matches the path or one of its ancestors (`a/b` is an ancestor of `a/b/c`).
    """

    param_dtype: np.dtype = _F32
    compute_dtype: np.dtype = _F32
    output_dtype: np.dtype = _F32
    accum_dtype: np.dtype = _F32
    update_rule: str = "nearest"
    overrides: tuple[tuple[str, Policy], ...] = ()
    quant: str | None = "none"
    residual_dtype: np.dtype | None = None

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype", "accum_dtype"):
            object.__setattr__(self, field, _as_float_dtype(getattr(self, field), field))
        if self.residual_dtype is not None:
            residual = _as_float_dtype(self.residual_dtype, "residual_dtype")
            object.__setattr__(self, "residual_dtype", residual)
        object.__setattr__(
            self, "update_rule", _parse_rule(self.update_rule, str(self.update_rule))
        )
        if self.quant is not None:
            object.__setattr__(self, "quant", parse_quant(self.quant))
        rules = []
        for rule in self.overrides:
            if not (isinstance(rule, tuple) and len(rule) == 2):
                raise ValueError(f"Override {rule!r} must be a (regex, policy) pair.")
            pattern, policy = rule
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"Bad override regex {pattern!r}: {e}. Fix the pattern.") from None
            if isinstance(policy, str):
                policy = get_policy(policy)
            if not isinstance(policy, Policy):
                raise ValueError(f"Override for {pattern!r} must be a Policy or policy string.")
            if policy.overrides:
                raise ValueError(f"Override for {pattern!r} may not carry overrides of its own.")
            if policy.update_rule != "nearest":
                raise ValueError(
                    f"Override for {pattern!r} sets update rule u={policy.update_rule}: the "
                    "update rule is model-wide; set it in the base policy."
                )
            rules.append((pattern, policy))
        object.__setattr__(self, "overrides", tuple(rules))
        if self.update_rule in _BF16_RULES:
            for where, p in [("", self), *((f" (override {r!r})", q) for r, q in rules)]:
                if p.param_dtype == _F16:
                    raise ValueError(
                        f"Update rule u={self.update_rule} needs bfloat16 (or float32) params, "
                        f"but p=f16{where}: it works on BF16's bit pattern (the top half of an "
                        "FP32), and FP16 has another exponent range. Use p=bf16, or p=f32 with "
                        "c=f16 (FP16 mixed precision, FP32 master weights) and u=nearest."
                    )

    # ----------------------------------------------------------------- resolution
    def for_module(self, path: str) -> Policy:
        """The policy for the module at `path` (e.g. "decoder/layers_3/attn/q").

        The returned policy keeps this policy's overrides, so resolving a deeper path from it
        gives the same answer as resolving from the root.
        """
        _note_path(path)
        base = _resolve(self.overrides, path)
        if base is None:
            return self
        quant = self.quant if base.quant is None else base.quant
        return dataclasses.replace(
            base, update_rule=self.update_rule, overrides=self.overrides, quant=quant
        )

    def quant_for(self, path: str, *, edge: bool = False) -> str:
        """The quant setting of the module at `path` ("none", "w8a8", ...).

        An override rule matching `path` that sets `q=` wins. Otherwise an `edge` module (the
        first layer or the output logits, which quantization is known to hurt) is unquantized
        and any other module takes this policy's setting.
        """
        _note_path(path)
        rule = _resolve(self.overrides, path)
        if rule is not None and rule.quant is not None:
            return rule.quant
        return "none" if edge or self.quant is None else self.quant

    def replace(self, **changes) -> Policy:
        """A copy with the given fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_output_dtype(self, output_dtype: Any) -> Policy:
        """A copy with `output_dtype` changed (jmp's API); overrides are kept."""
        return dataclasses.replace(self, output_dtype=output_dtype)

    # ----------------------------------------------------------------- casts
    def cast_to_param(self, tree):
        """Casts floating leaves of `tree` to `param_dtype`."""
        return _cast_tree(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        """Casts floating leaves of `tree` to `compute_dtype`."""
        return _cast_tree(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        """Casts floating leaves of `tree` to `output_dtype`."""
        return _cast_tree(tree, self.output_dtype)

    def cast_to_accum(self, tree):
        """Casts floating leaves of `tree` to `accum_dtype`."""
        return _cast_tree(tree, self.accum_dtype)

    @property
    def residual(self) -> np.dtype:
        """The residual stream's dtype: `residual_dtype`, or `compute_dtype` when unset."""
        return self.compute_dtype if self.residual_dtype is None else self.residual_dtype

    def cast_to_residual(self, tree):
        """Casts floating leaves of `tree` to the residual stream's dtype (`residual`)."""
        return _cast_tree(tree, self.residual)

    # ----------------------------------------------------------------- strings
    def dtypes_str(self, explicit_quant: bool = False) -> str:
        """`p=..,c=..,o=..[,a=..][,u=..][,q=..]`: jmp's form plus what differs from the defaults
        (a=f32, u=nearest, q=none); q=none only if `explicit_quant` (overrides)."""
        text = ",".join(
            f"{k}={_SHORT_NAME[getattr(self, f)]}"
            for k, f in (("p", "param_dtype"), ("c", "compute_dtype"), ("o", "output_dtype"))
        )
        if self.accum_dtype != _F32:  # jmp's form `p=..,c=..,o=..` when accum is the default
            text = f"{text},a={_SHORT_NAME[self.accum_dtype]}"
        if self.residual_dtype is not None:
            text = f"{text},r={_SHORT_NAME[self.residual_dtype]}"
        if self.update_rule != "nearest":
            text = f"{text},u={self.update_rule}"
        if self.quant is not None and (self.quant != "none" or explicit_quant):
            text = f"{text},q={self.quant}"
        return text

    def __str__(self) -> str:
        parts = [self.dtypes_str()]
        parts += [
            f"{pattern}{_RULE_ARROW}{policy.dtypes_str(explicit_quant=True)}"
            for pattern, policy in self.overrides
        ]
        return f"{_RULE_SEP} ".join(parts)

    def __repr__(self) -> str:
        return f"Policy({str(self)!r})"


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _ancestors(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[: i + 1]) for i in range(len(parts) - 1, -1, -1)]


def _resolve(rules: tuple[tuple[str, Policy], ...], path: str) -> Policy | None:
    if not rules:
        return None
    prefixes = _ancestors(path)
    for pattern, policy in rules:
        regex = _compiled(pattern)
        if any(regex.fullmatch(p) for p in prefixes):
            return policy
    return None


def _cast_leaf(x, dtype: np.dtype):
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(dtype) if x.dtype != dtype else x
    return x


def _cast_tree(tree, dtype: np.dtype):
    return jax.tree.map(lambda x: _cast_leaf(x, dtype), tree)


# ------------------------------------------------------------------- presets and parsing
PRESETS: dict[str, Policy] = {
    "fp32": Policy(_F32, _F32, _F32),
    # FP32 master weights, BF16 compute, FP32 outputs: standard mixed precision.
    "bf16": Policy(_F32, _BF16, _F32),
    # BF16 everywhere a value is stored; accumulation still FP32. Updates rounded to nearest:
    # an update below half a BF16 ulp of its weight is lost (1.0 + 1e-3 == 1.0).
    "bf16-pure": Policy(_BF16, _BF16, _BF16),
    # Pure BF16 with unbiased stochastic rounding of every param update.
    "bf16-pure-sr": Policy(_BF16, _BF16, _BF16, update_rule="stochastic"),
    # Pure BF16 with Kahan-compensated updates (an FP32 compensation buffer per param).
    "bf16-pure-kahan": Policy(_BF16, _BF16, _BF16, update_rule="kahan"),
    # Pure BF16 params plus the low 16 bits of their FP32 master: exact FP32 updates, 4 B/param.
    "bf16-pure-split": Policy(_BF16, _BF16, _BF16, update_rule="split"),
    # FP16 compute needs loss scaling (train.loss_scale) because FP16's range is narrow.
    "fp16": Policy(_F32, _F16, _F32),
}


def _parse_dtypes(text: str, context: str, base: Policy | None = None) -> Policy:
    """One policy segment. `base` is given for an override: then a segment of only `q=...`
    keeps the base's dtypes, and an unset `q` means "inherit" (quant None)."""
    quant_default = "none" if base is None else None
    text = text.strip()
    if not text:
        raise ValueError(
            f"Empty policy in {context!r}: use a preset ({', '.join(PRESETS)}) "
            "or a string like 'p=f32,c=bf16,o=f32'."
        )
    if text.lower() in PRESETS:
        return PRESETS[text.lower()].replace(quant=quant_default)
    if "=" not in text:
        # jmp: a bare dtype name sets params, compute and output alike.
        try:
            d = _parse_dtype(text, context)
        except ValueError:
            # "Unknown dtype" first: jmp's wording for a bare name it cannot parse.
            raise ValueError(
                f"Unknown dtype {text!r} in policy {context!r}: use a preset "
                f"({', '.join(PRESETS)}), a dtype name (f32, bf16, f16, half, float32, ...) or "
                "key=dtype pairs like 'p=f32,c=bf16,o=f32'."
            ) from None
        return Policy(d, d, d, quant=quant_default)
    fields: dict[str, Any] = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(
                f"Malformed part {part.strip()!r} in policy {context!r}: "
                "expected key=dtype, e.g. 'p=f32,c=bf16' (a preset with quantization is "
                "written 'bf16; q=w8a8')."
            )
        key, value = (s.strip() for s in part.split("=", 1))
        field = _KEYS.get(key.lower())
        if field is None:
            # Worded as jmp's error, then the keys only bf16jax has.
            raise ValueError(
                f"Unknown key {key!r} in {context!r} should be 'params', 'compute' or 'output' "
                "(p, c, o), or bf16jax's 'accum' (a), 'residual' (r), 'update' (u: nearest, "
                "stochastic, kahan, split) or 'quant' (q: none, w8a8, w4a8, fp8, ...)."
            )
        if field in fields:
            raise ValueError(f"Key {key!r} given twice in policy {context!r}.")
        if field == "update_rule":
            fields[field] = _parse_rule(value, context)
        elif field == "quant":
            fields[field] = parse_quant(value, context)
        else:
            fields[field] = _parse_dtype(value, context)
    quant = fields.get("quant", quant_default)
    if base is not None and set(fields) == {"quant"}:
        return base.replace(quant=quant, overrides=(), update_rule="nearest")
    param = fields.get("param_dtype", _F32)
    compute = fields.get("compute_dtype", param)  # jmp: compute follows params
    output = fields.get("output_dtype", compute)  # jmp: output follows compute
    accum = fields.get("accum_dtype", _F32)
    rule = fields.get("update_rule", "nearest")
    residual = fields.get("residual_dtype")  # None: the residual stream follows compute
    return Policy(param, compute, output, accum, rule, quant=quant, residual_dtype=residual)


def get_policy(spec: str | Policy) -> Policy:
    """Parses a policy from a preset name or a policy string; a Policy is returned as is.

    Grammar: `BASE [; q=QUANT] [; REGEX->POLICY]...` where BASE and each POLICY is a preset
    name (`fp32`, `bf16`, `bf16-pure`, `bf16-pure-sr`, `bf16-pure-kahan`, `bf16-pure-split`,
    `fp16`), a jmp/Levanter string of `key=dtype` pairs (keys p/params, c/compute, o/output,
    a/accum, r/residual; dtypes f32/float32/full, bf16/bfloat16, f16/float16, half; plus
    u/update=nearest|stochastic|kahan|split, base policy only, and q/quant) or a bare dtype
    (all of params/compute/output). Unset keys follow jmp: params f32, compute = params,
    output = compute, accum f32, update nearest; the residual stream follows compute. Example:
    `bf16-pure-kahan; .*norm.*->fp32; .*head.*->p=f32,c=bf16`. A `; key=value` segment amends
    the base: `bf16; r=f32` keeps the residual stream in FP32 (= `p=f32,c=bf16,o=f32,r=f32`),
    `bf16-pure; u=split` is `bf16-pure-split`, `bf16; q=w8a8` quantizes (below).

    Quantization-aware training (`bf16jax.nn.quant`, LSQ learned step sizes): QUANT is `none`,
    `w<b>a<b>` (weights per output channel and input activations per tensor, 2..8 bits, e.g.
    `w8a8`, `w4a8`), `w<b>` (weights only) or `fp8[:h<N>][:m<N>][:hybrid|e4m3]` (E4M3 weights
    and activations, E5M2 gradients, or E4M3 everywhere with `e4m3`; delayed scaling from amax
    histories of N steps, default 1024, with margin m: `bf16jax.nn.quant.fp8_dot`). It applies to
    every `layers.Linear` except the edge layers (the first layer and the output logits: ViT
    `patch_embed`, every `head`), which stay unquantized unless an override names them. An
    override `REGEX->q=QUANT` changes only the quantization of the matching modules and keeps
    the base dtypes; an override with
    dtypes and no `q` keeps the base quantization. `Embed` lookups and `Embed.attend` (tied
    logits) are never quantized. Examples: `fp32; q=w8a8`, `bf16; q=w4a8; head->q=w8a8`,
    `bf16; q=w4a8; blocks/0/.*->q=w8a8; .*norm.*->fp32`, `p=f32,c=bf16,q=w8a8`.

    Raises:
      ValueError: naming the bad part and the accepted values.
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"Policy must be a string or Policy, got {type(spec).__name__}.")
    base_text, *rule_texts = spec.split(_RULE_SEP)
    policy = _parse_dtypes(base_text, spec)
    # `; key=value` segments amend the base policy: q (quantization), r (residual), u (rule).
    amend_texts = [t for t in rule_texts if t.strip() and _RULE_ARROW not in t]
    amended = _keys_of(base_text)
    for text in amend_texts:
        key, _, value = text.partition("=")
        field = _KEYS.get(key.strip().lower())
        if field not in _AMENDABLE or not value.strip():
            raise ValueError(
                f"Malformed override {text.strip()!r} in policy {spec!r}: write REGEX->POLICY, "
                "e.g. '.*norm.*->fp32', or amend the base with q=QUANT, r=DTYPE or u=RULE, "
                "e.g. 'q=w8a8', 'r=f32', 'u=split'."
            )
        if field in amended or (field == "update_rule" and policy.update_rule != "nearest"):
            raise ValueError(f"{key.strip()}= given twice in policy {spec!r}: give it once.")
        amended.add(field)
        if field == "quant":
            policy = policy.replace(quant=parse_quant(value, spec))
        elif field == "update_rule":
            policy = policy.replace(update_rule=_parse_rule(value, spec))
        else:
            policy = policy.replace(residual_dtype=_parse_dtype(value, spec))
    rules = []
    for text in rule_texts:
        if not text.strip() or _RULE_ARROW not in text:
            continue
        pattern, sub = text.rsplit(_RULE_ARROW, 1)
        rules.append((pattern.strip(), _parse_dtypes(sub, spec, base=policy)))
    return dataclasses.replace(policy, overrides=tuple(rules)) if rules else policy


def fp32_reference(policy: Policy) -> Policy:
    """FP32 everywhere, with `policy`'s quantization: the reference that a lower-precision
    model is compared with (the drift diagnostic, serving gates). It holds the same params,
    LSQ step sizes included."""
    rules = tuple((pattern, Policy(quant=p.quant)) for pattern, p in policy.overrides)
    return Policy(quant=policy.quant, overrides=rules)


def _keys_of(text: str) -> set[str]:
    return {_KEYS.get(p.split("=", 1)[0].strip().lower()) for p in text.split(",") if "=" in p}


# ------------------------------------------------------------------- what the overrides hit
_RECORDING = threading.local()


def _note_path(path: str) -> None:
    for paths in getattr(_RECORDING, "stack", ()):
        paths.append(path)


def note_paths(paths: Iterable[str]) -> None:
    """Records `paths` as resolved (for modules created once and stacked, e.g. scanned layers)."""
    for path in paths:
        _note_path(path)


@contextlib.contextmanager
def record_paths() -> Iterator[list[str]]:
    """Collects the module paths that layers resolve (`for_module` / `quant_for`) in the block.

    Blocks nest; each sees every path resolved inside it. Used by `bf16jax.models.build_model`
    to report and check what each override rule hit.
    """
    paths: list[str] = []
    stack = getattr(_RECORDING, "stack", None)
    if stack is None:
        stack = _RECORDING.stack = []
    stack.append(paths)
    try:
        yield paths
    finally:
        stack.remove(paths)


def deciding_rule(rules: tuple[tuple[str, Policy], ...], path: str) -> int | None:
    """Index of the first override rule matching `path` or one of its ancestors (None: none)."""
    prefixes = _ancestors(path)
    for i, (pattern, _) in enumerate(rules):
        if any(_compiled(pattern).fullmatch(p) for p in prefixes):
            return i
    return None
