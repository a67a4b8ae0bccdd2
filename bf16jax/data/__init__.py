"""Data: tokenizers, the bundled demo datasets' grain pipelines, and T5 span corruption.

Owns everything between text on disk and integer batches: the byte tokenizer (with T5-style
sentinels) and pretrained models' tokenizer files, the input pipelines, and the span-corruption
objective. Knows nothing about models or training.
May import: precision, parallel.
"""
