//! The model a cell runs: LLaVA, or Qwen2-VL / Qwen2.5-VL, chosen by the checkpoint's
//! `config.json` (`model_type`, [`detect_family`]). The searches see either through
//! [`SearchModel`]; calibration and evaluation ask each in its own prompt format (LLaVA: the
//! config's conversation template; Qwen2-VL: the checkpoint's own chat template).

use anyhow::{bail, Context, Result};
use qvlm_core::io::config::{detect_family, ModelFamily};
use qvlm_core::model::llava::{LlavaBundle, LoadOptions};
use qvlm_core::model::qwen2_vl::Qwen2VlBundle;
use qvlm_search::model::SearchModel;

use crate::config::ModelEntry;

/// A loaded model with what its prompts need.
#[derive(Debug)]
pub enum Vlm {
    Llava(LlavaBundle),
    Qwen2Vl(Qwen2VlBundle),
}

impl Vlm {
    /// Loads `entry` on `device` (outliers planted when it asks; LLaVA only).
    pub fn load(entry: &ModelEntry, device: tch::Device) -> Result<Self> {
        let opts = LoadOptions { device, dtype: entry.dtype, clip_dir: entry.clip.clone() };
        let context = || format!("loading model `{}` from {}", entry.name, entry.path.display());
        let config = entry.path.join("config.json");
        let family = if config.is_file() {
            detect_family(&config).with_context(context)?
        } else {
            // Original LLaVA directories are recognised by the LLaVA loader (its error names
            // what is missing).
            ModelFamily::Llava
        };
        match family {
            ModelFamily::Llava => {
                let mut bundle = LlavaBundle::load(&entry.path, &opts).with_context(context)?;
                entry.plant(&mut bundle.model)?;
                Ok(Vlm::Llava(bundle))
            }
            ModelFamily::Qwen2Vl => {
                if entry.plants_outliers() {
                    bail!(
                        "model `{}` ({}): `outliers` and `shifted_outliers` plant LLaVA's outlier channels; they are not defined for Qwen2-VL",
                        entry.name,
                        entry.path.display()
                    );
                }
                Ok(Vlm::Qwen2Vl(Qwen2VlBundle::load(&entry.path, &opts).with_context(context)?))
            }
        }
    }

    pub fn search_model(&self) -> &dyn SearchModel {
        match self {
            Vlm::Llava(b) => &b.model,
            Vlm::Qwen2Vl(b) => &b.model,
        }
    }

    pub fn search_model_mut(&mut self) -> &mut dyn SearchModel {
        match self {
            Vlm::Llava(b) => &mut b.model,
            Vlm::Qwen2Vl(b) => &mut b.model,
        }
    }

    /// `llava`, `qwen2_vl`.
    pub fn family(&self) -> &'static str {
        self.search_model().family()
    }
}
