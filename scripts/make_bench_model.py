"""A SmolLM2-135M-shaped Llama with random weights, for benchmarks (not committed: 540 MB).

The shape (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied
embeddings) is what costs time; the weights and the tokenizer do not matter for speed. The
tokenizer is a word-level vocabulary `w0 .. w49151` (no network needed), whose decode/encode
round-trips exactly, so benchmark prompts have the lengths asked for.

    /work/venv/bin/python scripts/make_bench_model.py target/bench-models/smollm2-135m-random
"""

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

out = Path(sys.argv[1] if len(sys.argv) > 1 else "target/bench-models/smollm2-135m-random")
out.mkdir(parents=True, exist_ok=True)
vocab_size = 49152
config = LlamaConfig(
    vocab_size=vocab_size,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.float32)
model.save_pretrained(out, safe_serialization=True)

vocab = {f"w{i}": i for i in range(vocab_size)}
vocab["<unk>"] = 0
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save(str(out / "tokenizer.json"))
(out / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "w2"}))
print(f"wrote {out}")
