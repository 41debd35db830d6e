"""Data pipeline pieces: corpus Parquet I/O, raw sources, cleaning, the `prepare` logic and token shards.

Submodules are imported explicitly (`from gpt.data.corpus import read_corpus`) so that a stage only pays for what
it uses (the shard writer does not need datasets/datasketch, the trainer does not need pandas).
"""
