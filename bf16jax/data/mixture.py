"""The grain pipeline of prepared datasets (`data.name="prepared"`): one directory or a mixture.

train: each source's examples -> shuffle(seed + source) -> per-example map (keyed by the
position in that source's stream) -> repeat forever (grain reshuffles each epoch) -> mixed by
`data.mixture`'s weights (grain's deterministic proportional selection) -> positions p, p+n, ...
of process p of n -> batch. The global stream does not depend on the process count and is
infinite, so no process runs out before the others and the file count need not divide by it.
eval: the sources' eval splits interleaved by weight, cut to a multiple of the process count;
`source_configs` gives each source alone, for a loss per source (the trainer's evaluate).
Resume is exact through the iterator's get_state / set_state (grain's, as for every dataset).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import numpy as np

from bf16jax.data import prepared as fmt
from bf16jax.data import readers

__all__ = [
    "dataset_sources",
    "make_prepared_dataset",
    "prepared_record",
    "prepared_size",
    "source_configs",
]

log = logging.getLogger(__name__)
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def dataset_sources(data_cfg) -> list[tuple[fmt.PreparedDataset, float]]:
    """The verified datasets of `data.mixture` (or `data.path` alone) with their weights; their
    tokenizers must agree."""
    mixture = str(data_cfg.get("mixture", "") or "")
    items = readers.parse_mixture(mixture) if mixture else ((str(data_cfg.get("path", "")), 1.0),)
    out = [(fmt.open_dataset(p), w) for p, w in items]
    first = out[0][0]
    for ds, _ in out[1:]:
        if ds.tokenizer["files"] != first.tokenizer["files"] or (
            ds.tokenizer["kind"] != first.tokenizer["kind"]
        ):
            raise ValueError(
                f"config.data.mixture: {ds.path} and {first.path} were prepared with different "
                "tokenizers: prepare every source with the same --tokenizer."
            )
    return out


def source_configs(data_cfg) -> list[tuple[str, Any]]:
    """(name, data config reading that source alone) per source of a mixture; [] otherwise.
    The name is the directory's base name (made unique with its position if repeated)."""
    mixture = str(data_cfg.get("mixture", "") or "")
    if data_cfg.get("name") != "prepared" or not mixture:
        return []
    items = readers.parse_mixture(mixture)
    if len(items) < 2:
        return []
    out = []
    names = [os.path.basename(p.rstrip("/")) for p, _ in items]
    for i, (path, _) in enumerate(items):
        cfg = data_cfg.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.mixture, cfg.path = "", path
        name = names[i] if names.count(names[i]) == 1 else f"{names[i]}_{i}"
        out.append((name, cfg))
    return out


def prepared_record(data_cfg) -> list[dict]:
    """What a run records about its prepared data: path, metadata hash, tokenizer, weight."""
    return [dict(ds.record(), weight=w) for ds, w in dataset_sources(data_cfg)]


def _examples(data_cfg, model: str, split: str, seed: int):
    out = []
    for i, (ds, w) in enumerate(dataset_sources(data_cfg)):
        ex = readers.build_examples(ds, model, split, data_cfg, (seed + i) % 2**32)
        if ex.skipped:
            log.warning(
                "%s: %d %s input/target pairs are longer than data.enc_len / dec_len and left "
                "out (data.max_dropped_fraction allows it).",
                ds.path,
                ex.skipped,
                split,
            )
        if ex.split:
            log.info(
                "%s: %d %s examples are longer than data.seq_len: split across %d windows.",
                ds.path,
                ex.split,
                split,
                ex.pieces,
            )
        out.append((ex, w))
    return out


def prepared_size(data_cfg, model: str, split: str) -> int:
    """Examples in one pass over `split` (all sources together)."""
    return sum(len(ex) for ex, _ in _examples(data_cfg, model, split, int(data_cfg.get("seed", 0))))


def make_prepared_dataset(
    data_cfg,
    model: str,
    split: str,
    *,
    process_index: int,
    process_count: int,
    seed: int,
    local_batch: int,
) -> grain.IterDataset:
    """This process's batched pipeline of prepared data (module docstring)."""
    if model not in ("gpt", "t5"):
        raise ValueError(
            f"data.name='prepared' feeds token models (gpt, t5), not model.name={model!r}."
        )
    sources = _examples(data_cfg, model, split, seed)
    train = split == "train"
    if train:
        parts = []
        for i, (ex, _) in enumerate(sources):
            if len(ex) == 0:
                raise ValueError(f"{ex.name} yields no example: lower data.seq_len / enc_len.")
            ds = grain.MapDataset.source(ex).shuffle(seed=(seed + i) % 2**32)
            parts.append(ds.map_with_index(ex.fn).repeat(None))
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [w for _, w in sources])
        ds = ds[process_index::process_count]
    else:
        parts = [grain.MapDataset.source(ex).map_with_index(ex.fn) for ex, _ in sources]
        # Several sources: interleaved by weight (until one runs out), so the first eval
        # batches estimate the mixture's loss; each source's own is `source_configs`'.
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [w for _, w in sources])
        usable = len(ds) // process_count * process_count
        if usable // process_count < local_batch:
            raise ValueError(
                f"The eval split of data.path has {len(ds)} examples, fewer than one batch of "
                f"{local_batch * process_count}: lower config.data.eval_batch_size or prepare "
                "with a larger --eval_fraction."
            )
        ds = ds[:usable][process_index::process_count]
        if data_cfg.get("eval_repeat", False):
            ds = ds.repeat(None)
    ds = ds.batch(local_batch, drop_remainder=True)
    it_ds = ds.to_iter_dataset(_READ_OPTIONS)
    num_workers = int(data_cfg.get("num_workers", 0))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def feature_spec(data_cfg, model: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return readers.feature_spec(model, data_cfg)
