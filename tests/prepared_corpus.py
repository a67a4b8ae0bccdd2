"""Small generated corpora and a prepare runner, shared by tests/test_prepare*.py."""

import json
import random
from pathlib import Path

from bf16jax.data import prepare as prep

WORDS = "the of and to in a is that for it with as was on be by at this had not are but".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 60))]
        docs.append(f"doc {i}: " + " ".join(words) + rng.choice(["", " é", " 日本", "\n tail"]))
    return docs


def train_bpe(out_dir: Path, n_docs: int, vocab_size: int, seed: int = 1) -> Path:
    """A byte-level BPE (GPT-2's shape) trained offline on make_docs, saved as tokenizer.json."""
    import tokenizers

    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(
        make_docs(n_docs, seed=seed), vocab_size=vocab_size, special_tokens=["<|endoftext|>"]
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    return Path(out_dir)


def write_jsonl(path: Path, docs: list[str], extra_lines: dict[int, str] | None = None) -> None:
    lines = [json.dumps({"text": d}) for d in docs]
    for at, line in sorted((extra_lines or {}).items(), reverse=True):
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")


def run(inputs, out, **kw) -> dict:
    kw.setdefault("progress", False)
    return prep.prepare(prep.Options(inputs=[str(i) for i in inputs], out=str(out), **kw))
