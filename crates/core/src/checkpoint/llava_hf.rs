//! Writing a model as a llava-hf directory that transformers loads (`config.json`,
//! `model.safetensors` in the layout transformers 5.x writes, `preprocessor_config.json`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::config::{LlavaConfig, ProjectorKind, RopeScaling, SelectFeature};
use crate::io::image::{AspectMode, ImageProcessorConfig};
use crate::io::naming::Naming;
use crate::io::safetensors::write_safetensors;
use crate::model::llava::Llava;

/// transformers' `LlavaConfig.to_dict()` shape for a llava-hf checkpoint.
pub fn hf_config_json(cfg: &LlavaConfig) -> Result<Value> {
    if cfg.projector != ProjectorKind::Mlp2xGelu {
        return Err(Error::Invalid(
            "llava-hf checkpoints always use the mlp2x_gelu projector".into(),
        ));
    }
    let v = &cfg.vision;
    let t = &cfg.text;
    if (t.qkv_bias && !t.attention_bias) || t.mrope_section.is_some() {
        return Err(Error::Invalid(
            "a llava-hf checkpoint's LLaMA has neither a q/k/v-only bias nor M-RoPE (those are Qwen2's)"
                .into(),
        ));
    }
    let rope_parameters = match t.rope_scaling {
        RopeScaling::Default => json!({"rope_type": "default", "rope_theta": t.rope_theta}),
        RopeScaling::Linear { factor } => {
            json!({"rope_type": "linear", "rope_theta": t.rope_theta, "factor": factor})
        }
    };
    let eos: Value = match t.eos_token_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    Ok(json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_feature_len(),
        "projector_hidden_act": cfg.projector_act.name(),
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": match cfg.select_feature { SelectFeature::Default => "default", SelectFeature::Full => "full" },
        "tie_word_embeddings": t.tie_word_embeddings,
        "dtype": "float32",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": v.hidden_act.name(),
            "projection_dim": v.hidden_size,
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "attention_bias": t.attention_bias,
            "mlp_bias": t.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": t.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": t.pad_token_id,
        },
    }))
}

/// `preprocessor_config.json` of a CLIPImageProcessor.
pub fn preprocessor_json(p: &ImageProcessorConfig) -> Value {
    let mut v = json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": p.do_resize,
        "size": {"shortest_edge": p.shortest_edge},
        "resample": 3,
        "do_center_crop": p.do_center_crop,
        "crop_size": {"height": p.crop_height, "width": p.crop_width},
        "do_rescale": p.scaling.do_rescale,
        "rescale_factor": p.scaling.rescale_factor,
        "do_normalize": p.scaling.do_normalize,
        "image_mean": p.scaling.image_mean,
        "image_std": p.scaling.image_std,
        "do_convert_rgb": true,
    });
    if p.aspect == AspectMode::Pad {
        v["image_aspect_ratio"] = json!("pad");
    }
    v
}

pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes `config.json`, `model.safetensors` (float weights, f32) and `preprocessor_config.json`
/// into `dir`. The tokenizer is the caller's to place.
pub fn save_llava_hf(model: &Llava, images: &ImageProcessorConfig, dir: &Path) -> Result<()> {
    crate::model::rotation::refuse_rotated(model, "llava-hf export")?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let naming = Naming::HfFlatVision;
    let tensors: Vec<(String, tch::Tensor)> = model
        .named_tensors()
        .into_iter()
        .map(|(name, t)| (naming.stored_key(&name).1, t.detach().to_kind(tch::Kind::Float)))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &tensors, &meta)?;
    write_json(&dir.join("config.json"), &hf_config_json(&model.cfg)?)?;
    write_json(&dir.join("preprocessor_config.json"), &preprocessor_json(images))
}
