"""The inference side of a trained model: serving precisions and the pure programs it runs.

`restore_params(config, workdir)` reads a checkpoint's params (and FP8 scales);
`serving_model(config, params, fp8_meta, precision)` casts them to a serving precision;
`Programs(model)` holds the model's pure programs — `score`, `prefill`, `decode_step`,
`generate`, and for continuous batching `prefill_<L>` (one per prompt-length bucket, sampling
the first token), `insert` (a prefilled row into a decode slot), `step` (one sampled token
for every slot) and the GPT's `step_<L>` / `step_<L>x<k>` (attention over the first L cache
positions; k steps per call) — as functions of (flat params, arrays), which `bf16jax.serving.export`
serializes with `jax.export` and `bf16jax.serving.runners` / `bf16jax.serving.scoring` jit on a
workdir. Invariants:

- serving precisions: `fp32` (the FP32 reference: `precision.fp32_reference`, the training
  run's quantization kept), `bf16` (params and compute BF16, FP32 accumulation / softmax /
  logits, the run's overrides kept), `int8` (the `bf16` policy with LSQ kernels stored as int8
  codes: int8 x int8 -> int32 dots; needs a QAT run, `q=w8a8`, `w4a8`, `w8`...) and `fp8` (the
  `bf16` policy with E4M3 kernel codes and the run's delayed scales; needs a `q=fp8` run);
- quantized kernels are coded from the checkpoint's full-precision values, never from a
  rounded copy (a QAT kernel served in BF16 is stored as codes * step, which BF16 holds exactly);
- programs take params as a flat dict {"path/to/leaf": array} and return builtin containers
  only, so the serialized programs load without bf16jax (`bf16jax.serving.artifact`);
- fixed shapes except the batch: GPT sequences are max_len long, T5 encoder / decoder
  inputs enc_len / the decode length, ViT images the model's size (inputs are padded).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bf16jax.models import build_model
from bf16jax.nn import quant, quant_model
from bf16jax.precision import Policy, fp32_reference, get_policy, is_fp8, quant_bits
from bf16jax.serving import sampling as sampling_lib
from bf16jax.serving.artifact import step_programs

__all__ = [
    "PRECISIONS",
    "TRAIN",
    "MAX_STOP_SEQUENCES",
    "MAX_STOP_LENGTH",
    "TOP_LOGPROBS",
    "serving_policy",
    "serving_model",
    "restore_params",
    "flatten_params",
    "Programs",
    "tokenizer_info",
]

PRECISIONS = ("fp32", "bf16", "int8", "fp8")
TRAIN = "train"  # serve / evaluate a run under its own training policy
MAX_STOP_SEQUENCES = 4  # stop sequences per request (the generate program's static shape)
MAX_STOP_LENGTH = 16  # tokens per stop sequence
TOP_LOGPROBS = 5  # alternatives per token the step programs return (OpenAI's logprobs <= 5)
MIN_BUCKET = 16  # the shortest prefill bucket (GPT prompts: 16, 32, ... up to max_len)
MIN_STEP_BUCKET = 32  # the shortest context bucket of the GPT decode step: 32, 48, 64, 96...
MULTI_STEP = 4  # decode steps per call of the GPT's step_<L>x<k> programs
_BF16_SERVING = dict(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)


def serving_policy(train_policy: Policy | str, precision: str) -> Policy:
    """The policy a model trained under `train_policy` is served with at `precision`."""
    train_policy = get_policy(train_policy)
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown serving precision {precision!r}: use one of {PRECISIONS}.")
    if precision == "fp32":
        return fp32_reference(train_policy)
    layers = {p.quant for _, p in train_policy.overrides} | {train_policy.quant}
    if precision == "int8" and not any(quant_bits(q) for q in layers if q):
        raise ValueError(
            f"int8 serving needs LSQ step sizes, but the run's policy {str(train_policy)!r} "
            "quantizes nothing: train with e.g. --config.precision='bf16; q=w8a8' (or serve "
            "fp32 / bf16)."
        )
    if precision == "fp8" and not any(is_fp8(q) for q in layers):
        raise ValueError(
            f"fp8 serving needs the delayed FP8 scales of a q=fp8 run; the run's policy "
            f"{str(train_policy)!r} has none: train with --config.precision='bf16; q=fp8'."
        )
    # Serving keeps the run's per-module overrides (deliberate precision choices) and its
    # quantization; only the base dtypes change. FP32 accumulation stays.
    return train_policy.replace(
        **_BF16_SERVING, output_dtype=jnp.float32, accum_dtype=jnp.float32, update_rule="nearest"
    )


def restore_params(config, workdir: str, step: int | None = None) -> tuple[Any, Any, int]:
    """(params, fp8_meta, step) of a training run's checkpoint, as host NumPy arrays.

    Args:
      config: the run's config (`bf16jax.config.load_config` or the `--config` flag).
      workdir: the run's `--workdir`.
      step: a checkpointed step; default the newest.

    Raises:
      ValueError: no checkpoint in `workdir`, an unknown step, or a config that does not
        match the checkpoint (the message names the differing leaves).
    """
    from bf16jax.checkpoint.manager import Checkpointer
    from bf16jax.training.trainer import create_trainer

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(
            f"{workdir} has no checkpoints/ directory: pass the --workdir of a training run."
        )
    trainer = create_trainer(config)
    with Checkpointer(directory, create=False) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"No committed checkpoint in {directory}: train first.")
        target = {"params": trainer.abstract.params, "fp8_meta": trainer.abstract.fp8_meta}
        restored = ckpt.restore(step, target, partial=True)
    restored = jax.device_get(restored)
    return restored["params"], restored["fp8_meta"], int(step)


def serving_model(
    config, params, fp8_meta=None, precision: str = "fp32", *, policy: Policy | str | None = None
) -> nnx.Module:
    """The model of `config` holding `params` at a serving precision (see the module doc).

    Args:
      config: the run's config (its `model` and `precision` are read).
      params: the checkpoint's params (an nnx.State or its pure dict), any float dtype.
      fp8_meta: the run's FP8 scales (`TrainState.fp8_meta`), for `q=fp8` runs.
      precision: one of PRECISIONS, or TRAIN: the run's own training policy.
      policy: serve with this policy instead of `precision`'s (expert use: e.g. fp16 serving,
        or a planted regression in tests); int8 / fp8 codes are still made for `precision`.
    """
    if precision == TRAIN:
        policy, precision = policy or config.precision, "fp32"
    policy = get_policy(policy) if policy is not None else None
    policy = policy or serving_policy(config.precision, precision)
    abstract = nnx.eval_shape(lambda: build_model(config.model, policy, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    coded = {(*p, "kernel") for p, _ in _coded_layers(abstract, precision)}
    lsq = {
        (*p, "kernel"): (p, quant_bits(m.quant)[0])
        for p, m in quant_model.quantized_layers(abstract)
    }
    values = _pure(params)
    if fp8_meta is not None:
        values = _merge_dicts(values, _pure(fp8_meta))
    flat_target = nnx.to_flat_state(state)
    flat_values = _flatten(values)
    missing = sorted({_join(p) for p, _ in flat_target} - set(flat_values))
    if missing:
        raise ValueError(
            f"The params lack {missing[:5]} (+{max(len(missing) - 5, 0)} more) that the model "
            f"under policy {str(policy)!r} needs: pass the run's config and its fp8_meta."
        )
    filled = []
    for path, var in flat_target:
        value = np.asarray(flat_values[_join(path)])
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{_join(path)}: params have {value.shape}, the model {var.shape}.")
        keep = path in coded or not jnp.issubdtype(value.dtype, jnp.floating)
        if not keep and path in lsq and np.dtype(var.dtype) != value.dtype:
            # A QAT kernel stored in 16 bits: store codes * step, which the cast keeps exact
            # (|code| <= 128 < 2^8), instead of the raw weight, whose rounding flips codes.
            layer, bits = lsq[path]
            value = _dequantized(value, flat_values[_join((*layer, "w_log_scale"))], bits)
        filled.append((path, var.replace(jnp.asarray(value if keep else value.astype(var.dtype)))))
    model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    if precision == "int8":
        quant_model.to_int8(model)
    elif precision == "fp8":
        quant_model.to_fp8(model)
    return model


def _dequantized(w: np.ndarray, w_log_scale, bits: int) -> np.ndarray:
    """codes(w) * s in FP32, s = exp(w_log_scale) (the LSQ forward's weight)."""
    qn, qp = quant.quant_range(bits)
    s = np.asarray(quant.step_size(jnp.asarray(w_log_scale)), np.float32)
    return np.round(np.clip(w.astype(np.float32) / s, qn, qp)) * s


def _coded_layers(model: nnx.Module, precision: str) -> list:
    if precision == "int8":
        return [(p, m) for p, m in quant_model.quantized_layers(model) if quant_bits(m.quant)]
    if precision == "fp8":
        return quant_model.fp8_layers(model)
    return []


def _pure(tree) -> dict:
    return tree if isinstance(tree, dict) else nnx.to_pure_dict(tree)


def _merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_dicts(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def _join(path) -> str:
    return "/".join(str(k) for k in path)


def _flatten(tree: dict, prefix: tuple = ()) -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[_join((*prefix, k))] = v
    return out


def flatten_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """{"path/to/leaf": host array} of every variable of `model` (params, FP8 scales)."""
    flat = nnx.to_flat_state(nnx.state(model))
    return {_join(p): np.asarray(jax.device_get(v[...])) for p, v in flat}


def tokenizer_info(config=None) -> dict[str, Any]:
    """The run's tokenizer (`config.data.tokenizer`) as an artifact's manifest records it.

    Bytes (the default) carry their constants; a SentencePiece / BPE tokenizer records its
    kind, special ids, `file` (the model file's name: export copies it into the artifact) and
    `path` (where it lies now; the manifest drops it), so text works wherever the artifact goes.
    """
    from bf16jax.data import tokenizer as t

    spec = config.data.get("tokenizer", "") if config is not None else ""
    if not spec:
        return {"kind": "bytes", "pad_id": t.PAD_ID, "eos_id": t.EOS_ID,
                "byte_offset": t.BYTE_OFFSET, "sentinel_offset": t.SENTINEL_OFFSET,
                "num_sentinels": t.NUM_SENTINELS, "vocab_size": t.VOCAB_SIZE}  # fmt: skip
    tok = t.load_tokenizer(spec)
    info = {"kind": type(tok).__name__, "source": os.path.abspath(spec), "pad_id": tok.pad_id,
            "eos_id": tok.eos_id, "vocab_size": tok.vocab_size,
            "file": os.path.basename(tok.path), "path": os.path.abspath(tok.path)}  # fmt: skip
    if isinstance(tok, t.SentencePieceTokenizer):
        info["extra_ids"] = tok.extra_ids
    return info


# ----------------------------------------------------------------------------- programs
class Programs:
    """A serving model's pure programs over (flat params, arrays); see the module docstring.

    Build with `Programs(model, decode_len=...)`; `params` is `flatten_params(model)`.
    `specs(name, batch)` gives the argument shapes of program `name` for `jax.jit(...).lower`
    or `jax.export` (batch may be symbolic). `names` lists the programs of the family.
    """

    def __init__(self, model: nnx.Module, config, *, decode_len: int | None = None):
        self.family = config.model.name
        self.graphdef, self.template = nnx.split(model)
        self.params = flatten_params(model)
        self.limits = _limits(config, decode_len)
        self.tokenizer = tokenizer_info(config) if self.family != "vit" else None
        buckets = [f"prefill_{n}" for n in self.limits.get("prefill_buckets", ())]
        lim = self.limits
        steps = step_programs(lim.get("step_buckets", ()), lim.get("multi_step", 1),
                              lim.get("cache_len"))  # fmt: skip
        self.names = ("score",) if self.family == "vit" else (
            "score", "prefill", "decode_step", "generate", *buckets, "insert", "step",
            *steps)  # fmt: skip

    def model(self, params: dict[str, jax.Array]) -> nnx.Module:
        """The module holding flat `params` (inside a traced function)."""
        flat = nnx.to_flat_state(self.template)
        state = nnx.from_flat_state([(p, var.replace(params[_join(p)])) for p, var in flat])
        return nnx.merge(self.graphdef, state)

    # ----------------------------------------------------------------- the programs
    def score(self, params, *inputs) -> jax.Array:
        """GPT: tokens [B, max_len] -> logits [B, max_len, V]; T5: (encoder_inputs [B, Te],
        decoder_inputs [B, Td]) -> logits [B, Td, V]; ViT: images -> logits [B, K]. FP32."""
        return self.model(params)(*inputs).astype(jnp.float32)

    def prefill(self, params, prompt, prompt_len):
        """(logits [B, V] of the first new token, decode state, start [B]): the position where
        the first new token is fed. GPT: the prompt through the cache; T5: the encoder, then
        the start token (PAD) at position 0."""
        model = self.model(params)
        b = prompt.shape[0]
        if self.family == "gpt":
            # why: the prompt's queries attend to its own bucket's positions, not the cache's
            logits, cache = model.decode_step(
                prompt, model.init_cache(b), jnp.zeros([b], jnp.int32), prompt.shape[1]
            )
            last = jnp.take_along_axis(logits, (prompt_len - 1)[:, None, None], axis=1)[:, 0]
            return last.astype(jnp.float32), cache, prompt_len.astype(jnp.int32)
        cache = model.init_cache(prompt, self.limits["decode_len"])
        start = jnp.full((b, 1), self.tokenizer["pad_id"], jnp.int32)  # T5's start token
        logits, cache = model.decode_step(start, cache, jnp.zeros([b], jnp.int32))
        return logits[:, 0].astype(jnp.float32), cache, jnp.ones([b], jnp.int32)

    def decode_step(self, params, cache, tokens, index):
        """(logits [B, V], cache) for tokens [B, 1] fed at positions index [B]."""
        logits, cache = self.model(params).decode_step(tokens, cache, index)
        return logits[:, 0].astype(jnp.float32), cache

    def generate(self, params, prompt, prompt_len, seeds, temperature, top_k, top_p,
                 max_tokens, stop) -> dict:  # fmt: skip
        """Generation with the KV cache (`sampling.decode_loop`) in one program.

        Args: prompt [B, P] ids (PAD after prompt_len [B]); per-row seeds [B] uint32,
        temperature / top_p [B] f32, top_k / max_tokens [B] int32; stop [B, S, L] int32.
        Returns {"tokens" [B, N], "length" [B], "finish_reason" [B]}.
        """
        logits, cache, start = self.prefill(params, prompt, prompt_len)

        def step(tokens, cache, index):
            # why: the module is built inside the loop's own trace; one built outside it
            # fails under scan_layers (nnx.scan will not extract a variable of another trace).
            return self.model(params).decode_step(tokens, cache, index)

        return sampling_lib.decode_loop(
            step,
            cache,
            logits,
            start=start,
            cache_len=self.limits["cache_len"],
            num_steps=self.limits["cache_len"],
            seeds=seeds,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=stop,
            eos_id=self.tokenizer["eos_id"],
            pad_id=self.tokenizer["pad_id"],
        )

    # ----------------------------------------------------------------- continuous batching
    def _sampled(self, logits, seeds, count, temperature, top_k, top_p) -> dict:
        """Token `count` of each row sampled as `sampling.decode_loop` samples it (same keys),
        with its log-probability and the TOP_LOGPROBS most likely tokens (raw logits)."""
        keys = jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))
        keys = jax.vmap(jax.random.fold_in)(keys, count.astype(jnp.int32))
        token = sampling_lib.sample(logits, keys, temperature, top_k, top_p)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # why: FP32 logprobs
        top_logprobs, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
        return {"token": token, "logprob": jnp.take_along_axis(logp, token[:, None], -1)[:, 0],
                "top_ids": top_ids.astype(jnp.int32), "top_logprobs": top_logprobs}  # fmt: skip

    def prefill_sample(self, params, prompt, prompt_len, seeds, temperature, top_k, top_p):
        """`prefill` of prompts [B, L] (any bucket L) and their first sampled token: {"token",
        "logprob", "top_ids", "top_logprobs", "cache", "start"}."""
        logits, cache, start = self.prefill(params, prompt, prompt_len)
        count = jnp.zeros(prompt.shape[:1], jnp.int32)
        return {**self._sampled(logits, seeds, count, temperature, top_k, top_p),
                "cache": cache, "start": start}  # fmt: skip

    def step(self, params, cache, token, index, count, seeds, temperature, top_k, top_p):
        """Feeds token [B] at positions index [B] and samples token number count [B] of each
        row: {"token", "logprob", "top_ids", "top_logprobs", "cache"}. Free slots compute
        garbage that the host ignores."""
        logits, cache = self.decode_step(params, cache, token[:, None], index)
        return {**self._sampled(logits, seeds, count, temperature, top_k, top_p), "cache": cache}

    def step_prefix(self, length: int | None, steps: int = 1):
        """`step` reading the first `length` cache positions (None: all; every fed index +
        steps <= length), `steps` times in one program (the token sampled at step j is fed at
        step j + 1, at index + j, as token count + j): results [steps, B, ...] when steps > 1.
        Attention's cost follows the context in use, and several steps in one program cost
        less per step (experiments/results/serving_bench.md: 2.04 -> 1.35 ms at 4 steps)."""

        def one(params, cache, token, index, count, seeds, temperature, top_k, top_p):
            logits, cache = self.model(params).decode_step(token[:, None], cache, index, length)
            logits = logits[:, 0].astype(jnp.float32)
            return {**self._sampled(logits, seeds, count, temperature, top_k, top_p),
                    "cache": cache}  # fmt: skip

        if steps == 1:
            return one

        def multi(params, cache, token, index, count, seeds, temperature, top_k, top_p):
            def body(carry, j):
                out = one(params, carry[0], carry[1], index + j, count + j, seeds, temperature,
                          top_k, top_p)  # fmt: skip
                cache = out.pop("cache")
                return (cache, out["token"]), out

            (cache, _), outs = jax.lax.scan(body, (cache, token), jnp.arange(steps))
            return {**outs, "cache": cache}

        return multi

    def insert(self, params, cache, row, slot):
        """`cache` (every slot) with slot `slot` replaced by `row` (a batch-1 prefill's)."""
        del params  # a program signature like the others: (params, *arrays)
        return jax.tree.map(
            lambda c, r, axis: jax.lax.dynamic_update_slice_in_dim(
                c, r.astype(c.dtype), slot, axis
            ),  # fmt: skip
            cache,
            row,
            self._cache_batch_axes(),
        )

    def _cache_batch_axes(self):
        """Per cache leaf, the axis that is the batch (0, or 1 for scanned layers' stacks)."""
        params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.params.items()}

        def shapes(b):
            prompt = jax.ShapeDtypeStruct((b, self.limits["prompt_len"]), jnp.int32)
            return jax.eval_shape(self.prefill, params, prompt,
                                  jax.ShapeDtypeStruct((b,), jnp.int32))[1]  # fmt: skip

        def axis(a, b):
            return next(i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y)

        return jax.tree.map(axis, shapes(1), shapes(2))

    # ----------------------------------------------------------------- shapes
    def specs(self, name: str, batch: Any) -> tuple:
        """ShapeDtypeStructs of program `name`'s arguments for a batch of `batch` rows."""
        lim = self.limits
        i32, f32 = jnp.int32, jnp.float32

        def s(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype)

        params = {k: s(v.shape, v.dtype) for k, v in self.params.items()}
        if name == "score":
            if self.family == "gpt":
                return params, s((batch, lim["seq_len"]), i32)
            if self.family == "t5":
                return params, s((batch, lim["enc_len"]), i32), s((batch, lim["decode_len"]), i32)
            return params, s((batch, *lim["image_shape"]), f32)
        prompt = (s((batch, lim["prompt_len"]), i32), s((batch,), i32))
        if name == "prefill":
            return (params, *prompt)
        if name == "decode_step":
            _, cache, _ = jax.eval_shape(self.prefill, params, *prompt)
            return params, cache, s((batch, 1), i32), s((batch,), i32)
        if name == "generate":
            row = [s((batch,), t) for t in (jnp.uint32, f32, i32, f32, i32)]
            stop = s((batch, MAX_STOP_SEQUENCES, MAX_STOP_LENGTH), i32)
            return (params, *prompt, *row, stop)
        sampling = [s((batch,), t) for t in (jnp.uint32, f32, i32, f32)]
        if name.startswith("prefill_") and name in self.names:
            length = int(name.split("_")[1])
            return params, s((batch, length), i32), s((batch,), i32), *sampling
        if name == "step" or name.startswith("step_") or name == "insert":
            _, cache, _ = jax.eval_shape(self.prefill, params, *prompt)
            if name != "insert":
                return params, cache, *[s((batch,), i32)] * 3, *sampling
            one = (s((1, lim["prompt_len"]), i32), s((1,), i32))
            _, row, _ = jax.eval_shape(self.prefill, params, *one)
            return params, cache, row, s((), i32)
        raise ValueError(f"Unknown program {name!r} for {self.family}: use one of {self.names}.")

    def function(self, name: str):
        """The pure function of program `name` (to jit or export)."""
        if name not in self.names:
            raise ValueError(f"{self.family} has no program {name!r}: use one of {self.names}.")
        if name.startswith("step_"):  # step_<L> or step_<L>x<steps>
            length, _, steps = name[len("step_") :].partition("x")
            length = None if int(length) == self.limits["cache_len"] else int(length)
            return self.step_prefix(length, int(steps or 1))
        return self.prefill_sample if name.startswith("prefill_") else getattr(self, name)


def _limits(config, decode_len: int | None) -> dict[str, Any]:
    m, d = config.model, config.data
    stops = {"max_stop_sequences": MAX_STOP_SEQUENCES, "max_stop_length": MAX_STOP_LENGTH}
    if m.name == "gpt":
        buckets = sorted({min(MIN_BUCKET << i, m.max_len) for i in range(32)
                          if i == 0 or MIN_BUCKET << (i - 1) < m.max_len})  # fmt: skip
        steps = sorted({n for i in range(32) for n in (MIN_STEP_BUCKET << i,
                                                       3 * MIN_STEP_BUCKET << i >> 1)
                        if n < m.max_len})  # fmt: skip
        return {"seq_len": m.max_len, "prompt_len": m.max_len, "cache_len": m.max_len,
                "vocab_size": m.vocab_size, "prefill_buckets": buckets, "step_buckets": steps,
                "multi_step": MULTI_STEP,
                "top_logprobs": TOP_LOGPROBS, **stops}  # fmt: skip
    if m.name == "t5":  # one bucket: the encoder's output shapes the cross-attention cache
        decode_len = int(decode_len or d.dec_len)
        return {"enc_len": int(d.enc_len), "prompt_len": int(d.enc_len), "decode_len": decode_len,
                "cache_len": decode_len, "vocab_size": m.vocab_size,
                "prefill_buckets": [int(d.enc_len)], "top_logprobs": TOP_LOGPROBS,
                **stops}  # fmt: skip
    return {"image_shape": [m.image_size, m.image_size, m.get("channels", 1)],
            "num_classes": m.num_classes}  # fmt: skip
