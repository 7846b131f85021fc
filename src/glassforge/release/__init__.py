"""The `release` stage and what checks a release: the Hugging Face-layout folder, the model card,
the attestation, `verify`, the trace index over the training tokens, and the GGUF export."""
