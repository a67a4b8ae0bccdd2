"""Distribution shifts for robustness evaluation: deterministic corruptions of eval batches.

A shift maps a host batch (dict of NumPy arrays, as `bf16jax.data.datasets` yields it) and a NumPy
Generator to a corrupted copy; the labels / targets are never touched. Shifts are registered per
dataset (`SHIFTS[config.data.name]`):

- digits (8x8 images in [0, 1]): `noise` (additive Gaussian, sigma 0.3, clipped to [0, 1]),
  `blur` (Gaussian, sigma 0.8 px) and `rotate` (+-25 degrees, the sign drawn per image, bilinear,
  zero fill) — the corruption families of ImageNet-C (Hendrycks & Dietterich 2019) at one
  severity each.
- kjv_bytes (byte-level LM): `chars5` / `chars15`, which replace 5% / 15% of the input bytes with
  random lowercase letters (typos); the next-byte targets stay clean, so the score is how well
  the model predicts the true text from a corrupted context.

Every random choice comes from the Generator; `bf16jax.evaluation.heldout` seeds it with
(seed, shift, batch index), so every policy in a study sees exactly the same corrupted inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bf16jax.data.tokenizer import BYTE_OFFSET

__all__ = ["SHIFTS", "Shift", "shifts_for", "gaussian_noise", "blur", "rotate", "corrupt_chars"]

Shift = Callable[[dict, np.random.Generator], dict]

_LETTERS = np.arange(ord("a"), ord("z") + 1) + BYTE_OFFSET


def _images(batch: dict) -> np.ndarray:
    if "image" not in batch:
        raise ValueError(f"An image shift needs an 'image' batch, got keys {sorted(batch)}.")
    return np.asarray(batch["image"], np.float32)


def gaussian_noise(batch: dict, rng: np.random.Generator, sigma: float = 0.3) -> dict:
    """Adds N(0, sigma^2) pixel noise and clips to [0, 1]."""
    x = _images(batch)
    noisy = np.clip(x + rng.normal(0.0, sigma, x.shape).astype(np.float32), 0.0, 1.0)
    return {**batch, "image": noisy}


def blur(batch: dict, rng: np.random.Generator, sigma: float = 0.8) -> dict:
    """Gaussian blur of every image over its two spatial axes (edge pixels repeated)."""
    del rng
    from scipy import ndimage  # scipy comes with scikit-learn (the digits dataset)

    x = _images(batch)
    out = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest")
    return {**batch, "image": out.astype(np.float32)}


def rotate(batch: dict, rng: np.random.Generator, degrees: float = 25.0) -> dict:
    """Rotates every image by +-`degrees` (random sign per image) about its centre."""
    from scipy import ndimage

    x = _images(batch)
    signs = rng.choice(np.array([-1.0, 1.0]), size=len(x))
    out = np.stack(
        [
            ndimage.rotate(img, s * degrees, axes=(0, 1), reshape=False, order=1, cval=0.0)
            for img, s in zip(x, signs, strict=True)
        ]
    )
    return {**batch, "image": np.clip(out, 0.0, 1.0).astype(np.float32)}


def corrupt_chars(batch: dict, rng: np.random.Generator, rate: float = 0.05) -> dict:
    """Replaces a `rate` fraction of the input bytes with random lowercase letters.

    Only byte tokens of `inputs` are replaced (never PAD/EOS, never the targets).
    """
    if "inputs" not in batch:
        raise ValueError(f"A text shift needs an LM batch with 'inputs', got keys {sorted(batch)}.")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate}: the fraction of corrupted bytes must be in [0, 1].")
    ids = np.asarray(batch["inputs"])
    is_byte = (ids >= BYTE_OFFSET) & (ids < BYTE_OFFSET + 256)
    hit = is_byte & (rng.random(ids.shape) < rate)
    out = np.where(hit, rng.choice(_LETTERS, size=ids.shape), ids).astype(ids.dtype)
    return {**batch, "inputs": out}


SHIFTS: dict[str, dict[str, Shift]] = {
    "digits": {"noise": gaussian_noise, "blur": blur, "rotate": rotate},
    "kjv_bytes": {
        "chars5": lambda b, r: corrupt_chars(b, r, 0.05),
        "chars15": lambda b, r: corrupt_chars(b, r, 0.15),
    },
}


def shifts_for(data_name: str) -> dict[str, Shift]:
    """The shifts registered for `config.data.name` (empty for datasets without any)."""
    return dict(SHIFTS.get(data_name, {}))
