"""GGUF export: llama.cpp's metadata and tensor names, read back with gguf's reader, and a
reference forward pass in llama.cpp's conventions (adjacent-pair RoPE) that must give our logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module", params=["random-tied", "random-untied", pytest.param("tiny", marks=pytest.mark.slow)])
def model_folder(request, tmp_path_factory) -> Path:
    """Folders to export: random weights (tied and untied embeddings; fast) and the real `tiny` release."""
    if request.param == "tiny":
        return Path(request.getfixturevalue("tiny_run")) / "release"
    from helpers import make_random_model_folder

    return make_random_model_folder(tmp_path_factory.mktemp(request.param), d_model=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, vocab_size=512, tie_embeddings=request.param == "random-tied",
                                    seed=3)


@pytest.fixture(scope="module")
def exported(model_folder, tmp_path_factory) -> Path:
    from glassforge.release.export import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    info = export_gguf(model_folder, out)
    assert Path(info["gguf"]) == out and out.is_file()
    return out


def test_exported_file_gets_the_usual_permissions(exported):
    """Not mkstemp's private 0600: a file meant to be copied and shared gets 0666 less the umask."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o666 & ~umask
    assert not list(exported.parent.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def _fields(reader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _tensors(reader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        out[t.name] = np.asarray(t.data, dtype=np.float64).reshape(shape)
    return out


def test_permutation_is_inverted_exactly():
    from glassforge.release.export import permute_for_llamacpp, unpermute_from_llamacpp

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    p = permute_for_llamacpp(w, 8)
    assert not np.array_equal(p, w)
    assert np.array_equal(unpermute_from_llamacpp(p, 8), w)
    # within a head, rows go 0, h/2, 1, h/2+1, ...
    assert list(p[:4, 0] // 3) == [0, 8, 1, 9]


def test_gguf_metadata_follows_llamacpp_llama(model_folder, exported):
    import gguf

    rel = model_folder
    cfg = json.loads((rel / "config.json").read_text())
    tok = json.loads((rel / "tokenizer.json").read_text())
    tok_cfg = json.loads((rel / "tokenizer_config.json").read_text())
    f = _fields(gguf.GGUFReader(exported))
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["llama.context_length"] == cfg["max_position_embeddings"]
    assert f["llama.rope.dimension_count"] == cfg["head_dim"]
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert f["llama.vocab_size"] == cfg["vocab_size"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    specials = {a["content"]: a["id"] for a in tok["added_tokens"]}
    vocab.update({i: t for t, i in specials.items()})
    assert f["tokenizer.ggml.tokens"] == [vocab[i] for i in range(cfg["vocab_size"])]
    types = f["tokenizer.ggml.token_type"]
    assert all(types[i] == int(gguf.TokenType.CONTROL) for i in specials.values())
    assert types.count(int(gguf.TokenType.NORMAL)) == cfg["vocab_size"] - len(specials)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert f["tokenizer.ggml.merges"] == merges
    assert f["tokenizer.ggml.eos_token_id"] == specials["<|end|>"]
    assert f["tokenizer.ggml.add_bos_token"] is False or f["tokenizer.ggml.add_bos_token"] == 0
    assert f["tokenizer.chat_template"] == tok_cfg["chat_template"]
    from glassforge.core.hashing import sha256_file

    assert f["glassforge.weights_sha256"] == sha256_file(rel / "model.safetensors")


def test_gguf_tensors_are_the_weights_under_llamacpp_names(model_folder, exported):
    import gguf
    from safetensors.numpy import load_file

    from glassforge.release.export import unpermute_from_llamacpp

    rel = model_folder
    cfg = json.loads((rel / "config.json").read_text())
    reader = gguf.GGUFReader(exported)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    t = _tensors(reader)
    L = cfg["num_hidden_layers"]
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(L) for n in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    if not cfg["tie_word_embeddings"]:
        expected.add("output.weight")
    assert set(t) == expected  # tied embeddings: no output.weight, llama.cpp reuses token_embd
    w = load_file(str(rel / "model.safetensors"))
    assert np.array_equal(t["token_embd.weight"], w["model.embed_tokens.weight"])
    assert np.array_equal(t["blk.1.ffn_down.weight"], w["model.layers.1.mlp.down_proj.weight"])
    assert np.array_equal(t["blk.0.attn_v.weight"], w["model.layers.0.self_attn.v_proj.weight"])
    q, k = t["blk.0.attn_q.weight"], t["blk.0.attn_k.weight"]
    assert not np.array_equal(q, w["model.layers.0.self_attn.q_proj.weight"])  # permuted for llama.cpp's RoPE
    assert np.array_equal(unpermute_from_llamacpp(q, cfg["num_attention_heads"]),
                          w["model.layers.0.self_attn.q_proj.weight"])
    assert np.array_equal(unpermute_from_llamacpp(k, cfg["num_key_value_heads"]),
                          w["model.layers.0.self_attn.k_proj.weight"])


def llamacpp_reference_logits(fields: dict, t: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits from GGUF tensors the way llama.cpp's Llama graph computes them (float64, numpy).

    RoPE rotates adjacent pairs (2i, 2i+1) by pos * base^(-2i/d), as llama.cpp's
    normal RoPE mode does; query head h reads key/value head h // (H / KV).
    """
    H, KV = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    d = fields["llama.embedding_length"]
    hd, eps, base = d // H, fields["llama.attention.layer_norm_rms_epsilon"], fields["llama.rope.freq_base"]
    T = len(ids)
    ang = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(v):
        out = np.empty_like(v)
        a, b = v[..., 0::2], v[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    def rms(v, w):
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps) * w

    x = t["token_embd.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(fields["llama.block_count"]):
        h = rms(x, t[f"blk.{i}.attn_norm.weight"])
        q = rope((h @ t[f"blk.{i}.attn_q.weight"].T).reshape(T, H, hd))
        k = np.repeat(rope((h @ t[f"blk.{i}.attn_k.weight"].T).reshape(T, KV, hd)), H // KV, axis=1)
        v = np.repeat((h @ t[f"blk.{i}.attn_v.weight"].T).reshape(T, KV, hd), H // KV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, H * hd) @ t[f"blk.{i}.attn_output.weight"].T
        h = rms(x, t[f"blk.{i}.ffn_norm.weight"])
        gate = h @ t[f"blk.{i}.ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ t[f"blk.{i}.ffn_up.weight"].T)) @ t[f"blk.{i}.ffn_down.weight"].T
    x = rms(x, t["output_norm.weight"])
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def test_llamacpp_conventions_on_the_gguf_give_our_logits(model_folder, exported):
    import gguf
    import torch

    from glassforge.model.hf import load_pretrained
    from glassforge.tokenizer.bpe import load_tokenizer

    reader = gguf.GGUFReader(exported)
    fields, t = _fields(reader), _tensors(reader)
    ids = load_tokenizer(model_folder).encode("import json\nprint(json.dumps({'a': [1, 2]}, indent=2))",
                                              add_special_tokens=False).ids
    ref = llamacpp_reference_logits(fields, t, ids)
    with torch.no_grad():
        ours = load_pretrained(model_folder)(torch.tensor([ids]))[0][0].double().numpy()
    assert np.abs(ref - ours).max() <= 1e-4
    assert (ref.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.slow
def test_export_refuses_weights_that_do_not_match_the_manifest(request, tmp_path):
    from glassforge.core.errors import UserError
    from glassforge.release.export import export_gguf

    run_root = Path(request.getfixturevalue("tiny_run"))
    rel = tmp_path / "release"
    shutil.copytree(run_root / "release", rel, ignore=shutil.ignore_patterns("replay", "trace"))
    data = bytearray((rel / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (rel / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="manifest"):
        export_gguf(rel, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model"):
        export_gguf(tmp_path / "empty", tmp_path / "y.gguf")


@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
def test_lower_precision_gguf_stores_matrices_in_that_type(model_folder, dtype, tmp_path):
    """--dtype bf16 / q8_0 (how llama.cpp is compared with our bf16 / int8 decode): every matrix in that
    type and within its rounding of the weights, norms still F32, file type set accordingly."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    from glassforge.release.export import GGUF_DTYPES, export_gguf

    out = tmp_path / f"model-{dtype}.gguf"
    assert export_gguf(model_folder, out, dtype)["dtype"] == dtype
    reader = gguf.GGUFReader(out)
    qtype = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype][0]]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {gguf.GGMLQuantizationType.F32}
    assert {types[n] for n in types if not n.endswith("norm.weight")} == {qtype}
    assert int(_fields(reader)["general.file_type"]) == int(gguf.LlamaFileType[GGUF_DTYPES[dtype][1]])
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    got = dequantize(down.data, qtype).reshape(tuple(int(d) for d in reversed(down.shape)))
    w = load_file(str(model_folder / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    assert np.abs(got - w).max() <= (2 ** -8 if dtype == "bf16" else 1 / 254 * 1.01) * np.abs(w).max()


def test_cli_export_writes_the_dtype_asked(model_folder, tmp_path, capsys):
    import gguf

    from glassforge.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(model_folder), "--out", str(out), "--dtype", "q8_0"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "q8_0"
    file_type = int(_fields(gguf.GGUFReader(out))["general.file_type"])
    assert file_type == int(gguf.LlamaFileType.MOSTLY_Q8_0)
