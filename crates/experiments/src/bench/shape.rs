//! Model shapes the bench builds: LLaVA-1.5-7B/13B (CLIP ViT-L/14-336, `mlp2x_gelu` projector,
//! LLaMA decoder) as presets, or custom `[[shape]]` tables (the tests' tiny shape).

use qvlm_core::io::config::{
    Activation, CheckpointFormat, ClipVisionConfig, LlamaConfig, LlavaConfig, ProjectorKind,
    RopeScaling, SelectFeature,
};
use serde::{Deserialize, Serialize};

/// Largest width, vocabulary or head count a shape may have (2^20).
pub const MAX_WIDTH: i64 = 1 << 20;
/// Largest layer count of either tower.
pub const MAX_LAYERS: i64 = 1 << 12;
/// Largest image side in pixels.
pub const MAX_IMAGE: i64 = 1 << 14;

/// Every dimension that sets a LLaVA model's weight shapes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShapeDims {
    pub name: String,
    pub vision_hidden: i64,
    pub vision_layers: i64,
    pub vision_heads: i64,
    pub vision_intermediate: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub text_hidden: i64,
    pub text_layers: i64,
    pub text_heads: i64,
    pub text_intermediate: i64,
    pub vocab: i64,
}

impl ShapeDims {
    /// Why these dimensions cannot make a model, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        let all = [
            self.vision_hidden,
            self.vision_layers,
            self.vision_heads,
            self.vision_intermediate,
            self.image_size,
            self.patch_size,
            self.text_hidden,
            self.text_layers,
            self.text_heads,
            self.text_intermediate,
            self.vocab,
        ];
        if all.iter().any(|&v| v < 1) {
            return Err("every dimension must be at least 1".into());
        }
        // Bounds far above any real model, so that parameter and byte counts cannot overflow.
        for (name, v, max) in [
            ("vision_layers", self.vision_layers, MAX_LAYERS),
            ("text_layers", self.text_layers, MAX_LAYERS),
            ("image_size", self.image_size, MAX_IMAGE),
        ] {
            if v > max {
                return Err(format!("{name} {v} is above {max}"));
            }
        }
        if let Some(v) = all.iter().find(|&&v| v > MAX_WIDTH) {
            return Err(format!("a dimension of {v} is above {MAX_WIDTH}"));
        }
        if self.vision_hidden % self.vision_heads != 0 {
            return Err("vision_heads must divide vision_hidden".into());
        }
        if self.text_hidden % self.text_heads != 0 || (self.text_hidden / self.text_heads) % 2 != 0
        {
            return Err("text_heads must divide text_hidden into an even head size (RoPE)".into());
        }
        if self.image_size % self.patch_size != 0 {
            return Err("patch_size must divide image_size".into());
        }
        Ok(())
    }

    /// Parameters of the whole model with `layers` decoder layers (all vision layers), as
    /// [`qvlm_core::model::llava::Llava::build`] creates them.
    pub fn parameters(&self, layers: i64) -> i64 {
        let (vh, vi) = (self.vision_hidden, self.vision_intermediate);
        let patches = (self.image_size / self.patch_size).pow(2);
        let vision_layer = 4 * (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh) + 4 * vh;
        let vision = vh * 3 * self.patch_size.pow(2)
            + vh
            + (patches + 1) * vh
            + 2 * vh
            + self.vision_layers * vision_layer
            + 2 * vh;
        let th = self.text_hidden;
        let projector = vh * th + th + th * th + th;
        let text = 2 * self.vocab * th + th + layers * self.decoder_layer_parameters();
        vision + projector + text
    }

    /// Parameters of one decoder layer: four attention and three MLP linears, two norms.
    pub fn decoder_layer_parameters(&self) -> i64 {
        let (h, i) = (self.text_hidden, self.text_intermediate);
        4 * h * h + 3 * h * i + 2 * h
    }

    /// The `[out, in]` shapes of one decoder layer's linears (q, k, v, o, gate, up, down).
    pub fn decoder_linear_shapes(&self) -> [(i64, i64); 7] {
        let (h, i) = (self.text_hidden, self.text_intermediate);
        [(h, h), (h, h), (h, h), (h, h), (i, h), (i, h), (h, i)]
    }
}

/// A named shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub name: String,
    pub dims: ShapeDims,
}

impl Shape {
    pub const PRESETS: [&'static str; 2] = ["llava-7b", "llava-13b"];

    /// A preset by name, else the custom shape of that name.
    pub fn resolve(name: &str, custom: &[ShapeDims]) -> Option<Shape> {
        let dims = match name {
            "llava-7b" => llava(name, 4096, 32, 32, 11008),
            "llava-13b" => llava(name, 5120, 40, 40, 13824),
            _ => custom.iter().find(|d| d.name == name)?.clone(),
        };
        Some(Shape { name: name.to_string(), dims })
    }

    /// A LLaVA-1.5 config (llava-hf defaults: feature layer −2 without CLS, `mlp2x_gelu`
    /// projector) with `layers` decoder layers. Nothing is tokenized, so no image token is set.
    pub fn llava_config(&self, layers: i64) -> LlavaConfig {
        let d = &self.dims;
        LlavaConfig {
            format: CheckpointFormat::Original,
            vision: ClipVisionConfig {
                hidden_size: d.vision_hidden,
                intermediate_size: d.vision_intermediate,
                num_hidden_layers: d.vision_layers,
                num_attention_heads: d.vision_heads,
                num_channels: 3,
                image_size: d.image_size,
                patch_size: d.patch_size,
                layer_norm_eps: 1e-5,
                hidden_act: Activation::QuickGelu,
            },
            text: LlamaConfig {
                vocab_size: d.vocab,
                hidden_size: d.text_hidden,
                intermediate_size: d.text_intermediate,
                num_hidden_layers: layers,
                num_attention_heads: d.text_heads,
                num_key_value_heads: d.text_heads,
                head_dim: d.text_hidden / d.text_heads,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                rope_scaling: RopeScaling::Default,
                max_position_embeddings: 4096,
                tie_word_embeddings: false,
                attention_bias: false,
                qkv_bias: false,
                mrope_section: None,
                mlp_bias: false,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                pad_token_id: None,
            },
            projector: ProjectorKind::Mlp2xGelu,
            projector_act: Activation::Gelu,
            projector_bias: true,
            image_token_id: None,
            vision_feature_layer: -2,
            select_feature: SelectFeature::Default,
            use_im_start_end: false,
            clip_source: None,
        }
    }
}

/// CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers, 16 heads, MLP 4096) + a LLaMA decoder.
fn llava(name: &str, hidden: i64, layers: i64, heads: i64, intermediate: i64) -> ShapeDims {
    ShapeDims {
        name: name.to_string(),
        vision_hidden: 1024,
        vision_layers: 24,
        vision_heads: 16,
        vision_intermediate: 4096,
        image_size: 336,
        patch_size: 14,
        text_hidden: hidden,
        text_layers: layers,
        text_heads: heads,
        text_intermediate: intermediate,
        vocab: 32000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_llava_1_5() {
        let p7 = Shape::resolve("llava-7b", &[]).map(|s| s.dims.parameters(32)).unwrap_or(0);
        let p13 = Shape::resolve("llava-13b", &[]).map(|s| s.dims.parameters(40)).unwrap_or(0);
        // LLaMA-7B 6.74e9 + CLIP-L/336 3.04e8 + projector 2.1e7; LLaMA-13B 1.30e10 + the same.
        assert!((7.0e9..7.1e9).contains(&(p7 as f64)), "{p7}");
        assert!((13.3e9..13.4e9).contains(&(p13 as f64)), "{p13}");
    }
}
