//! A model from its files to a [`arch::Model`] on a device: where the files are (`hub`), what
//! they say (`hf_config`: Hugging Face's `config.json` and `generation_config.json`; not the
//! engine's config), the tokenizer and its chat template, and the architectures (`arch`); a
//! GGUF file (`gguf`) stands in for the config, tokenizer and weights together.
//! `loader::load` does all of it and hands back a [`loader::LoadedModel`].

pub mod arch;
pub mod chat_template;
pub mod gguf;
pub mod hf_config;
pub mod hub;
pub mod loader;
pub mod tokenizer;
