//! Checkpoint key layouts. The model asks for canonical names
//! (`vision_tower.encoder.layers.0.self_attn.q_proj.weight`, `multi_modal_projector.linear_1.weight`,
//! `language_model.layers.0.mlp.up_proj.weight`, `lm_head.weight`); each layout is one prefix table
//! that maps them to the stored keys. Detection looks for one probe key per tower.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::shards::ShardSet;

/// A checkpoint key layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    /// llava-hf as transformers 4.x wrote it: `language_model.model.*`, `language_model.lm_head.*`,
    /// `vision_tower.vision_model.*`, `multi_modal_projector.*`.
    HfLegacy,
    /// transformers ≥ 4.52: `model.language_model.*`, `model.vision_tower.vision_model.*`,
    /// `model.multi_modal_projector.*`, `lm_head.*`.
    HfModelPrefixed,
    /// transformers 5.x: like `HfLegacy` but `vision_tower.*` without `vision_model`.
    HfFlatVision,
    /// Original LLaVA (liuhaotian; Q-VLM's checkpoints): `model.*`, `model.mm_projector.*`,
    /// `lm_head.*` in store 0, and the CLIP tower (`vision_model.*`) in a separate store 1.
    /// `linear_projector`: `mm_projector_type = "linear"` stores `model.mm_projector.{weight,bias}`;
    /// `mlp2x_gelu` stores `model.mm_projector.{0,2}.*`.
    Original { linear_projector: bool },
    /// Qwen2-VL as Qwen released it and transformers 5.x writes it: `visual.*` (vision tower and
    /// merger), `model.*` (the language model), `lm_head.*`. Canonical names: `visual.`,
    /// `language_model.`, `lm_head.`.
    Qwen2Vl,
    /// Qwen2-VL as transformers 4.52–4.57 wrote it: `model.visual.*`, `model.language_model.*`,
    /// `lm_head.*`.
    Qwen2VlModelPrefixed,
}

/// (canonical prefix, store, stored prefix), first match wins.
type Rule = (&'static str, usize, &'static str);

impl Naming {
    fn rules(self) -> &'static [Rule] {
        match self {
            Naming::HfLegacy => &[
                ("vision_tower.", 0, "vision_tower.vision_model."),
                ("multi_modal_projector.", 0, "multi_modal_projector."),
                ("language_model.", 0, "language_model.model."),
                ("lm_head.", 0, "language_model.lm_head."),
            ],
            Naming::HfModelPrefixed => &[
                ("vision_tower.", 0, "model.vision_tower.vision_model."),
                ("multi_modal_projector.", 0, "model.multi_modal_projector."),
                ("language_model.", 0, "model.language_model."),
                ("lm_head.", 0, "lm_head."),
            ],
            Naming::HfFlatVision => &[
                ("vision_tower.", 0, "vision_tower."),
                ("multi_modal_projector.", 0, "multi_modal_projector."),
                ("language_model.", 0, "language_model.model."),
                ("lm_head.", 0, "language_model.lm_head."),
            ],
            Naming::Original { linear_projector: true } => &[
                ("vision_tower.", 1, "vision_model."),
                ("multi_modal_projector.linear_1.", 0, "model.mm_projector."),
                ("language_model.", 0, "model."),
                ("lm_head.", 0, "lm_head."),
            ],
            Naming::Qwen2Vl => &[
                ("visual.", 0, "visual."),
                ("language_model.", 0, "model."),
                ("lm_head.", 0, "lm_head."),
            ],
            Naming::Qwen2VlModelPrefixed => &[
                ("visual.", 0, "model.visual."),
                ("language_model.", 0, "model.language_model."),
                ("lm_head.", 0, "lm_head."),
            ],
            Naming::Original { linear_projector: false } => &[
                ("vision_tower.", 1, "vision_model."),
                ("multi_modal_projector.linear_1.", 0, "model.mm_projector.0."),
                ("multi_modal_projector.linear_2.", 0, "model.mm_projector.2."),
                ("language_model.", 0, "model."),
                ("lm_head.", 0, "lm_head."),
            ],
        }
    }

    /// The store index and stored key of a canonical name.
    pub fn stored_key(self, canonical: &str) -> (usize, String) {
        for &(from, store, to) in self.rules() {
            if let Some(rest) = canonical.strip_prefix(from) {
                return (store, format!("{to}{rest}"));
            }
        }
        (0, canonical.to_string())
    }

    /// Stored keys that no module reads and that are not an error to leave unused: derived buffers
    /// (`rotary_emb.inv_freq`, `position_ids`) and, in a full CLIPModel directory, the text tower.
    pub fn ignorable(self, store: usize, key: &str) -> bool {
        if key.ends_with(".rotary_emb.inv_freq") || key.ends_with("embeddings.position_ids") {
            return true;
        }
        matches!(self, Naming::Original { .. })
            && store == 1
            && (key.starts_with("text_model.")
                || key == "text_projection.weight"
                || key == "visual_projection.weight"
                || key == "logit_scale")
    }

    /// Picks the Qwen2-VL layout whose probe keys the stores hold.
    pub fn detect_qwen2_vl(set: &ShardSet, file_hint: &std::path::Path) -> Result<Naming> {
        const PROBE_VISION: &str = "visual.patch_embed.proj.weight";
        const PROBE_TEXT: &str = "language_model.embed_tokens.weight";
        for naming in [Naming::Qwen2Vl, Naming::Qwen2VlModelPrefixed] {
            if set.contains(&naming.stored_key(PROBE_VISION).1)
                && set.contains(&naming.stored_key(PROBE_TEXT).1)
            {
                return Ok(naming);
            }
        }
        Err(Error::Safetensors {
            file: file_hint.to_path_buf(),
            reason: "no known Qwen2-VL key layout: expected `visual.patch_embed.proj.weight` + \
                     `model.embed_tokens.weight` (Qwen's release, transformers 5.x) or \
                     `model.visual.…` + `model.language_model.embed_tokens.weight` (4.52–4.57)"
                .into(),
        })
    }

    /// Picks the llava-hf layout whose probe keys the stores hold.
    pub fn detect_hf(set: &ShardSet, file_hint: &std::path::Path) -> Result<Naming> {
        const PROBE_VISION: &str = "vision_tower.embeddings.patch_embedding.weight";
        const PROBE_TEXT: &str = "language_model.embed_tokens.weight";
        for naming in [Naming::HfLegacy, Naming::HfModelPrefixed, Naming::HfFlatVision] {
            let vision = naming.stored_key(PROBE_VISION).1;
            let text = naming.stored_key(PROBE_TEXT).1;
            if set.contains(&vision) && set.contains(&text) {
                return Ok(naming);
            }
        }
        Err(Error::Safetensors {
            file: file_hint.to_path_buf(),
            reason: "no known llava-hf key layout: expected e.g. \
                     `vision_tower.vision_model.embeddings.patch_embedding.weight` + \
                     `language_model.model.embed_tokens.weight` (transformers 4.x), \
                     `model.vision_tower.vision_model.…` + `model.language_model.embed_tokens.weight` \
                     (≥ 4.52) or `vision_tower.embeddings.…` (5.x)"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_map_canonical_names() {
        let q = "language_model.layers.3.self_attn.q_proj.weight";
        assert_eq!(
            Naming::HfLegacy.stored_key(q).1,
            "language_model.model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            Naming::HfModelPrefixed.stored_key(q).1,
            "model.language_model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            Naming::Original { linear_projector: true }.stored_key(q).1,
            "model.layers.3.self_attn.q_proj.weight"
        );
        let v = "vision_tower.encoder.layers.0.mlp.fc1.weight";
        assert_eq!(
            Naming::HfFlatVision.stored_key(v).1,
            "vision_tower.encoder.layers.0.mlp.fc1.weight"
        );
        assert_eq!(
            Naming::Original { linear_projector: false }.stored_key(v),
            (1, "vision_model.encoder.layers.0.mlp.fc1.weight".to_string())
        );
        let p = "multi_modal_projector.linear_2.bias";
        assert_eq!(
            Naming::Original { linear_projector: false }.stored_key(p).1,
            "model.mm_projector.2.bias"
        );
        assert_eq!(
            Naming::Original { linear_projector: true }
                .stored_key("multi_modal_projector.linear_1.weight")
                .1,
            "model.mm_projector.weight"
        );
        assert_eq!(
            Naming::HfLegacy.stored_key("lm_head.weight").1,
            "language_model.lm_head.weight"
        );
    }

    #[test]
    fn only_derived_buffers_and_clip_text_tower_are_ignorable() {
        let orig = Naming::Original { linear_projector: true };
        assert!(orig.ignorable(1, "text_model.encoder.layers.0.mlp.fc1.weight"));
        assert!(!orig.ignorable(0, "text_model.encoder.layers.0.mlp.fc1.weight"));
        assert!(Naming::HfLegacy
            .ignorable(0, "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"));
        assert!(
            !Naming::HfLegacy.ignorable(0, "language_model.model.layers.0.self_attn.q_proj.weight")
        );
    }
}
