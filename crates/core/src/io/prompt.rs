//! Tokenizer (tokenizer.json through the `tokenizers` crate), LLaVA's conversation templates, and
//! the `<image>` placeholder: a prompt becomes text pieces and image slots that the model fills
//! with image features.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The literal placeholder LLaVA puts in prompts.
pub const IMAGE_PLACEHOLDER: &str = "<image>";
const IM_START: &str = "<im_start>";
const IM_END: &str = "<im_end>";

/// Conversation templates from LLaVA's `conversation.py`
/// (<https://github.com/haotian-liu/LLaVA/blob/c121f0432da27facab705978f83c4ada465e46fd/llava/conversation.py#L231-L262>).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// The prompt is used verbatim.
    None,
    /// `conv_llava_v1` (Q-VLM's LLaVA-v1.3 ScienceQA setup).
    #[default]
    LlavaV1,
    /// `conv_vicuna_v1` (LLaVA-1.5 evaluation).
    VicunaV1,
}

impl std::str::FromStr for Template {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Template::None),
            "llava_v1" => Ok(Template::LlavaV1),
            "vicuna_v1" => Ok(Template::VicunaV1),
            other => Err(Error::Invalid(format!(
                "unknown template `{other}` (none, llava_v1, vicuna_v1)"
            ))),
        }
    }
}

impl Template {
    fn system(self) -> Option<&'static str> {
        match self {
            Template::None => None,
            Template::LlavaV1 => Some(
                "A chat between a curious human and an artificial intelligence assistant. \
                 The assistant gives helpful, detailed, and polite answers to the human's questions.",
            ),
            Template::VicunaV1 => Some(
                "A chat between a curious user and an artificial intelligence assistant. \
                 The assistant gives helpful, detailed, and polite answers to the user's questions.",
            ),
        }
    }

    /// One user turn and an open assistant turn (`SeparatorStyle.TWO`, sep " "):
    /// `"{system} USER: {message} ASSISTANT:"`.
    pub fn render(self, message: &str) -> String {
        match self.system() {
            None => message.to_string(),
            Some(system) => format!("{system} USER: {message} ASSISTANT:"),
        }
    }

    /// The user message for a question about an image, as LLaVA's eval scripts build it:
    /// `"<image>\n" + question` (wrapped in `<im_start>`/`<im_end>` when the model uses them).
    pub fn image_question(question: &str, use_im_start_end: bool) -> String {
        if use_im_start_end {
            format!("{IM_START}{IMAGE_PLACEHOLDER}{IM_END}\n{question}")
        } else {
            format!("{IMAGE_PLACEHOLDER}\n{question}")
        }
    }
}

/// A tokenized prompt: text and image slots in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Tokens(Vec<i64>),
    /// The n-th image of the prompt.
    Image(usize),
}

/// How the image placeholder reaches the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageSplice {
    /// llava-hf: `<image>` is a token of the tokenizer; a run of it (one, or already expanded to
    /// the feature count) marks an image.
    Token { id: i64, expanded_len: i64 },
    /// Original LLaVA's `tokenizer_image_token`: the prompt text is split at `<image>` and each
    /// chunk tokenized on its own (the leading BOS kept once).
    SplitText,
}

/// A tokenizer.json plus how images splice into prompts.
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    file: PathBuf,
    /// `None`: the caller places image tokens itself ([`PromptTokenizer::text_only`]).
    splice: Option<ImageSplice>,
    bos: Option<i64>,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PromptTokenizer({}, {:?})", self.file.display(), self.splice)
    }
}

impl PromptTokenizer {
    pub fn from_file(path: &Path, splice: ImageSplice, bos: Option<i64>) -> Result<Self> {
        let mut tokenizer = Self::text_only(path)?;
        if let ImageSplice::Token { id, .. } = splice {
            let known = tokenizer.tokenizer.id_to_token(id as u32);
            if known.as_deref() != Some(IMAGE_PLACEHOLDER) {
                return Err(Error::Tokenizer {
                    file: path.to_path_buf(),
                    reason: format!("the config's image token {id} is {known:?} here, not `{IMAGE_PLACEHOLDER}`"),
                });
            }
        }
        tokenizer.splice = Some(splice);
        tokenizer.bos = bos;
        Ok(tokenizer)
    }

    /// A tokenizer for text only: [`PromptTokenizer::tokenize_prompt`] is an error, the caller
    /// expands image placeholders itself (Qwen2-VL: one `<|image_pad|>` per merged image token,
    /// counted from each image's grid).
    pub fn text_only(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Tokenizer {
                file: path.to_path_buf(),
                reason: "file not found".into(),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            file: path.to_path_buf(),
            reason: format!("cannot parse: {e}"),
        })?;
        Ok(Self { tokenizer, file: path.to_path_buf(), splice: None, bos: None })
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let enc = self.tokenizer.encode(text, special).map_err(|e| Error::Tokenizer {
            file: self.file.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Plain text → ids, with the tokenizer's own post-processor (BOS for LLaMA).
    pub fn encode_text(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        self.encode(text, add_special_tokens)
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer.decode(&ids, skip_special_tokens).map_err(|e| Error::Tokenizer {
            file: self.file.clone(),
            reason: format!("cannot decode: {e}"),
        })
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.tokenizer.token_to_id(token).map(i64::from)
    }

    /// A rendered prompt → pieces. Errors if the prompt's image count differs from `n_images`.
    pub fn tokenize_prompt(&self, prompt: &str, n_images: usize) -> Result<Vec<Piece>> {
        let Some(splice) = self.splice else {
            return Err(Error::Tokenizer {
                file: self.file.clone(),
                reason: "this tokenizer has no image splice (the model places its image tokens)"
                    .into(),
            });
        };
        let pieces = match splice {
            ImageSplice::SplitText => self.split_text(prompt)?,
            ImageSplice::Token { id, expanded_len } => {
                let ids = self.encode(prompt, true)?;
                runs_to_pieces(&ids, id, expanded_len)?
            }
        };
        let found = pieces.iter().filter(|p| matches!(p, Piece::Image(_))).count();
        if found != n_images {
            return Err(Error::Prompt(format!(
                "the prompt has {found} `{IMAGE_PLACEHOLDER}` placeholder(s) but {n_images} image(s) were given"
            )));
        }
        Ok(pieces)
    }

    /// LLaVA's `tokenizer_image_token`
    /// (<https://github.com/haotian-liu/LLaVA/blob/c121f0432da27facab705978f83c4ada465e46fd/llava/mm_utils.py#L185-L204>):
    /// every chunk is tokenized with special tokens; when they start with BOS, it is kept once.
    fn split_text(&self, prompt: &str) -> Result<Vec<Piece>> {
        let chunks: Vec<Vec<i64>> =
            prompt.split(IMAGE_PLACEHOLDER).map(|c| self.encode(c, true)).collect::<Result<_>>()?;
        let starts_with_bos = match (chunks.first().and_then(|c| c.first()), self.bos) {
            (Some(&first), Some(bos)) => first == bos,
            _ => false,
        };
        let offset = usize::from(starts_with_bos);
        let mut pieces = Vec::new();
        if starts_with_bos {
            pieces.push(Piece::Tokens(vec![chunks[0][0]]));
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                pieces.push(Piece::Image(i - 1));
            }
            let body = chunk.get(offset..).unwrap_or(&[]).to_vec();
            if !body.is_empty() {
                pieces.push(Piece::Tokens(body));
            }
        }
        Ok(merge_tokens(pieces))
    }
}

/// Runs of the image token become image slots: a single token (to be expanded) or a run of exactly
/// the feature count (llava-hf's processor pre-expands).
fn runs_to_pieces(ids: &[i64], image_id: i64, expanded_len: i64) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut text = Vec::new();
    let mut i = 0;
    let mut n_images = 0;
    while i < ids.len() {
        if ids[i] != image_id {
            text.push(ids[i]);
            i += 1;
            continue;
        }
        let run = ids[i..].iter().take_while(|&&t| t == image_id).count();
        let images = if run == 1 {
            1
        } else if run as i64 % expanded_len == 0 {
            run / expanded_len as usize
        } else {
            return Err(Error::Prompt(format!(
                "a run of {run} image tokens is neither one placeholder nor a multiple of the {expanded_len} image features"
            )));
        };
        if !text.is_empty() {
            pieces.push(Piece::Tokens(std::mem::take(&mut text)));
        }
        for _ in 0..images {
            pieces.push(Piece::Image(n_images));
            n_images += 1;
        }
        i += run;
    }
    if !text.is_empty() {
        pieces.push(Piece::Tokens(text));
    }
    Ok(pieces)
}

fn merge_tokens(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for p in pieces {
        match (out.last_mut(), p) {
            (Some(Piece::Tokens(prev)), Piece::Tokens(next)) => prev.extend(next),
            (_, p) => out.push(p),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_like_llava() {
        let msg = Template::image_question("What color?", false);
        assert_eq!(msg, "<image>\nWhat color?");
        assert_eq!(
            Template::LlavaV1.render(&msg),
            "A chat between a curious human and an artificial intelligence assistant. The assistant gives \
             helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat color? ASSISTANT:"
        );
        assert!(Template::VicunaV1.render("x").starts_with("A chat between a curious user"));
        assert_eq!(Template::None.render("verbatim"), "verbatim");
    }

    #[test]
    fn image_token_runs_become_slots() -> Result<()> {
        let p = runs_to_pieces(&[1, 5, 9, 9, 9, 7], 9, 3)?;
        assert_eq!(p, vec![Piece::Tokens(vec![1, 5]), Piece::Image(0), Piece::Tokens(vec![7])]);
        let p = runs_to_pieces(&[1, 9, 7], 9, 3)?;
        assert_eq!(p, vec![Piece::Tokens(vec![1]), Piece::Image(0), Piece::Tokens(vec![7])]);
        let p = runs_to_pieces(&[9, 9, 9, 9, 9, 9], 9, 3)?;
        assert_eq!(p, vec![Piece::Image(0), Piece::Image(1)]);
        assert!(runs_to_pieces(&[1, 9, 9, 7], 9, 3).is_err());
        Ok(())
    }
}
