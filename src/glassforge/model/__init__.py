"""The model and what acts on it directly: the Llama decoder (one forward), its Hugging Face I/O,
checkpoints, the one sampler, and generation with the model's own forward."""
