"""The `tokenizer` and `shards` stages: byte-level BPE with the chat template, a fast ASCII encoder
with the same ids, and the memory-mapped token shards every training token is traced through."""
