//! Chat templates: the Jinja template in `tokenizer_config.json`, rendered with minijinja under
//! Hugging Face's conventions (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//! `raise_exception`, Python string methods, `trim_blocks` and `lstrip_blocks`).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::EngineError;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        // Hugging Face renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source).map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        Ok(Self { env, bos_token, eos_token })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, EngineError> {
        let tmpl = self.env.get_template("chat").map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| {
            // raise_exception's message is the template author's explanation: show it plainly.
            let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.to_string());
            EngineError::ChatTemplate(detail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_messages_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML.into(), Some("<s>".into()), None).unwrap();
        let out =
            t.render(&[Message::new("system", "Be brief."), Message::new("user", " hi ")], true).unwrap();
        assert_eq!(
            out,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_prompt = t.render(&[Message::new("user", "x")], false).unwrap();
        assert!(!no_prompt.ends_with("assistant\n"));
    }

    #[test]
    fn raise_exception_surfaces_the_templates_message() {
        let t = ChatTemplate::new(CHATML.into(), None, None).unwrap();
        let e = t.render(&[Message::new("tool", "x")], true).unwrap_err().to_string();
        assert!(e.contains("unknown role tool"), "{e}");
    }

    #[test]
    fn a_broken_template_is_an_error_at_load() {
        assert!(ChatTemplate::new("{% for %}".into(), None, None).is_err());
    }
}
