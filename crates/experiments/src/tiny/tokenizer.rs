//! The tiny LLaVA's word-level tokenizer, saved as a standard tokenizer.json (WordLevel model,
//! `Whitespace` pre-tokenizer, BOS added by a template post-processor, `<image>` an added special
//! token) so that transformers' `PreTrainedTokenizerFast` reads it too.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{anyhow, Result};
use qvlm_core::io::prompt::{Template, IMAGE_PLACEHOLDER};
use tokenizers::decoders::wordpiece::WordPiece;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::data::easy_vqa::EasyVqa;

pub const SPECIALS: [&str; 4] = ["<unk>", "<s>", "</s>", "<pad>"];
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const PAD: u32 = 3;

/// Splits text like the `Whitespace` pre-tokenizer (`\w+|[^\w\s]+`).
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_word: Option<bool> = None;
    for ch in text.chars() {
        if ch.is_whitespace() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur_word = None;
            continue;
        }
        let is_word = ch.is_alphanumeric() || ch == '_';
        if cur_word.is_some_and(|w| w != is_word) && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
        cur_word = Some(is_word);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The vocabulary: specials, every word of the conversation templates and of easy-VQA's
/// questions and answers (sorted), then `<image>`.
pub fn build(questions: &[&str]) -> Result<Tokenizer> {
    build_with(questions, &[], &[IMAGE_PLACEHOLDER])
}

/// Qwen's chat tokens, special (added) tokens of the tiny Qwen2-VL's tokenizer.
pub const QWEN_SPECIALS: [&str; 6] = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// The tiny Qwen2-VL's vocabulary: [`build`]'s words and the chat roles, then Qwen's chat tokens
/// ([`QWEN_SPECIALS`]).
pub fn build_qwen(questions: &[&str]) -> Result<Tokenizer> {
    build_with(questions, &["user", "assistant", "system"], &QWEN_SPECIALS)
}

/// Specials, the templates' and `questions`' words, easy-VQA's answers and `words` (sorted), then
/// the special tokens `added`.
fn build_with(questions: &[&str], words_too: &[&str], added: &[&str]) -> Result<Tokenizer> {
    let mut vocab_words = BTreeSet::new();
    vocab_words.extend(words_too.iter().map(|w| w.to_string()));
    for template in [Template::LlavaV1, Template::VicunaV1] {
        vocab_words.extend(words(&template.render("")));
    }
    for q in questions {
        vocab_words.extend(words(q));
    }
    for a in EasyVqa::answers() {
        vocab_words.insert(a.to_string());
    }
    vocab_words.retain(|w| {
        !SPECIALS.contains(&w.as_str()) && !added.contains(&w.as_str()) && w != "<" && w != ">"
    });
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), i as u32);
    }
    for w in vocab_words {
        let id = vocab.len() as u32;
        vocab.insert(w, id);
    }
    for a in added {
        let id = vocab.len() as u32;
        vocab.insert(a.to_string(), id);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.with_decoder(Some(WordPiece::default()));
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| anyhow!("{e}"))?
        .try_pair("<s> $A $B")
        .map_err(|e| anyhow!("{e}"))?
        .special_tokens(vec![("<s>", BOS)])
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    tok.with_post_processor(Some(post));
    let specials: Vec<AddedToken> =
        SPECIALS.iter().chain(added).map(|s| AddedToken::from(s.to_string(), true)).collect();
    tok.add_special_tokens(specials).map_err(|e| anyhow!("{e}"))?;
    Ok(tok)
}

pub fn save(tok: &Tokenizer, path: &Path) -> Result<()> {
    tok.save(path, true).map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_the_whitespace_pre_tokenizer() {
        assert_eq!(
            words("the human's questions. USER: <image>\nwhat?"),
            [
                "the",
                "human",
                "'",
                "s",
                "questions",
                ".",
                "USER",
                ":",
                "<",
                "image",
                ">",
                "what",
                "?"
            ]
        );
    }

    #[test]
    fn tokenizer_round_trips_prompts_with_the_image_token() -> Result<()> {
        let tok = build(&["what color is the shape?"])?;
        let prompt = Template::LlavaV1.render("<image>\nwhat color is the shape?");
        let enc = tok.encode(prompt.as_str(), true).map_err(|e| anyhow!("{e}"))?;
        let ids = enc.get_ids();
        assert_eq!(ids[0], BOS);
        let image = tok.token_to_id(IMAGE_PLACEHOLDER).ok_or_else(|| anyhow!("no image token"))?;
        assert_eq!(ids.iter().filter(|&&i| i == image).count(), 1);
        assert!(!ids.contains(&0), "no unknown words in {prompt}");
        Ok(())
    }
}
