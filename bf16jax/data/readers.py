"""Training examples from prepared datasets (`bf16jax.data.prepared`), as grain sources.

The task follows from the dataset's kind and the model (see /work/notes/data_contract.md):
  gpt + text              windows of seq_len + 1 tokens over the document stream (documents end
                          with EOS); with packing, segment_ids (1, 2, ... per document in the
                          row) and positions restarting at each document start, and weight 0 on
                          the target that crosses into the next document.
  gpt + prompt_completion one example per row (packing: several), loss on the completion only.
  t5 + text               span corruption with the tokenizer's own sentinels: windows over the
                          stream, or (packing) each document cut into chunks, each corrupted on
                          its own and packed several to a row as separate segments.
  t5 + text2text          input -> target pairs, one per row or packed.
Nothing is truncated: a document longer than a window spans windows; a prompt/completion
example longer than the row is split across windows (`continuation_pieces`: each continuation
carries at least half a row of preceding context, and every completion token is scored once);
a text2text pair longer than enc_len / dec_len is left out and counted (`Examples.skipped`),
refused above `data.max_dropped_fraction`. Every
random choice is a function of (seed, position in the global stream), so resume is exact.
Packed rows are planned greedily in document order from lengths alone (no tokens read); T5
span corruption's plan is kept on disk (`bf16jax.data.span_plan`).
"""

from __future__ import annotations

import bisect
import functools
from typing import Any

import numpy as np

from bf16jax.data import prepared as fmt
from bf16jax.data import span_plan
from bf16jax.data.span_corruption import corrupt, random_spans_helper
from bf16jax.data.tokenizer import load_tokenizer, sentinel_ids

__all__ = ["TokenStream", "Examples", "build_examples", "feature_spec", "check_tokenizer"]

_SPAN_SALT = 0x5B4A  # as datasets.py: span-corruption randomness apart from anything else


# ----------------------------------------------------------------------------- token streams
class TokenStream:
    """The concatenation of a split's shards (one field) as one read-only token array."""

    def __init__(self, shards: list[fmt.Shard], field: str):
        self.arrays = [s.tokens[field] for s in shards]
        # Plain views of the memory-mapped offsets: a memmap's slices cost a Python object each.
        self.offsets = [np.asarray(s.offsets[field]) for s in shards]
        sizes = [len(a) for a in self.arrays]
        self.bases = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._bases = self.bases.tolist()  # for bisect: per-row lookups without NumPy calls
        doc_counts = [len(o) - 1 for o in self.offsets]
        self.doc_bases = np.concatenate([[0], np.cumsum(doc_counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.bases[-1])

    @property
    def num_docs(self) -> int:
        return int(self.doc_bases[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """int32 tokens [start, stop) of the stream."""
        k = int(np.searchsorted(self.bases, start, "right")) - 1
        lo = start - int(self.bases[k])
        if stop <= self.bases[k + 1]:
            return np.asarray(self.arrays[k][lo : lo + stop - start], np.int32)
        parts, pos = [], start
        while pos < stop:
            k = int(np.searchsorted(self.bases, pos, "right")) - 1
            end = min(stop, int(self.bases[k + 1]))
            base = int(self.bases[k])
            parts.append(np.asarray(self.arrays[k][pos - base : end - base], np.int32))
            pos = end
        return np.concatenate(parts)

    def doc_starts(self, start: int, stop: int) -> np.ndarray:
        """Stream positions of the document starts in [start, stop), ascending."""
        k = bisect.bisect_right(self._bases, start) - 1
        if stop <= self._bases[k + 1]:  # within one shard (the common case): one search
            base, offs = self._bases[k], self.offsets[k]
            a, b = np.searchsorted(offs, (start - base, stop - base), "left").tolist()
            return offs[a:b] + base
        out = []
        while k < len(self.arrays) and self._bases[k] < stop:
            base, offs = self._bases[k], self.offsets[k][:-1]  # its end is the next one's start
            a, b = np.searchsorted(offs, (start - base, stop - base), "left").tolist()
            out.append(offs[a:b] + base)
            k += 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def doc_lengths(self) -> np.ndarray:
        """int64 [num_docs]: every document's length (in memory: 8 bytes per document)."""
        return np.concatenate([np.diff(np.asarray(o, np.int64)) for o in self.offsets])

    def doc(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.doc_bases, i, "right")) - 1
        offs, j = self.offsets[k], i - int(self.doc_bases[k])
        return np.asarray(self.arrays[k][int(offs[j]) : int(offs[j + 1])], np.int32)


# ----------------------------------------------------------------------------- row features
def _segment_features(seg: np.ndarray) -> np.ndarray:
    """positions [n]: 0 at each new segment value, counting up within it."""
    n = len(seg)
    idx = np.arange(n, dtype=np.int32)
    new = np.ones(n, bool)
    new[1:] = seg[1:] != seg[:-1]
    starts = np.maximum.accumulate(np.where(new, idx, 0))
    return (idx - starts).astype(np.int32)


def _window_features(w: np.ndarray, cuts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """GPT packed features of the window `w` [seq_len + 1] whose documents start at the window
    positions `cuts` (ascending, in [1, seq_len]): a handful of NumPy calls per row."""
    weights = np.ones(seq_len, np.float32)
    if not len(cuts):
        seg = np.ones(seq_len, np.int32)
        return {
            "inputs": w[:-1],
            "targets": w[1:],
            "weights": weights,
            "segment_ids": seg,
            "positions": np.arange(seq_len, dtype=np.int32),
        }
    weights[cuts - 1] = 0.0  # the target that is the next document's first token
    bounds = np.concatenate([[0], cuts, [seq_len]])  # segments of the seq_len inputs
    lens = np.diff(bounds)
    seg = np.repeat(np.arange(1, len(lens) + 1, dtype=np.int32), lens)
    starts = np.repeat(bounds[:-1].astype(np.int32), lens)
    return {
        "inputs": w[:-1],
        "targets": w[1:],
        "weights": weights,
        "segment_ids": seg,
        "positions": np.arange(seq_len, dtype=np.int32) - starts,
    }


def pack_plan(lengths: list[np.ndarray], limits: list[int]) -> np.ndarray:
    """Greedy rows in order: example i joins the current row while, for every j, the row's
    total of lengths[j] stays <= limits[j]. Returns the row bounds, int64 [rows + 1]: row r
    holds examples bounds[r] .. bounds[r + 1] - 1."""
    starts, n = span_plan.greedy_rows([np.asarray(x, np.int64) for x in lengths], limits, True)
    return np.asarray([*starts, n], np.int64)


def _one_per_row(n: int) -> np.ndarray:
    return np.arange(n + 1, dtype=np.int64)


def _pack_t5(pairs: list[tuple[np.ndarray, np.ndarray]], enc_len: int, dec_len: int, packing: bool):
    """T5 features of one row holding `pairs` of (encoder tokens, targets), each ending in EOS."""
    enc = np.zeros(enc_len, np.int32)
    tgt = np.zeros(dec_len, np.int32)
    dec = np.zeros(dec_len, np.int32)
    eseg = np.zeros(enc_len, np.int32)
    dseg = np.zeros(dec_len, np.int32)
    e = d = 0
    for k, (x, y) in enumerate(pairs, 1):
        enc[e : e + len(x)] = x
        eseg[e : e + len(x)] = k
        tgt[d : d + len(y)] = y
        dec[d + 1 : d + len(y)] = y[:-1]  # shifted right within the segment; start = PAD 0
        dseg[d : d + len(y)] = k
        e, d = e + len(x), d + len(y)
    out = {
        "encoder_inputs": enc,
        "decoder_inputs": dec,
        "targets": tgt,
        "weights": (dseg > 0).astype(np.float32),
    }
    if packing:
        out.update(
            encoder_segment_ids=eseg,
            decoder_segment_ids=dseg,
            encoder_positions=_segment_features(eseg) * (eseg > 0),
            decoder_positions=_segment_features(dseg) * (dseg > 0),
        )
    return out


def _pack_gpt(examples: list[tuple[np.ndarray, int]], seq_len: int, pad: int, packing: bool):
    """GPT features of one row of (tokens, first weighted target index) examples."""
    inputs = np.full(seq_len, pad, np.int32)
    targets = np.full(seq_len, pad, np.int32)
    weights = np.zeros(seq_len, np.float32)
    seg = np.zeros(seq_len, np.int32)
    t = 0
    for k, (x, first) in enumerate(examples, 1):
        n = len(x) - 1
        inputs[t : t + n], targets[t : t + n] = x[:-1], x[1:]
        weights[t + first : t + n] = 1.0
        seg[t : t + n] = k
        t += n
    out = {"inputs": inputs, "targets": targets, "weights": weights}
    if packing:
        out.update(segment_ids=seg, positions=_segment_features(seg) * (seg > 0))
    return out


# ----------------------------------------------------------------------------- sources
class Examples:
    """A random-access source of finished examples: `fn(index, item)` maps `self[i]` (the
    item) to the example; `index` is the position in the global stream (epoch included)."""

    def __init__(self, name: str, length: int, get, fn, skipped: int = 0):
        self.name, self._len, self._get, self.fn, self.skipped = name, length, get, fn, skipped
        self.split = self.pieces = 0  # examples split across rows, and the rows they take

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Any:
        return self._get(int(i))

    def __repr__(self) -> str:
        return f"Examples({self.name!r}, num={self._len})"


def _lengths(data_cfg) -> tuple[int, int, int]:
    return (
        int(data_cfg.get("seq_len", 0)),
        int(data_cfg.get("enc_len", 0)),
        int(data_cfg.get("dec_len", 0)),
    )


def _gpt_text(ds, split, data_cfg, packing) -> Examples:
    stream = TokenStream(ds.shards(split), "text")
    seq_len = int(data_cfg.seq_len)
    n = max(0, (len(stream) - 1) // seq_len)

    def get(i):
        start = i * seq_len
        w = stream.read(start, start + seq_len + 1)
        if not packing:
            return {"inputs": w[:-1], "targets": w[1:], "weights": np.ones(seq_len, np.float32)}
        # Segment k + 1 from the k-th document start inside the row (the row's first document
        # is segment 1 whether it starts here or continues from the row before).
        cuts = stream.doc_starts(start + 1, start + seq_len + 1) - start  # in [1, seq_len]
        return _window_features(w, cuts, seq_len)

    return Examples(f"{ds.path}/{split}", n, get, lambda index, x: x)


def continuation_pieces(plen: int, n: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(start, stop, first weighted input index) of the windows of one prompt/completion
    example of `n` tokens (prompt `plen`) longer than a row: the first window from the start,
    then windows that each carry the preceding `seq_len // 2` tokens (at least) as context
    (weight 0) and score the next up to `seq_len - seq_len // 2` completion tokens, until every
    completion token is a target exactly once."""
    first_target = max(plen, 1)  # x[i] is the target of input position i - 1
    out, nxt = [], first_target
    if first_target <= seq_len:
        stop = min(seq_len, n - 1) + 1
        out.append((0, stop, first_target - 1))
        nxt = stop
    step = seq_len - seq_len // 2
    while nxt <= n - 1:
        end = min(nxt + step - 1, n - 1)  # the last target of this window
        start = end - seq_len
        out.append((start, end + 1, nxt - start - 1))
        nxt = end + 1
    return out


def _gpt_prompt_completion(ds, split, data_cfg, packing, pad) -> Examples:
    prompts = TokenStream(ds.shards(split), "prompt")
    comps = TokenStream(ds.shards(split), "completion")
    seq_len = int(data_cfg.seq_len)
    plen = prompts.doc_lengths()
    total = plen + comps.doc_lengths()
    long = np.flatnonzero(total - 1 > seq_len)
    # Pieces: every example that fits is one; a longer one is split across windows
    # (`continuation_pieces`), so that no completion token is left out.
    doc = np.arange(len(total), dtype=np.int64)
    start = np.zeros(len(total), np.int64)
    stop = total.astype(np.int64)
    first = np.maximum(plen - 1, 0).astype(np.int64)
    if len(long):
        extra = [
            (d, *piece)
            for d in long.tolist()
            for piece in continuation_pieces(int(plen[d]), int(total[d]), seq_len)
        ]
        keep = np.ones(len(total), bool)
        keep[long] = False
        ed, es, et, ef = (np.asarray(col, np.int64) for col in zip(*extra, strict=True))
        order = np.argsort(np.concatenate([doc[keep], ed]), kind="stable")
        doc, start, stop, first = (
            np.concatenate([a[keep], b])[order]
            for a, b in ((doc, ed), (start, es), (stop, et), (first, ef))
        )
    need = stop - start - 1  # positions a piece takes
    rows = pack_plan([need], [seq_len]) if packing else _one_per_row(len(need))

    def get(r):
        items = []
        for k in range(int(rows[r]), int(rows[r + 1])):
            d = int(doc[k])
            x = np.concatenate([prompts.doc(d), comps.doc(d)])[int(start[k]) : int(stop[k])]
            items.append((x, int(first[k])))
        return _pack_gpt(items, seq_len, pad, packing)

    ex = Examples(f"{ds.path}/{split}", len(rows) - 1, get, lambda index, x: x)
    ex.split, ex.pieces = len(long), len(need) - len(total) + len(long)
    return ex


def _t5_text2text(ds, split, data_cfg, packing) -> Examples:
    inputs = TokenStream(ds.shards(split), "input")
    targets = TokenStream(ds.shards(split), "target")
    _, enc_len, dec_len = _lengths(data_cfg)
    il, tl = inputs.doc_lengths(), targets.doc_lengths()
    fits = np.flatnonzero((il <= enc_len) & (tl <= dec_len))
    if packing:
        rows = pack_plan([il[fits], tl[fits]], [enc_len, dec_len])
    else:
        rows = _one_per_row(len(fits))

    def get(r):
        docs = fits[rows[r] : rows[r + 1]].tolist()
        return _pack_t5([(inputs.doc(d), targets.doc(d)) for d in docs], enc_len, dec_len, packing)

    skipped = len(il) - len(fits)
    allowed = float(data_cfg.get("max_dropped_fraction", 0.0))
    if skipped > allowed * len(il):
        raise ValueError(
            f"prepared dataset {ds.path}: {skipped} of {len(il)} {split} input/target pairs "
            f"({skipped / len(il):.2%}) exceed data.enc_len={enc_len} (longest input "
            f"{int(il.max())}) or data.dec_len={dec_len} (longest target {int(tl.max())}); a "
            "T5 pair cannot be split without changing its task: raise enc_len / dec_len, or "
            "leave them out (counted in the log) with "
            f"--config.data.max_dropped_fraction={skipped / len(il):.3g}."
        )
    return Examples(f"{ds.path}/{split}", len(rows) - 1, get, lambda index, x: x, skipped)


def span_lengths(data_cfg) -> tuple[int, int, float, float]:
    """(raw tokens per chunk, targets length, noise density, mean span) of `data_cfg`."""
    density, mean_span = float(data_cfg.noise_density), float(data_cfg.mean_noise_span)
    tokens_length, targets_length = random_spans_helper(int(data_cfg.enc_len), density, mean_span)
    return tokens_length, targets_length, density, mean_span


def _t5_span(ds, split, data_cfg, packing, seed, sentinels, eos) -> Examples:
    stream = TokenStream(ds.shards(split), "text")
    _, enc_len, dec_len = _lengths(data_cfg)
    chunk, _, density, mean_span = span_lengths(data_cfg)
    kwargs = dict(
        noise_density=density, mean_noise_span_length=mean_span, sentinels=sentinels, eos_id=eos
    )
    if not packing:
        n = len(stream) // chunk

        def example(index, tokens):
            rng = np.random.default_rng([seed, _SPAN_SALT, int(index)])
            return _pack_t5([corrupt(tokens, rng, **kwargs)], enc_len, dec_len, False)

        return Examples(
            f"{ds.path}/{split}", n, lambda i: stream.read(i * chunk, (i + 1) * chunk), example
        )
    plan = span_plan.open_plan(ds, split, stream, chunk, enc_len, dec_len, density, mean_span)

    def example(index, row):
        rng = np.random.default_rng([seed, _SPAN_SALT, int(index)])
        spans = zip(*row, strict=True)  # (chunk starts, chunk lengths) of the row
        pairs = [corrupt(stream.read(a, a + n), rng, **kwargs) for a, n in spans]
        return _pack_t5(pairs, enc_len, dec_len, True)

    return Examples(f"{ds.path}/{split}", len(plan), plan.row, example)


# ----------------------------------------------------------------------------- public
def check_tokenizer(ds: fmt.PreparedDataset) -> Any:
    """The dataset's tokenizer, loaded from its copy and checked against the manifest (vocab
    size, EOS, pad, sentinel ids); ValueError naming the difference."""
    tok = load_tokenizer(ds.tokenizer_dir())
    meta = ds.tokenizer
    got = sentinel_ids(tok)
    want = meta["sentinels"]
    same = (
        int(tok.vocab_size) == meta["vocab_size"]
        and tok.eos_id == meta["eos_id"]
        and (list(got[:2]) + [len(got)] if len(got) else []) == want
    )
    if not same:
        raise ValueError(
            f"prepared dataset {ds.path}: its tokenizer copy (vocab {tok.vocab_size}, eos "
            f"{tok.eos_id}, sentinels {got[:2].tolist()}) differs from its manifest's (vocab "
            f"{meta['vocab_size']}, eos {meta['eos_id']}, sentinels {want}): prepare it again."
        )
    return tok


def build_examples(ds: fmt.PreparedDataset, model: str, split: str, data_cfg, seed: int):
    """The `Examples` of `split` of one prepared dataset for `model` ("gpt" or "t5")."""
    packing = bool(data_cfg.get("packing", False))
    tok = check_tokenizer(ds)
    if split not in ("train", "eval"):
        raise ValueError(f"Unknown split {split!r}: use train or eval.")
    if not ds.documents(split):
        raise ValueError(
            f"prepared dataset {ds.path} has no {split} document: prepare it with "
            + ("--eval_fraction or --eval_docs." if split == "eval" else "more input.")
        )
    pad = 0 if tok.pad_id is None else int(tok.pad_id)
    if (model, ds.kind) == ("gpt", "text"):
        return _gpt_text(ds, split, data_cfg, packing)
    if (model, ds.kind) == ("gpt", "prompt_completion"):
        return _gpt_prompt_completion(ds, split, data_cfg, packing, pad)
    if model == "t5" and pad != 0:
        raise ValueError(
            f"prepared dataset {ds.path}: its tokenizer pads with id {pad}; a T5 pads and masks "
            "with id 0: use a T5 (SentencePiece) tokenizer or bytes."
        )
    if (model, ds.kind) == ("t5", "text2text"):
        return _t5_text2text(ds, split, data_cfg, packing)
    if (model, ds.kind) == ("t5", "text"):
        sentinels = sentinel_ids(tok)
        if not len(sentinels):
            raise ValueError(
                f"prepared dataset {ds.path}: T5 span corruption needs sentinel tokens "
                "(<extra_id_i>), and its tokenizer has none: prepare with a T5 spiece.model or "
                "bytes."
            )
        return _t5_span(ds, split, data_cfg, packing, seed, sentinels, int(tok.eos_id))
    raise ValueError(
        f"prepared dataset {ds.path} holds kind {ds.kind!r}, which model.name={model!r} cannot "
        "train on: gpt takes text / prompt_completion, t5 takes text / text2text."
    )


def feature_spec(model: str, data_cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{feature: (shape, dtype)} of a prepared dataset's examples (the data contract)."""
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    packing = bool(data_cfg.get("packing", False))
    seq_len, enc_len, dec_len = _lengths(data_cfg)
    if model == "gpt":
        t = (seq_len,)
        spec = {"inputs": (t, i32), "targets": (t, i32), "weights": (t, f32)}
        if packing:
            spec.update(segment_ids=(t, i32), positions=(t, i32))
        return spec
    e, d = (enc_len,), (dec_len,)
    spec = {
        "encoder_inputs": (e, i32),
        "decoder_inputs": (d, i32),
        "targets": (d, i32),
        "weights": (d, f32),
    }
    if packing:
        spec.update(
            encoder_segment_ids=(e, i32),
            decoder_segment_ids=(d, i32),
            encoder_positions=(e, i32),
            decoder_positions=(d, i32),
        )
    return spec


@functools.lru_cache(maxsize=32)
def parse_mixture(text: str) -> tuple[tuple[str, float], ...]:
    """ "DIR=W,DIR=W" -> ((dir, normalised weight), ...)."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        path, sep, weight = item.rpartition("=")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not sep or not path or not w > 0:
            raise ValueError(
                f"config.data.mixture item {item!r} is not DIR=WEIGHT with WEIGHT > 0: write "
                "e.g. --config.data.mixture=data/web=3,data/code=1."
            )
        out.append((path, w))
    total = sum(w for _, w in out)
    return tuple((p, w / total) for p, w in out)
