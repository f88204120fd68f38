//! Model shapes the bench builds: LLaVA-1.5-7B/13B (CLIP ViT-L/14-336, `mlp2x_gelu` projector,
//! LLaMA decoder) and Qwen2-VL-7B (its 675M-parameter ViT, the patch merger, the Qwen2-7B decoder
//! with grouped-query attention and a q/k/v bias) as presets, or custom `[[shape]]` tables (the
//! tests' tiny shapes).

use qvlm_core::io::config::{
    Activation, CheckpointFormat, ClipVisionConfig, LlamaConfig, LlavaConfig, ProjectorKind,
    Qwen2VisionConfig, Qwen2VisionKind, Qwen2VlConfig, RopeScaling, SelectFeature,
};
use serde::{Deserialize, Serialize};

/// Largest width, vocabulary or head count a shape may have (2^20).
pub const MAX_WIDTH: i64 = 1 << 20;
/// Largest layer count of either tower.
pub const MAX_LAYERS: i64 = 1 << 12;
/// Largest image side in pixels.
pub const MAX_IMAGE: i64 = 1 << 14;

/// Which model a shape builds.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ShapeFamily {
    /// CLIP tower, `mlp2x_gelu` projector, LLaMA decoder.
    #[default]
    Llava,
    /// Qwen2-VL's ViT (patches of 2×14×14 pixels, merged 2×2), the patch merger, the Qwen2
    /// decoder (q/k/v bias, M-RoPE). `image_size` is the side of the square image a prefill with
    /// an image feeds it; `vision_intermediate` is `mlp_ratio · vision_hidden`.
    Qwen2Vl,
}

/// Every dimension that sets a model's weight shapes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShapeDims {
    pub name: String,
    #[serde(default)]
    pub family: ShapeFamily,
    pub vision_hidden: i64,
    pub vision_layers: i64,
    pub vision_heads: i64,
    pub vision_intermediate: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub text_hidden: i64,
    pub text_layers: i64,
    pub text_heads: i64,
    /// Key/value heads of the decoder (grouped-query attention); absent: `text_heads`.
    #[serde(default)]
    pub text_kv_heads: Option<i64>,
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
        let kv = self.kv_heads();
        if kv < 1 || self.text_heads % kv != 0 {
            return Err("text_kv_heads must divide text_heads".into());
        }
        if self.family == ShapeFamily::Qwen2Vl {
            if (self.vision_hidden / self.vision_heads) % 4 != 0 {
                return Err(
                    "Qwen2-VL's axial rotary needs a vision head size divisible by 4".into()
                );
            }
            if self.text_hidden / self.text_heads < 6 {
                return Err("M-RoPE needs a text head size of at least 6".into());
            }
            if self.vision_intermediate % self.vision_hidden != 0 {
                return Err(
                    "Qwen2-VL's vision_intermediate must be a multiple of vision_hidden".into()
                );
            }
            if self.image_size % (2 * self.patch_size) != 0 {
                return Err("Qwen2-VL's image_size must be whole 2×2 blocks of patches".into());
            }
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> i64 {
        self.text_kv_heads.unwrap_or(self.text_heads)
    }

    /// Width of the decoder's keys and values (`kv_heads · head_dim`).
    fn kv_width(&self) -> i64 {
        self.kv_heads() * (self.text_hidden / self.text_heads)
    }

    /// Parameters of the whole model with `layers` decoder layers (all vision layers), as
    /// [`qvlm_core::model::llava::Llava::build`] / [`qvlm_core::model::qwen2_vl::Qwen2Vl::build`]
    /// create them.
    pub fn parameters(&self, layers: i64) -> i64 {
        let (vh, vi, th) = (self.vision_hidden, self.vision_intermediate, self.text_hidden);
        let text = 2 * self.vocab * th + th + layers * self.decoder_layer_parameters();
        match self.family {
            ShapeFamily::Llava => {
                let patches = (self.image_size / self.patch_size).pow(2);
                let vision_layer = 4 * (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh) + 4 * vh;
                let vision = vh * 3 * self.patch_size.pow(2)
                    + vh
                    + (patches + 1) * vh
                    + 2 * vh
                    + self.vision_layers * vision_layer
                    + 2 * vh;
                let projector = vh * th + th + th * th + th;
                vision + projector + text
            }
            ShapeFamily::Qwen2Vl => {
                // Conv3d without bias; per block two LayerNorms, fused qkv, proj, fc1, fc2 (all
                // with bias); the merger's LayerNorm and two linears over 2×2 merged patches.
                let block = 4 * vh
                    + (3 * vh * vh + 3 * vh)
                    + (vh * vh + vh)
                    + (vh * vi + vi)
                    + (vi * vh + vh);
                let merged = 4 * vh;
                let merger = 2 * vh + (merged * merged + merged) + (merged * th + th);
                vh * 3 * 2 * self.patch_size.pow(2) + self.vision_layers * block + merger + text
            }
        }
    }

    /// Parameters of one decoder layer: q/k/v/o and the three MLP linears, two norms, and
    /// Qwen2's q/k/v biases.
    pub fn decoder_layer_parameters(&self) -> i64 {
        let (h, i, kv) = (self.text_hidden, self.text_intermediate, self.kv_width());
        let biases = match self.family {
            ShapeFamily::Llava => 0,
            ShapeFamily::Qwen2Vl => h + 2 * kv,
        };
        2 * h * h + 2 * kv * h + 3 * h * i + 2 * h + biases
    }

    /// The `[out, in]` shapes of one decoder layer's linears (q, k, v, o, gate, up, down).
    pub fn decoder_linear_shapes(&self) -> [(i64, i64); 7] {
        let (h, i, kv) = (self.text_hidden, self.text_intermediate, self.kv_width());
        [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    }
}

/// A named shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub name: String,
    pub dims: ShapeDims,
}

impl Shape {
    pub const PRESETS: [&'static str; 3] = ["llava-7b", "llava-13b", "qwen2-vl-7b"];

    /// A preset by name, else the custom shape of that name.
    pub fn resolve(name: &str, custom: &[ShapeDims]) -> Option<Shape> {
        let dims = match name {
            "llava-7b" => llava(name, 4096, 32, 32, 11008),
            "llava-13b" => llava(name, 5120, 40, 40, 13824),
            "qwen2-vl-7b" => qwen2_vl_7b(name),
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
                num_key_value_heads: d.kv_heads(),
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

    /// A Qwen2-VL config (Qwen2-VL-7B-Instruct's settings: M-RoPE section `[16, 24, 24]` scaled
    /// to the head size, θ = 10⁶, untied head, quick-GELU ViT) with `layers` decoder layers.
    pub fn qwen2_vl_config(&self, layers: i64) -> Qwen2VlConfig {
        let d = &self.dims;
        let head_dim = d.text_hidden / d.text_heads;
        // [16, 24, 24] of 64 at head_dim 128: a quarter temporal, the rest split between rows
        // and columns.
        let half = head_dim / 2;
        let (t, h) = (half / 4, (half - half / 4) / 2);
        let vocab = d.vocab;
        Qwen2VlConfig {
            vision: Qwen2VisionConfig {
                depth: d.vision_layers,
                embed_dim: d.vision_hidden,
                hidden_size: d.text_hidden,
                num_heads: d.vision_heads,
                intermediate_size: d.vision_intermediate,
                in_channels: 3,
                patch_size: d.patch_size,
                temporal_patch_size: 2,
                spatial_merge_size: 2,
                hidden_act: Activation::QuickGelu,
                rope_theta: 10000.0,
                kind: Qwen2VisionKind::Qwen2Vl,
            },
            text: LlamaConfig {
                vocab_size: vocab,
                hidden_size: d.text_hidden,
                intermediate_size: d.text_intermediate,
                num_hidden_layers: layers,
                num_attention_heads: d.text_heads,
                num_key_value_heads: d.kv_heads(),
                head_dim,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                rope_scaling: RopeScaling::Default,
                max_position_embeddings: 32768,
                tie_word_embeddings: false,
                attention_bias: false,
                qkv_bias: true,
                mrope_section: Some([t, h, half - t - h]),
                mlp_bias: false,
                bos_token_id: None,
                eos_token_ids: vec![(vocab - 1).min(151645)],
                pad_token_id: None,
            },
            // Qwen's ids when the vocabulary has them, else the last four ids.
            image_token_id: if vocab > 151656 { 151655 } else { vocab - 4 },
            video_token_id: if vocab > 151656 { 151656 } else { vocab - 3 },
            vision_start_token_id: if vocab > 151656 { 151652 } else { vocab - 2 },
            vision_end_token_id: if vocab > 151656 { 151653 } else { vocab - 1 },
        }
    }
}

/// Qwen2-VL-7B (Qwen/Qwen2-VL-7B-Instruct's config.json): a ViT of 32 blocks, width 1280, 16
/// heads, MLP 5120, patches of 14 px; the Qwen2-7B decoder, 28 layers of width 3584, 28 query and
/// 4 key/value heads, MLP 18944, vocabulary 152064. A prefill image is 336 px square (24×24
/// patches, 144 merged tokens).
fn qwen2_vl_7b(name: &str) -> ShapeDims {
    ShapeDims {
        name: name.to_string(),
        family: ShapeFamily::Qwen2Vl,
        vision_hidden: 1280,
        vision_layers: 32,
        vision_heads: 16,
        vision_intermediate: 5120,
        image_size: 336,
        patch_size: 14,
        text_hidden: 3584,
        text_layers: 28,
        text_heads: 28,
        text_kv_heads: Some(4),
        text_intermediate: 18944,
        vocab: 152064,
    }
}

/// CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers, 16 heads, MLP 4096) + a LLaMA decoder.
fn llava(name: &str, hidden: i64, layers: i64, heads: i64, intermediate: i64) -> ShapeDims {
    ShapeDims {
        name: name.to_string(),
        family: ShapeFamily::Llava,
        text_kv_heads: None,
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

    #[test]
    fn the_qwen2_vl_7b_preset_counts_its_8_29b_parameters() {
        // Qwen/Qwen2-VL-7B-Instruct: 8,291,375,616 parameters (its safetensors index's
        // total_size / 2 bytes in bf16).
        let p = Shape::resolve("qwen2-vl-7b", &[]).map(|s| s.dims.parameters(28)).unwrap_or(0);
        assert_eq!(p, 8_291_375_616);
    }
}
