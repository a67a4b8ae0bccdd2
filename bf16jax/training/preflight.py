"""Start-up checks of a run's data against its model and mesh, made before the first step.

Everything a run would otherwise discover late is checked here: the train, eval and drift
batches split evenly over the processes and the batch mesh axes (data * fsdp), the eval split
holds at least one eval batch (else the first evaluation, after all training, would fail), the
model's vocabulary covers every id the data can produce, with the bytes or a pretrained
`data.tokenizer` (else the loss is NaN and every step is skipped), and an image model matches
the images. Each failure is a ValueError naming the key and the fix.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from bf16jax.data import datasets as data_lib
from bf16jax.data import mixture
from bf16jax.data.prepared import sha256_file
from bf16jax.data.readers import check_tokenizer
from bf16jax.data.span_corruption import random_spans_helper, span_counts
from bf16jax.data.tokenizer import load_tokenizer, tokenizer_files
from bf16jax.parallel.sharding import BATCH_AXES

__all__ = ["check_data", "check_prepared", "vocab_needed"]


def vocab_needed(data_cfg) -> int | None:
    """The smallest model vocabulary that covers every token id the data yields (None: no
    token ids, i.e. images)."""
    name = data_cfg.name
    if name == "prepared":
        return None  # checked by check_prepared against the dataset's tokenizer
    tokenizer = data_cfg.get("tokenizer", "") or ""
    if tokenizer and name == "kjv_bytes":  # the encoded splits (cached: training reads them)
        return int(max(data_lib.kjv_tokens(s, tokenizer).max() for s in data_lib.SPLITS)) + 1
    if name == "kjv_continuation":
        arrays = [
            data_lib.continuation_examples(
                s,
                tokenizer,
                str(data_cfg.get("prompt", "")),
                int(data_cfg.enc_len),
                int(data_cfg.dec_len),
            )  # fmt: skip
            for s in data_lib.SPLITS
        ]
        return 1 + max(int(a[k].max()) for a in arrays for k in ("encoder_inputs", "targets"))
    if tokenizer:
        return None  # kjv_span refuses a tokenizer itself (data.datasets)
    if name == "kjv_bytes":
        return int(max(data_lib.kjv_tokens(s).max() for s in data_lib.SPLITS)) + 1
    if name == "kjv_span":
        density, mean_span = float(data_cfg.noise_density), float(data_cfg.mean_noise_span)
        tokens_length, _ = random_spans_helper(int(data_cfg.enc_len), density, mean_span)
        _, spans = span_counts(tokens_length, density, mean_span)
        # One sentinel per noise span, and the targets' one more (T5's layout).
        return data_lib.SENTINEL_OFFSET + spans + 1
    if name == "synthetic_tokens":
        return int(data_cfg.get("vocab_size", data_lib.VOCAB_SIZE))
    return None


def _tokenizer_hashes(spec: str) -> dict[str, str]:
    return {os.path.basename(p): sha256_file(p) for p in tokenizer_files(spec)}


def check_prepared(config: ml_collections.ConfigDict) -> None:
    """A prepared dataset (or mixture) against the model: readable and complete (manifests and
    shard hashes), its tokenizer the model's (`data.tokenizer`, else `init_from`'s), its
    vocabulary within the embedding, both splits non-empty, T5 sentinels as the tokenizer's."""
    d, m = config.data, config.model
    for ds, _ in mixture.dataset_sources(d):
        check_tokenizer(ds)  # the copy against the manifest (ids, EOS, sentinels)
        # The model's tokenizer, where the config names one: data.tokenizer, else init_from's
        # files (a from-scratch model takes the dataset's own tokenizer).
        spec = d.get("tokenizer", "") or None
        if spec == "init_from" or (spec is None and config.get("init_from")):
            spec = config.init_from
            if not tokenizer_files_or_none(spec):
                spec = None  # an init_from directory without tokenizer files: nothing to compare
        if spec is not None and _tokenizer_hashes(spec) != ds.tokenizer["files"]:
            raise ValueError(
                f"prepared dataset {ds.path} was tokenized with a {ds.tokenizer['kind']} "
                f"tokenizer that differs from the model's ({spec}): prepare it again with "
                f"--tokenizer={spec}."
            )
        if m.vocab_size < ds.tokenizer["vocab_size"] or m.vocab_size <= ds.max_token_id:
            raise ValueError(
                f"config.model.vocab_size={m.vocab_size} is smaller than the vocabulary of "
                f"{ds.path}'s tokenizer ({ds.tokenizer['vocab_size']}): set model.vocab_size >= "
                f"{ds.tokenizer['vocab_size']} or use the model's own tokenizer."
            )
        for split in data_lib.SPLITS:
            if not ds.documents(split):
                raise ValueError(
                    f"prepared dataset {ds.path} has an empty {split} split: prepare it with "
                    + (
                        "--eval_fraction=0.01 (or --eval_docs=N)."
                        if split == "eval"
                        else "more input."
                    )
                )
    # Builds every source's train examples: sentinels checked, empty example sets refused.
    data_lib.num_examples(d, "train", m.name)


def tokenizer_files_or_none(spec: str) -> list[str]:
    try:
        return tokenizer_files(spec)
    except FileNotFoundError:
        return []


def _check_batch(key: str, global_rows: int, mesh) -> None:
    shards = 1
    for axis in BATCH_AXES:
        shards *= mesh.shape[axis]
    if global_rows % shards:
        sizes = "*".join(str(mesh.shape[a]) for a in BATCH_AXES)
        raise ValueError(
            f"config.data.{key}={global_rows} is not divisible by {'*'.join(BATCH_AXES)} = "
            f"{sizes} = {shards} (the batch mesh axes): make it a multiple of {shards} or change "
            "config.mesh."
        )


def check_data(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises ValueError for data that the model or the mesh cannot take (module docstring)."""
    d, m = config.data, config.model
    _check_batch("batch_size", int(d.batch_size), mesh)
    _check_batch("eval_batch_size", int(d.eval_batch_size), mesh)
    # Builds (does not read) the eval pipeline: too few eval examples, or a batch that does not
    # split over the processes, fail here rather than at the first evaluation.
    if d.name == "prepared":
        check_prepared(config)
    data_lib.make_dataset(
        d,
        "eval",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        model=m.name,
    )
    needed = vocab_needed(d)
    if needed is not None and m.name in ("gpt", "t5") and m.vocab_size < needed:
        tokenizer = d.get("tokenizer", "") or ""
        source = f"data.tokenizer={tokenizer}" if tokenizer else f"data.name={d.name!r}"
        size = load_tokenizer(tokenizer).vocab_size
        raise ValueError(
            f"config.model.vocab_size={m.vocab_size} is too small for {source}, "
            f"whose token ids reach {needed - 1}: set model.vocab_size >= {needed} "
            f"(the tokenizer's is {size}), or start from the tokenizer's model with "
            "config.init_from."
        )
    if m.name == "vit" and d.name in ("digits", "synthetic_images"):
        shape = data_lib.example_spec(d)["image"][0]
        want = (m.image_size, m.image_size, m.channels)
        if tuple(shape) != want:
            raise ValueError(
                f"data.name={d.name!r} yields images of shape {tuple(shape)}, the model expects "
                f"{want}: set model.image_size={shape[0]} and model.channels={shape[2]}."
            )
        classes = 10 if d.name == "digits" else int(d.get("num_classes", 10))
        if m.num_classes < classes:
            raise ValueError(
                f"config.model.num_classes={m.num_classes} is below the {classes} classes of "
                f"data.name={d.name!r}: set model.num_classes >= {classes}."
            )
