//! What a cell quantizes to, below the config and the methods that both use it: the bit widths
//! of a cell, and how each tower's activations and weights are quantized.

use qvlm_core::quant::spec::{Granularity, RangeMode};
use serde::{Deserialize, Serialize};

/// Bit widths of a cell; 16 means float. Written `"W4A4"` (`W<weights>A<activations>`, each 2–8
/// or 16) in configs and tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bits {
    pub w: u8,
    pub a: u8,
}

impl Bits {
    pub fn parse(s: &str) -> Option<Bits> {
        let rest = s.strip_prefix('W')?;
        let (w, a) = rest.split_once('A')?;
        let (w, a): (u8, u8) = (w.parse().ok()?, a.parse().ok()?);
        let ok = |b: u8| (2..=8).contains(&b) || b == 16;
        (ok(w) && ok(a)).then_some(Bits { w, a })
    }

    pub fn label(self) -> String {
        format!("W{}A{}", self.w, self.a)
    }
}

impl Serialize for Bits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.label())
    }
}

impl<'de> Deserialize<'de> for Bits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Bits::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("`{s}` is not W<bits>A<bits> with bits 2–8 or 16"))
        })
    }
}

/// Activation granularity and range mode of one tower.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActSettings {
    pub granularity: Granularity,
    pub range: RangeMode,
    #[serde(default)]
    pub symmetric: bool,
}

impl ActSettings {
    /// Static per-token ranges need a fixed sequence length, which the language tower lacks.
    pub fn is_static_per_token(&self) -> bool {
        self.granularity == Granularity::PerToken && self.range == RangeMode::Static
    }
}

/// Which towers are quantized and how (the bit widths come from the grid).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantSettings {
    /// Weight group size along the input dimension for RTN/AWQ weights (0 = per output channel).
    #[serde(default = "default_group")]
    pub weight_group: i64,
    /// Symmetric RTN/AWQ weight grids (zero points 0; what compressed-tensors checkpoints that
    /// transformers 5.24 can load need). Default asymmetric, as every result so far; left out of
    /// the hashed cell config when false, so existing cell ids stay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub weight_symmetric: bool,
    /// NF4 block size (QLoRA: 64) and double quantization.
    #[serde(default = "default_nf4_block")]
    pub nf4_block: i64,
    #[serde(default = "default_true")]
    pub nf4_double_quant: bool,
    /// Vision activations: per token, static (Outlier Suppression-style, as in the paper).
    #[serde(default = "default_vision_act")]
    pub vision_act: ActSettings,
    /// Language activations: per channel, static (RPTQ-style, as in the paper).
    #[serde(default = "default_language_act")]
    pub language_act: ActSettings,
    /// Quantize the projector (Q-VLM's code keeps it in float).
    #[serde(default)]
    pub quantize_projector: bool,
    /// Quantize the vision tower (the paper does; Q-VLM's released code does not).
    #[serde(default = "default_true")]
    pub quantize_vision: bool,
}

fn default_group() -> i64 {
    64
}
fn default_nf4_block() -> i64 {
    64
}
fn default_true() -> bool {
    true
}
fn default_vision_act() -> ActSettings {
    ActSettings { granularity: Granularity::PerToken, range: RangeMode::Static, symmetric: false }
}
fn default_language_act() -> ActSettings {
    ActSettings { granularity: Granularity::PerChannel, range: RangeMode::Static, symmetric: false }
}

impl Default for QuantSettings {
    fn default() -> Self {
        Self {
            weight_group: default_group(),
            weight_symmetric: false,
            nf4_block: default_nf4_block(),
            nf4_double_quant: true,
            vision_act: default_vision_act(),
            language_act: default_language_act(),
            quantize_projector: false,
            quantize_vision: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_written_as_their_label() {
        assert_eq!(Bits::parse("W4A16"), Some(Bits { w: 4, a: 16 }));
        for bad in ["W4", "W1A4", "W4A9", "w4a4", "W4A4x", "A4W4"] {
            assert_eq!(Bits::parse(bad), None, "{bad}");
        }
        let json = serde_json::to_string(&Bits { w: 6, a: 6 }).unwrap_or_default();
        assert_eq!(json, "\"W6A6\"");
        assert_eq!(serde_json::from_str::<Bits>(&json).ok(), Some(Bits { w: 6, a: 6 }));
        assert!(serde_json::from_str::<Bits>("\"W9A9\"").is_err());
    }
}
