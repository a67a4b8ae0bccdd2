"""Prepared datasets at a URL (data.path=gs://...): read through fsspec with ranged reads, here
on fsspec's in-memory file system (no network); the same batches as the local copy, damage
refused, and a protocol whose package is missing named in one line."""

import importlib.util

import fsspec
import numpy as np
import pytest
from prepared_corpus import make_docs, run, train_bpe, write_jsonl

from bf16jax.config import base_config
from bf16jax.data import datasets as data_lib
from bf16jax.data import prepared as fmt


@pytest.fixture
def memory_copy(tmp_path):
    train_bpe(tmp_path / "bpe", 200, vocab_size=280)
    write_jsonl(tmp_path / "a.jsonl", make_docs(120))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", tokenizer=str(tmp_path / "bpe"), eval_docs=20)
    fs = fsspec.filesystem("memory")
    url = f"memory://bf16jax-test-{tmp_path.name}/ds"
    fs.put(str(tmp_path / "ds"), url, recursive=True)
    yield tmp_path / "ds", url
    fs.rm(url, recursive=True)


def _batches(path, n=3):
    c = base_config("gpt")
    c.data.update(name="prepared", path=str(path), seq_len=32, batch_size=4, eval_batch_size=4)
    c.data.packing = True
    it = iter(data_lib.make_dataset(c.data, "train", model="gpt"))
    return [next(it) for _ in range(n)]


def test_a_url_dataset_reads_as_the_local_one(memory_copy):
    local, url = memory_copy
    ds = fmt.open_dataset(url, full=True)
    assert ds.meta_sha256 == fmt.open_dataset(str(local)).meta_sha256
    token_file = ds.shards("train")[0].tokens["text"]
    assert isinstance(token_file, fmt.FileArray)  # ranged reads, not the whole shard
    for a, b in zip(_batches(local), _batches(url), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    fs, root = fmt.remote_fs(url)
    name = next(n for n in fs.ls(root, detail=False) if n.endswith(".bin"))
    data = bytearray(fs.cat_file(name))
    data[5] ^= 0xFF
    fs.pipe_file(name, bytes(data))
    with pytest.raises(ValueError, match="does not match its sha256"):
        fmt.open_dataset(url, full=True)
    with pytest.raises(ValueError, match="does not exist"):
        fmt.open_dataset(url + "-missing")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs_names_the_fix():
    with pytest.raises(ValueError, match=r"reading gs:// needs gcsfs .*pip install gcsfs"):
        fmt.open_dataset("gs://some-bucket/ds")
