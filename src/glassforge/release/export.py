"""`glassforge export RELEASE --format gguf`: the release as one GGUF file for llama.cpp.

Written with the `gguf` package under llama.cpp's Llama conventions:
`general.architecture = llama`, the `llama.*` hyperparameters, the byte-level
BPE vocabulary as `tokenizer.ggml.model = gpt2` (tokens, merges, token types,
the GPT-2 pre-tokenizer, which is the one our tokenizer uses), the chat
template and the end-of-turn tokens; tensors under llama.cpp's names
(`token_embd`, `blk.N.attn_q`, ...), in fp32 by default so nothing is lost.
`dtype` may instead store the matrices as f16, bf16 or q8_0 (norm weights stay
fp32, as llama.cpp wants): that is how llama.cpp is compared with our engine at
matching precision (q8_0 against our default int8 decode, bf16 against bf16;
see docs/PERFORMANCE.md).

One real difference: our RoPE (Hugging Face's) rotates the first half of each
head against the second half, while llama.cpp's Llama RoPE rotates adjacent
pairs. The query and key projections are therefore permuted within each head,
rows [0, h/2, 1, h/2+1, ...], which makes llama.cpp's pairs exactly our pairs;
attention scores are unchanged because q and k move together.

Weights are read with safetensors (never pickle), and refused if they do not
match the release's manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_path
from glassforge.core.hashing import sha256_file
from glassforge.core.recipe import ModelConfig
from glassforge.core.runfolder import WEIGHTS, Release, resolve_release
from glassforge.tokenizer.bpe import END, ENDOFTEXT, PAD


def permute_for_llamacpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection from rotate-half order to llama.cpp's adjacent-pair order."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_llamacpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_for_llamacpp."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_name_map(n_layers: int) -> dict[str, str]:
    """Hugging Face Llama tensor name -> llama.cpp GGUF tensor name."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(n_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    return names


def _vocab(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str], set[str]]:
    import gguf

    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer.json: model type {model.get('type')!r}; GGUF export handles byte-level BPE only")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["content"])
    if max(by_id) >= vocab_size:
        raise UserError(f"tokenizer has token id {max(by_id)} but the model's vocabulary is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if by_id[i] in special else gguf.TokenType.NORMAL))
        else:  # the model has rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, special


GGUF_DTYPES = {  # name -> (GGML tensor type, GGUF file type)
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}


def export_gguf(release: Path, out: Path, dtype: str = "f32") -> dict:
    """Write release (a Hugging Face-layout glassforge release) as a GGUF file at out.

    dtype (one of GGUF_DTYPES) is the storage of the 2-D weight matrices; 1-D norm weights stay fp32.
    """
    import gguf
    from safetensors import safe_open

    folder, out = resolve_release(release), Path(out)  # a run folder means its release/
    release = Release(folder)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(GGUF_DTYPES)}")
    qtype = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype][0]]
    for path in (release.config, release.weights, release.tokenizer_json, release.tokenizer_config):
        if not path.is_file():
            raise UserError(f"{folder}: not a release folder (no {path.name}); build one with `glassforge release RUN`")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as model.gguf")
    weights_sha = sha256_file(release.weights)
    if release.manifest.is_file():
        listed = json.loads(release.manifest.read_text()).get("files", {}).get(WEIGHTS, {}).get("sha256")
        if listed and listed != weights_sha:
            raise UserError(f"{release.weights}: sha256 {weights_sha[:12]}... does not match {release.manifest.name} "
                            f"({listed[:12]}...); run `glassforge verify {folder}`")
    hf_cfg = json.loads(release.config.read_text())
    if hf_cfg.get("model_type") != "llama":
        raise UserError(f"{release.config}: model_type {hf_cfg.get('model_type')!r}, expected 'llama'")
    cfg = ModelConfig.from_hf(hf_cfg)
    tok_json = json.loads(release.tokenizer_json.read_text())
    tok_cfg = json.loads(release.tokenizer_config.read_text())
    tokens, types, merges, _ = _vocab(tok_json, cfg.vocab_size)
    ids = {t: i for i, t in enumerate(tokens)}

    names = tensor_name_map(cfg.n_layers)
    tensors: list[tuple[str, np.ndarray]] = []
    with safe_open(str(release.weights), framework="np") as f:
        keys = set(f.keys())
        unknown = sorted(keys - set(names))
        if unknown:
            raise UserError(f"{release.weights}: tensor {unknown[0]} is not part of a Llama model")
        for hf_name, gg_name in names.items():
            if hf_name not in keys:
                if hf_name == "lm_head.weight":
                    continue  # tied: llama.cpp reuses token_embd.weight for the output
                raise UserError(f"{release.weights}: no tensor {hf_name}")
            w = np.ascontiguousarray(f.get_tensor(hf_name), dtype=np.float32)
            if hf_name.endswith("q_proj.weight"):
                w = permute_for_llamacpp(w, cfg.n_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = permute_for_llamacpp(w, cfg.n_kv_heads)
            tensors.append((gg_name, w))

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch="llama")
        w.add_name(f"glassforge {folder.resolve().parent.name or folder.name}")
        w.add_file_type(int(gguf.LlamaFileType[GGUF_DTYPES[dtype][1]]))
        w.add_string("glassforge.weights_sha256", weights_sha)  # ties the file back to the attested release
        if release.attestation.is_file():
            w.add_string("glassforge.attestation_sha256", sha256_file(release.attestation))
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # GPT-2's split regex: what tokenizers' ByteLevel pre-tokenizer uses
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(ids[ENDOFTEXT])
        w.add_add_bos_token(False)  # no BOS anywhere (see tokenizer.py)
        w.add_add_eos_token(False)
        w.add_eos_token_id(ids[END])
        w.add_eot_token_id(ids[END])
        w.add_pad_token_id(ids[PAD])
        if tok_cfg.get("chat_template"):
            w.add_chat_template(tok_cfg["chat_template"])
        for name, arr in tensors:
            if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"gguf": str(out), "sha256": sha256_file(out), "bytes": out.stat().st_size, "tensors": len(tensors),
            "weights_sha256": weights_sha, "dtype": dtype}
