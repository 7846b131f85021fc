"""Hugging Face I/O: a release folder's config.json and model.safetensors to a `Llama`, and weights to disk.

Weights only ever travel as safetensors: never pickle, never `torch.load`.
The state dict is Hugging Face's own (see llama.py), so the same files load
in transformers' `LlamaForCausalLM` unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glassforge.core.recipe import ModelConfig
from glassforge.core.runfolder import Release
from glassforge.model.llama import Llama


def load_weights(path: Path, model: Llama) -> None:
    from safetensors.torch import load_file

    model.load_hf_state_dict(load_file(path))


def save_weights(model: Llama, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(model.hf_state_dict(), path)


def load_pretrained(folder: Path | str, dtype=torch.float32) -> Llama:
    """A release folder (config.json + model.safetensors, Hugging Face layout) as a model in eval mode."""
    release = Release(folder)
    model = Llama(ModelConfig.from_hf(json.loads(release.config.read_text())))
    load_weights(release.weights, model)
    return model.to(dtype).eval()
