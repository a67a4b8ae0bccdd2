"""T5 span corruption in NumPy: the pre-training objective of Raffel et al. (arXiv:1910.10683).

A chunk of `tokens_length` tokens gets round(L * noise_density) noise tokens in
round(noise / mean_noise_span_length) spans; noise and non-noise spans alternate, starting with
non-noise, and all such masks are equally likely (T5's `random_spans_noise_mask`, same counts and
the same random segmentation; NumPy's generator replaces TF's stateless shuffle). Each noise span
becomes one sentinel in the inputs; the targets list every sentinel followed by the span it hid.
Both end with EOS. `random_spans_helper` picks `tokens_length` so the inputs fill `enc_len`
without padding, as T5 does. Randomness comes only from the `rng` passed in.
"""

from __future__ import annotations

import numpy as np

from bf16jax.data.tokenizer import EOS_ID, NUM_SENTINELS, PAD_ID, SENTINEL_OFFSET

__all__ = [
    "span_counts",
    "random_spans_helper",
    "random_spans_noise_mask",
    "noise_span_to_unique_sentinel",
    "corrupt",
    "span_corrupt",
    "merge_spans",
]


def span_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """Returns (num_noise_tokens, num_noise_spans) for a chunk of `length` tokens (T5's rule)."""
    length = max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def random_spans_helper(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """Longest raw chunk whose corrupted inputs (+EOS) fit `inputs_length` (T5's helper).

    Args:
      inputs_length: encoder length to fill (EOS included).
      noise_density: fraction of tokens that become noise, in (0, 1).
      mean_noise_span_length: mean length of a noise span, >= 1.

    Returns:
      (tokens_length, targets_length): raw tokens per example and the targets length with EOS.
    """

    def lengths(tokens_length):
        num_noise, num_spans = span_counts(tokens_length, noise_density, mean_noise_span_length)
        # inputs: non-noise tokens + one sentinel per span + EOS; targets: the mirror image.
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # T5's hack: with density 0.5 make targets as long as inputs (a round number).
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
    """Splits `num_items` into `num_segments` non-empty segments, uniformly at random."""
    first_in_segment = np.zeros(num_items, np.int32)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)  # [num_segments]


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Bool mask [length]: True on noise tokens, in alternating non-noise/noise spans."""
    if noise_density == 0.0:
        return np.zeros(length, bool)
    padded_length = max(length, 2)  # avoid degeneracy, as T5 does
    num_noise, num_spans = span_counts(padded_length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(padded_length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(padded_length, np.int32)
    span_start_indicator[span_starts] = 1
    is_noise = np.cumsum(span_start_indicator) % 2 == 1
    return is_noise[:length]


def noise_span_to_unique_sentinel(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinels: np.ndarray | None = None
) -> np.ndarray:
    """Replaces each noise span by one sentinel (the k-th span by `sentinels[k]`, default the
    byte tokenizer's 258 + k) and drops the rest."""
    prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
    first_noise = noise_mask & ~prev_is_noise
    subsequent_noise = noise_mask & prev_is_noise
    available = NUM_SENTINELS if sentinels is None else len(sentinels)
    if first_noise.sum() > available:
        raise ValueError(
            f"{first_noise.sum()} noise spans need more than the {available} sentinels: "
            "lower enc_len or raise data.mean_noise_span."
        )
    span_index = np.cumsum(first_noise) - 1
    if sentinels is None:
        ids = SENTINEL_OFFSET + span_index
    else:
        ids = np.asarray(sentinels, np.int32)[np.maximum(span_index, 0)]
    out = np.where(first_noise, ids, tokens)
    return out[~subsequent_noise].astype(np.int32)


def corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    noise_density: float,
    mean_noise_span_length: float,
    sentinels: np.ndarray | None = None,
    eos_id: int = EOS_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one chunk, unpadded, both ending with `eos_id`; `sentinels[k]` is
    the id of `<extra_id_k>` (default: the byte tokenizer's)."""
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    eos = np.asarray([eos_id], np.int32)
    inputs = np.concatenate([noise_span_to_unique_sentinel(tokens, mask, sentinels), eos])
    targets = np.concatenate([noise_span_to_unique_sentinel(tokens, ~mask, sentinels), eos])
    return inputs, targets


def span_corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    noise_density: float,
    mean_noise_span_length: float,
    enc_len: int,
    dec_len: int,
    sentinels: np.ndarray | None = None,
    eos_id: int = EOS_ID,
) -> dict[str, np.ndarray]:
    """Turns one chunk of tokens into a padded T5 example.

    Args:
      tokens: int32 [L] raw tokens (no EOS).
      rng: the example's generator (seeded from (seed, example index) by the caller).
      noise_density: fraction of noise tokens.
      mean_noise_span_length: mean noise span length.
      enc_len: padded encoder length.
      dec_len: padded decoder length.
      sentinels: ids of `<extra_id_0>`, `<extra_id_1>`, ... (`tokenizer.sentinel_ids`);
        default the byte tokenizer's.
      eos_id: the tokenizer's EOS.

    Returns:
      dict with "encoder_inputs" int32 [enc_len], "decoder_inputs" int32 [dec_len] (targets
      shifted right, PAD=0 as the start token, as T5), "targets" int32 [dec_len] and "weights"
      float32 [dec_len] (1 on real target tokens including EOS, 0 on padding).
    """
    inputs, targets = corrupt(
        tokens,
        rng,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        sentinels=sentinels,
        eos_id=eos_id,
    )
    if len(inputs) > enc_len or len(targets) > dec_len:
        raise ValueError(
            f"Span corruption of {len(tokens)} tokens gives inputs of {len(inputs)} and targets "
            f"of {len(targets)} tokens, more than enc_len={enc_len} / dec_len={dec_len}: "
            "size chunks with random_spans_helper or raise the lengths."
        )
    encoder_inputs = np.full(enc_len, PAD_ID, np.int32)
    encoder_inputs[: len(inputs)] = inputs
    padded_targets = np.full(dec_len, PAD_ID, np.int32)
    padded_targets[: len(targets)] = targets
    decoder_inputs = np.full(dec_len, PAD_ID, np.int32)
    decoder_inputs[1:] = padded_targets[:-1]
    return {
        "encoder_inputs": encoder_inputs,
        "decoder_inputs": decoder_inputs,
        "targets": padded_targets,
        "weights": (padded_targets != PAD_ID).astype(np.float32),
    }


def merge_spans(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Inverse of span corruption: puts each target span back in place of its sentinel.

    Args:
      inputs: encoder inputs (sentinels, EOS and PAD allowed).
      targets: targets as produced by `span_corrupt`.

    Returns:
      int32 array of the original tokens (no EOS, no PAD).
    """
    spans: dict[int, list[int]] = {}
    current = None
    for t in np.asarray(targets).tolist():
        if t in (PAD_ID, EOS_ID):
            break
        if SENTINEL_OFFSET <= t < SENTINEL_OFFSET + NUM_SENTINELS:
            current = spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in np.asarray(inputs).tolist():
        if t in (PAD_ID, EOS_ID):
            break
        if t in spans:
            out.extend(spans[t])
        else:
            out.append(t)
    return np.asarray(out, np.int32)
