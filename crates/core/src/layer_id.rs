//! Typed identities of the quantizable linear layers. `LayerId { tower, block, slot }` is the only
//! way code names a layer — never shapes, construction order or substrings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The three parts of a LLaVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tower {
    Vision,
    Projector,
    Language,
}

impl Tower {
    pub const ALL: [Tower; 3] = [Tower::Vision, Tower::Projector, Tower::Language];

    pub fn name(self) -> &'static str {
        match self {
            Tower::Vision => "vision",
            Tower::Projector => "projector",
            Tower::Language => "language",
        }
    }
}

/// A linear layer's role inside its block, in execution order within each tower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// Attention projections (CLIP and LLaMA).
    QProj,
    KProj,
    VProj,
    /// CLIP's `out_proj`.
    OutProj,
    /// LLaMA's `o_proj`.
    OProj,
    /// CLIP MLP.
    Fc1,
    Fc2,
    /// LLaMA SwiGLU MLP.
    GateProj,
    UpProj,
    DownProj,
    /// Projector layers (`linear_1`, `linear_2`).
    Linear1,
    Linear2,
    /// The language model's head (`lm_head`), block = the decoder's layer count (it runs after
    /// the last layer). Not a search site: `Llava::linears` leaves it out.
    LmHead,
    /// Qwen2-VL's vision attention: q, k and v in one linear (`attn.qkv`) and its output
    /// (`attn.proj`).
    Qkv,
    Proj,
}

impl Slot {
    /// The checkpoint name of the layer (`q_proj`, `fc1`, `linear_1`, …).
    pub fn name(self) -> &'static str {
        match self {
            Slot::QProj => "q_proj",
            Slot::KProj => "k_proj",
            Slot::VProj => "v_proj",
            Slot::OutProj => "out_proj",
            Slot::OProj => "o_proj",
            Slot::Fc1 => "fc1",
            Slot::Fc2 => "fc2",
            Slot::GateProj => "gate_proj",
            Slot::UpProj => "up_proj",
            Slot::DownProj => "down_proj",
            Slot::Linear1 => "linear_1",
            Slot::Linear2 => "linear_2",
            Slot::LmHead => "lm_head",
            Slot::Qkv => "qkv",
            Slot::Proj => "proj",
        }
    }

    const ALL: [Slot; 15] = [
        Slot::QProj,
        Slot::KProj,
        Slot::VProj,
        Slot::OutProj,
        Slot::OProj,
        Slot::Fc1,
        Slot::Fc2,
        Slot::GateProj,
        Slot::UpProj,
        Slot::DownProj,
        Slot::Linear1,
        Slot::Linear2,
        Slot::LmHead,
        Slot::Qkv,
        Slot::Proj,
    ];
}

/// One quantizable linear layer: `language.12.down_proj`, `vision.3.fc1`, `projector.0.linear_2`.
/// Serialized as that string (so it can key JSON maps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId {
    pub tower: Tower,
    /// Encoder/decoder layer index (0 for the projector).
    pub block: u32,
    pub slot: Slot,
}

impl LayerId {
    pub const fn new(tower: Tower, block: u32, slot: Slot) -> Self {
        Self { tower, block, slot }
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.tower.name(), self.block, self.slot.name())
    }
}

impl FromStr for LayerId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Invalid(format!("`{s}` is not a layer id (e.g. `language.3.q_proj`)"));
        let mut parts = s.split('.');
        let (Some(tower), Some(block), Some(slot), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let tower = Tower::ALL.into_iter().find(|t| t.name() == tower).ok_or_else(bad)?;
        let block = block.parse().map_err(|_| bad())?;
        let slot = Slot::ALL.into_iter().find(|x| x.name() == slot).ok_or_else(bad)?;
        Ok(LayerId { tower, block, slot })
    }
}

impl Serialize for LayerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LayerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for id in [
            LayerId::new(Tower::Language, 12, Slot::DownProj),
            LayerId::new(Tower::Vision, 0, Slot::Fc1),
            LayerId::new(Tower::Projector, 0, Slot::Linear2),
            LayerId::new(Tower::Language, 32, Slot::LmHead),
        ] {
            assert_eq!(id.to_string().parse::<LayerId>().ok(), Some(id));
        }
        assert!("language.x.q_proj".parse::<LayerId>().is_err());
        let id = LayerId::new(Tower::Vision, 2, Slot::OutProj);
        let json = serde_json::to_string(&id).unwrap_or_default();
        assert_eq!(json, "\"vision.2.out_proj\"");
        assert_eq!(serde_json::from_str::<LayerId>(&json).ok(), Some(id));
        assert!("language.1.q_proj.extra".parse::<LayerId>().is_err());
    }
}
