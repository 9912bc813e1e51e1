"""Random-weight models of real shapes, for benchmarks (not committed: hundreds of MB).

    python3 scripts/make_bench_model.py OUT [--shape smollm2-135m|qwen2.5-0.5b|llama-170m-k]
                                            [--dtype f32|bf16]
                                            [--tokenizer words|bpe]

- smollm2-135m (default, f32): Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536,
  vocab 49152, tied embeddings. The CPU benchmarks' model.
- qwen2.5-0.5b (default bf16): Qwen2, 24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864,
  vocab 151936, q/k/v biases, tied embeddings. The GPU benchmarks' model (issue 7); built on
  the GPU when there is one, so it takes seconds there.
- llama-170m-k (default f32): Llama, 12 layers, hidden 1024, 16 heads / 4 KV heads, MLP 2816,
  vocab 32768, tied embeddings. Every row a whole number of 256-blocks, so llama-quantize's
  Q4_K_M of it is K-quants throughout (SmolLM2's 576-wide rows fall back to Q5_0); the CPU's
  K-quant benchmarks' model.

The shape is what costs time; the weights do not matter for speed. The default tokenizer is a
word-level vocabulary `w0 .. w{vocab-1}` (no network needed), whose decode/encode round-trips
exactly, so benchmark prompts have the lengths asked for. Structured output needs a real one
(JSON's `{` must be a token, and a grammar's mask cost depends on the vocabulary's shape):
`--tokenizer bpe` trains a byte-level BPE of the shape's vocabulary size on text found on this
machine (Python's standard library and /usr/share), with a ChatML chat template.

Without torch (`pip install numpy safetensors tokenizers transformers` suffices), the weights
are drawn with numpy instead (normal, std 0.02; norms 1), in f32 only.
"""

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

try:
    import torch
except ImportError:
    torch = None

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
    "llama-170m-k": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=32768,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "f32",
    ),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out", nargs="?", default="target/bench-models/smollm2-135m-random")
parser.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
parser.add_argument("--dtype", choices=["f32", "bf16"], help="default: the shape's")
parser.add_argument("--tokenizer", choices=["words", "bpe"], default="words")
args = parser.parse_args()

cls, config, default_dtype = SHAPES[args.shape]
dtype_name = args.dtype or default_dtype
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)


def numpy_weights():
    """The checkpoint's tensors, drawn with numpy (names as transformers saves them)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    tensors = {"model.embed_tokens.weight": normal(config.vocab_size, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        for name, shape in [("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))]:
            tensors[p + f"self_attn.{name}.weight"] = normal(*shape)
        if isinstance(config, Qwen2Config):
            for name, width in [("q_proj", h), ("k_proj", kv), ("v_proj", kv)]:
                tensors[p + f"self_attn.{name}.bias"] = normal(width)
        for name, shape in [("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))]:
            tensors[p + f"mlp.{name}.weight"] = normal(*shape)
    if dtype_name == "bf16":
        raise SystemExit("numpy weights are f32 only: pass --dtype f32, or install torch")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = [cls.__name__]
    config.torch_dtype = "float32"
    config.to_json_file(str(out / "config.json"))
    return sum(t.size for t in tensors.values())


if torch is not None:
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls(config).to(dtype)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
else:
    params = numpy_weights()


def corpus():
    """Text on this machine: Python's standard library, then /usr/share's docs, ~60 MB."""
    roots = [Path(sys.base_prefix) / "lib", Path("/usr/share/doc"), Path("/usr/share/common-licenses")]
    budget = 60 << 20
    for root in roots:
        for path in sorted(root.rglob("*")):
            if budget <= 0:
                return
            if path.suffix in {".py", ".txt", ".md", ".rst", ".json", ""} and path.is_file():
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                budget -= len(text)
                yield text


vocab_size = config.vocab_size
if args.tokenizer == "bpe":
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": template}))
    # The model's EOS is the template's end of turn.
    cfg = json.loads((out / "config.json").read_text())
    cfg["eos_token_id"] = tok.token_to_id("<|im_end|>")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens")
else:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab["<unk>"] = 0
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "w2"}))
print(f"wrote {out}: {args.shape}, {params / 1e6:.1f}M parameters, {dtype_name}")
