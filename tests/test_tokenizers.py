"""Pretrained tokenizers (bf16jax.data.tokenizer.load_tokenizer): tiny models built offline here,
and
the ids transformers' tokenizers gave for the golden directories' files (tests/golden)."""

import io
import json
import os

import numpy as np
import pytest

from bf16jax.data import datasets as data
from bf16jax.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
VERSES = [text for _, text in data.kjv_verses("train")[:2000]]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A 150-piece unigram SentencePiece model with T5's special ids, trained on KJV verses."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(VERSES),
        model_writer=buf,
        vocab_size=150,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm")
    (path / "spiece.model").write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A 300-token byte-level BPE tokenizer.json (GPT-2's kind) trained on KJV verses."""
    import tokenizers

    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(VERSES, vocab_size=300, special_tokens=["<|endoftext|>"])
    path = tmp_path_factory.mktemp("bpe")
    tok.save(str(path / "tokenizer.json"))
    return path


def test_sentencepiece_t5_conventions(spm_dir):
    tok = load_tokenizer(str(spm_dir))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 250)  # 150 pieces + 100 sentinels
    text = "And God said, Let there be light: and there was light."
    ids = tok.encode(text, add_eos=True)
    assert ids.dtype == np.int32 and ids[-1] == 1 and 0 not in ids
    assert len(ids) < len(text)  # pieces, not characters
    assert tok.decode(ids) == text
    assert tok.sentinel_id(0) == 249 and tok.sentinel_id(99) == 150
    assert tok.decode([*tok.encode("In"), tok.sentinel_id(0), *tok.encode("the")]) == (
        "In<extra_id_0>the"
    )


def test_bpe_gpt2_conventions(bpe_dir):
    tok = load_tokenizer(str(bpe_dir))
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == 300 and tok.eos_id == 0
    text = "Jesus wept. Ünïcödé too"
    ids = tok.encode(text)
    assert tok.eos_id not in ids  # GPT-2 adds nothing on encode
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    assert tok.encode(text, add_eos=True)[-1] == tok.eos_id


@pytest.mark.parametrize("family, eos", [("gpt2", False), ("t5_v1_1", True)])
def test_ids_match_transformers(family, eos):
    reference = json.loads(open(os.path.join(GOLDEN, family, "tokens.json")).read())
    tok = load_tokenizer(os.path.join(GOLDEN, family))
    for text, ids in reference.items():
        assert tok.encode(text, add_eos=eos).tolist() == ids, text


def test_bytes_stay_the_default():
    tok = load_tokenizer("")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 384
    assert tok.decode(tok.encode("Amen.")) == "Amen."


def test_missing_and_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no spiece.model .* or tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="spiece.model is not a SentencePiece model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(ValueError, match="t.json is not a tokenizers JSON file"):
        load_tokenizer(str(tmp_path / "t.json"))
    (tmp_path / "vocab.txt").write_text("a b")
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(FileNotFoundError, match="tokenizer=.*missing.txt does not exist"):
        load_tokenizer(str(tmp_path / "missing.txt"))


def test_kjv_continuation_examples(spm_dir):
    cfg = dict(
        name="kjv_continuation",
        tokenizer=str(spm_dir),
        prompt="continue: ",
        enc_len=40,
        dec_len=24,
        batch_size=4,
        eval_batch_size=4,
        seed=0,
    )
    batch = next(iter(data.make_dataset(cfg, "eval")))
    tok = load_tokenizer(str(spm_dir))
    pairs = data.kjv_verse_pairs("eval")
    verse, following = pairs[0]  # eval is in order
    first = {k: v[0] for k, v in batch.items()}
    assert tok.decode(first["encoder_inputs"]).startswith("continue: " + verse[:20])
    assert first["encoder_inputs"][first["encoder_inputs"] != 0][-1] == tok.eos_id  # kept
    n = int(first["weights"].sum())
    assert first["targets"][n - 1] == tok.eos_id and not first["targets"][n:].any()
    assert following.startswith(tok.decode(first["targets"][: n - 1])[:10])
    np.testing.assert_array_equal(first["decoder_inputs"][1:], first["targets"][:-1])
    assert first["decoder_inputs"][0] == 0
    spec = data.example_spec(cfg)
    assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == spec
    assert len(pairs) < len(data.kjv_verses("eval"))  # chapter ends have no next verse
