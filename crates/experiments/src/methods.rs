//! Methods: a weight format plus a search strategy, by name. Presets cover the paper's rows
//! (QLoRA, AWQ, ZeroQuant-V2, +CDM, +VEO, Q-VLM) and this project's extra strategies; a config
//! can define its own under `[[methods]]`.

use qvlm_core::model::rotation::{RotationKind, RotationSpec};
use qvlm_core::quant::spec::{Granularity, RangeMode, WeightSpec};
use qvlm_core::quant::uniform::Grid;
use qvlm_search::awq::AwqSites;
use qvlm_search::engine::WeightMethod;
use qvlm_search::gptq::GptqSettings;
use qvlm_search::partition::Threshold;
use qvlm_search::plan::{ActScheme, Scheme, TowerScheme};
use qvlm_search::smoothquant::SmoothSettings;
use qvlm_search::strategy::config::{
    BaseStrategy, BlockedConfig, CandidateGrid, EntropyPairs, Proxy, RuleKind, StrategyConfig,
    VeoConfig, VeoInit,
};
use serde::{Deserialize, Serialize};

use crate::settings::{ActSettings, Bits, QuantSettings};

/// How weights are quantized. Written `"rtn"`, `"nf4"`, `"awq"`, `"gptq"`, `"smoothquant"` (each at
/// its default settings), or as a table: `{ awq = { grid = 20, clip_steps = 11 } }`,
/// `{ gptq = { damp = 0.01, act_order = true, static_groups = true, block_size = 128 } }`,
/// `{ smoothquant = { alpha = 0.5 } }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightFormat {
    /// Round-to-nearest, group-wise (`quant.weight_group`).
    Rtn,
    /// QLoRA's NF4 (4-bit only; other widths fall back to group-wise RTN).
    Nf4,
    /// AWQ scales and clipping, then group-wise RTN.
    Awq(AwqSettings),
    /// GPTQ on group-wise (or per-channel) uniform weights ([`qvlm_search::gptq`]).
    Gptq(GptqSettings),
    /// SmoothQuant's migration (α) at the inputs that follow a norm, then group-wise RTN
    /// ([`qvlm_search::smoothquant`]).
    SmoothQuant(SmoothSettings),
}

/// AWQ's search: `grid` values of α in [0, 1] for the scales (llm-awq's `auto_scale` uses
/// `n_grid = 20`) and `clip_steps` clip ratios from 1.0 down to 0.5 (`auto_clip`'s range).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwqSettings {
    #[serde(default = "default_awq_grid")]
    pub grid: usize,
    #[serde(default = "default_awq_clip_steps")]
    pub clip_steps: usize,
    /// Which sites get a scale: `"all"` (default) or `"foldable"` (llm-awq's rule; what a
    /// compressed-tensors export needs). Left out of the hashed cell config at the default, so
    /// existing cell ids stay.
    #[serde(default, skip_serializing_if = "AwqSites::is_all")]
    pub sites: AwqSites,
}

fn default_awq_grid() -> usize {
    20
}
fn default_awq_clip_steps() -> usize {
    11
}

impl Default for AwqSettings {
    fn default() -> Self {
        Self {
            grid: default_awq_grid(),
            clip_steps: default_awq_clip_steps(),
            sites: AwqSites::All,
        }
    }
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Rtn => "rtn",
            WeightFormat::Nf4 => "nf4",
            WeightFormat::Awq(_) => "awq",
            WeightFormat::Gptq(_) => "gptq",
            WeightFormat::SmoothQuant(_) => "smoothquant",
        }
    }

    /// How the search treats the weights.
    pub fn search_method(self) -> WeightMethod {
        match self {
            WeightFormat::Awq(a) => {
                WeightMethod::Awq { grid: a.grid, clip_steps: a.clip_steps, sites: a.sites }
            }
            WeightFormat::Gptq(g) => WeightMethod::Gptq(g),
            WeightFormat::SmoothQuant(s) => WeightMethod::SmoothQuant(s),
            WeightFormat::Rtn | WeightFormat::Nf4 => WeightMethod::Plain,
        }
    }

    /// Settings out of range are errors here, before any cell runs.
    pub fn validate(self) -> anyhow::Result<()> {
        match self {
            WeightFormat::Gptq(g) => g.validate()?,
            WeightFormat::SmoothQuant(s) => s.validate()?,
            WeightFormat::Rtn | WeightFormat::Nf4 | WeightFormat::Awq(_) => {}
        }
        Ok(())
    }
}

const WEIGHT_FORMATS: &str =
    "rtn, nf4, awq, gptq, smoothquant, or a table { awq | gptq | smoothquant = { … } }";

impl Serialize for WeightFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use std::collections::BTreeMap;
        match self {
            // The bare name at the defaults, as before AWQ had settings (cell ids hash this).
            WeightFormat::Awq(a) if *a != AwqSettings::default() => {
                BTreeMap::from([("awq", a)]).serialize(s)
            }
            WeightFormat::Gptq(g) if *g != GptqSettings::default() => {
                BTreeMap::from([("gptq", g)]).serialize(s)
            }
            WeightFormat::SmoothQuant(a) if *a != SmoothSettings::default() => {
                BTreeMap::from([("smoothquant", a)]).serialize(s)
            }
            other => s.serialize_str(other.name()),
        }
    }
}

impl<'de> Deserialize<'de> for WeightFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        fn settings<T: serde::de::DeserializeOwned, E: Error>(
            name: &str,
            v: &serde_json::Value,
        ) -> Result<T, E> {
            serde_json::from_value(v.clone()).map_err(|e| E::custom(format!("{name}: {e}")))
        }
        match &value {
            serde_json::Value::String(name) => match name.as_str() {
                "rtn" => Ok(WeightFormat::Rtn),
                "nf4" => Ok(WeightFormat::Nf4),
                "awq" => Ok(WeightFormat::Awq(AwqSettings::default())),
                "gptq" => Ok(WeightFormat::Gptq(GptqSettings::default())),
                "smoothquant" => Ok(WeightFormat::SmoothQuant(SmoothSettings::default())),
                other => Err(D::Error::custom(format!(
                    "unknown weight format `{other}` ({WEIGHT_FORMATS})"
                ))),
            },
            serde_json::Value::Object(table) if table.len() == 1 => {
                let (name, v) = table.iter().next().ok_or_else(|| D::Error::custom("empty"))?;
                match name.as_str() {
                    "awq" => Ok(WeightFormat::Awq(settings("awq", v)?)),
                    "gptq" => Ok(WeightFormat::Gptq(settings("gptq", v)?)),
                    "smoothquant" => Ok(WeightFormat::SmoothQuant(settings("smoothquant", v)?)),
                    _ => Err(D::Error::custom(format!("weights: expected {WEIGHT_FORMATS}"))),
                }
            }
            _ => Err(D::Error::custom(format!("weights: expected {WEIGHT_FORMATS}"))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    pub name: String,
    pub weights: WeightFormat,
    pub strategy: StrategyConfig,
    /// ZeroQuant-V2-style dynamic per-token activation ranges in every tower.
    #[serde(default)]
    pub dynamic_activations: bool,
    /// Overrides of `quant.vision_act` / `quant.language_act` for this method (e.g. to map how
    /// granularity and static vs dynamic ranges change round-to-nearest).
    #[serde(default)]
    pub vision_act: Option<ActSettings>,
    #[serde(default)]
    pub language_act: Option<ActSettings>,
    /// A QuaRot-style rotation of the language model before the search
    /// ([`qvlm_core::model::rotation`]), e.g. `rotation = { kind = "hadamard", seed =
    /// "calibration" }` (the random signs drawn from each cell's calibration seed) or `seed = 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<MethodRotation>,
    /// How tables name the method (default: its name).
    #[serde(default)]
    pub label: Option<String>,
    /// This method's point on a one-parameter sweep (Fig. 3b): the `accuracy_vs_sweep` figure
    /// draws accuracy against `value`, one plot per `axis`. Not part of the cell id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepPoint>,
}

/// A named numeric setting a method stands for, e.g. `{ axis = "p", value = 0.99 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepPoint {
    pub axis: String,
    pub value: f64,
}

impl MethodSpec {
    pub fn strategy_name(&self) -> String {
        format!("{}/{}", self.weights.name(), self.strategy.name())
    }

    pub fn label(&self) -> String {
        self.label.clone().unwrap_or_else(|| self.name.clone())
    }

    /// The quantization scheme of a cell with these bits.
    pub fn scheme(&self, bits: Bits, q: &QuantSettings) -> anyhow::Result<Scheme> {
        let weight = if bits.w == 16 {
            None
        } else {
            let granularity = if q.weight_group == 0 {
                Granularity::PerChannel
            } else {
                Granularity::PerGroup { size: q.weight_group }
            };
            let rtn = WeightSpec::Rtn { grid: Grid::new(bits.w, q.weight_symmetric)?, granularity };
            Some(match self.weights {
                WeightFormat::Nf4 if bits.w == 4 => {
                    WeightSpec::Nf4 { block: q.nf4_block, double_quant: q.nf4_double_quant }
                }
                _ => rtn,
            })
        };
        let act = |s: ActSettings| -> Option<ActScheme> {
            let (granularity, range) = if self.dynamic_activations {
                (Granularity::PerToken, RangeMode::Dynamic)
            } else {
                (s.granularity, s.range)
            };
            (bits.a != 16).then_some(ActScheme {
                bits: bits.a,
                symmetric: s.symmetric,
                granularity,
                range,
            })
        };
        let language_act = self.language_act.unwrap_or(q.language_act);
        let vision_act = self.vision_act.unwrap_or(q.vision_act);
        let language = TowerScheme { weight, act: act(language_act) };
        let vision = if q.quantize_vision {
            TowerScheme { weight, act: act(vision_act) }
        } else {
            TowerScheme::default()
        };
        let projector = if q.quantize_projector {
            TowerScheme { weight, act: act(language_act) }
        } else {
            TowerScheme::default()
        };
        Ok(Scheme { vision, projector, language })
    }
}

/// Each tower's activation quantizer and whether an integer kernel executes it
/// ([`ActScheme::integer_kernel_executes`]): `language per_channel static: fake-quant only;
/// vision per_token static: integer kernel`, or `float`.
pub fn activation_setting(scheme: &Scheme) -> String {
    let towers = [
        ("language", scheme.language.act),
        ("projector", scheme.projector.act),
        ("vision", scheme.vision.act),
    ];
    let parts: Vec<String> = towers
        .iter()
        .filter_map(|(name, act)| act.map(|a| (name, a)))
        .map(|(name, a)| {
            let g = match a.granularity {
                Granularity::PerTensor => "per_tensor".to_string(),
                Granularity::PerChannel => "per_channel".to_string(),
                Granularity::PerToken => "per_token".to_string(),
                Granularity::PerGroup { size } => format!("per_group({size})"),
            };
            let r = match a.range {
                RangeMode::Static => "static",
                RangeMode::Dynamic => "dynamic",
            };
            let how =
                if a.integer_kernel_executes() { "integer kernel" } else { "fake-quant only" };
            format!("{name} {g} {r}: {how}")
        })
        .collect();
    if parts.is_empty() {
        "float".into()
    } else {
        parts.join("; ")
    }
}

pub const PRESETS: [&str; 22] = [
    "rtn",
    "qlora",
    "awq",
    "rtn_weights",
    "gptq",
    "smoothquant",
    "rotation",
    "rotation_gptq",
    "rotation_qvlm",
    "zeroquant",
    "seq_ratio",
    "sequential",
    "cdm",
    "cdm_quant_error",
    "cdm_released_gate",
    "veo_noent",
    "veo",
    "veo_vision_pairs",
    "qvlm_veo_then_cdm",
    "qvlm",
    "qvlm_from_cdm",
    "oracle",
];

fn blocked(proxy: Proxy, rule: RuleKind) -> BaseStrategy {
    BaseStrategy::EntropyBlocked(BlockedConfig {
        proxy,
        rule,
        h0: Threshold::Quantile(0.5),
        ..BlockedConfig::default()
    })
}

/// QLoRA's shrink ratios of min/max: 1.0, 0.95, …, 0.55.
fn lp_ratios() -> Vec<f64> {
    (0..10).map(|i| 1.0 - 0.05 * f64::from(i)).collect()
}

fn lp_init() -> BaseStrategy {
    BaseStrategy::LpInit { p: 2.4, ratios: lp_ratios() }
}

/// Where a method's rotation draws its randomness (the Hadamard's random signs, or the Gaussian of
/// a random orthogonal matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RotationSeed {
    /// `seed = 3`: the same rotation in every cell of the method.
    Fixed(u64),
    /// `seed = "calibration"`: each cell's calibration seed, so that a grid's seeds vary the
    /// rotation as well as the calibration pairs, and a row's std and paired test cover both.
    /// Two valid Hadamard matrices moved the `rotation` row of Table 1 by 0.95 points, more than
    /// its std over calibration seeds (README "Results of make table1").
    Source(SeedSource),
}

/// A named source of a seed (`"calibration"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeedSource {
    Calibration,
}

impl Default for RotationSeed {
    /// Seed 0, what a rotation without `seed` meant before seeds could follow the calibration.
    fn default() -> Self {
        Self::Fixed(0)
    }
}

/// A method's rotation: the kind and where its seed comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodRotation {
    pub kind: RotationKind,
    #[serde(default)]
    pub seed: RotationSeed,
}

impl MethodRotation {
    /// The rotation a cell with this calibration seed applies.
    pub fn spec(&self, calibration_seed: u64) -> RotationSpec {
        let seed = match self.seed {
            RotationSeed::Fixed(s) => s,
            RotationSeed::Source(SeedSource::Calibration) => calibration_seed,
        };
        RotationSpec { kind: self.kind, seed }
    }
}

/// The rotation the `rotation*` presets use: QuaRot's randomized Hadamard, its signs drawn from
/// the cell's calibration seed.
const HADAMARD: MethodRotation = MethodRotation {
    kind: RotationKind::Hadamard,
    seed: RotationSeed::Source(SeedSource::Calibration),
};

/// At most this many VEO/CDM rounds for `qvlm` (it stops earlier once the objective stops
/// falling).
const QVLM_ROUNDS: usize = 3;

/// A preset method by name.
pub fn preset(name: &str) -> Option<MethodSpec> {
    let m = |weights, strategy: StrategyConfig, label: &str| MethodSpec {
        name: name.to_string(),
        weights,
        strategy,
        dynamic_activations: false,
        vision_act: None,
        language_act: None,
        rotation: None,
        label: Some(label.to_string()),
        sweep: None,
    };
    let rotated = |spec: MethodSpec| MethodSpec { rotation: Some(HADAMARD), ..spec };
    Some(match name {
        "rtn" => m(WeightFormat::Rtn, BaseStrategy::Rtn {}.into(), "RTN"),
        "qlora" => m(WeightFormat::Nf4, lp_init().into(), "QLoRA"),
        "awq" => m(WeightFormat::Awq(AwqSettings::default()), lp_init().into(), "AWQ"),
        // The weight baselines below share QLoRA's activation ranges, so each differs from
        // `rtn_weights` by its weight method alone.
        "rtn_weights" => m(WeightFormat::Rtn, lp_init().into(), "RTN weights"),
        "gptq" => m(WeightFormat::Gptq(GptqSettings::default()), lp_init().into(), "GPTQ"),
        "smoothquant" => {
            m(WeightFormat::SmoothQuant(SmoothSettings::default()), lp_init().into(), "SmoothQuant")
        }
        "zeroquant" => MethodSpec {
            dynamic_activations: true,
            ..m(WeightFormat::Rtn, BaseStrategy::Rtn {}.into(), "ZeroQuant-V2")
        },
        // Eq. 2 on QLoRA's own candidates: differs from `qlora` by the objective alone.
        "seq_ratio" => m(
            WeightFormat::Nf4,
            BaseStrategy::Sequential { candidates: CandidateGrid::Ratio(lp_ratios()) }.into(),
            "Sequential (Eq. 2), QLoRA's ratios",
        ),
        "sequential" => m(
            WeightFormat::Nf4,
            BaseStrategy::Sequential { candidates: CandidateGrid::default() }.into(),
            "Sequential (Eq. 2)",
        ),
        "cdm" => m(WeightFormat::Nf4, blocked(Proxy::Entropy, RuleKind::Eq7).into(), "+CDM"),
        "cdm_quant_error" => m(
            WeightFormat::Nf4,
            blocked(Proxy::QuantError, RuleKind::Eq7).into(),
            "+CDM (quant-error proxy)",
        ),
        "cdm_released_gate" => m(
            WeightFormat::Nf4,
            blocked(Proxy::Entropy, RuleKind::ReleasedGate).into(),
            "+CDM (released gate)",
        ),
        // Learned clipping alone: VEO without its entropy term.
        "veo_noent" => m(
            WeightFormat::Nf4,
            StrategyConfig::Disentangled {
                veo: VeoConfig { lambda1: 0.0, ..VeoConfig::default() },
                then: lp_init(),
            },
            "+VEO (λ1 = 0)",
        ),
        "veo" => m(
            WeightFormat::Nf4,
            StrategyConfig::Disentangled { veo: VeoConfig::default(), then: lp_init() },
            "+VEO",
        ),
        "veo_vision_pairs" => m(
            WeightFormat::Nf4,
            StrategyConfig::Disentangled {
                veo: VeoConfig { entropy_pairs: EntropyPairs::Vision, ..VeoConfig::default() },
                then: lp_init(),
            },
            "+VEO (L_ent over vision pairs)",
        ),
        // VEO once (with the QLoRA-initialised plan in the loop), then CDM once.
        "qvlm_veo_then_cdm" => m(
            WeightFormat::Nf4,
            StrategyConfig::Disentangled {
                veo: VeoConfig::default(),
                then: blocked(Proxy::Entropy, RuleKind::Eq7),
            },
            "CDM + VEO (VEO, then CDM)",
        ),
        // Joint: VEO and CDM alternate, VEO with CDM's plan in the loop, while the calibration
        // objective falls.
        "qvlm" => m(
            WeightFormat::Nf4,
            StrategyConfig::Disentangled {
                veo: VeoConfig { rounds: QVLM_ROUNDS, ..VeoConfig::default() },
                then: blocked(Proxy::Entropy, RuleKind::Eq7),
            },
            "Q-VLM (CDM+VEO, joint)",
        ),
        // VEO refining the block search's own ranges (not the paper's QLoRA start), alternated
        // with it as in `qvlm`.
        "qvlm_from_cdm" => m(
            WeightFormat::Nf4,
            StrategyConfig::Disentangled {
                veo: VeoConfig { rounds: QVLM_ROUNDS, init: VeoInit::Base, ..VeoConfig::default() },
                then: blocked(Proxy::Entropy, RuleKind::Eq7),
            },
            "Q-VLM, VEO from CDM's ranges",
        ),
        // Rotation (QuaRot-style, randomized Hadamard) before each search; each differs from
        // its unrotated twin by the rotation alone.
        "rotation" => rotated(m(WeightFormat::Rtn, lp_init().into(), "Rotation, RTN weights")),
        "rotation_gptq" => rotated(m(
            WeightFormat::Gptq(GptqSettings::default()),
            lp_init().into(),
            "Rotation + GPTQ",
        )),
        "rotation_qvlm" => rotated(m(
            WeightFormat::Nf4,
            StrategyConfig::Disentangled {
                veo: VeoConfig { rounds: QVLM_ROUNDS, ..VeoConfig::default() },
                then: blocked(Proxy::Entropy, RuleKind::Eq7),
            },
            "Rotation + Q-VLM",
        )),
        "oracle" => m(
            WeightFormat::Nf4,
            BaseStrategy::Oracle { candidates: CandidateGrid::default(), window: 4 }.into(),
            "Oracle (joint windows)",
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_seed_is_fixed_or_follows_the_calibration_seed() -> anyhow::Result<()> {
        #[derive(Deserialize)]
        struct Wrap {
            rotation: MethodRotation,
        }
        let parse = |t: &str| toml::from_str::<Wrap>(t).map(|w| w.rotation);
        let fixed = parse(r#"rotation = { kind = "hadamard", seed = 3 }"#)?;
        assert_eq!(fixed.spec(7), RotationSpec { kind: RotationKind::Hadamard, seed: 3 });
        let follows = parse(r#"rotation = { kind = "random_orthogonal", seed = "calibration" }"#)?;
        assert_eq!(follows.spec(7), RotationSpec { kind: RotationKind::RandomOrthogonal, seed: 7 });
        // Without a seed: 0, as before.
        assert_eq!(parse(r#"rotation = { kind = "hadamard" }"#)?.spec(7).seed, 0);
        assert!(parse(r#"rotation = { kind = "hadamard", seed = "cell" }"#).is_err());
        // A fixed seed serializes as before (cell ids of explicit rotations are unchanged).
        assert_eq!(serde_json::to_string(&fixed)?, r#"{"kind":"hadamard","seed":3}"#);
        assert_eq!(
            serde_json::to_string(&follows)?,
            r#"{"kind":"random_orthogonal","seed":"calibration"}"#
        );
        // The presets vary the rotation with the calibration seed.
        for name in ["rotation", "rotation_gptq", "rotation_qvlm"] {
            let r = preset(name).and_then(|m| m.rotation).expect(name);
            assert_eq!(r.spec(2).seed, 2, "{name}");
        }
        Ok(())
    }

    fn weights(text: &str) -> Result<WeightFormat, String> {
        #[derive(Deserialize)]
        struct Wrap {
            weights: WeightFormat,
        }
        toml::from_str::<Wrap>(text).map(|w| w.weights).map_err(|e| e.to_string())
    }

    #[test]
    fn activation_settings_say_whether_an_integer_kernel_runs_them() -> anyhow::Result<()> {
        let q = QuantSettings::default();
        let w4a4 = Bits { w: 4, a: 4 };
        let paper = preset("qlora").map(|m| m.scheme(w4a4, &q)).transpose()?.expect("qlora");
        assert_eq!(
            activation_setting(&paper),
            "language per_channel static: fake-quant only; vision per_token static: integer kernel"
        );
        let dynamic =
            preset("zeroquant").map(|m| m.scheme(w4a4, &q)).transpose()?.expect("zeroquant");
        assert_eq!(
            activation_setting(&dynamic),
            "language per_token dynamic: integer kernel; vision per_token dynamic: integer kernel"
        );
        let weights_only =
            preset("gptq").map(|m| m.scheme(Bits { w: 4, a: 16 }, &q)).transpose()?.expect("gptq");
        assert_eq!(activation_setting(&weights_only), "float");
        Ok(())
    }

    #[test]
    fn awq_settings_live_in_the_weight_format() {
        assert_eq!(weights("weights = \"awq\""), Ok(WeightFormat::Awq(AwqSettings::default())));
        assert_eq!(weights("weights = \"nf4\""), Ok(WeightFormat::Nf4));
        let custom = weights("weights = { awq = { grid = 10 } }").expect("awq table");
        assert_eq!(
            custom,
            WeightFormat::Awq(AwqSettings { grid: 10, clip_steps: 11, sites: AwqSites::All })
        );
        assert_eq!(
            custom.search_method(),
            qvlm_search::engine::WeightMethod::Awq {
                grid: 10,
                clip_steps: 11,
                sites: AwqSites::All
            }
        );
        // At the defaults the bare name is written (cell ids of earlier runs hash it).
        let json = |w: WeightFormat| serde_json::to_string(&w).unwrap_or_default();
        assert_eq!(json(WeightFormat::Awq(AwqSettings::default())), "\"awq\"");
        assert_eq!(json(custom), r#"{"awq":{"grid":10,"clip_steps":11}}"#);
        // Only foldable sites scaled (llm-awq's rule): written, so the cell id changes.
        let foldable = weights("weights = { awq = { sites = \"foldable\" } }").expect("awq sites");
        assert_eq!(
            foldable,
            WeightFormat::Awq(AwqSettings { sites: AwqSites::Foldable, ..AwqSettings::default() })
        );
        assert_eq!(json(foldable), r#"{"awq":{"grid":20,"clip_steps":11,"sites":"foldable"}}"#);
        assert!(weights("weights = { awq = { sites = \"some\" } }").is_err());
        let gptq = weights("weights = { gptq = { act_order = true, static_groups = true } }")
            .expect("gptq table");
        let want = GptqSettings { act_order: true, static_groups: true, ..GptqSettings::default() };
        assert_eq!(gptq, WeightFormat::Gptq(want));
        assert_eq!(json(WeightFormat::Gptq(GptqSettings::default())), "\"gptq\"");
        assert_eq!(
            weights("weights = \"smoothquant\""),
            Ok(WeightFormat::SmoothQuant(SmoothSettings::default()))
        );
        let sq = weights("weights = { smoothquant = { alpha = 0.8 } }").expect("smoothquant table");
        assert_eq!(json(sq), r#"{"smoothquant":{"alpha":0.8}}"#);
        assert!(WeightFormat::SmoothQuant(SmoothSettings { alpha: 1.5 }).validate().is_err());
        for (bad, wanted) in [
            ("weights = \"gptq4\"", "unknown weight format `gptq4`"),
            ("weights = { gptq = { damping = 0.1 } }", "unknown field `damping`"),
            ("weights = { awq = { grid = 10, steps = 3 } }", "unknown field `steps`"),
            ("weights = { nf4 = {} }", "expected rtn, nf4, awq"),
            ("weights = { awq = {}, gptq = {} }", "expected rtn, nf4, awq"),
        ] {
            let err = weights(bad).expect_err(bad);
            assert!(err.contains(wanted), "{bad}: {err}");
        }
    }
}
