"""`python -m bf16jax.prepare` (bf16jax.data.prepare / prepared / sources): small generated
corpora, tokenizers trained here offline."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from prepared_corpus import make_docs, run, train_bpe, write_jsonl

from bf16jax import prepare as prepare_cli
from bf16jax.data import prepare as prep
from bf16jax.data import prepared as fmt
from bf16jax.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three jsonl files (one gzipped) and a .txt file of paragraphs: 301 documents."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300)
    write_jsonl(root / "a.jsonl", docs[:100])
    write_jsonl(root / "b.jsonl", docs[100:200])
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[200:]))
    (root / "d.txt").write_text("a paragraph\nof two lines\n\n\n")
    return root, docs + ["a paragraph\nof two lines"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe"), 500, vocab_size=300)


def all_docs(path, tok, field="text") -> list[str]:
    ds = fmt.open_dataset(str(path))
    out = []
    for split in ("train", "eval"):
        for shard in ds.shards(split):
            offs, toks = shard.offsets[field], shard.tokens[field]
            for a, b in zip(offs[:-1], offs[1:], strict=True):
                ids = np.asarray(toks[a:b])
                assert ids[-1] == tok.eos_id  # every document ends with EOS
                out.append(tok.decode(ids))
    return out


def tree_bytes(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_every_document_round_trips(corpus, bpe_dir, tmp_path, tokenizer):
    root, docs = corpus
    spec = str(bpe_dir) if tokenizer == "bpe" else ""
    m = run([root], tmp_path / "out", tokenizer=spec, eval_fraction=0.2)
    tok = load_tokenizer(spec)
    assert sorted(all_docs(tmp_path / "out", tok)) == sorted(docs)
    assert m["splits"]["eval"]["documents"] > 20 and m["splits"]["train"]["documents"] > 200
    assert m["dtype"] == "uint16" and m["tokenizer"]["kind"] == tokenizer
    if spec:  # the dataset carries its tokenizer, hashed
        assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
        assert set(m["tokenizer"]["files"]) == {"tokenizer.json"}


def test_output_identical_for_any_worker_count(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    run([root], tmp_path / "w1", workers=1, eval_fraction=0.1, shard_tokens=3000)
    monkeypatch.setattr(prep, "_BLOCK_TOKENS", 100)  # and for any stage-2 block size
    run([root], tmp_path / "w2", workers=2, eval_fraction=0.1, shard_tokens=3000)
    one, two = tree_bytes(tmp_path / "w1"), tree_bytes(tmp_path / "w2")
    assert len([n for n in one if n.endswith(".bin")]) > 4  # several shards per split
    assert one == two


def test_eval_docs_count_and_no_overlap(corpus, tmp_path):
    root, docs = corpus
    m = run([root], tmp_path / "out", eval_docs=17)
    assert m["splits"]["eval"]["documents"] == 17
    assert m["splits"]["train"]["documents"] == len(docs) - 17
    ds = fmt.open_dataset(str(tmp_path / "out"))
    tok = load_tokenizer("")

    def split_docs(split):
        return {
            tok.decode(s.tokens["text"][a:b])
            for s in ds.shards(split)
            for a, b in zip(s.offsets["text"][:-1], s.offsets["text"][1:], strict=True)
        }

    assert not split_docs("train") & split_docs("eval")


def test_bad_records_counted_and_threshold_enforced(tmp_path, capsys):
    good = make_docs(50)
    bad = {3: "{not json", 10: json.dumps({"title": "no text"}), 20: json.dumps({"text": "  "})}
    write_jsonl(tmp_path / "x.jsonl", good, bad)
    with open(tmp_path / "x.jsonl", "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    m = run([tmp_path / "x.jsonl"], tmp_path / "ok", max_bad_fraction=0.1)
    assert m["rejects"]["total"] == 4 and m["splits"]["train"]["documents"] == 50
    reasons = m["rejects"]["by_reason"]
    assert reasons["not UTF-8"] == 1 and reasons["missing field 'text'"] == 1
    assert reasons["empty text"] == 1 and sum(v for k, v in reasons.items() if "JSON" in k) == 1
    assert m["rejects"]["first"][0] == f"{tmp_path / 'x.jsonl'}:4: invalid JSON (Expecting " + (
        "property name enclosed in double quotes)"
    )
    code = prepare_cli.main(
        [str(tmp_path / "x.jsonl"), f"--out={tmp_path / 'no'}", "--no_progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "4 of 54 records are bad" in err and "x.jsonl:4" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no" / "part-00000-of-00001.json").exists()


def wordlevel_dir(path: Path, vocab: int) -> Path:
    """A word-level tokenizer.json: <|endoftext|> = 0, word w{i} = i + 1 for i < vocab."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    words = {f"w{i}": i + 1 for i in range(vocab)}
    words["<|endoftext|>"] = 0
    tok = tokenizers.Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_uint16_or_uint32_from_the_ids_actually_seen(tmp_path):
    tok_dir = wordlevel_dir(tmp_path / "tok", 70_000)  # vocab > 2**16
    (tmp_path / "low.jsonl").write_text(json.dumps({"text": "w1 w65534 w7"}) + "\n")
    (tmp_path / "high.jsonl").write_text(json.dumps({"text": "w1 w65535 w7"}) + "\n")
    low = run([tmp_path / "low.jsonl"], tmp_path / "low", tokenizer=str(tok_dir))
    high = run([tmp_path / "high.jsonl"], tmp_path / "high", tokenizer=str(tok_dir))
    assert low["tokenizer"]["vocab_size"] == 70_001
    assert low["dtype"] == "uint16" and low["max_token_id"] == 65535  # fits: 16 bits
    assert high["dtype"] == "uint32" and high["max_token_id"] == 65536  # one more: 32 bits
    for name, top in (("low", 65535), ("high", 65536)):
        shard = fmt.open_dataset(str(tmp_path / name)).shards("train")[0]
        assert shard.tokens["text"].tolist() == [2, top, 8, 0]


@pytest.fixture
def small(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(40))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", eval_fraction=0.2)
    return tmp_path / "ds"


def flip_byte(path: Path, at: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("manifest", "does not match its sha256"),
        ("shard", "block 0 .* does not match its digest"),
        ("checksum_missing", ".sha256 is missing"),
        ("shard_missing", "is missing"),
        ("truncated", "bytes, its manifest says"),
    ],
)
def test_damage_is_refused(small, damage, message):
    fmt.open_dataset(str(small))  # fine before
    manifest = small / "part-00000-of-00001.json"
    shard = small / "train-00000-00000.text.bin"
    if damage == "manifest":
        flip_byte(manifest, 40)
    elif damage == "shard":
        flip_byte(shard)
    elif damage == "checksum_missing":
        (small / "part-00000-of-00001.json.sha256").unlink()
    elif damage == "shard_missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=message):
        # A shard's blocks are checked when first read; the rest when the dataset is opened.
        ds = fmt.open_dataset(str(small))
        ds.shards("train")[0].tokens["text"][:10]
    with pytest.raises(ValueError, match=message if damage != "shard" else "its sha256"):
        fmt.open_dataset(str(small), full=True)  # python -m bf16jax.prepare --verify=DIR


def test_unknown_version_and_missing_part_are_refused(small, tmp_path):
    manifest = small / "part-00000-of-00001.json"
    m = json.loads(manifest.read_bytes())
    m["version"] = 99
    fmt.write_manifest(str(small), m)
    with pytest.raises(ValueError, match="version 99; this bf16jax reads"):
        fmt.open_dataset(str(small))
    with pytest.raises(ValueError, match="holds no part"):
        fmt.open_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        fmt.open_dataset(str(tmp_path / "nowhere"))


def test_parts_prepared_apart_form_one_dataset(corpus, tmp_path):
    root, docs = corpus
    for i in range(2):
        run([root], tmp_path / "parts", num_parts=2, part_index=i, eval_fraction=0.1)
        if i == 0:
            with pytest.raises(ValueError, match=r"lacks part\(s\) \[1\] of 2"):
                fmt.open_dataset(str(tmp_path / "parts"))
    ds = fmt.open_dataset(str(tmp_path / "parts"))
    assert ds.documents("train") + ds.documents("eval") == len(docs)
    assert sorted(all_docs(tmp_path / "parts", load_tokenizer(""))) == sorted(docs)
    with pytest.raises(ValueError, match="other settings"):  # same --out, other settings
        run([root], tmp_path / "parts", num_parts=2, part_index=0, eval_fraction=0.3)


def test_interrupted_run_resumes_without_redoing_finished_inputs(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    calls = []
    real = prep._tokenize_input

    def flaky(task):
        calls.append(os.path.basename(task["path"]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prep, "_tokenize_input", flaky)
    with pytest.raises(KeyboardInterrupt):
        run([root], tmp_path / "out", eval_fraction=0.1)
    assert not (tmp_path / "out" / "part-00000-of-00001.json").exists()
    calls.clear()
    run([root], tmp_path / "out", eval_fraction=0.1)
    assert calls == ["c.jsonl.gz", "d.txt"]  # a.jsonl and b.jsonl were done
    monkeypatch.setattr(prep, "_tokenize_input", real)
    run([root], tmp_path / "straight", eval_fraction=0.1)
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "straight")
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".work")]


def test_zst_and_parquet_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = make_docs(30)
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs[:15]).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"body": docs[15:], "n": list(range(15))}), tmp_path / "b.parquet")
    m = run([tmp_path / "a.jsonl.zst"], tmp_path / "zst")
    assert m["splits"]["train"]["documents"] == 15
    m = run([tmp_path / "b.parquet"], tmp_path / "pq", text_field="body")
    assert sorted(all_docs(tmp_path / "pq", load_tokenizer(""))) == sorted(docs[15:])


def test_text2text_and_prompt_completion_fields(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run(
        [tmp_path / "qa.jsonl"],
        tmp_path / "t2t",
        kind="text2text",
        input_field="q",
        target_field="a",
    )
    ds = fmt.open_dataset(str(tmp_path / "t2t"))
    shard = ds.shards("train")[0]
    assert m["kind"] == "text2text" and set(shard.tokens) == {"input", "target"}
    tok = load_tokenizer("")
    assert (
        tok.decode(shard.tokens["target"][shard.offsets["target"][3] : shard.offsets["target"][4]])
        == "answer 3"
    )
    run(
        [tmp_path / "qa.jsonl"],
        tmp_path / "pc",
        kind="prompt_completion",
        prompt_field="q",
        completion_field="a",
    )
    shard = fmt.open_dataset(str(tmp_path / "pc")).shards("train")[0]
    prompt = shard.tokens["prompt"][shard.offsets["prompt"][0] : shard.offsets["prompt"][1]]
    assert prompt[-1] != tok.eos_id  # a prompt runs on into its completion


def test_bad_options_exit_2_before_writing(tmp_path, capsys):
    assert prepare_cli.main([str(tmp_path / "missing*.jsonl"), f"--out={tmp_path}/o"]) == 2
    assert "no input file matches" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "x.csv").write_text("a,b\n")
    assert prepare_cli.main([str(tmp_path / "x.csv"), f"--out={tmp_path}/o"]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_blocks_are_checked_where_read(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(12_000))
    run([tmp_path / "a.jsonl"], tmp_path / "ds")
    shard = tmp_path / "ds" / "train-00000-00000.text.bin"
    size = shard.stat().st_size
    assert size > 2 * fmt.BLOCK_BYTES  # three blocks or more
    flip_byte(shard, 2 * fmt.BLOCK_BYTES + 7)
    tokens = fmt.open_dataset(str(tmp_path / "ds")).shards("train")[0].tokens["text"]
    assert len(tokens[: fmt.BLOCK_BYTES // 2]) == fmt.BLOCK_BYTES // 2  # blocks 0-1: fine
    with pytest.raises(ValueError, match="block 2 "):
        tokens[fmt.BLOCK_BYTES : fmt.BLOCK_BYTES + 10]  # tokens in bytes 2 MiB+ (uint16)
