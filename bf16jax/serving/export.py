"""Serving artifacts: a training checkpoint -> a self-contained directory of jax.export programs.

`python -m bf16jax.export --config=configs/gpt_tiny.py --workdir=runs/x --precision=bf16
--out=artifacts/x-bf16` restores the checkpoint's params, casts them to the serving precision
(`inference.serving_model`: fp32, bf16, int8 LSQ codes, fp8 E4M3 codes), serializes the model's
programs (`inference.Programs`: score, and for GPT / T5 prefill, decode_step and generate) with
`jax.export` for CPU, CUDA and TPU, evaluates the written artifact against the FP32 reference
of the same checkpoint (`bf16jax.serving.scoring`) and writes `manifest.json`. Invariants:

- the directory appears complete or not at all: it is written beside `--out` and renamed into
  place; an existing `--out` is never overwritten unless `--overwrite`;
- the artifact carries its tokenizer's file (BPE `tokenizer.json` or SentencePiece model) and
  `text.py` (reads it, matches stop strings on the decoded text), hashed like the others, so
  text in and out works without the training run (and without bf16jax);
- the manifest names the source (workdir, step, config file, command line), the config, the
  data the model trained on and the data its metrics were measured on ("data"), the
  training and serving policies, the git revision, versions, limits, the tokenizer, the
  evaluation metrics, and the sha256 + size of every file (`bf16jax.serving.artifact.verify`);
- the metrics are measured on the written programs, not on the model they came from.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
from typing import Any

import jax
import numpy as np

import bf16jax
from bf16jax.precision import get_policy
from bf16jax.serving import artifact as artifact_lib
from bf16jax.serving import inference, text

__all__ = ["DEFAULT_PLATFORMS", "PROGRAM_SIGNATURES", "git_revision", "export_artifact"]

log = logging.getLogger(__name__)
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PROGRAM_SIGNATURES = {
    "score": "gpt: (params, tokens [b, seq_len]) -> logits [b, seq_len, V]; t5: (params, "
    "encoder_inputs [b, enc_len], decoder_inputs [b, decode_len]) -> logits [b, decode_len, V]; "
    "vit: (params, images [b, H, W, C]) -> logits [b, K]; logits f32",
    "prefill": "(params, prompt [b, prompt_len] int32, prompt_len [b]) -> (logits [b, V] of the "
    "first new token, cache, start [b]: where that token is fed)",
    "decode_step": "(params, cache, tokens [b, 1], index [b]) -> (logits [b, V], cache)",
    "generate": "(params, prompt, prompt_len, seeds [b] u32, temperature [b], top_k [b] i32, "
    "top_p [b], max_tokens [b] i32, stop [b, max_stop_sequences, max_stop_length] i32 right-"
    "aligned, -1 padded) -> {tokens [b, cache_len], length [b], finish_reason [b]}",
    "prefill_L": "(params, prompt [b, L] int32 (L: this bucket), prompt_len [b], seeds [b] u32, "
    "temperature [b], top_k [b] i32, top_p [b]) -> {token [b] (the first new token, sampled as "
    "generate samples it), logprob [b], top_ids [b, top_logprobs], top_logprobs [b, "
    "top_logprobs], cache (batch b), start [b]}",
    "insert": "(params (unused), cache (every slot), row (a batch-1 prefill's cache), slot "
    "int32) -> cache with that slot replaced",
    "step": "(params, cache, token [b] to feed, index [b] where, count [b] = the number of the "
    "token sampled next, seeds [b] u32, temperature [b], top_k [b] i32, top_p [b]) -> {token "
    "[b], logprob [b], top_ids, top_logprobs, cache}",
    "step_L": "step over the first L cache positions (every index [b] < L; L: this context "
    "bucket): the same arguments and results, the cache returned whole",
    "step_LxK": "K steps of step_L in one program (every index + K <= L): the same arguments, "
    "results [K, b, ...] (the cache returned whole)",
}


def git_revision() -> str:
    """`git rev-parse HEAD` of the bf16jax checkout (+ "-dirty"), or "unknown"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}-dirty" if dirty.strip() else rev


def export_artifact(
    config,
    params,
    fp8_meta,
    out: str,
    *,
    precision: str,
    source: dict[str, Any],
    policy: str | None = None,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
    decode_len: int | None = None,
    eval_batches: int | None = None,
    overwrite: bool = False,
    data: tuple[Any, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Writes the artifact of `params` at `precision` to `out`; returns its manifest.

    Args:
      config: the run's config.
      params, fp8_meta: the checkpoint's (`inference.restore_params`).
      out: the artifact directory to create.
      precision: one of `inference.PRECISIONS`.
      source: what the params came from (workdir, step, ...), recorded in the manifest.
      policy: serve with this policy string instead of `precision`'s (see
        `inference.serving_model`); recorded as the serving policy.
      platforms: lowering platforms of the programs.
      decode_len: T5's decode cache length (default config.data.dec_len).
      eval_batches: eval batches for the manifest's metrics (default config.train.eval_steps;
        0 skips the evaluation).
      overwrite: replace an existing `out`.
      data: (config, report) of the data the metrics are measured on
        (`scoring.resolve_data`); default: `config.data`, checked against the data the run
        trained on as recorded in `config` (config.json's "dataset").
    """
    from bf16jax.data import provenance
    from bf16jax.serving import scoring

    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists: pass a new --out (or --overwrite to replace it).")
    if data is None:
        data = scoring.resolve_data(config, provenance.describe_saved(config.to_dict()))
    model = inference.serving_model(config, params, fp8_meta, precision, policy=policy)
    programs = inference.Programs(model, config, decode_len=decode_len)
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        manifest = _write(tmp, config, model, programs, precision, source, platforms)
        manifest["data"] = data[1]  # the data the model trained on, and the metrics' data
        if eval_batches != 0:
            manifest["metrics"] = _metrics(tmp, data, params, fp8_meta, precision, policy,
                                           source, eval_batches)  # fmt: skip
        _write_manifest(tmp, manifest)
        if os.path.exists(out):  # overwrite: move the old one aside first, then swap
            old = f"{out}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes `tensors` in the safetensors layout (u64 header size, JSON header, raw data) that
    `artifact.read_safetensors` reads, as the reference writer lays it out."""
    names = {v: k for k, v in artifact_lib.SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        if a.dtype not in names:
            raise ValueError(f"{name}: dtype {a.dtype} has no safetensors name.")
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}  # fmt: skip
        offset += a.nbytes
        arrays.append(a)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in arrays:
            f.write(a.tobytes())


def _write(tmp, config, model, programs, precision, source, platforms) -> dict[str, Any]:
    from jax import export

    _write_safetensors(os.path.join(tmp, artifact_lib.PARAMS), programs.params)
    (batch,) = export.symbolic_shape("b")
    entries, timings = {}, {}
    for name in programs.names:
        start = time.perf_counter()
        fn = jax.jit(programs.function(name))
        exported = export.export(fn, platforms=platforms)(*programs.specs(name, batch))
        file = f"{name}.jaxexport"
        with open(os.path.join(tmp, file), "wb") as f:
            f.write(exported.serialize())
        timings[name] = round(time.perf_counter() - start, 3)
        key = name.split("_")[0] + "_L" if name.startswith(("prefill_", "step_")) else name
        key = "step_LxK" if name.startswith("step_") and "x" in name else key
        entries[name] = {"file": file, "signature": PROGRAM_SIGNATURES[key]}
    shutil.copyfile(artifact_lib.__file__, os.path.join(tmp, artifact_lib.LOADER))
    shutil.copyfile(text.__file__, os.path.join(tmp, artifact_lib.TEXT))
    tokenizer = dict(programs.tokenizer) if programs.tokenizer else None
    if tokenizer and "path" in tokenizer:  # the tokenizer's file travels with the artifact
        shutil.copyfile(tokenizer.pop("path"), os.path.join(tmp, tokenizer["file"]))
    files = sorted(os.listdir(tmp))
    param_arrays = programs.params.values()
    limits = dict(programs.limits)
    manifest = {
        "format": artifact_lib.FORMAT,
        "family": config.model.name,
        "precision": precision,
        "serving_policy": str(model.policy),
        "train_policy": str(get_policy(config.precision)),
        "source": source,
        "config": config.to_dict(),
        "git_revision": git_revision(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {
            "bf16jax": bf16jax.__version__,
            "jax": jax.__version__,
            "python": sys.version.split()[0],
        },  # fmt: skip
        "platforms": list(platforms),
        "batch": "symbolic (any batch size)",
        "limits": limits,
        "tokenizer": tokenizer,
        "programs": entries,
        "export_seconds": timings,
        "params": {
            "file": artifact_lib.PARAMS,
            "tensors": len(programs.params),
            "elements": int(sum(np.asarray(a).size for a in param_arrays)),
            "bytes": int(sum(np.asarray(a).nbytes for a in param_arrays)),
            "dtypes": _dtype_counts(programs.params),
        },
        "metrics": None,
        "files": {f: artifact_lib.file_entry(os.path.join(tmp, f)) for f in files},
    }
    _write_manifest(tmp, manifest)
    return manifest


def _dtype_counts(params: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in params.values():
        key = str(np.asarray(a).dtype)
        counts[key] = counts.get(key, 0) + int(np.asarray(a).size)
    return counts


def _write_manifest(directory: str, manifest: dict) -> None:
    """manifest.json, then manifest.sha256: the digest of the JSON as written and read back."""
    import json

    path = os.path.join(directory, artifact_lib.MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, default=float)
        f.write("\n")
    with open(path + ".tmp", encoding="utf-8") as f:
        digest = artifact_lib.manifest_digest(json.load(f))
    digest_path = os.path.join(directory, artifact_lib.MANIFEST_DIGEST)
    with open(digest_path + ".tmp", "w", encoding="ascii") as f:
        f.write(f"{digest}\n")
    os.replace(path + ".tmp", path)
    os.replace(digest_path + ".tmp", digest_path)


def _metrics(tmp, data, params, fp8_meta, precision, policy, source, eval_batches):
    from bf16jax.serving import scoring as evaluate_lib

    config, report = data
    scorer = evaluate_lib.Scorer.from_artifact(tmp).use_data(config, report)
    scorer.description = {"precision": precision}
    is_reference = precision == "fp32" and policy is None
    reference = None if is_reference else evaluate_lib.Scorer.from_params(
        config, params, fp8_meta, "fp32", source).use_data(config, report)  # fmt: skip
    report, _ = evaluate_lib.evaluate(scorer, reference, num_batches=eval_batches)
    if is_reference:
        report["reference"] = "this artifact (fp32)"
    return report
