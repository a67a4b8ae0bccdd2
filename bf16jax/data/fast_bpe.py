"""A faster exact encoder for byte-level BPE `tokenizer.json` files: a `tiktoken.Encoding`.

`from_tokenizer_json(path)` builds the Encoding offline from the file's own vocabulary (no
download) when its structure is GPT-2's, where the two libraries run the same algorithm: no
normalizer; the ByteLevel pre-tokenizer (GPT-2's regex, no prefix space); a BPE model without
dropout, byte fallback, subword prefix or word suffix; every byte a token; each merge's result a
token whose id grows with the merge's rank (tiktoken merges by the rank of the result, the
`tokenizers` package by the rank of the pair); added tokens matched as written. Any other file
raises `NotEquivalent` naming the difference. One difference no such check rules out: tiktoken
merges any two adjacent parts whose concatenation is a token, `tokenizers` only listed pairs
(they agree on vocabularies that BPE training made, not on every hand-made one), so
`choose_encoder` also compares the two on probes and corpus texts (`mismatch`) and uses tiktoken
only when they agree.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

__all__ = [
    "CHECK_RECORDS",
    "ENCODERS",
    "GPT2_PATTERN",
    "PROBES",
    "NotEquivalent",
    "choose_encoder",
    "encode",
    "from_tokenizer_json",
    "mismatch",
]

# The `tokenizers` ByteLevel pre-tokenizer's regex (GPT-2's), as that library writes it.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Texts that exercise the pre-tokenizer's corners, checked along with the corpus sample.
PROBES = (
    "Hello world! It's 2024: we'll see; they've, I'm, you'd, she's, 're 'll",
    "  leading and trailing spaces  \n\n\tTabs\tand\r\nCRLF  \u00a0nbsp\u2003em",
    "digits 3.14159 1,000,000 \u0661\u0662\u0663 \u2167 \u00bd",
    "Unicode: caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u0639\u0631\u0628\u064a "
    "\U0001f600\U0001f44d\U0001f3fd e\u0301 \u200d\u200b",
    "special <|endoftext|> inside <|endoftext|><|endoftext|>text and <|endof",
    'punctuation!!! ??? ... --- ((( ))) [[x]] {y} "quoted" `code` #tag @user',
)


log = logging.getLogger(__name__)
# How `python -m bf16jax.prepare` applies a BPE tokenizer.json (--bpe_encoder): tiktoken where
# it is proven the same and agrees on a sample ("auto"), or always the `tokenizers` package.
ENCODERS = ("auto", "tiktoken", "tokenizers")
CHECK_RECORDS = 256  # corpus records compared at start-up


class NotEquivalent(ValueError):
    """The tokenizer.json is one tiktoken cannot reproduce exactly."""


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character standing for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _check(spec: dict[str, Any]) -> None:
    if spec.get("normalizer") is not None:
        raise NotEquivalent(f"it has a normalizer ({spec['normalizer'].get('type')})")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        raise NotEquivalent(f"its pre-tokenizer is {pre.get('type')!r}, not ByteLevel")
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise NotEquivalent("its ByteLevel pre-tokenizer adds a prefix space or skips the regex")
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":  # ByteLevel post: offsets only
        raise NotEquivalent(f"its post-processor is {post.get('type')!r}")
    dec = spec.get("decoder")
    if dec is not None and dec.get("type") != "ByteLevel":
        raise NotEquivalent(f"its decoder is {dec.get('type')!r}, not ByteLevel")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotEquivalent(f"its model is {model.get('type')!r}, not BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise NotEquivalent(f"its BPE model sets {key}={model[key]!r}")
    for tok in spec.get("added_tokens") or []:
        if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            raise NotEquivalent(f"added token {tok['content']!r} strips or matches whole words")


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    out = []
    for m in merges:  # "a b" (tokenizers < 0.20) or ["a", "b"]
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2:
            raise NotEquivalent(f"merge {m!r} is not a pair")
        out.append((pair[0], pair[1]))
    return out


def _ranks(spec: dict[str, Any]) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable ranks = ids of the byte strings, added tokens = ids)."""
    byte_of = _byte_of_char()
    added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens") or []}
    names = sorted(added)
    for a, b in zip(names, names[1:], strict=False):
        if b.startswith(a):  # tiktoken's alternation is leftmost-first, tokenizers' longest
            raise NotEquivalent(f"added token {a!r} is a prefix of {b!r}")
    vocab: dict[str, int] = spec["model"]["vocab"]
    ranks: dict[bytes, int] = {}
    for text, i in vocab.items():
        if text in added:
            if added[text] != i:
                raise NotEquivalent(f"added token {text!r} has two ids")
            continue
        try:
            ranks[bytes(byte_of[c] for c in text)] = int(i)
        except KeyError:
            raise NotEquivalent(f"token {text!r} is not in the byte-level alphabet") from None
    if len(ranks) != len(vocab) - len(set(vocab) & set(added)):
        raise NotEquivalent("two tokens stand for the same bytes")
    if len(set(ranks.values()) | set(added.values())) != len(ranks) + len(added):
        raise NotEquivalent("two tokens share an id")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise NotEquivalent("not every byte is a token")
    last, made = -1, set()
    for a, b in _merge_pairs(spec["model"].get("merges") or []):
        result = a + b
        if a not in vocab or b not in vocab or result not in vocab:
            raise NotEquivalent(f"merge {a!r} + {b!r} names a token not in the vocabulary")
        if vocab[result] <= last:
            raise NotEquivalent(f"merge {a!r} + {b!r} gives id {vocab[result]} <= an earlier one")
        last = vocab[result]
        made.add(result)
    unmade = [t for t in vocab if t not in added and len(t) > 1 and t not in made]
    if unmade:
        raise NotEquivalent(f"token {unmade[0]!r} is made by no merge")
    return ranks, added


def from_tokenizer_json(path: str):
    """A `tiktoken.Encoding` that encodes as the `tokenizers` package does with `path`.

    Raises:
      NotEquivalent: the file's structure differs from GPT-2's (the reason in the message).
      ImportError: tiktoken is not installed.
    """
    import tiktoken

    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    _check(spec)
    ranks, added = _ranks(spec)
    return tiktoken.Encoding(
        name=f"bf16jax:{path}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=added,
    )


def encode(enc, texts: list[str], threads: int = 1) -> list[list[int]]:
    """Ids of `texts` (added tokens in the text are matched, as `tokenizers` does)."""
    if threads > 1:
        return enc.encode_batch(texts, num_threads=threads, allowed_special="all")
    return [enc.encode(t, allowed_special="all") for t in texts]


def mismatch(enc, hf_tokenizer, texts: list[str]) -> str | None:
    """The first text (with PROBES) whose ids differ between `enc` and the `tokenizers`
    Tokenizer `hf_tokenizer`, described in one line; None when every one agrees. Encodes one
    text at a time: no thread pool is started in the calling process."""
    for text in (*PROBES, *texts):
        want = hf_tokenizer.encode(text, add_special_tokens=False).ids
        got = encode(enc, [text])[0]
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), 0)
            return (
                f"ids differ at token {at} of a {len(text)}-character text "
                f"(tiktoken {got[at : at + 3]}, tokenizers {want[at : at + 3]})"
            )
    return None


def choose_encoder(tok, mode: str, sample: Callable[[int], list[str]]) -> dict:
    """How to encode with the `BPETokenizer` `tok`: {"name": "tiktoken" | "tokenizers",
    "version", "note"}.

    tiktoken when `from_tokenizer_json` accepts the file and both libraries give the same ids
    on the PROBES and on `sample(CHECK_RECORDS)` (the corpus's first records); else the
    `tokenizers` package, with one logged line saying why (mode "tiktoken": ValueError).
    """
    import tokenizers

    hf = {"name": "tokenizers", "version": tokenizers.__version__}
    if mode == "tokenizers":
        return hf | {"note": "--bpe_encoder=tokenizers"}
    enc, reason, texts = None, None, []
    try:
        enc = from_tokenizer_json(tok.path)
    except ImportError:
        reason = "tiktoken is not installed (pip install tiktoken)"
    except NotEquivalent as e:
        reason = f"{tok.path} is not shaped as GPT-2's: {e}"
    if enc is not None:
        texts = sample(CHECK_RECORDS)
        bad = mismatch(enc, tok._tok, texts)
        if bad:
            reason = f"tiktoken and tokenizers disagree on {tok.path}: {bad}"
    if reason is None:
        import tiktoken

        note = f"ids equal to tokenizers {tokenizers.__version__}'s on {len(PROBES)} probes"
        return {
            "name": "tiktoken",
            "version": tiktoken.__version__,
            "note": f"{note} and {len(texts)} corpus texts",
        }
    if mode == "tiktoken":
        raise ValueError(f"--bpe_encoder=tiktoken: {reason}; pass --bpe_encoder=auto.")
    log.warning("prepare: encoding with the tokenizers package, not tiktoken: %s.", reason)
    return hf | {"note": reason}
