"""Data: tokenizers, prepared datasets, grain pipelines, packing, and T5 span corruption.

Owns everything between text on disk and integer batches: the byte tokenizer (with T5-style
sentinels) and pretrained models' tokenizer files, `prepare` (raw text -> verified token shards:
sources, prepare, prepared; fast_bpe, tiktoken for GPT-2-shaped BPE), the readers of prepared
data (windows, packing, span corruption and its on-disk plan, fine-tuning pairs; readers,
span_plan, mixture), the record of which data a run or tool reads (provenance), the bundled
demo datasets (datasets), and the
span-corruption objective. Knows nothing about models or training.
May import: precision, parallel.
"""
