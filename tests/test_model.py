"""The model against Hugging Face `LlamaForCausalLM`: same names, same numbers.

Our state dict loads into transformers' model and gives the same logits and
loss (grouped-query attention, tied and untied heads); gradients agree; the
cached inference path equals the training path; initialisation follows the
documented rule.
"""

from __future__ import annotations

import math

import pytest
import torch

from glassforge.model import KVCache, Llama, ModelConfig, flops_per_token


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def hf_twin(model: Llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in model.cfg.to_hf().items()
                            if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(model.hf_state_dict(), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied: stored once, as HF does
    return hf.float().eval()


@pytest.mark.parametrize("tie", [True, False])
def test_logits_loss_and_gradients_match_transformers(tie):
    torch.manual_seed(0)
    model = Llama(small_cfg(tie_embeddings=tie)).float()
    hf = hf_twin(model)
    x = torch.randint(0, 128, (2, 17))
    y = torch.randint(0, 128, (2, 17))
    y[0, :5] = -100  # ignored positions, as in SFT rows
    logits, loss = model(x, y)
    out = hf(input_ids=x, labels=y, shift_labels=y)
    assert torch.allclose(logits, out.logits, atol=1e-5)
    assert torch.allclose(loss, out.loss, atol=1e-6)
    loss.backward()
    out.loss.backward()
    ours = dict(model.named_parameters())
    for name, p in hf.named_parameters():
        assert torch.allclose(ours[name].grad, p.grad, atol=1e-6), name


def test_sum_reduction_is_mean_times_targets():
    torch.manual_seed(0)
    model = Llama(small_cfg())
    x = torch.randint(0, 128, (3, 9))
    y = x.clone()
    y[1, 3:] = -100
    _, mean = model(x, y)
    _, total = model(x, y, reduction="sum")
    assert torch.allclose(total, mean * (y != -100).sum(), rtol=1e-5)


def test_cached_path_equals_training_path():
    torch.manual_seed(0)
    model = Llama(small_cfg()).eval()
    ids = torch.randint(0, 128, (1, 12))
    full, _ = model(ids)
    cache = KVCache(model.cfg, 1, 16)
    slots = torch.zeros(1, dtype=torch.long)
    prefix = model.forward_cached(ids[:, :8], torch.arange(8)[None], cache, slots)
    steps = [model.forward_cached(ids[:, i:i + 1], torch.tensor([[i]]), cache, slots) for i in range(8, 12)]
    assert torch.allclose(torch.cat([prefix, *steps], dim=1), full, atol=1e-5)


def test_initialisation_rule():
    torch.manual_seed(0)
    cfg = small_cfg(d_model=256, n_heads=4, n_kv_heads=4, n_layers=8, vocab_size=2048, tie_embeddings=False)
    model = Llama(cfg)
    sd = dict(model.named_parameters())
    assert sd["model.layers.0.input_layernorm.weight"].eq(1).all() and sd["model.norm.weight"].eq(1).all()
    assert sd["model.layers.3.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert sd["model.layers.3.mlp.down_proj.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert sd["model.layers.3.self_attn.o_proj.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    tied = Llama(small_cfg(tie_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "lm_head.weight" not in tied.hf_state_dict()


def test_config_round_trips_through_hf_and_rejects_bad_heads():
    cfg = small_cfg(n_kv_heads=1, rope_theta=5e5)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ValueError):
        small_cfg(n_heads=3)
    with pytest.raises(ValueError):
        small_cfg(n_heads=4, n_kv_heads=3)


def test_flops_per_token_counts_every_matmul():
    cfg = small_cfg()
    d, f = cfg.d_model, cfg.d_ff
    attn = d * d + 2 * d * (cfg.n_kv_heads * cfg.head_dim) + d * d
    expected = 6 * (cfg.n_layers * (attn + 3 * d * f) + d * cfg.vocab_size) + 12 * cfg.n_layers * d * 32
    assert flops_per_token(cfg, 32) == expected
