"""Shifted inputs (bf16jax.evaluation.shifts) and the held-out evaluation on them
(bf16jax.evaluation.heldout)."""

import numpy as np
import pytest
from tiny import tiny_gpt_config

from bf16jax import config as config_lib
from bf16jax.data import datasets as data
from bf16jax.data.tokenizer import BYTE_OFFSET, PAD_ID
from bf16jax.evaluation import heldout as evaluation
from bf16jax.evaluation import shifts
from bf16jax.training.trainer import create_trainer


def _digits(n=16):
    x, y = data.digits_split("eval")
    return {"image": np.array(x[:n]), "label": np.array(y[:n])}


def _rng(i=0):
    return np.random.default_rng([7, i])


def test_noise_is_deterministic_clipped_and_keeps_labels():
    batch = _digits()
    a = shifts.gaussian_noise(batch, _rng())
    b = shifts.gaussian_noise(batch, _rng())
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], batch["label"])
    assert a["image"].min() >= 0 and a["image"].max() <= 1 and a["image"].dtype == np.float32
    assert np.abs(a["image"] - batch["image"]).mean() > 0.1
    assert not np.array_equal(a["image"], shifts.gaussian_noise(batch, _rng(1))["image"])


def test_blur_smooths_and_rotation_by_90_degrees_is_exact():
    batch = _digits()
    blurred = shifts.blur(batch, _rng())["image"]

    def tv(x):  # total variation: blurring lowers it
        return np.abs(np.diff(x, axis=1)).sum() + np.abs(np.diff(x, axis=2)).sum()

    assert tv(blurred) < 0.6 * tv(batch["image"])
    rotated = shifts.rotate(batch, _rng(), degrees=90.0)["image"]
    for img, out in zip(batch["image"], rotated, strict=True):
        assert any(np.allclose(out, np.rot90(img, k, axes=(0, 1)), atol=1e-5) for k in (1, 3))
    assert not np.allclose(shifts.rotate(batch, _rng())["image"], batch["image"])


def test_char_corruption_touches_only_input_bytes():
    rng = np.random.default_rng(0)
    inputs = rng.integers(BYTE_OFFSET, BYTE_OFFSET + 256, (8, 200)).astype(np.int32)
    inputs[:, -10:] = PAD_ID
    batch = {"inputs": inputs, "targets": inputs + 1}
    none = shifts.corrupt_chars(batch, _rng(), rate=0.0)
    np.testing.assert_array_equal(none["inputs"], inputs)
    every = shifts.corrupt_chars(batch, _rng(), rate=1.0)["inputs"]
    letters = (every[:, :-10] >= BYTE_OFFSET + ord("a")) & (
        every[:, :-10] <= BYTE_OFFSET + ord("z")
    )
    assert letters.all() and (every[:, -10:] == PAD_ID).all()
    some = shifts.corrupt_chars(batch, _rng(), rate=0.15)
    changed = (some["inputs"] != inputs).mean()
    assert 0.10 < changed < 0.16  # 15% hit, a few replaced by the same letter
    np.testing.assert_array_equal(some["targets"], inputs + 1)
    with pytest.raises(ValueError, match="rate"):
        shifts.corrupt_chars(batch, _rng(), rate=1.5)
    with pytest.raises(ValueError, match="'image'"):
        shifts.gaussian_noise(batch, _rng())


def test_gpt_quality_matches_trainer_evaluate_and_shifts_change_it():
    config = tiny_gpt_config("bf16")
    trainer = create_trainer(config)
    state = trainer.init_state()
    summary, preds = evaluation.evaluate_quality(trainer, state.params, num_batches=2)
    assert set(summary) == {"clean", "chars5", "chars15"}
    reference = trainer.evaluate(state.params, num_batches=2)
    assert summary["clean"]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert summary["clean"]["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6)
    assert summary["clean"]["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    n = 2 * config.data.eval_batch_size * config.data.seq_len
    assert preds["clean"]["prediction"].shape == (n,)
    assert 0 <= summary["clean"]["ece"] <= 1
    assert summary["chars15"]["loss"] != summary["clean"]["loss"]
    again, _ = evaluation.evaluate_quality(trainer, state.params, num_batches=2)
    assert again == summary  # the shifted inputs are a function of (seed, shift, batch)
    agree = evaluation.agreement_with(preds, preds)
    assert agree == {"clean": 1.0, "chars5": 1.0, "chars15": 1.0}
    with pytest.raises(ValueError, match="Unknown shift 'blur'.*chars15"):
        evaluation.collect_predictions(trainer, state.params, shift="blur")


def test_vit_quality_on_shifted_digits():
    c = config_lib.base_config("vit")
    c.precision = "fp32"
    c.model.update(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.data.update(batch_size=16, eval_batch_size=40)
    c.train.update(eval_steps=1, diagnostics=False)
    trainer = create_trainer(c)
    state = trainer.init_state()
    summary, preds = evaluation.evaluate_quality(trainer, state.params)
    assert set(summary) == {"clean", "noise", "blur", "rotate"}
    assert all(p["prediction"].shape == (40,) for p in preds.values())
    assert len({round(s["loss"], 6) for s in summary.values()}) == 4
    # A classifier has no perplexity: only language models report one.
    assert "perplexity" not in summary["clean"]
    assert set(trainer.evaluate(state.params)) == {"loss", "accuracy"}
