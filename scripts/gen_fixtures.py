#!/usr/bin/env python3
"""Generate tiny random Hugging Face checkpoints + transformers reference outputs.

What it makes (under tests/fixtures/):
  llama/          LlamaForCausalLM, GQA 4q/2kv, rope_scaling llama3 (factor 8,
                  original_max_position_embeddings 64), tied embeddings, f32.
  llama_sharded/  the same checkpoint as llama/, saved in several safetensors
                  shards + model.safetensors.index.json (same reference.json).
  llama_linear/   LlamaForCausalLM, MHA, 3 layers, ffn 64, rope_scaling linear (factor 2),
                  untied, f32.
  mistral/        MistralForCausalLM, GQA 8q/2kv (ratio 4), sliding_window 48,
                  untied, f32.
  qwen2/          Qwen2ForCausalLM, q/k/v bias, GQA, untied, f32, no sliding window;
                  generation_config eos_token_id is a list of two ids.
  qwen3/          Qwen3ForCausalLM, head_dim (32) != hidden/heads (16), per-head
                  q_norm/k_norm, tied embeddings, f32.
  qwen2_bf16/     the qwen2 shape (different seed) with bf16 weights; references are
                  computed in f32 from the bf16 weights upcast to f32.
  gemma2/ gemma3/ granite/ olmo2/ phi3/
                  one per family beyond Llama, each with the switches that make it differ
                  set where they change the result (tests/fixtures/README.md says which).
  gemma3_multimodal/
                  the language model of a Gemma3ForConditionalGeneration checkpoint (what
                  Gemma 3 4B and larger ship as), with a tiny vision tower beside it.
  qwen3_moe/ mixtral/
                  mixtures of experts (4 experts, top 2); seeds whose routing has a near tie
                  are rejected like those with a near-tied greedy step.
  qwen3_yarn/ phi3_longrope/
                  RoPE scalings through the served path: YaRN, and LongRoPE with the
                  pretrained context passed by only the longest prompt.

Every folder holds config.json, generation_config.json, model*.safetensors,
tokenizer.json, tokenizer_config.json and reference.json.  The tokenizer is a small
byte-level BPE trained here on the inline corpus below (shared vocabulary; the llama
family prepends <|bos|> via a TemplateProcessing post-processor, the qwen family does
not).  reference.json follows the schema of shared/models/stories260K-hf/reference.json:
per prompt the prompt ids, f32 logits at the last prompt position, and 24 greedy tokens
computed with a plain no-KV-cache loop (argmax of f32 logits, EOS ignored), their
log-probs and top-2 logit margins; plus rendered chat-template prompts and their ids.

Seeds are fixed; the script searches upward from each model's base seed until every
greedy step has a top-2 logit margin >= MIN_MARGIN and the outputs are not degenerate,
and records the seed used.

Run (from the repository root):
    /work/venv/bin/python scripts/gen_fixtures.py            # writes tests/fixtures/
    /work/venv/bin/python scripts/gen_fixtures.py --only gemma2,phi3  # just these
    /work/venv/bin/python scripts/gen_fixtures.py --out DIR  # elsewhere

Generated with torch 2.15.0+cu132 (CPU), transformers 5.24.0, tokenizers 0.23.3,
safetensors, numpy 2 (the versions are also recorded in every reference.json under
"versions").  Deterministic: two runs produce byte-identical files.  Runs in ~30 s on
one CPU thread.  Prerequisite: pip install torch transformers safetensors numpy
tokenizers jinja2.
"""

import argparse
import copy
import json
import os
import shutil
import sys

import numpy as np
import torch
import tokenizers
import transformers
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)

MAX_NEW_TOKENS = 24
MIN_MARGIN = 2e-3  # required top-2 logit margin at every greedy step
VOCAB_SIZE = 448
SPECIALS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
BOS, EOS, IM_START, IM_END, PAD = SPECIALS
QWEN_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# --------------------------------------------------------------------------------------
# Training corpus for the tokenizer (a few KB of varied text, some multibyte UTF-8).
# --------------------------------------------------------------------------------------
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog did not seem to mind at all.",
    "Once upon a time, there was a little girl named Lily who loved to read books about the sea.",
    "She walked to the market every morning, bought three apples, two loaves of bread, and a jar of honey.",
    "In 1969, humans first walked on the Moon; the mission was called Apollo 11.",
    "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
    "The train leaves at 7:45 a.m. and arrives at 10:30 a.m., unless it is late again!",
    "Is this the right way? \"Yes,\" she said, \"keep going straight, then turn left.\"",
    "A café on the corner serves crème brûlée, and the naïve tourist ordered two.",
    "Zoë and Chloé went to São Paulo, then to Zürich, and finally to Kraków.",
    "日本 is the Japanese name for Japan; 東京 is its capital city.",
    "Emoji are everywhere now: 😀 🎉 🚀 ❤️ and even 🦀 for the Rust language.",
    "The price was $19.99, but with a 25% discount it came to $14.99 plus tax.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}",
    "Email me at someone@example.com or visit https://example.org/index.html today.",
    "Machine learning models learn patterns from data; larger models often need more data.",
    "The weather today is sunny with a light breeze, and tomorrow it will rain in the afternoon.",
    "Mathematics: 3 + 4 = 7, 12 * 12 = 144, and the square root of 81 is 9.",
    "Good morning! How are you? I am fine, thank you. And you?",
    "The library opens at nine o'clock and closes at five; it is closed on Sundays.",
    "Scientists discovered a new species of frog in the rainforest last year.",
    "He said: 'Never give up.' Then he smiled, picked up his bag, and left the room.",
    "Tabs\tand  double  spaces   appear here, along with line\nbreaks and\r\nwindows endings.",
    "Ein kleiner Hund läuft über die Straße. Où est la bibliothèque? ¿Dónde está el baño?",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم! שלום עולם!",
    "The year 2024 had 366 days because it was a leap year; February had 29 days.",
    "Tokens, tokens, tokens: the model reads them one by one, and predicts the next one.",
    "A stitch in time saves nine. Actions speak louder than words. Better late than never.",
    "The children played in the garden until the sun went down, then they went inside for dinner.",
    "Please remember to bring your passport, your ticket, and a warm jacket for the trip.",
    "<html><body><p>Hello, world!</p></body></html>",
    "{\"name\": \"ferrite\", \"version\": \"0.1.0\", \"tags\": [\"llm\", \"inference\"]}",
    "The orchestra played Beethoven's Ninth Symphony, and the audience stood and cheered.",
    "Rivers flow into the ocean, clouds carry the water back to the mountains, and the cycle repeats.",
    "Small steps, taken every day, add up to a long journey over many years.",
]

MEDIUM_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at sunset. "
    "He lit the great lamp, wiped the salt from the windows, and watched the ships "
    "pass by in the dark. Some nights the storms were so strong that the whole tower "
    "seemed to shake, but the light never went out. When he retired after forty-two "
    "years, the village threw a party with music, cake, and fireworks over the harbor."
)

LONG_TEXT = (
    "In the middle of a quiet valley there was a small town with a river, a bridge, "
    "and a bakery that opened before dawn. Every morning the baker, a tall woman named "
    "Marta, mixed flour, water, salt, and yeast in a wooden bowl that had belonged to her "
    "grandmother. By six o'clock the smell of fresh bread drifted down the main street, "
    "and the first customers arrived: the postman, two teachers, a doctor on her way to "
    "the clinic, and a boy who always asked for a roll with extra seeds. Marta knew "
    "everyone's order by heart. On Saturdays she baked cinnamon buns, 48 of them, and "
    "they were always gone by nine. One winter the river froze solid for the first time "
    "in 30 years. Children skated on the ice, dogs chased each other across it, and the "
    "old men argued about whether it was safe. Marta carried a basket of warm bread to the "
    "bridge and handed it out for free, because, as she said, \"cold days need warm hands.\" "
    "In the spring the ice melted, the river rose, and the town held a festival with "
    "lanterns, songs, and a long table that stretched from one end of the bridge to the "
    "other. People still talk about that festival: the lanterns floating on the water, "
    "the band playing until midnight, and Marta, laughing, with flour on her sleeves. "
    "Years later, when a new road brought tourists and a supermarket, the little bakery "
    "stayed open, and the line outside its door on Saturday mornings was longer than ever. "
    "Visitors asked for the secret of her bread; she smiled and said it was patience, "
    "good flour, and an early alarm clock set for 3:45 a.m. every single day of the year."
)

# "cafe\u0301" is a decomposed é: the qwen family's NFC normalizer composes it
MULTIBYTE_TEXT = "Café déjà vu: naïve façade, cafe\u0301 日本 東京 🦀🚀 — Zürich ¿qué? Привет ✓"

CHAT_CASES = [
    [{"role": "user", "content": "Hello! How are you today?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    [
        {"role": "user", "content": "Où est le café?"},
        {"role": "assistant", "content": "Le café est au coin de la rue. 日本 ☕"},
        {"role": "user", "content": "Merci! 🎉"},
    ],
]


def chat_template(with_bos):
    return (
        ("{{ bos_token }}" if with_bos else "")
        + "{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('Unknown role: ' + message['role']) }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------
def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = CORPUS + [MEDIUM_TEXT, LONG_TEXT]
    # repeat so that common words get merged
    tok.train_from_iterator(corpus * 3, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_variant(base, with_bos):
    tok = Tokenizer.from_str(base.to_str())
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS} $B",
            special_tokens=[(BOS, base.token_to_id(BOS))],
        )
    else:
        # Real Qwen2/Qwen3 tokenizer.json layout.  transformers 5 loads model_type qwen2
        # with Qwen2Tokenizer, which rebuilds exactly this normalizer/pre-tokenizer in
        # code (ignoring those in tokenizer.json), so tokenizer.json must match it for
        # the Rust `tokenizers` crate to agree with transformers.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                  use_regex=False)
    return tok


def write_tokenizer(folder, tok, family):
    tok.save(os.path.join(folder, "tokenizer.json"))
    llama = family == "llama"
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS if (llama or family == "qwen3") else None,
        "eos_token": EOS if llama else IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": llama,
        "add_eos_token": False,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(with_bos=llama),
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def model_specs(vocab):
    common = dict(
        vocab_size=vocab,
        max_position_embeddings=1024,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=4,
    )
    return [
        dict(
            name="llama", family="llama", arch="LlamaForCausalLM", model_type="llama",
            seed=1000, spelling="old", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                     rms_norm_eps=1e-5),
            rope=dict(rope_theta=10000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=64),
            rope_old_type_key="rope_type",
            gen_eos=1, sharded_copy="llama_sharded",
        ),
        dict(
            name="llama_linear", family="llama", arch="LlamaForCausalLM", model_type="llama",
            seed=2000, spelling="old", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
            rope=dict(rope_theta=50000.0, rope_type="linear", factor=2.0),
            rope_old_type_key="type",
            gen_eos=1,
        ),
        dict(
            name="mistral", family="llama", arch="MistralForCausalLM", model_type="mistral",
            seed=3000, spelling="new", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                     tie_word_embeddings=False, sliding_window=48),
            rope=dict(rope_theta=1000000.0, rope_type="default"),
            gen_eos=1,
        ),
        dict(
            name="qwen2", family="qwen", arch="Qwen2ForCausalLM", model_type="qwen2",
            seed=4000, spelling="new", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
                     max_window_layers=2, bos_token_id=None, eos_token_id=3),
            rope=dict(rope_theta=1000000.0, rope_type="default"),
            gen_eos=[1, 3],
        ),
        dict(
            name="qwen3", family="qwen3", arch="Qwen3ForCausalLM", model_type="qwen3",
            seed=5000, spelling="old", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     tie_word_embeddings=True, attention_bias=False,
                     use_sliding_window=False, sliding_window=None, max_window_layers=2,
                     eos_token_id=3),
            rope=dict(rope_theta=1000000.0, rope_type="default"),
            gen_eos=3,
        ),
        dict(
            name="qwen2_bf16", family="qwen", arch="Qwen2ForCausalLM", model_type="qwen2",
            seed=6000, spelling="new", weights_dtype="bfloat16",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
                     max_window_layers=2, bos_token_id=None, eos_token_id=3),
            rope=dict(rope_theta=1000000.0, rope_type="default"),
            gen_eos=3,
        ),
        # ---- families beyond Llama (issue 21). Each sets the switch that makes it differ low
        # or small enough to change the result: windows shorter than the long prompts, soft-caps
        # near the logits' range, scalings far from the defaults they replace. Untied: with
        # random weights a tied head repeats one token (the scaled embedding dominates), and
        # tying is the shared code the llama and qwen3 fixtures already cover.
        dict(
            name="gemma2", family="llama", arch="Gemma2ForCausalLM", model_type="gemma2",
            seed=7000, spelling="new", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                     tie_word_embeddings=False, query_pre_attn_scalar=20, sliding_window=40,
                     attn_logit_softcapping=4.0, final_logit_softcapping=6.0),
            rope=dict(rope_theta=10000.0, rope_type="default"),
            gen_eos=1,
        ),
        dict(
            name="gemma3", family="llama", arch="Gemma3ForCausalLM", model_type="gemma3_text",
            seed=8000, spelling="new", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                     tie_word_embeddings=False, query_pre_attn_scalar=20, sliding_window=40,
                     layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                     final_logit_softcapping=None, attn_logit_softcapping=None),
            rope={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                  "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000000.0)},
            gen_eos=1,
        ),
        dict(
            name="granite", family="llama", arch="GraniteForCausalLM", model_type="granite",
            seed=9000, spelling="old", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                     embedding_multiplier=3.0, residual_multiplier=0.4,
                     attention_multiplier=0.1, logits_scaling=2.5),
            rope=dict(rope_theta=10000.0, rope_type="default"),
            gen_eos=1,
        ),
        dict(
            name="olmo2", family="llama", arch="Olmo2ForCausalLM", model_type="olmo2",
            seed=10000, spelling="old", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
            rope=dict(rope_theta=500000.0, rope_type="default"),
            gen_eos=1,
        ),
        dict(
            name="phi3", family="llama", arch="Phi3ForCausalLM", model_type="phi3",
            seed=11000, spelling="new", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                     sliding_window=48, original_max_position_embeddings=1024),
            rope=dict(rope_theta=10000.0, rope_type="default", partial_rotary_factor=0.5),
            gen_eos=1,
        ),
        # RoPE scalings through the served path (every type's tables are checked against
        # transformers' rotary modules by scripts/gen_rope_reference.py).
        dict(
            name="qwen3_yarn", family="qwen3", arch="Qwen3ForCausalLM", model_type="qwen3",
            seed=12000, spelling="old", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     tie_word_embeddings=True, attention_bias=False,
                     use_sliding_window=False, sliding_window=None, max_window_layers=2,
                     eos_token_id=3),
            rope=dict(rope_theta=1000000.0, rope_type="yarn", factor=4.0,
                      original_max_position_embeddings=128),
            gen_eos=3,
        ),
        # LongRoPE as Phi-3.5 writes it: factors in `rope_scaling`, the pretrained context
        # (256: only the 310-token prompt passes it) at the top level.
        dict(
            name="phi3_longrope", family="llama", arch="Phi3ForCausalLM", model_type="phi3",
            seed=13000, spelling="old", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                     original_max_position_embeddings=256),
            rope=dict(rope_theta=10000.0, rope_type="longrope",
                      short_factor=[1.0, 1.02, 1.05, 1.1, 1.3, 1.7, 2.2, 2.9],
                      long_factor=[1.0, 1.2, 1.9, 3.1, 5.6, 9.0, 14.5, 22.0]),
            rope_old_type_key="type",
            gen_eos=1,
        ),
        # Gemma 3 as the 4B-and-up checkpoints ship it: the language model inside
        # Gemma3ForConditionalGeneration (a tiny SigLIP tower beside it, unused by text
        # prompts), weights under `language_model.`, the head tied. The embedding is scaled by
        # 0.3 after init: with random weights the tied head otherwise repeats one token.
        dict(
            name="gemma3_multimodal", family="llama", arch="Gemma3ForConditionalGeneration",
            model_type="gemma3_text", multimodal=True, embed_scale=0.3,
            seed=16000, spelling="as saved", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                     tie_word_embeddings=True, query_pre_attn_scalar=20, sliding_window=40,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
            rope={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                  "full_attention": dict(rope_type="default", rope_theta=1000000.0)},
            gen_eos=1,
        ),
        # Mixtures of experts: a router picks 2 of 4 experts per token. Qwen3-MoE renormalizes
        # the top-2 probabilities (`norm_topk_prob`) and keeps layer 1 dense
        # (`mlp_only_layers`); Mixtral always renormalizes.
        dict(
            name="qwen3_moe", family="qwen3", arch="Qwen3MoeForCausalLM", model_type="qwen3_moe",
            seed=14000, spelling="new", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[1], use_sliding_window=False, sliding_window=None,
                     eos_token_id=3),
            rope=dict(rope_theta=1000000.0, rope_type="default"),
            gen_eos=3,
        ),
        dict(
            name="mixtral", family="llama", arch="MixtralForCausalLM", model_type="mixtral",
            seed=15000, spelling="old", weights_dtype="float32",
            cfg=dict(common, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                     num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
            rope=dict(rope_theta=1000000.0, rope_type="default"),
            gen_eos=1,
        ),
    ]


def rope_new(spec):
    return dict(spec["rope"])


def rope_old(spec):
    """(rope_theta, rope_scaling) in the transformers-4 spelling."""
    r = dict(spec["rope"])
    theta = r.pop("rope_theta")
    rtype = r.pop("rope_type")
    if rtype == "default":
        return theta, None
    scaling = {spec.get("rope_old_type_key", "rope_type"): rtype}
    scaling.update(r)
    return theta, scaling


def build_config(spec):
    cls = transformers.CONFIG_MAPPING[spec["model_type"]]
    kw = dict(spec["cfg"])
    kw["rope_parameters"] = rope_new(spec)
    cfg = cls(**kw)
    if spec.get("multimodal"):
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14)
        cfg = transformers.Gemma3Config(text_config=cfg.to_dict(), vision_config=vision,
                                        mm_tokens_per_image=4,
                                        tie_word_embeddings=kw["tie_word_embeddings"])
    cfg.architectures = [spec["arch"]]
    return cfg


def model_class(spec):
    if spec.get("multimodal"):
        return transformers.Gemma3ForConditionalGeneration
    return AutoModelForCausalLM


def text_config(config):
    """The language model's config (a multimodal config's `text_config`)."""
    return getattr(config, "text_config", None) or config


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_model(spec, seed):
    cfg = build_config(spec)
    torch.manual_seed(seed)
    if spec.get("multimodal"):
        cfg._attn_implementation = "eager"
        model = model_class(spec)(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    perturb(model, seed)
    if spec.get("embed_scale"):
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(spec["embed_scale"])
    if spec["weights_dtype"] == "bfloat16":
        # round the parameters to bf16-representable values but keep the module (and its
        # rotary inv_freq buffer) in f32; the bf16 copy is made only for saving
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def save_model(model, spec, folder, **kw):
    if spec["weights_dtype"] == "bfloat16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, **kw)


def rewrite_config_spelling(folder, spec):
    path = os.path.join(folder, "config.json")
    if spec["spelling"] == "as saved":
        with open(path) as f:
            return json.load(f)
    with open(path) as f:
        cfg = json.load(f)
    dtype = spec["weights_dtype"]
    for k in ("rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    if spec["spelling"] == "old":
        theta, scaling = rope_old(spec)
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = scaling
        cfg["torch_dtype"] = dtype
    else:
        cfg["rope_parameters"] = rope_new(spec)
        cfg["dtype"] = dtype
    cfg = dict(sorted(cfg.items()))
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return cfg


def write_generation_config(folder, spec, bos_id):
    gc = {
        "bos_token_id": bos_id,
        "eos_token_id": spec["gen_eos"],
        "pad_token_id": 4,
        "do_sample": False,
    }
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(gc, f, indent=2)
        f.write("\n")


def load_model(folder, spec=None):
    cls = model_class(spec) if spec else AutoModelForCausalLM
    m = cls.from_pretrained(folder, attn_implementation="eager")
    return m.float().eval()


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------
def n_tokens(tok, text):
    return len(tok(text)["input_ids"])


def prefix_with_len(tok, text, target):
    """Prefix of `text` (word boundary preferred) whose tokenization has `target` ids
    (or, failing that, target..target+3 ids)."""
    words = text.split(" ")
    best = None
    for i in range(1, len(words) + 1):
        p = " ".join(words[:i])
        n = n_tokens(tok, p)
        if n == target:
            return p
        if n > target:
            break
        best = p
    for j in range(1, len(text) + 1):
        p = text[:j]
        if p.endswith(" "):
            continue
        n = n_tokens(tok, p)
        if n == target:
            return p
        if n > target + 3:
            break
    # no exact hit: the shortest word-boundary prefix with a few more tokens
    for i in range(1, len(words) + 1):
        p = " ".join(words[:i])
        if target <= n_tokens(tok, p) <= target + 3:
            return p
    raise RuntimeError(f"no prefix with {target} tokens (best {best!r})")


def make_prompts(tok, family):
    prompts = []
    if family == "llama":
        prompts.append("")  # BOS only
    else:
        prompts.append("A")  # no BOS in the qwen family: one real token
    prompts.append("Hello, world!")
    prompts.append(prefix_with_len(tok, MEDIUM_TEXT, 17))
    prompts.append(prefix_with_len(tok, MEDIUM_TEXT, 41))
    prompts.append(prefix_with_len(tok, LONG_TEXT, 66))
    prompts.append(prefix_with_len(tok, LONG_TEXT, 130))
    prompts.append(prefix_with_len(tok, LONG_TEXT, 310))
    prompts.append(MULTIBYTE_TEXT)
    return prompts


# --------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------
def f32(x):
    """float32 value -> shortest decimal that round-trips through float32."""
    return float(str(np.float32(x)))


def f32_list(t):
    return [f32(v) for v in t.detach().float().cpu().numpy().tolist()]


@torch.no_grad()
def logits_at_last(model, ids):
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0, -1].float()


@torch.no_grad()
def greedy(model, ids, n):
    seq = list(ids)
    toks, lps, margins = [], [], []
    first = None
    for _ in range(n):
        logits = logits_at_last(model, seq)
        if first is None:
            first = logits.clone()
        top2 = torch.topk(logits, 2)
        t = int(torch.argmax(logits))
        assert t == int(top2.indices[0])
        lp = torch.log_softmax(logits, dim=-1)[t]
        toks.append(t)
        lps.append(float(lp))
        margins.append(float(top2.values[0] - top2.values[1]))
        seq.append(t)
    return first, toks, lps, margins


@torch.no_grad()
def kv_cache_generate(model, ids, n):
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=4,
        use_cache=True,
    )
    return out[0, len(ids):].tolist()


MIN_ROUTING_MARGIN = 1e-4  # between the k-th and (k+1)-th router probability of any token


def watch_routing(model):
    """Records, over every forward pass, the smallest gap between the last chosen and the first
    unchosen expert's router probability: a near tie could pick another expert on another
    machine's rounding, which no logit margin would reveal."""
    seen = {"min": float("inf")}

    def hook(module, _inputs, output):
        probs = torch.softmax(output[0].float(), dim=-1).sort(dim=-1, descending=True).values
        k = module.top_k
        seen["min"] = min(seen["min"], float((probs[:, k - 1] - probs[:, k]).min()))

    for m in model.modules():
        if type(m).__name__.endswith("TopKRouter"):
            m.register_forward_hook(hook)
    return seen


def evaluate(model, hf_tok, prompts):
    """Returns (entries, min_margin, ok, why)."""
    entries = []
    min_margin = float("inf")
    why = []
    routing = watch_routing(model)
    for text in prompts:
        ids = hf_tok(text)["input_ids"]
        first, toks, lps, margins = greedy(model, ids, MAX_NEW_TOKENS)
        m = min(margins)
        min_margin = min(min_margin, m)
        if m < MIN_MARGIN:
            why.append(f"margin {m:.2e} for prompt of {len(ids)} tokens")
        if len(set(toks)) < 4:
            why.append(f"degenerate greedy ({len(set(toks))} distinct) for {len(ids)} tokens")
        probs = torch.softmax(first, -1)
        entries.append(dict(
            prompt_text=text,
            prompt_ids=ids,
            n_prompt_tokens=len(ids),
            last_logits=f32_list(first),
            last_logits_argmax=int(torch.argmax(first)),
            greedy_ids=toks,
            greedy_text=hf_tok.decode(toks),
            greedy_text_skip_special=hf_tok.decode(toks, skip_special_tokens=True),
            full_text=hf_tok.decode(ids + toks),
            greedy_logprobs=[f32(v) for v in lps],
            greedy_top2_logit_margin=[f32(v) for v in margins],
            _max_prob=float(probs.max()),
        ))
    maxp = [e["_max_prob"] for e in entries]
    if min(maxp) > 0.999:
        why.append("softmax is one-hot everywhere")
    if routing["min"] < MIN_ROUTING_MARGIN:
        why.append(f"routing margin {routing['min']:.2e}")
    return entries, min_margin, not why, why


def chat_entries(hf_tok, bos_id):
    out = []
    notes = []
    for msgs in CHAT_CASES:
        rendered = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        if not isinstance(ids, list):  # BatchEncoding in transformers 5
            ids = ids["input_ids"]
        ids = list(ids)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        plain = hf_tok(rendered, add_special_tokens=False)["input_ids"]
        with_special = hf_tok(rendered)["input_ids"]
        n_bos = ids[:2].count(bos_id) if bos_id is not None else 0
        notes.append(dict(ids_equal_tokenize_without_special=(ids == plain),
                          ids_equal_tokenize_with_special=(ids == with_special),
                          leading_bos_count=n_bos))
        out.append(dict(messages=msgs, add_generation_prompt=True, rendered=rendered,
                        prompt_ids=ids))
    return out, notes


def chat_error_case(hf_tok):
    msgs = [{"role": "tool", "content": "42"}]
    try:
        hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001
        return dict(messages=msgs, raises=True, error_type=type(e).__name__, message=str(e))
    return dict(messages=msgs, raises=False)


# --------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures"))
    ap.add_argument("--only", default=None, help="comma-separated fixture names")
    args = ap.parse_args()
    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__}
    print("versions", versions)

    base_tok = train_tokenizer()
    vocab = base_tok.get_vocab_size()
    print("tokenizer vocab", vocab)
    tok_variants = {"llama": tokenizer_variant(base_tok, True),
                    "qwen": tokenizer_variant(base_tok, False),
                    "qwen3": tokenizer_variant(base_tok, False)}

    summary = []
    only = set(args.only.split(",")) if args.only else None
    for spec in model_specs(vocab):
        if only and spec["name"] not in only:
            continue
        name = spec["name"]
        folder = os.path.join(out_root, name)
        family = spec["family"]
        seed = spec["seed"]
        for attempt in range(50):
            if os.path.exists(folder):
                shutil.rmtree(folder)
            os.makedirs(folder)
            model = make_model(spec, seed)
            save_model(model, spec, folder)
            rewrite_config_spelling(folder, spec)
            write_tokenizer(folder, tok_variants[family], family)
            bos_id = 0 if family == "llama" else None
            write_generation_config(folder, spec, bos_id)

            hf_tok = AutoTokenizer.from_pretrained(folder)
            ref_model = load_model(folder, spec)
            # on-disk config must load to the same model (same logits) as the in-memory one
            probe = hf_tok(LONG_TEXT)["input_ids"][:80]
            mem = model.eval()
            d = float((logits_at_last(mem, probe) - logits_at_last(ref_model, probe)).abs().max())
            assert d < 1e-5, f"{name}: reloaded model differs by {d}"
            rp = dict(text_config(ref_model.config).rope_parameters)
            for k, v in spec["rope"].items():
                got = rp.get(k)
                if isinstance(v, dict):  # per layer type (Gemma 3): the given keys survive
                    got = {kk: got.get(kk) for kk in v} if isinstance(got, dict) else got
                assert got == v, f"{name}: reloaded rope_parameters {rp} != {spec['rope']}"
            assert ref_model.config.tie_word_embeddings == spec["cfg"]["tie_word_embeddings"]

            prompts = make_prompts(hf_tok, family)
            entries, min_margin, ok, why = evaluate(ref_model, hf_tok, prompts)
            if ok:
                break
            print(f"  {name}: seed {seed} rejected: {why}")
            seed += 1
        else:
            raise RuntimeError(f"{name}: no acceptable seed")

        # -------- checks recorded in reference.json --------
        validation = {"reloaded_config_logits_max_abs_diff": d}
        kv_match = []
        for e in entries:
            kv = kv_cache_generate(ref_model, e["prompt_ids"], MAX_NEW_TOKENS)
            kv_match.append(kv == e["greedy_ids"])
            e.pop("_max_prob")
        validation["kv_cache_generate_matches_no_cache_greedy"] = kv_match
        if spec["cfg"].get("sliding_window") and not spec.get("multimodal"):
            long_ids = entries[6]["prompt_ids"]
            base = logits_at_last(ref_model, long_ids)
            # Families with per-layer types need a window: one longer than any prompt.
            unbounded = 10**6 if "layer_types" in spec["cfg"] or name.startswith("gemma") else None
            nowin = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                         sliding_window=unbounded).float().eval()
            assert nowin.config.sliding_window == unbounded
            alt = logits_at_last(nowin, long_ids)
            validation["sliding_window_none_long_prompt_logits_max_abs_diff"] = float(
                (base - alt).abs().max())
            # window semantics: query q attends to keys k with q - window < k <= q
            w = spec["cfg"]["sliding_window"]
            with torch.no_grad():
                att = ref_model(input_ids=torch.tensor([long_ids]), use_cache=False,
                                output_attentions=True).attentions[0][0]  # [heads, q, k]
            q = len(long_ids) - 1
            validation["sliding_window_semantics"] = (
                f"query q attends to keys k with q-{w} < k <= q ({w} keys incl. itself)")
            validation["sliding_window_attn_weights_check"] = bool(
                float(att[:, q, : q - w + 1].abs().max()) == 0.0
                and float(att[:, q, q - w + 1].min()) > 0.0)
            assert validation["sliding_window_attn_weights_check"]
            short_ids = entries[3]["prompt_ids"]
            validation["sliding_window_none_short_prompt_logits_max_abs_diff"] = float(
                (logits_at_last(ref_model, short_ids) - logits_at_last(nowin, short_ids)).abs().max())
        if spec["weights_dtype"] == "bfloat16":
            validation["note"] = ("weights stored as bf16; references computed in f32 after "
                                  "upcasting the bf16 weights (model.float())")

        chat, chat_notes = chat_entries(hf_tok, bos_id)
        verify_folder(folder, spec, entries, chat)
        with open(os.path.join(folder, "config.json")) as f:
            on_disk_cfg = json.load(f)
        ref = dict(
            name=name,
            description=describe(spec, vocab),
            architecture=spec["arch"],
            seed=seed,
            weights_dtype=spec["weights_dtype"],
            attn_implementation="eager",
            config_spelling=("old: rope_theta/rope_scaling/torch_dtype" if spec["spelling"] == "old"
                             else "new: rope_parameters/dtype"),
            compute_dtype="float32",
            versions=versions,
            generation=dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_ignored=True,
                            note="pure greedy argmax of f32 logits for exactly max_new_tokens "
                                 "steps, full forward each step (use_cache=False); EOS does "
                                 "not stop generation"),
            tokenization=("tok(text) with add_special_tokens=True: <|bos|>=0 is prepended "
                          "(the empty prompt is [0])" if family == "llama" else
                          "tok(text) with add_special_tokens=True: no BOS is added "
                          "(the 1-char prompt 'A' is one token)"),
            prompts=entries,
            min_greedy_top2_logit_margin=f32(min_margin),
            chat=chat,
            chat_note=("prompt_ids = apply_chat_template(messages, tokenize=True, "
                       "add_generation_prompt=True) as produced by transformers; checks: "
                       + json.dumps(chat_notes)),
            chat_error_case=chat_error_case(hf_tok),
            validation=validation,
        )
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")

        if spec.get("sharded_copy"):
            sfolder = os.path.join(out_root, spec["sharded_copy"])
            if os.path.exists(sfolder):
                shutil.rmtree(sfolder)
            os.makedirs(sfolder)
            save_model(model, spec, sfolder, max_shard_size="150KB")
            for fn in ("config.json", "generation_config.json", "tokenizer.json",
                       "tokenizer_config.json"):
                shutil.copy(os.path.join(folder, fn), os.path.join(sfolder, fn))
            shards = sorted(f for f in os.listdir(sfolder)
                            if f.startswith("model-") and f.endswith(".safetensors"))
            assert len(shards) >= 2 and os.path.exists(
                os.path.join(sfolder, "model.safetensors.index.json")), shards
            verify_folder(sfolder, spec, entries, chat)
            sm = load_model(sfolder)
            for a, b in zip(sm.state_dict().items(), ref_model.state_dict().items()):
                assert a[0] == b[0] and torch.equal(a[1], b[1]), (a[0], b[0])
            shard_diff = 0.0
            for e in entries:
                shard_diff = max(shard_diff, float((logits_at_last(sm, e["prompt_ids"]) -
                                                    logits_at_last(ref_model, e["prompt_ids"])).abs().max()))
                assert greedy(sm, e["prompt_ids"], MAX_NEW_TOKENS)[1] == e["greedy_ids"]
            assert shard_diff < 1e-4, shard_diff
            sval = dict(validation, sharded_vs_single_file_last_logits_max_abs_diff=shard_diff,
                        sharded_weights_bitwise_equal=True)
            sref = dict(ref, name=spec["sharded_copy"], validation=sval,
                        description=f"sharded copy ({len(shards)} shards) of " + ref["description"])
            with open(os.path.join(sfolder, "reference.json"), "w") as f:
                json.dump(sref, f, ensure_ascii=False, separators=(",", ":"))
                f.write("\n")
            print(f"  {spec['sharded_copy']}: {len(shards)} shards")

        summary.append((name, seed, [e["n_prompt_tokens"] for e in entries], min_margin,
                        on_disk_cfg.get("rope_parameters") or on_disk_cfg.get("rope_scaling"),
                        validation))
        print(f"{name}: seed {seed}, prompt lengths {summary[-1][2]}, min margin {min_margin:.4g}")
        print(f"   validation {validation}")
        print(f"   chat notes {chat_notes}")
    return 0


def verify_folder(folder, spec, entries, chat):
    """Checks on the files as written (what the Rust side will read)."""
    from safetensors import safe_open

    # raw tokenizer.json (the Rust `tokenizers` crate) agrees with transformers
    raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    for e in entries:
        assert raw.encode(e["prompt_text"]).ids == e["prompt_ids"], e["prompt_text"]
        assert raw.decode(e["greedy_ids"], skip_special_tokens=False) == e["greedy_text"]
        assert raw.decode(e["greedy_ids"]) == e["greedy_text_skip_special"]
    for c in chat:
        assert raw.encode(c["rendered"], add_special_tokens=False).ids == c["prompt_ids"]
    # weights dtype / tying
    want = {"float32": "F32", "bfloat16": "BF16"}[spec["weights_dtype"]]
    names = set()
    for fn in os.listdir(folder):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fn), "np" if want == "F32" else "pt") as f:
                for k in f.keys():
                    names.add(k)
                    sl = f.get_slice(k)
                    assert sl.get_dtype() == want, (fn, k, sl.get_dtype())
    assert ("lm_head.weight" in names) == (not spec["cfg"]["tie_word_embeddings"]), names
    # config spelling
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    if spec["spelling"] == "as saved":
        pass
    elif spec["spelling"] == "old":
        assert "rope_theta" in cfg and "rope_scaling" in cfg and "torch_dtype" in cfg
        assert "rope_parameters" not in cfg and "dtype" not in cfg
    else:
        assert "rope_parameters" in cfg and "dtype" in cfg
        assert not {"rope_theta", "rope_scaling", "torch_dtype"} & set(cfg)
    gc = transformers.GenerationConfig.from_pretrained(folder)
    assert gc.eos_token_id == spec["gen_eos"], gc.eos_token_id


def describe(spec, vocab):
    c = spec["cfg"]
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    parts = [
        f"tiny random {spec['arch']}",
        f"hidden {c['hidden_size']}", f"{c['num_hidden_layers']} layers",
        f"{c['num_attention_heads']} heads", f"{c['num_key_value_heads']} kv heads",
        f"head_dim {hd}", f"ffn {c['intermediate_size']}", f"vocab {vocab}",
        f"rope {spec['rope']}",
        f"sliding_window {c.get('sliding_window')}",
        f"tie_word_embeddings {c['tie_word_embeddings']}",
        f"weights {spec['weights_dtype']}",
    ]
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
