#!/usr/bin/env python3
"""A Llama-3-style byte-level BPE tokenizer as a tokenizer-only GGUF, for the GGUF loader's
`llama-bpe` pre-tokenizer.

Writes tests/fixtures/gguf/llama3-tokenizer.gguf and tests/fixtures/gguf/llama3-tokenizer.json
(the reference: prompts and the ids Hugging Face `tokenizers` gives them).

The tokenizer is trained here (tokenizers' BpeTrainer, deterministic) on a small corpus rich in
numbers, contractions, punctuation, newlines and non-Latin text, with the pre-tokenizer
transformers' TikTokenConverter gives Llama 3 (its default pattern, `\\p{N}{1,3}` digit groups,
Isolated split, then ByteLevel without a prefix space or its own regex), `ignore_merges` as
Llama 3's tokenizer.json sets it, `<|begin_of_text|>` / `<|end_of_text|>` specials and a
post-processor that adds BOS, as Llama 3's does. The GGUF holds it as llama.cpp's converter
writes Llama 3: `tokenizer.ggml.model = gpt2`, `pre = llama-bpe`, tokens, types, merges, BOS/EOS
ids and no `add_bos_token` (llama.cpp adds BOS for the llama-bpe group by default).

The reference ids come from the tokenizer.json itself, so a loader that rebuilt the wrong split
(GPT-2's `\\p{N}+`, Qwen2's single digits) or ignored `ignore_merges` fails on them; the script
checks that both wrong splits would indeed give other ids on these prompts.

Run (from the repository root; needs tokenizers, transformers and gguf):
    /tmp/bench-venv/bin/python scripts/gen_llama3_tokenizer_fixture.py
"""

import json
import pathlib

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers.convert_slow_tokenizer import TikTokenConverter

OUT = pathlib.Path("tests/fixtures/gguf")
# Llama 3's split, taken from transformers (the converter that made Llama 3's tokenizer.json).
PATTERN = TikTokenConverter.__init__.__defaults__[1]
assert r"\p{N}{1,3}" in PATTERN, PATTERN
GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2 = PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

CORPUS = [
    "In 2024 the company shipped 1234567 units, up 15% from 987654 in 2023.",
    "Call 555-0123 or 555 0199 before 10:30; the code is 40213, not 4021 or 402.",
    "I'm sure you're right, we'll see; they'd've said it's THEIR idea. DON'T, WON'T, I'M.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(12, 345))  # 357\n",
    "Ünïcödé: naïve café, 東京は大きい都市です。 Привет, мир! 12 ½ 3.14159 ٣٤٥",
    "Lists:\n- one\n- two\r\n- three\n\n   indented    text\t\ttabs",
    "The year 1999, the number 100000000, versions 3.10.12 and v2.0.1-rc3.",
    "Emoji 🙂🙃 and symbols ©®™ — dashes – and “quotes” ‘single’ …",
] * 20

PROMPTS = [
    "Hello world",
    "12345 and 1234567890",
    "The price is $1,299.99 (was 1499).",
    "I'm, you're, we'll, they'd, it's, DON'T",
    "line one\nline two\r\n\n  spaced   out\t\ttabs  ",
    "東京 café naïve 2024年12月7日",
    "print(add(12, 345))  # 357",
    "a 1 22 333 4444 55555 666666",
    "🙂 ©® — “ok” …",
    "   leading and trailing   ",
]


def pre_tokenizer(pattern):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def main():
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizer(PATTERN)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    spec = json.loads(tok.to_str())
    assert spec["model"]["ignore_merges"] is True
    # Whole words no merge reaches, as in a vocabulary converted from tiktoken's ranks (Llama
    # 3's): `ignore_merges` takes such a pre-token whole.
    for word in ["Ġspaced", "Ġtrailing", "Ġ1234"]:
        assert word not in spec["model"]["vocab"], word
        spec["model"]["vocab"][word] = len(spec["model"]["vocab"])
    ids = sorted(spec["model"]["vocab"].values())
    assert ids == list(range(len(ids))), "the vocabulary's ids must be contiguous"
    tok = Tokenizer.from_str(json.dumps(spec))

    want = [tok.encode(p).ids for p in PROMPTS]
    # The wrong splits must give other ids here, or the test could not tell them apart.
    for name, pattern in [("gpt2", GPT2), ("qwen2", QWEN2)]:
        other = Tokenizer.from_str(tok.to_str())
        other.pre_tokenizer = pre_tokenizer(pattern)
        differ = sum(other.encode(p).ids != w for p, w in zip(PROMPTS, want))
        assert differ >= 2, f"the {name} split tokenizes these prompts alike"
        print(f"{name} split: {differ} of {len(PROMPTS)} prompts tokenize otherwise")
    # And without ignore_merges.
    plain = json.loads(tok.to_str())
    plain["model"]["ignore_merges"] = False
    merged = Tokenizer.from_str(json.dumps(plain))
    differ = sum(merged.encode(p).ids != w for p, w in zip(PROMPTS, want))
    assert differ >= 2, "ignore_merges changes nothing on these prompts"
    print(f"without ignore_merges: {differ} of {len(PROMPTS)} prompts tokenize otherwise")

    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    assert all(t is not None for t in tokens)
    w = gguf.GGUFWriter(str(OUT / "llama3-tokenizer.gguf"), "llama")
    w.add_name(f"llama3-style tokenizer (gguf {getattr(gguf, '__version__', '0.x')})")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in (bos, eos) else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reference = {
        "source": "scripts/gen_llama3_tokenizer_fixture.py: tokenizers "
        + __import__("tokenizers").__version__,
        "bos_token_id": bos,
        "prompts": [{"text": p, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)} for p, ids in zip(PROMPTS, want)],
    }
    (OUT / "llama3-tokenizer.json").write_text(json.dumps(reference, ensure_ascii=False, indent=1) + "\n")
    print(f"vocab {len(tokens)}, merges {len(spec['model']['merges'])}; wrote {OUT}/llama3-tokenizer.{{gguf,json}}")


if __name__ == "__main__":
    main()
