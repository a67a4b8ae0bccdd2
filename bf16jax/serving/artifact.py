"""Loading a serving artifact with JAX alone: verify hashes, read params, call its programs.

An artifact is a directory written by `bf16jax.serving.export`: `manifest.json`, the params in
`params.safetensors` (the safetensors layout, read here with NumPy), one
`jax.export`-serialized program per `<name>.jaxexport` (score, prefill, decode_step, generate,
and the continuous-batching prefill_<L>, insert, step), the tokenizer's file if it has one,
`loader.py` (a copy of this file), `text.py` (a copy of `bf16jax.serving.text`: tokenizer
files, stop strings on the decoded text) and `manifest.sha256`. Invariants:

- this module imports only the standard library, NumPy and JAX, and the artifact's `text.py`
  (with `tokenizers` or `sentencepiece` for a BPE / SentencePiece model's text), so an
  artifact runs where bf16jax is not installed (`python ARTIFACT/loader.py ARTIFACT
  --prompt "..."`);
- nothing is read before every file listed in the manifest matches its sha256 and size, and the
  manifest itself matches the digest of its canonical JSON in `manifest.sha256`: a missing,
  altered or unparsable file raises `IntegrityError` naming it (and a given manifest digest is
  checked too, as the registry does);
- programs have a symbolic batch dimension and fixed sequence shapes (`manifest["limits"]`);
  `Artifact` pads inputs to them and validates every request against them;
- text goes through the tokenizer the manifest describes: `bytes` (UTF-8 bytes + offset, no
  package), or the artifact's own copy of a BPE `tokenizer.json` (the `tokenizers` package) or
  SentencePiece model (`sentencepiece`), hashed like every file; a prompt may be token ids;
  stop strings are matched on the decoded text, as the server matches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FORMAT",
    "MANIFEST",
    "MANIFEST_DIGEST",
    "PARAMS",
    "LOADER",
    "TEXT",
    "FINISH_REASONS",
    "DONATES_CACHE",
    "donated_args",
    "step_programs",
    "IntegrityError",
    "sha256_file",
    "file_entry",
    "manifest_digest",
    "read_manifest",
    "SAFETENSORS_DTYPES",
    "read_safetensors",
    "verify",
    "Runner",
    "Artifact",
]

FORMAT = "bf16jax-artifact/1"
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"  # hex sha256 of the manifest's canonical JSON
PARAMS = "params.safetensors"
LOADER = "loader.py"
TEXT = "text.py"  # a copy of bf16jax.serving.text: tokenizer files, stop strings on text
FINISH_REASONS = ("length", "eos", "stop", "context")  # = bf16jax.serving.sampling.FINISH_REASONS
_STOP_PAD = -1
# Programs (and step_<L>) whose argument 1 (after params) is the decode-slot cache they return
# updated: it is donated, so XLA updates it in place instead of copying every slot per call
# (the caller must not reuse the cache it passed).
DONATES_CACHE = ("insert", "step")


def donated_args(name: str) -> tuple[int, ...]:
    """The arguments program `name` donates: (1,) for the cache of `insert`, `step` and its
    `step_<L>` / `step_<L>x<k>` variants, else ()."""
    return (1,) if name.split("_")[0] in DONATES_CACHE else ()


def step_programs(buckets: Sequence[int], k: int, cache_len: int | None) -> list[str]:
    """The decode-step programs beside `step`: `step_<L>` per context bucket L and, when k > 1,
    `step_<L>x<k>` (k steps per call) per bucket and for the whole cache."""
    names = [f"step_{b}" for b in buckets]
    if k > 1:
        names += [f"step_{b}x{k}" for b in [*buckets, cache_len]]
    return names


# safetensors dtype names (huggingface/safetensors, format spec) <-> NumPy dtypes.
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8),
    "U32": np.dtype(np.uint32),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class IntegrityError(ValueError):
    """An artifact file is missing, altered, or the manifest is not the one expected."""


def sha256_file(path: str) -> str:
    """Hex sha256 of the file at `path` (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str) -> dict[str, Any]:
    """{"sha256": ..., "bytes": ...} of a file, as the manifest lists it."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Hex sha256 of a manifest's canonical JSON (sorted keys, no spaces, ASCII): the same for
    any formatting of the same content, different for any changed value."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of an artifact, checked against `manifest.sha256` beside it.

    Raises:
      IntegrityError: naming the file: no manifest, a manifest that is not JSON, a missing or
        unreadable digest, or a manifest whose content differs from its digest.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise IntegrityError(f"{directory} has no {MANIFEST}: not a bf16jax artifact.")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IntegrityError(
            f"{path} is not valid JSON ({str(e)[:120]}): the manifest is damaged; re-export "
            "the artifact."
        ) from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path} holds a {type(manifest).__name__}, not a manifest object.")
    digest_path = os.path.join(directory, MANIFEST_DIGEST)
    try:
        with open(digest_path, encoding="ascii") as f:
            expected = f.read().split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        raise IntegrityError(
            f"{digest_path} is missing or unreadable, so {path} cannot be checked: refusing to "
            "load it. Re-export the artifact."
        ) from None
    actual = manifest_digest(manifest)
    if actual != expected:
        raise IntegrityError(
            f"{path}: its content (sha256 {actual[:16]}...) differs from {digest_path} "
            f"({expected[:16]}...): the manifest was changed after export; refusing to load "
            "it. Re-export the artifact."
        )
    return manifest


# ----------------------------------------------------------------------------- safetensors
def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (NumPy arrays viewing one read of the file)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise IntegrityError(f"{path} is not a safetensors file (too short).")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise IntegrityError(f"{path}: header of {size} bytes overruns the file.")
    header = json.loads(blob[8 : 8 + size])
    header.pop("__metadata__", None)
    data = memoryview(blob)[8 + size :]
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None or end > len(data):
            raise IntegrityError(f"{path}: tensor {name!r} has a bad dtype or extent.")
        out[name] = np.frombuffer(data[begin:end], dtype).reshape(info["shape"])
    return out


# ----------------------------------------------------------------------------- integrity
def verify(directory: str, manifest_sha256: str | None = None) -> dict[str, Any]:
    """Checks every file the manifest lists (sha256 and size) and returns the manifest.

    Args:
      directory: the artifact directory.
      manifest_sha256: if given, the manifest file itself must have this digest.

    Raises:
      IntegrityError: a missing manifest or file, a digest or size that differs, or an
        unknown format; the message names the file.
    """
    path = os.path.join(directory, MANIFEST)
    if (
        manifest_sha256 is not None
        and os.path.isfile(path)
        and sha256_file(path) != manifest_sha256
    ):
        raise IntegrityError(
            f"{path} is not the manifest that was registered (sha256 differs): the artifact "
            "was changed after it was registered; re-export and promote it again."
        )
    manifest = read_manifest(directory)
    if manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}.")
    listed = manifest.get("files", {})
    for name, entry in sorted(listed.items()):
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise IntegrityError(f"{file} is missing (listed in the manifest): re-export.")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise IntegrityError(
                f"{file} has {size} bytes, the manifest says {entry['bytes']}: it was changed "
                "after export; refusing to load it. Re-export the artifact."
            )
        digest = sha256_file(file)
        if digest != entry["sha256"]:
            raise IntegrityError(
                f"{file}: sha256 {digest[:16]}... differs from the manifest's "
                f"{entry['sha256'][:16]}...: it was changed after export; refusing to load it. "
                "Re-export the artifact."
            )
    extra = sorted(n for n in os.listdir(directory)
                   if n not in listed and n not in (MANIFEST, MANIFEST_DIGEST)
                   and not n.startswith("."))  # fmt: skip
    if extra:
        warnings.warn(
            f"{directory} holds files the manifest does not list (ignored): {extra}", stacklevel=2
        )
    return manifest


# ----------------------------------------------------------------------------- requests
class Runner:
    """Text and array requests on a model's programs: generate, score, classify.

    Subclasses provide `family`, `limits`, `tokenizer` (manifest entries) and
    `call(name, *arrays)`: `Artifact` runs the serialized programs; `bf16jax.serving.runners` runs
    the same programs jitted from a training run. Every request is validated here and bad
    values raise ValueError naming the field and the limit.
    """

    family: str
    limits: dict[str, Any]
    tokenizer: dict[str, Any]

    def call(self, name: str, *args):
        raise NotImplementedError

    tokenizer_dir: str = ""  # where the tokenizer's file (manifest "file") lies

    # ----------------------------------------------------------------- tokenizer
    def encode(self, text: str | Sequence[int]) -> np.ndarray:
        """Token ids of `text` under the model's tokenizer; a sequence of ids passes through
        (checked against the vocabulary)."""
        tok = self.tokenizer
        if not isinstance(text, str):
            ids = np.asarray(text)
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise ValueError("a prompt is a string or a list of token ids (ints).")
            vocab = tok.get("vocab_size") or self.limits.get("vocab_size")
            if ids.size and (ids.min() < 0 or (vocab and ids.max() >= vocab)):
                raise ValueError(f"token ids must lie in [0, {vocab}), got [{ids.min()}, "
                                 f"{ids.max()}].")  # fmt: skip
            return ids.astype(np.int32)
        if tok.get("kind") == "bytes":
            raw = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
            return raw + np.int32(tok["byte_offset"])
        return np.asarray(self._text_tokenizer().encode(text), np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids; special ids (PAD, EOS) are dropped."""
        ids = [int(i) for i in ids]
        if self.tokenizer.get("kind") != "bytes":
            return self._text_tokenizer().decode(ids)
        off = self.tokenizer["byte_offset"]
        raw = bytes(i - off for i in ids if off <= i < off + 256)
        return raw.decode("utf-8", errors="replace")

    def _text_tokenizer(self):
        if getattr(self, "_tok", None) is None:
            self._tok = self._text().FileTokenizer(self.tokenizer, self.tokenizer_dir)
        return self._tok

    def _text(self):
        """`bf16jax.serving.text` (tokenizer files, stop strings on the decoded text)."""
        try:
            from bf16jax.serving import text
        except ImportError:
            raise ValueError(f"This artifact has no {TEXT} (it predates it): re-export it, or "
                             "give prompts and stop sequences as token ids.") from None  # fmt: skip
        return text

    # ----------------------------------------------------------------- requests
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_tokens: int | Sequence[int] | None = None,
        temperature: float | Sequence[float] = 0.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        stop: Sequence[Sequence[str | Sequence[int]]] | None = None,
        seed: int | Sequence[int] = 0,
    ) -> list[dict[str, Any]]:
        """Generates for a batch of prompts (text or token ids) with the `generate` program.

        Scalar settings apply to every prompt; sequences give one value per prompt; max_tokens
        defaults to min(64, the cache length). `stop` holds per prompt stop strings, matched
        on the decoded text (the text is cut where the first to complete starts; its ids
        leave "tokens"), or token-id sequences, matched on ids. Returns per prompt {"tokens"
        (ids), "finish_reason" (FINISH_REASONS), "text"}.
        """
        n = len(prompts)
        if max_tokens is None:
            max_tokens = min(64, self.limits["cache_len"])
        stop = _per_row(stop, n, "stop") if stop else [[]] * n
        if any(isinstance(row, (str, bytes)) for row in stop):
            raise ValueError("stop gives each prompt a list of stops, e.g. stop=[['\\n']] for "
                             "one prompt.")  # fmt: skip
        texts = [[s for s in row if isinstance(s, str)] for row in stop]
        if any(s == "" for row in texts for s in row):
            raise ValueError("a stop string must not be empty.")
        rows = self.generate_arrays(
            [self.encode(p) for p in prompts],
            max_tokens=_per_row(max_tokens, n, "max_tokens"),
            temperature=_per_row(temperature, n, "temperature"),
            top_k=_per_row(top_k, n, "top_k"),
            top_p=_per_row(top_p, n, "top_p"),
            stop=[[self.encode(s) for s in row if not isinstance(s, str)] for row in stop],
            seed=_per_row(seed, n, "seed"),
        )
        complete = self._text().complete if any(texts) else None
        out = []
        for r, strings in zip(rows, texts, strict=True):
            if not strings:
                out.append({**r, "text": self.decode(r["tokens"])})
                continue
            # The program samples past a stop string; cut where the first one starts.
            c = complete(self.decode, r["tokens"], strings)
            reason = "stop" if c["stopped"] else r["finish_reason"]
            out.append({"tokens": r["tokens"][: c["kept"]], "finish_reason": reason,
                        "text": c["text"]})  # fmt: skip
        return out

    def generate_arrays(self, prompts, *, max_tokens, temperature, top_k, top_p, stop, seed):
        """`generate` on token ids: prompts [ids per row], settings and stop ids per row."""
        lim, n = self.limits, len(prompts)
        if n == 0:
            raise ValueError("generate needs at least one prompt.")
        width = lim["prompt_len"]
        buf = np.zeros((n, width), np.int32)  # PAD = 0
        lengths = np.zeros(n, np.int32)
        eos = self.tokenizer.get("eos_id", 1)
        for i, ids in enumerate(prompts):
            ids = np.asarray(ids, np.int32)
            if self.family == "t5":
                ids = np.append(ids, np.int32(eos))  # the encoder input ends with EOS
            elif ids.size == 0:
                raise ValueError("prompt is empty: a GPT continues text, give it some.")
            if ids.size > width:
                raise ValueError(f"prompt is {ids.size} tokens, the model takes at most {width}.")
            buf[i, : ids.size] = ids
            lengths[i] = ids.size
        stops = np.full((n, lim["max_stop_sequences"], lim["max_stop_length"]), _STOP_PAD, np.int32)
        for i, row in enumerate(stop):
            if len(row) > lim["max_stop_sequences"]:
                raise ValueError(f"stop has {len(row)} sequences, at most "
                                 f"{lim['max_stop_sequences']} are supported.")  # fmt: skip
            for j, ids in enumerate(row):
                if not 1 <= len(ids) <= lim["max_stop_length"]:
                    raise ValueError(f"a stop sequence must be 1..{lim['max_stop_length']} "
                                     f"tokens, got {len(ids)}.")  # fmt: skip
                stops[i, j, -len(ids) :] = ids
        settings = _settings(max_tokens, temperature, top_k, top_p, seed, lim["cache_len"])
        out = self.call("generate", buf, lengths, *settings, stops)
        tokens, length, reason = (np.asarray(out[k]) for k in ("tokens", "length", "finish_reason"))
        return [{"tokens": tokens[i, : length[i]].tolist(),
                 "finish_reason": FINISH_REASONS[int(reason[i])]} for i in range(n)]  # fmt: skip

    def score(self, texts: Sequence[str], targets: Sequence[str] | None = None) -> list[dict]:
        """Log-probabilities of texts (GPT: each token given the ones before; T5: `targets`
        given `texts`). Returns per row {"logprob", "tokens", "token_logprobs"}."""
        if self.family == "t5":
            if targets is None or len(targets) != len(texts):
                raise ValueError("T5 scoring needs one target per input text.")
            rows = self.score_ids([self.encode(t) for t in texts],
                                  [self.encode(t) for t in targets])  # fmt: skip
        else:
            rows = self.score_ids([self.encode(t) for t in texts])
        return [{"logprob": float(np.sum(r["token_logprobs"])), "tokens": len(r["token_logprobs"]),
                 "token_logprobs": r["token_logprobs"].astype(float).tolist()}
                for r in rows]  # fmt: skip

    def score_ids(self, inputs: Sequence, targets: Sequence | None = None) -> list[dict]:
        """Teacher-forced scoring of token ids. GPT: each `inputs` row's tokens after the first
        given those before; T5: `targets` (EOS appended) given `inputs` (EOS appended).
        Returns per row {"token_logprobs" [n] of the actual tokens, "predictions" [n]: the
        argmax at each scored position} as NumPy arrays."""
        lim = self.limits
        if self.family == "gpt":
            ids = [np.asarray(x, np.int32) for x in inputs]
            if any(len(x) < 2 for x in ids):
                raise ValueError("text must be at least 2 tokens (the first one is not scored).")
            batch = _pad(ids, lim["seq_len"], "text")
            logits = np.asarray(self.call("score", batch))[:, :-1]
            scored, lengths = batch[:, 1:], [len(x) - 1 for x in ids]
        elif self.family == "t5":
            eos = self.tokenizer["eos_id"]
            enc = _pad([np.append(x, eos) for x in inputs], lim["enc_len"], "input")
            tgt = [np.append(np.asarray(x, np.int32), eos) for x in targets]
            scored = _pad(tgt, lim["decode_len"], "target")
            shifted = np.zeros_like(scored)  # PAD start token, then the targets shifted right
            shifted[:, 1:] = scored[:, :-1]
            logits = np.asarray(self.call("score", enc, shifted))
            lengths = [len(x) for x in tgt]
        else:
            raise ValueError("score is for language models: use classify for an image model.")
        logp = logits - _logsumexp(logits)
        picked = np.take_along_axis(logp, scored[..., None].astype(np.int64), -1)[..., 0]
        best = logits.argmax(-1)
        return [{"token_logprobs": picked[i, :n], "predictions": best[i, :n]}
                for i, n in enumerate(lengths)]  # fmt: skip

    def classify(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Class probabilities of images [B, H, W, C] in [0, 1] (image models)."""
        if self.family != "vit":
            raise ValueError(f"classify is for image models; this artifact is a {self.family}.")
        images = np.asarray(images, np.float32)
        shape = tuple(self.limits["image_shape"])
        if images.ndim != 4 or images.shape[1:] != shape:
            raise ValueError(f"images must be [batch, {', '.join(map(str, shape))}], got "
                             f"{list(images.shape)}.")  # fmt: skip
        logits = np.asarray(self.call("score", images))
        probs = np.exp(logits - _logsumexp(logits))
        return [{"label": int(p.argmax()), "probs": p.astype(float).tolist()} for p in probs]


class Artifact(Runner):
    """A verified artifact: its manifest, params on the default device, and its programs.

    `call(name, *arrays)` runs a program with the params; the `Runner` methods take text.
    """

    def __init__(self, directory: str, *, manifest_sha256: str | None = None):
        self.directory = os.path.abspath(directory)
        self.manifest = verify(self.directory, manifest_sha256)
        from jax import export  # deferred: `import jax.export` costs ~0.1 s

        m = self.manifest
        platform = jax.default_backend()
        if platform not in m["platforms"]:
            raise ValueError(
                f"{directory} was exported for {m['platforms']}, this process runs on "
                f"{platform!r}: re-export with --platforms including it."
            )
        self.family: str = m["family"]
        self.limits: dict[str, Any] = m["limits"]
        self.tokenizer: dict[str, Any] = m.get("tokenizer") or {}
        self.tokenizer_dir = self.directory
        params = read_safetensors(os.path.join(self.directory, m["params"]["file"]))
        self.params = {k: jax.device_put(v) for k, v in params.items()}
        self._programs = {}
        for name, info in m["programs"].items():
            with open(os.path.join(self.directory, info["file"]), "rb") as f:
                exported = export.deserialize(bytearray(f.read()))
            self._programs[name] = jax.jit(exported.call, donate_argnums=donated_args(name))

    @property
    def programs(self) -> tuple[str, ...]:
        return tuple(self._programs)

    def _text(self):
        """The artifact's own `text.py` (hashed like every file, checked again before it runs),
        so that `loader.py` needs no bf16jax; bf16jax's for an artifact exported before it."""
        if getattr(self, "_text_module", None) is not None:
            return self._text_module
        entry = self.manifest["files"].get(TEXT)
        if entry is None:
            return super()._text()
        path = os.path.join(self.directory, TEXT)
        if not os.path.isfile(path) or sha256_file(path) != entry["sha256"]:
            raise IntegrityError(f"{path} is missing or changed since the artifact was loaded: "
                                 "re-export it.")  # fmt: skip
        import importlib.util

        spec = importlib.util.spec_from_file_location("_bf16jax_artifact_text", path)
        self._text_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self._text_module)
        return self._text_module

    def call(self, name: str, *args):
        """Runs program `name` on (params, *args); see the manifest for its arguments."""
        if name not in self._programs:
            raise ValueError(f"This {self.family} artifact has no {name!r} program: "
                             f"it has {sorted(self._programs)}.")  # fmt: skip
        return self._programs[name](self.params, *args)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _pad(rows: Sequence[np.ndarray], width: int, what: str) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, ids in enumerate(rows):
        if len(ids) > width:
            raise ValueError(f"{what} is {len(ids)} tokens, the model takes at most {width}.")
        out[i, : len(ids)] = ids
    return out


def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts.")
        return list(value)
    return [value] * n


def _settings(max_tokens, temperature, top_k, top_p, seed, cache_len: int) -> list[np.ndarray]:
    """The generate program's per-row setting arrays, validated."""
    for m in max_tokens:
        if not 1 <= int(m) <= cache_len:
            raise ValueError(f"max_tokens={m} must lie in [1, {cache_len}].")
    if any(not np.isfinite(t) or t < 0 for t in temperature):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}.")
    if any(int(k) < 0 for k in top_k):
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}.")
    if any(not 0 < p <= 1 for p in top_p):
        raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p}.")
    if any(not 0 <= int(s) < 2**32 for s in seed):
        raise ValueError(f"seed must lie in [0, 2**32), got {seed}.")
    return [
        np.asarray(seed, np.uint32),
        np.asarray(temperature, np.float32),
        np.asarray(top_k, np.int32),
        np.asarray(top_p, np.float32),
        np.asarray(max_tokens, np.int32),
    ]


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run a bf16jax artifact with JAX alone.")
    parser.add_argument("artifact", help="the artifact directory")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--max_tokens",
        type=int,
        default=None,
        help="new tokens per prompt at most (default: min(64, the context))",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    args = parser.parse_args()
    try:
        art = Artifact(args.artifact)
        print(json.dumps({"family": art.family, "precision": art.manifest["precision"],
                          "source": art.manifest["source"]}))  # fmt: skip
        if args.prompt:
            out = art.generate(args.prompt, max_tokens=args.max_tokens,
                               temperature=args.temperature,
                               stop=[args.stop] * len(args.prompt))  # fmt: skip
            for row in out:
                print(json.dumps(row))
    except (ValueError, OSError) as e:  # IntegrityError included: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _main()
