#!/usr/bin/env python3
"""Generate tiny random sentence-transformers embedding checkpoints + their reference vectors.

What it makes (under tests/fixtures/):
  embed_qwen3_last/  a bare Qwen3Model (weights at the root: `embed_tokens.weight`,
                     `layers.N.*`, no head), modules.json with Transformer, Pooling
                     (last token) and Normalize, and `matryoshka_dimensions` in config.json,
                     as Qwen3-Embedding ships.
  embed_llama_mean/  a bare LlamaModel with mean pooling and no Normalize module, its
                     config untied (`tie_word_embeddings: false`): a checkpoint with no head
                     at all, as e5-mistral-style models ship. Its 1_Pooling/config.json is
                     rewritten in the spelling of sentence-transformers before 6
                     (`pooling_mode_mean_tokens: true` ...), which hub checkpoints have.

Each folder is what `SentenceTransformer.save` writes, with sentence_bert_config.json in the
spelling of the versions before 6 (no `modality_config`, which would wrap each text in the
chat template; hub checkpoints have the old one) and no chat template, plus reference.json: for each input
text, the token ids sentence-transformers fed the model and `encode()`'s vector (batch size
1, so no padding is involved), and for the Matryoshka fixture the vectors truncated to each
width and normalised again. The tokenizers are the ones tests/fixtures/qwen3 and llama use.

    /tmp/tf-venv/bin/python scripts/gen_embedding_fixtures.py   # torch transformers sentence-transformers

Generated with torch 2.15.0 (CPU), transformers 5.24.0, sentence-transformers 6.3.0.
"""

import json
import os
import shutil
import tempfile

import sentence_transformers
import torch
import transformers
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import AutoConfig, AutoModel

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl who loved to read books about the sea and the stars.",
    "Ünïcödé text: naïve café, 東京, and emoji 🙂 all in one input.",
    " ".join(["A long input that fills several KV cache blocks and several prefill chunks."] * 12),
]

SPECS = [
    dict(name="embed_qwen3_last", base="qwen3", pooling="lasttoken", normalize=True,
         matryoshka=[16, 32], tie=True, seed=11),
    dict(name="embed_llama_mean", base="llama", pooling="mean", normalize=False,
         matryoshka=None, tie=False, seed=12, legacy_pooling_config=True),
]


def make_transformer(spec, folder):
    """A random bare `…Model` saved with the base fixture's tokenizer into `folder`."""
    base = os.path.join(FIXTURES, spec["base"])
    config = AutoConfig.from_pretrained(base)
    config.architectures = None
    config.tie_word_embeddings = spec["tie"]
    torch.manual_seed(spec["seed"])
    model = AutoModel.from_config(config).eval()
    with torch.no_grad():
        # Norm weights away from 1, so that a missed or misplaced norm shows in the vector.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(base, f), folder)


def main():
    torch.set_num_threads(1)
    for spec in SPECS:
        out = os.path.join(FIXTURES, spec["name"])
        shutil.rmtree(out, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            make_transformer(spec, tmp)
            transformer = Transformer(tmp)
            pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=spec["pooling"])
            modules = [transformer, pooling] + ([Normalize()] if spec["normalize"] else [])
            st = sentence_transformers.SentenceTransformer(modules=modules, device="cpu")
            st.save(out)
        os.remove(os.path.join(out, "README.md"))  # the generated model card
        # As hub checkpoints (saved by sentence-transformers before 6) have it: text is embedded
        # as given. Version 6's `modality_config` would wrap a text in the chat template.
        os.remove(os.path.join(out, "chat_template.jinja"))
        with open(os.path.join(out, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": 1024, "do_lower_case": False}, f, indent=2)
        if spec.get("legacy_pooling_config"):
            modes = ["cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                     "weightedmean_tokens", "lasttoken"]
            legacy = {"word_embedding_dimension": transformer.get_embedding_dimension()}
            chosen = {"mean": "mean_tokens", "cls": "cls_token", "lasttoken": "lasttoken"}[spec["pooling"]]
            legacy.update({f"pooling_mode_{m}": m == chosen for m in modes})
            legacy["include_prompt"] = True
            with open(os.path.join(out, "1_Pooling", "config.json"), "w") as f:
                json.dump(legacy, f, indent=4)
        if spec["matryoshka"]:
            path = os.path.join(out, "config.json")
            with open(path) as f:
                config = json.load(f)
            config["matryoshka_dimensions"] = spec["matryoshka"]
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
        st = sentence_transformers.SentenceTransformer(out, device="cpu")
        entries = []
        for text in TEXTS:
            ids = st.tokenize([text])["input_ids"][0].tolist()
            vector = st.encode([text], batch_size=1, convert_to_tensor=True)[0]
            entry = {"text": text, "token_ids": ids, "embedding": vector.tolist()}
            if spec["matryoshka"]:
                entry["truncated"] = {
                    str(d): torch.nn.functional.normalize(
                        st.encode([text], batch_size=1, convert_to_tensor=True, truncate_dim=d)[0], dim=0
                    ).tolist()
                    for d in spec["matryoshka"]
                }
            entries.append(entry)
        reference = {
            "pooling": spec["pooling"],
            "normalize": spec["normalize"],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "sentence_transformers": sentence_transformers.__version__},
            "inputs": entries,
        }
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(reference, f, indent=1)
        print(spec["name"], sorted(os.listdir(out)), [len(e["token_ids"]) for e in entries])


if __name__ == "__main__":
    main()
