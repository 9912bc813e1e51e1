#!/usr/bin/env python3
"""RoPE references: cos and sin as transformers' rotary embeddings compute them, for every
scaling type ferrite reads (default, linear, llama3, yarn, longrope, dynamic).

Each case is a config.json (what ferrite parses) and a context length L: transformers' rotary
module is run over positions 0..L-1 (its LongRoPE and dynamic-NTK updates choose by the longest
position, L), and the cos/sin rows at a few positions are recorded (the first rotary_dim / 2
columns: the rest repeat them).  ferrite builds its rotation for an engine whose sequences reach
L tokens and must give the same rows.

Run (from the repository root):
    /tmp/tf-venv/bin/python scripts/gen_rope_reference.py   # writes tests/fixtures/rope/reference.json
Needs torch and transformers (the versions are recorded in the file).
"""

import json
import os

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "rope", "reference.json")

BASE = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2)
# Short and long factors for 8 frequencies (head_dim 16) and for 4 (half of it rotated).
SHORT8 = [1.0, 1.02, 1.05, 1.1, 1.3, 1.7, 2.2, 2.9]
LONG8 = [1.0, 1.2, 1.9, 3.1, 5.6, 9.0, 14.5, 22.0]

CASES = [
    ("default", "llama", dict(head_dim=16, max_position_embeddings=1024,
                              rope_parameters=dict(rope_type="default", rope_theta=10000.0)), 300),
    ("linear", "llama", dict(head_dim=16, max_position_embeddings=1024,
                             rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=10000.0)), 300),
    ("llama3", "llama", dict(head_dim=16, max_position_embeddings=1024,
                             rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=64,
                                                  rope_theta=10000.0)), 300),
    ("yarn", "llama", dict(head_dim=16, max_position_embeddings=1024,
                           rope_parameters=dict(rope_type="yarn", factor=4.0,
                                                original_max_position_embeddings=256, rope_theta=10000.0)), 900),
    ("yarn_mscale_untruncated", "qwen2", dict(max_position_embeddings=2048,
                                               rope_parameters=dict(rope_type="yarn", factor=8.0, mscale=1.0,
                                                                    mscale_all_dim=0.5, beta_fast=16.0, beta_slow=2.0,
                                                                    truncate=False,
                                                                    original_max_position_embeddings=256,
                                                                    rope_theta=1000000.0)), 900),
    ("yarn_attention_factor", "qwen3", dict(head_dim=32, max_position_embeddings=1024,
                                             rope_parameters=dict(rope_type="yarn", factor=2.0, attention_factor=1.3,
                                                                  original_max_position_embeddings=512,
                                                                  rope_theta=1000000.0)), 700),
    ("longrope_short", "phi3", dict(max_position_embeddings=1024, original_max_position_embeddings=256,
                                     rope_parameters=dict(rope_type="longrope", short_factor=SHORT8 + SHORT8[:0],
                                                          long_factor=LONG8, rope_theta=10000.0)), 200),
    ("longrope_long", "phi3", dict(max_position_embeddings=1024, original_max_position_embeddings=256,
                                    rope_parameters=dict(rope_type="longrope", short_factor=SHORT8,
                                                         long_factor=LONG8, rope_theta=10000.0)), 600),
    ("longrope_partial_long", "phi3", dict(max_position_embeddings=1024, original_max_position_embeddings=256,
                                            rope_parameters=dict(rope_type="longrope", short_factor=SHORT8[::2],
                                                                 long_factor=LONG8[::2], partial_rotary_factor=0.5,
                                                                 rope_theta=10000.0)), 600),
    ("dynamic_within", "llama", dict(head_dim=16, max_position_embeddings=128,
                                     rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)), 100),
    ("dynamic_grown", "llama", dict(head_dim=16, max_position_embeddings=128,
                                    rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)), 500),
]
ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "phi3": "Phi3ForCausalLM"}
ROTARY = {"llama": "LlamaRotaryEmbedding", "qwen2": "Qwen2RotaryEmbedding", "qwen3": "Qwen3RotaryEmbedding",
          "phi3": "Phi3RotaryEmbedding"}


def f32(x):
    return float(str(np.float32(x)))


def main():
    cases = []
    for name, model_type, extra, length in CASES:
        cfg = transformers.CONFIG_MAPPING[model_type](**BASE, **extra)
        cfg.architectures = [ARCH[model_type]]
        module = getattr(__import__(f"transformers.models.{model_type}.modeling_{model_type}",
                                    fromlist=["x"]), ROTARY[model_type])
        rotary = module(cfg).eval()
        positions = torch.arange(length)[None, :]
        x = torch.zeros(1, length, 8, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary(x, positions)
        half = cos.shape[-1] // 2
        picked = sorted({0, 1, 7, length // 3, length - 1})
        config_json = cfg.to_dict()
        config_json["architectures"] = [ARCH[model_type]]
        cases.append(dict(
            name=name,
            config=json.loads(json.dumps(config_json, default=str)),
            context_len=length,
            positions=picked,
            cos=[[f32(v) for v in cos[0, p, :half].tolist()] for p in picked],
            sin=[[f32(v) for v in sin[0, p, :half].tolist()] for p in picked],
            attention_scaling=float(rotary.attention_scaling),
        ))
        print(name, "rotary dims", 2 * half, "attention scaling", rotary.attention_scaling)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(dict(versions={"torch": torch.__version__, "transformers": transformers.__version__},
                       cases=cases), f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
