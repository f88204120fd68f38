//! A checkpoint's own chat template (Jinja), rendered the way transformers'
//! `apply_chat_template` renders it
//! (<https://github.com/huggingface/transformers/blob/v5.0.0/src/transformers/utils/chat_template_utils.py>):
//! `trim_blocks` and `lstrip_blocks` on, loop controls, `raise_exception`, `tojson`, Python's
//! string methods (`.strip()`, `.startswith()`, …), and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, …) as variables beside `messages` and `add_generation_prompt`.
//!
//! Where the template lives, in transformers' order: `chat_template.jinja` (what transformers
//! ≥ 4.49 writes), `chat_template.json` (`{"chat_template": …}`, the processor's file in Qwen's
//! releases), then `tokenizer_config.json`'s `chat_template` (a string, or a list of named
//! templates of which `default` is used).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::io::config::read_json_object;

/// A chat template and the special-token variables it may use.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    /// The file the template came from (named in errors).
    pub file: PathBuf,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` from `tokenizer_config.json`.
    special_tokens: Map<String, Value>,
}

impl ChatTemplate {
    /// The template of the checkpoint in `dir`; an error naming the files looked at when there is
    /// none.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_config = dir.join("tokenizer_config.json");
        let config = if tokenizer_config.is_file() {
            read_json_object(&tokenizer_config)?
        } else {
            Map::new()
        };
        let special_tokens = special_tokens(&config);
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Ok(Self { source, file: jinja, special_tokens });
        }
        let json = dir.join("chat_template.json");
        if json.is_file() {
            let root = read_json_object(&json)?;
            let source = match root.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(Error::config(&json, "chat_template", "missing or not a string")),
            };
            return Ok(Self { source, file: json, special_tokens });
        }
        let source = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        match source {
            Some(source) => Ok(Self { source, file: tokenizer_config, special_tokens }),
            None => Err(Error::Invalid(format!(
                "{}: no chat template (looked for chat_template.jinja, chat_template.json and \
                 tokenizer_config.json's chat_template)",
                dir.display()
            ))),
        }
    }

    /// A template given as text (tests, or a template file passed by hand).
    pub fn from_source(source: &str, file: &Path) -> Self {
        Self { source: source.to_string(), file: file.to_path_buf(), special_tokens: Map::new() }
    }

    /// Renders `messages` (a JSON list of `{"role", "content"}`, content a string or a list of
    /// `{"type": "image"}` / `{"type": "text", "text": …}` parts).
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let fail = |e: minijinja::Error| Error::Tokenizer {
            file: self.file.clone(),
            reason: format!("chat template: {e:#}"),
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, _> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template("chat", &self.source).map_err(fail)?;
        let mut ctx = self.special_tokens.clone();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        let template = env.get_template("chat").map_err(fail)?;
        template.render(Value::Object(ctx)).map_err(fail)
    }

    /// One user turn: `images` image parts, then the text, as transformers' processors build it
    /// from `[{"type": "image"}, …, {"type": "text", "text": …}]`.
    pub fn user_turn(images: usize, text: &str) -> Value {
        let mut content: Vec<Value> =
            (0..images).map(|_| serde_json::json!({"type": "image"})).collect();
        content.push(serde_json::json!({"type": "text", "text": text}));
        serde_json::json!([{"role": "user", "content": content}])
    }
}

/// The special tokens transformers passes to the template, as strings (a token may be stored as
/// `{"content": …}`).
fn special_tokens(config: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        let text = match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        if let Some(text) = text {
            out.insert(key.to_string(), Value::String(text));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_trimmed_like_transformers_and_raise_exception_is_an_error() {
        // Python's jinja2 with trim_blocks + lstrip_blocks renders this as 'user: hiassistant:'
        // (the newline after each block tag and the indent before `{% if %}` are dropped).
        let t = ChatTemplate::from_source(
            "{% for m in messages %}\n  {% if m['role'] %}{{ m['role'] }}: {{ m['content'] | trim }}\
             {% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
            Path::new("inline"),
        );
        let messages = serde_json::json!([{"role": "user", "content": " hi "}]);
        assert_eq!(t.render(&messages, true).expect("render"), "user: hiassistant:");
        let t = ChatTemplate::from_source(
            "{{ raise_exception('only user turns') }}",
            Path::new("inline"),
        );
        let err = t.render(&messages, true).expect_err("raised");
        assert!(err.to_string().contains("only user turns"), "{err}");
        // Python string methods, as Qwen's and LLaMA's templates use them.
        let t = ChatTemplate::from_source(
            "{% if messages[0]['content'].strip().startswith('hi') %}yes{% endif %}",
            Path::new("inline"),
        );
        assert_eq!(t.render(&messages, false).expect("render"), "yes");
    }
}
