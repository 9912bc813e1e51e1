#!/usr/bin/env python3
"""GGUF copies of the tiny fixture checkpoints, for the GGUF loader's tests.

Writes tests/fixtures/gguf/{llama_linear,llama,qwen2,qwen3}-f32.gguf and {llama_linear,qwen3}-{q8_0,q4_0}.gguf
from tests/fixtures/<name>/ with the `gguf` package (llama.cpp's gguf-py), laid out as
llama.cpp's converter lays them out:

- tensor names `token_embd`, `blk.N.attn_q`, `ffn_gate`, `output_norm`, ...; the llama
  family's q and k rows permuted into llama.cpp's interleaved RoPE order (the loader must undo
  it, or llama_linear's logits come out wrong);
- metadata `{arch}.context_length`, `.embedding_length`, `.block_count`,
  `.attention.head_count(_kv)`, `.attention.key_length`, `.rope.freq_base`,
  `.rope.scaling.*`, `.attention.layer_norm_rms_epsilon`;
- Llama 3's rope scaling (the `llama` fixture) as llama.cpp stores it: a `rope_freqs.weight`
  tensor of per-frequency divisors and no scaling metadata;
- the tokenizer as `tokenizer.ggml.*` (`gpt2` model: tokens, merges, token types, `pre` =
  `default` for the GPT-2 split, `qwen2` for Qwen's), BOS/EOS ids, `add_bos_token`, and the
  chat template.

Q8_0 and Q4_0 quantize every 2-D tensor (the norms stay F32), as llama.cpp's `--outtype q8_0`
does. Beside each quantized file, `{name}-{type}-dequantized.gguf` holds the same tensors as F32,
dequantized by gguf-py's numpy code: the independent reference for the quantized products.

gguf-py does not quantize K-quants, so `kquant-{q4_k_m,q5_k_m}.gguf` (a one-layer llama whose
rows are multiples of 256, as K-quant blocks need) are made by llama.cpp's `llama-quantize`, the
tool that makes the files users download (see `kquant_fixture`), each beside its dequantized twin.

Run (from the repository root; needs numpy, safetensors and gguf, no torch):
    LLAMA_QUANTIZE=/path/to/llama-quantize /tmp/tf-venv/bin/python scripts/gen_gguf_fixtures.py
Or convert any checkpoint folder to an F32 GGUF, or a Q8_0 / Q4_0 one quantized by gguf-py
(for benchmarks, where no llama-quantize is at hand):
    /tmp/tf-venv/bin/python scripts/gen_gguf_fixtures.py SRC_DIR OUT.gguf [q8_0|q4_0]

Generated with gguf 0.x (recorded in each file's `general.name`). Deterministic.
"""

import json
import pathlib
import sys

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests/fixtures"
OUT = FIXTURES / "gguf"

ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER[module]}.{kind}"


def interleave_rope_rows(w, heads):
    """Within each head, rows ordered (half, i) become (i, half): llama.cpp's RoPE layout."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(name, qtype, dequantized=False):
    suffix = "f32" if qtype is None else f"{qtype.name.lower()}{'-dequantized' if dequantized else ''}"
    version = gguf.__version__ if hasattr(gguf, "__version__") else ""
    title = f"ferrite fixture {name} ({suffix}, gguf-py {version})"
    write_gguf(FIXTURES / name, OUT / f"{name}-{suffix}.gguf", title, qtype, dequantized)


def write_gguf(src, path, title, qtype=None, dequantized=False, tensors=None):
    """The checkpoint in `src` (config, tokenizer, model.safetensors unless `tensors` gives the
    weights by Hugging Face name) as a GGUF file at `path`."""
    config = json.loads((src / "config.json").read_text())
    tok_json = json.loads((src / "tokenizer.json").read_text())
    tok_config_path = src / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.exists() else {}
    arch = ARCH[config["architectures"][0]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(title)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if config.get("head_dim"):
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(theta))
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling.get("rope_type") == "llama3":
        # As llama.cpp's converter does: no scaling metadata, the divisor of each inverse
        # frequency in a `rope_freqs.weight` tensor.
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        freqs = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        factors = []
        for f in freqs:
            wavelen = 2 * np.pi / f
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old_len / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])

    # Tokenizer: the byte-level BPE as llama.cpp's `gpt2` model.
    vocab = tok_json["model"]["vocab"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in tok_json["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    pre = tok_json["pre_tokenizer"]
    w.add_tokenizer_pre("qwen2" if pre["type"] == "Sequence" else "default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    w.add_token_merges(merges)
    ids = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    if tok_config.get("bos_token") in ids:
        w.add_bos_token_id(ids[tok_config["bos_token"]])
    if tok_config.get("eos_token") in ids:
        w.add_eos_token_id(ids[tok_config["eos_token"]])
    w.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    if tok_config.get("chat_template"):
        w.add_chat_template(tok_config["chat_template"])

    if tensors is None:
        tensors = load_file(str(src / "model.safetensors"))
    for hf, t in sorted(tensors.items()):
        t = t.astype(np.float32)
        if arch == "llama" and ".q_proj." in hf:
            t = interleave_rope_rows(t, heads)
        elif arch == "llama" and ".k_proj." in hf:
            t = interleave_rope_rows(t, kv_heads)
        if qtype is not None and t.ndim == 2 and t.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(t, qtype)
            if dequantized:
                w.add_tensor(gguf_name(hf), gguf.quants.dequantize(q, qtype).astype(np.float32))
            else:
                w.add_tensor(gguf_name(hf), q, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(hf), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def dequantized_twin(quantized, path):
    """Every tensor of the GGUF file `quantized` dequantized to F32 by gguf-py's numpy code
    (independent of the loader's), with the same metadata, at `path`."""
    reader = gguf.GGUFReader(str(quantized))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        w.add_tensor(t.name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def kquant_fixture():
    """A llama of K-quant-sized rows (hidden and MLP multiples of 256, one layer, random
    normal weights of std 0.05 from a fixed seed) with llama_linear's tokenizer, quantized by
    llama.cpp's own `llama-quantize` (LLAMA_QUANTIZE names it; build it from the llama.cpp
    sources in PyPI's llama-cpp-python sdist: `cmake -B b -G Ninja && ninja -C b llama-quantize`)
    to Q4_K_M (Q4_K with Q6_K for attn_v, ffn_down and the head) and Q5_K_M (Q5_K, Q6_K), each
    beside its dequantized twin. The F32 source is not kept."""
    import os
    import shutil
    import subprocess
    import tempfile

    quantize = os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if not quantize:
        print("skipping the K-quant fixtures: set LLAMA_QUANTIZE to llama.cpp's llama-quantize")
        return
    src = FIXTURES / "llama_linear"
    base = json.loads((src / "config.json").read_text())
    hidden, inter, heads, kv_heads = 256, 512, 4, 2
    config = dict(base, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                  tie_word_embeddings=True)
    vocab = base["vocab_size"]
    rng = np.random.default_rng(20261206)
    normal = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    d = hidden // heads
    tensors = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    layer = "model.layers.0."
    tensors.update({
        layer + "input_layernorm.weight": np.ones(hidden, np.float32),
        layer + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        layer + "self_attn.q_proj.weight": normal(heads * d, hidden),
        layer + "self_attn.k_proj.weight": normal(kv_heads * d, hidden),
        layer + "self_attn.v_proj.weight": normal(kv_heads * d, hidden),
        layer + "self_attn.o_proj.weight": normal(hidden, heads * d),
        layer + "mlp.gate_proj.weight": normal(inter, hidden),
        layer + "mlp.up_proj.weight": normal(inter, hidden),
        layer + "mlp.down_proj.weight": normal(hidden, inter),
    })
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(src / f, tmp / f)
        (tmp / "config.json").write_text(json.dumps(config))
        f32 = tmp / "kquant-f32.gguf"
        write_gguf(tmp, f32, "ferrite fixture kquant (f32)", tensors=tensors)
        for kind in ["Q4_K_M", "Q5_K_M"]:
            out = OUT / f"kquant-{kind.lower()}.gguf"
            subprocess.run([quantize, str(f32), str(out), kind], check=True, capture_output=True)
            print(f"wrote {out} ({out.stat().st_size} bytes) with {quantize}")
            dequantized_twin(out, OUT / f"kquant-{kind.lower()}-dequantized.gguf")


def main():
    if len(sys.argv) in (3, 4):
        # A checkpoint folder to an F32 GGUF (for benchmarks: llama-quantize takes it from
        # there), or to Q8_0 / Q4_0 by gguf-py.
        src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        kind = sys.argv[3].lower() if len(sys.argv) == 4 else "f32"
        types = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
        if kind != "f32" and kind not in types:
            sys.exit(f"type {kind!r} is not one of f32, q8_0, q4_0")
        write_gguf(src, out, f"ferrite conversion of {src.name} ({kind})", types.get(kind))
        return
    OUT.mkdir(exist_ok=True)
    for name in ["llama_linear", "llama", "qwen2", "qwen3"]:
        convert(name, None)
    for name in ["llama_linear", "qwen3"]:
        for qtype in [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0]:
            convert(name, qtype)
            convert(name, qtype, dequantized=True)
    kquant_fixture()


if __name__ == "__main__":
    main()
