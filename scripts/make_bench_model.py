"""Random-weight models of real shapes, for benchmarks (not committed: hundreds of MB).

    python3 scripts/make_bench_model.py OUT [--shape smollm2-135m|qwen2.5-0.5b] [--dtype f32|bf16]

- smollm2-135m (default, f32): Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536,
  vocab 49152, tied embeddings. The CPU benchmarks' model.
- qwen2.5-0.5b (default bf16): Qwen2, 24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864,
  vocab 151936, q/k/v biases, tied embeddings. The GPU benchmarks' model (issue 7); built on
  the GPU when there is one, so it takes seconds there.

The shape is what costs time; the weights and the tokenizer do not matter for speed. The
tokenizer is a word-level vocabulary `w0 .. w{vocab-1}` (no network needed), whose
decode/encode round-trips exactly, so benchmark prompts have the lengths asked for.
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "smollm2-135m": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=49152,
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
        ),
        "f32",
    ),
    "qwen2.5-0.5b": (
        Qwen2ForCausalLM,
        Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "bf16",
    ),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out", nargs="?", default="target/bench-models/smollm2-135m-random")
parser.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
parser.add_argument("--dtype", choices=["f32", "bf16"], help="default: the shape's")
args = parser.parse_args()

cls, config, default_dtype = SHAPES[args.shape]
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype or default_dtype]
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = cls(config).to(dtype)
model.save_pretrained(out)

vocab_size = config.vocab_size
vocab = {f"w{i}": i for i in range(vocab_size)}
vocab["<unk>"] = 0
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save(str(out / "tokenizer.json"))
(out / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "w2"}))
params = sum(p.numel() for p in model.parameters())
print(f"wrote {out}: {args.shape}, {params / 1e6:.1f}M parameters, {dtype}")
