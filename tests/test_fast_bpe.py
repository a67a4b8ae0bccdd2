"""tiktoken as prepare's BPE encoder (bf16jax.data.fast_bpe): the same shard bytes as the
`tokenizers` package, and a fallback with one logged line where the two could differ."""

import logging
from pathlib import Path

import pytest
from prepared_corpus import make_docs, run, write_jsonl

from bf16jax import prepare as prepare_cli
from bf16jax.data import fast_bpe

pytest.importorskip("tiktoken")

# Corners of GPT-2's pre-tokenizer regex and of added-token matching, as documents.
TRICKY = [
    "It's 2024: we'll see; they've, I'm, you'd, 're 'll 'S",
    "  spaces  \n\n\ttabs\tand\r\nCRLF \u00a0nbsp\u2003em   ",
    "3.14159 1,000,000 \u0661\u0662 \u2167 \u00bd caf\u00e9 \u65e5\u672c\u8a9e",
    "emoji \U0001f600\U0001f44d\U0001f3fd",
    "text <|endoftext|> inside<|endoftext|><|endoftext|> and <|endof",
    '!!! ??? ... --- ((( ))) [[x]] {y} "q" `c` #t @u e\u0301 \u200d',
]


def train_bpe(path: Path, vocab_size: int = 600, **kw) -> Path:
    import tokenizers

    tok = tokenizers.ByteLevelBPETokenizer(**kw)
    tok.train_from_iterator(
        make_docs(500, seed=1) + TRICKY, vocab_size=vocab_size, special_tokens=["<|endoftext|>"]
    )
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(path.iterdir())
        if p.suffix in {".bin", ".idx", ".blk"}
    }


def test_tiktoken_and_tokenizers_write_the_same_shards(tmp_path):
    bpe = train_bpe(tmp_path / "bpe")
    docs = make_docs(300) + TRICKY * 3
    write_jsonl(tmp_path / "a.jsonl", docs[::2])
    write_jsonl(tmp_path / "b.jsonl", docs[1::2])
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    fast = run(inputs, tmp_path / "fast", tokenizer=str(bpe), eval_fraction=0.2, workers=2)
    slow = run(inputs, tmp_path / "slow", tokenizer=str(bpe), eval_fraction=0.2,
               bpe_encoder="tokenizers")  # fmt: skip
    assert fast["tokenizer"]["encoder"]["name"] == "tiktoken"
    assert slow["tokenizer"]["encoder"]["name"] == "tokenizers"
    got, want = shard_bytes(tmp_path / "fast"), shard_bytes(tmp_path / "slow")
    assert len(want) == 6 and got == want  # train + eval: .bin, .idx, .blk of 1 shard each
    assert fast["splits"] == slow["splits"] and fast["max_token_id"] == slow["max_token_id"]


def write_tokenizer(path: Path, merges, normalizer=None) -> Path:
    """A byte-level BPE tokenizer.json by hand: <|endoftext|> = 0, bytes 1..256, then the
    results of `merges` in order."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    chars = sorted(fast_bpe._byte_of_char(), key=fast_bpe._byte_of_char().get)
    vocab = {"<|endoftext|>": 0} | {c: i + 1 for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab, list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    if normalizer is not None:
        tok.normalizer = normalizer
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_falls_back_with_one_line_where_the_two_differ(tmp_path, caplog, capsys):
    # tokenizers merges "b c" first and has no "a bc" merge: "abc" -> [a, bc]; tiktoken
    # takes the whole piece "abc", a token: the structure is GPT-2's, the ids are not equal.
    odd = write_tokenizer(tmp_path / "odd", [("b", "c"), ("a", "b"), ("ab", "c")])
    fast_bpe.from_tokenizer_json(str(odd / "tokenizer.json"))  # passes the structure checks
    write_jsonl(tmp_path / "x.jsonl", ["abc abc", "cab"])
    with caplog.at_level(logging.WARNING):
        m = run([tmp_path / "x.jsonl"], tmp_path / "out", tokenizer=str(odd))
    enc = m["tokenizer"]["encoder"]
    assert enc["name"] == "tokenizers" and "disagree" in enc["note"]
    lines = [r.getMessage() for r in caplog.records if r.name == fast_bpe.__name__]
    assert len(lines) == 1 and "not tiktoken" in lines[0] and "ids differ" in lines[0]
    # A file tiktoken cannot reproduce by construction: refused before any comparison.
    from tokenizers import normalizers

    low = write_tokenizer(tmp_path / "low", [("a", "b")], normalizers.Lowercase())
    m = run([tmp_path / "x.jsonl"], tmp_path / "out2", tokenizer=str(low))
    assert "normalizer" in m["tokenizer"]["encoder"]["note"]
    args = [str(tmp_path / "x.jsonl"), f"--out={tmp_path / 'no'}", f"--tokenizer={odd}"]
    code = prepare_cli.main([*args, "--bpe_encoder=tiktoken", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--bpe_encoder=tiktoken" in err and not (tmp_path / "no").exists()
