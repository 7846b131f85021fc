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

from glassforge.core.recipe import ModelConfig
from glassforge.model.llama import KVCache, Llama, explicit_attention, flops_per_token, rope_tables


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
    prefix, _ = model(ids[:, :8], cache=cache, positions=torch.arange(8)[None], slots=slots)
    steps = [model(ids[:, i:i + 1], cache=cache, positions=torch.tensor([[i]]), slots=slots)[0] for i in range(8, 12)]
    assert torch.allclose(torch.cat([prefix, *steps], dim=1), full, atol=1e-5)


def test_packed_rows_compute_each_sequence_as_it_would_be_alone():
    torch.manual_seed(0)
    model = Llama(small_cfg())
    a, b = torch.randint(0, 128, (1, 11)), torch.randint(0, 128, (1, 6))
    packed = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # two sequences, then padding
    segments = torch.tensor([[0] * 11 + [1] * 6 + [2] * 4])
    logits, _ = model(packed, segments=segments)
    alone_a, alone_b = model(a)[0], model(b)[0]
    assert torch.allclose(logits[:, :11], alone_a, atol=1e-5) and torch.allclose(logits[:, 11:17], alone_b, atol=1e-5)
    # without segments the second sequence would see the first: the mask is what keeps them apart
    assert not torch.allclose(model(packed)[0][:, 11:17], alone_b, atol=1e-3)
    # the loss and its gradients are those of the two sequences' summed losses
    targets = torch.cat([a, b, torch.full((1, 4), -100)], dim=1)
    model(packed, targets, reduction="sum", segments=segments)[1].backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    (model(a, a, reduction="sum")[1] + model(b, b, reduction="sum")[1]).backward()
    assert torch.allclose(packed_grad, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5)


def test_explicit_attention_equals_sdpa_causal_and_masked():
    """The CPU training path's attention (explicit scores) computes what SDPA does, with grouped heads."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g)
    k, v = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(explicit_attention(q, k, v, None), want, atol=1e-6)
    segments = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    mask = ((segments[:, :, None] == segments[:, None, :]) & torch.ones(10, 10, dtype=torch.bool).tril())[:, None]
    got = explicit_attention(q, k, v, mask)
    assert torch.allclose(got, sdpa(q, k, v, attn_mask=mask, enable_gqa=True), atol=1e-6)
    assert not torch.allclose(got[0], want[0], atol=1e-3)  # the mask did something: row 0 has two segments


def test_cached_rows_of_different_lengths_share_a_batch():
    """Two sequences in cache slots 2 and 0, at different positions, decode together as they would alone."""
    torch.manual_seed(1)
    model = Llama(small_cfg(n_heads=4, n_kv_heads=1)).eval()  # grouped-query attention
    a, b = torch.randint(0, 128, (1, 9)), torch.randint(0, 128, (1, 5))
    full_a, full_b = model(a)[0], model(b)[0]
    cache = KVCache(model.cfg, 3, 16)
    model(a[:, :8], cache=cache, positions=torch.arange(8)[None], slots=torch.tensor([2]))
    model(b[:, :4], cache=cache, positions=torch.arange(4)[None], slots=torch.tensor([0]))
    step, _ = model(torch.tensor([[a[0, 8]], [b[0, 4]]]), cache=cache, positions=torch.tensor([[8], [4]]),
                    slots=torch.tensor([2, 0]))
    assert torch.allclose(step[0, 0], full_a[0, 8], atol=1e-5) and torch.allclose(step[1, 0], full_b[0, 4], atol=1e-5)


def test_rotary_tables_are_computed_once_and_are_not_weights():
    model = Llama(small_cfg())
    assert "rope_cos" not in model.state_dict() and "rope_cos" not in model.hf_state_dict()
    for T in (1, 7, 16, model.cfg.max_seq_len):  # a slice of the cached table is the table of those positions
        cos, sin = rope_tables(model.cfg, torch.arange(T))
        assert torch.equal(model.rope_cos[:T], cos) and torch.equal(model.rope_sin[:T], sin)


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


def test_sampler_controls_on_known_logits():
    """Each control's effect on a row of known logits, and seeded draws that stay inside what it allows."""
    from glassforge.model.sampling import Sampling, adjusted_logits, generator_for, sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = [torch.tensor([1.0, 0.0, 0.0, 1.0])]
    rep = adjusted_logits(logits, [Sampling(repetition_penalty=2.0)], counts)
    assert rep.tolist() == [[1.0, 1.0, 0.0, -2.0]]  # a seen positive logit halved, a seen negative one doubled
    pen = adjusted_logits(logits, [Sampling(presence_penalty=0.5, frequency_penalty=0.25)], [counts[0] * 2])
    assert pen.tolist() == [[1.0, 1.0, 0.0, -2.0]]  # 2 - 0.5 - 2 x 0.25, and -1 - 0.5 - 0.5
    assert adjusted_logits(logits, [Sampling(logit_bias={3: 5.0})]).tolist() == [[2.0, 1.0, 0.0, 4.0]]
    assert logits.tolist() == [[2.0, 1.0, 0.0, -1.0]]  # the input is left alone

    def draws(params: Sampling, n: int = 400) -> set[int]:
        return {sample(logits, [params], [generator_for(seed)])[0] for seed in range(n)}

    # softmax: 0.644, 0.237, 0.087, 0.032; min_p 0.2 keeps what is at least 0.129: tokens 0 and 1
    assert draws(Sampling(min_p=0.2)) == {0, 1}
    assert draws(Sampling(min_p=1.0)) == {0} == draws(Sampling(top_k=1))
    assert draws(Sampling(top_k=3)) == {0, 1, 2} and draws(Sampling()) == {0, 1, 2, 3}
    assert draws(Sampling(temperature=0, logit_bias={3: 5.0})) == {3}
    same = [sample(logits, [Sampling(min_p=0.05)], [generator_for(7)])[0] for _ in range(3)]
    assert len(set(same)) == 1  # a seed gives the same draw each time


def test_seeded_draws_follow_the_distribution():
    """The exponential race draws from softmax(logits / T): frequencies over 4,000 seeds, each row its own."""
    from glassforge.model.sampling import Sampling, generator_for, sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    for temperature in (1.0, 0.5):
        drawn = sample(logits, [Sampling(temperature=temperature)] * 4000, [generator_for(s) for s in range(4000)])
        freq = torch.bincount(torch.tensor(drawn), minlength=4).float() / 4000
        expected = torch.softmax(logits[0] / temperature, -1)
        assert torch.allclose(freq, expected, atol=0.025), (temperature, freq.tolist(), expected.tolist())


def test_generate_batch_gives_each_prompt_what_it_gets_alone():
    """Prompts of one length prefill together, others apart; each row's tokens are those of the prompt alone,
    greedy and seeded."""
    from glassforge.model.generate import generate_batch
    from glassforge.model.sampling import Sampling

    torch.manual_seed(2)
    model = Llama(small_cfg(n_heads=4, n_kv_heads=2)).eval()
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8], [5, 9, 2], [4, 4, 4], [11, 2, 6, 1, 9]]
    seeds = [3, 1, 4, 1, 5]
    for sampling in (Sampling(temperature=0.0), Sampling(temperature=0.8)):
        together = generate_batch(model, prompts, 6, sampling, seeds)
        alone = [generate_batch(model, [p], 6, sampling, [s])[0] for p, s in zip(prompts, seeds)]
        assert together == alone and all(len(t) == 6 for t in together)
    greedy = generate_batch(model, prompts, 6)
    assert greedy[0] == greedy[2]  # the same prompt, greedy: the same tokens


def test_rows_that_stop_early_leave_the_others_what_they_get_alone():
    """Rows ending at different steps (a stop id) hand their cache slots to rows still decoding; every row's
    tokens stay those of its prompt alone, greedy and seeded."""
    from glassforge.model.generate import generate_batch
    from glassforge.model.sampling import Sampling

    torch.manual_seed(3)
    model = Llama(small_cfg(n_heads=4, n_kv_heads=2)).eval()
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8], [4, 4, 4], [11, 2, 6, 1, 9], [3, 8], [6, 6, 1, 2]]
    seeds = [3, 1, 4, 1, 5, 9]
    for sampling in (Sampling(temperature=0.0), Sampling(temperature=1.0)):
        free = generate_batch(model, prompts, 10, sampling, seeds)
        stop = {free[0][1], free[3][4]}  # ids that end some rows early, at different steps
        together = generate_batch(model, prompts, 10, sampling, seeds, stop)
        alone = [generate_batch(model, [p], 10, sampling, [s], stop)[0] for p, s in zip(prompts, seeds)]
        assert together == alone
        lengths = {len(t) for t in together}
        assert len(lengths) >= 2 and min(lengths) < 10, lengths  # rows did stop, at different steps


def test_a_cached_step_reads_slots_from_zero_as_a_view():
    """A step whose rows are in slots 0..n-1 reads them without a gather, and computes what a gather does."""
    from glassforge.model.llama import CacheStep

    torch.manual_seed(4)
    model = Llama(small_cfg(n_heads=4, n_kv_heads=2)).eval()
    cache = KVCache(model.cfg, 3, 16)
    ids = torch.randint(0, 128, (3, 6))
    model(ids[:, :5], cache=cache, positions=torch.arange(5).expand(3, 5), slots=torch.arange(3))
    assert CacheStep(cache, torch.arange(2), torch.tensor([[5], [5]])).rows == slice(0, 2)
    assert torch.equal(CacheStep(cache, torch.tensor([1, 0]), torch.tensor([[5], [5]])).rows, torch.tensor([1, 0]))
    saved_k, saved_v = cache.k.clone(), cache.v.clone()
    view, _ = model(ids[:2, 5:], cache=cache, positions=torch.tensor([[5], [5]]), slots=torch.arange(2))
    cache.k.copy_(saved_k), cache.v.copy_(saved_v)
    gathered, _ = model(ids[[1, 0], 5:], cache=cache, positions=torch.tensor([[5], [5]]), slots=torch.tensor([1, 0]))
    assert torch.equal(view, gathered[[1, 0]])
    assert torch.allclose(view[:, 0], model(ids[:2])[0][:, 5], atol=1e-5)


def test_compiling_for_training_compiles_training_steps_only():
    """compile_for_training adds no weights (the checkpoint is the same Hugging Face state dict), and only a
    training forward with gradients goes through the compiled regions: evaluation and generation stay eager."""
    torch.manual_seed(0)
    model = Llama(small_cfg())
    keys = list(model.state_dict())
    model.compile_for_training()
    assert list(model.state_dict()) == keys and list(model.hf_state_dict()) == [k for k in keys if k != "lm_head.weight"]
    layers, head = model._regions()
    assert layers is not model.model.layers and all(a is not b for a, b in zip(layers, model.model.layers))
    with torch.no_grad():
        assert model._regions()[0] is model.model.layers
    model.eval()
    assert model._regions()[0] is model.model.layers and model._regions()[1] == model.logits_and_loss
    logits, loss = model(torch.randint(0, 128, (1, 8)), torch.randint(0, 128, (1, 8)))
    assert logits.shape == (1, 8, 128) and loss.ndim == 0  # eager: logits too
