//! Plan → search → apply. A [`Scheme`] says what to quantize (per tower, possibly nothing); a
//! strategy turns it into a [`QuantPlan`] — every site's activation range, every layer's weight
//! treatment, the groups it formed and why, and what the search cost — which is plain data
//! (serde) so a costly search is reused; [`apply`] puts a plan onto a model.

use std::collections::BTreeMap;

use qvlm_core::hook::LinearHook;
use qvlm_core::layer_id::{LayerId, Tower};
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::model::rotation::RotationSpec;
use qvlm_core::quant::activation::ActQuantizer;
use qvlm_core::quant::spec::{ActSpec, Clip, Granularity, RangeMode, WeightSpec};
use qvlm_core::quant::uniform::Grid;
use qvlm_core::quant::weight::QuantizedWeight;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::cost::CostReport;
use crate::error::{setting, Result, SearchError};
use crate::model::SearchModel;
use crate::site::Site;

/// How one tower's activations are quantized (the clipping range is the search's business).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActScheme {
    pub bits: u8,
    #[serde(default)]
    pub symmetric: bool,
    pub granularity: Granularity,
    pub range: RangeMode,
}

impl ActScheme {
    /// Whether an integer GEMM can execute these activations as they are: one scale per tensor
    /// or per token lies along the matmul's output rows; per-channel (or per-group) scales lie
    /// along its reduction dimension, which no integer kernel executes without folding them into
    /// the weights (SmoothQuant's trade), so those are fake-quant only.
    pub fn integer_kernel_executes(&self) -> bool {
        matches!(self.granularity, Granularity::PerTensor | Granularity::PerToken)
    }

    pub fn spec(&self, clip: Clip) -> Result<ActSpec> {
        let grid =
            Grid::new(self.bits, self.symmetric).map_err(|e| setting("act.bits", e.to_string()))?;
        Ok(ActSpec { grid, granularity: self.granularity, range: self.range, clip })
    }
}

/// What happens to one tower: weights and activations each quantized or left in float.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TowerScheme {
    #[serde(default)]
    pub weight: Option<WeightSpec>,
    #[serde(default)]
    pub act: Option<ActScheme>,
}

/// The quantization scheme of a whole LLaVA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    #[serde(default)]
    pub vision: TowerScheme,
    #[serde(default)]
    pub projector: TowerScheme,
    #[serde(default)]
    pub language: TowerScheme,
}

impl Scheme {
    pub fn tower(&self, tower: Tower) -> &TowerScheme {
        match tower {
            Tower::Vision => &self.vision,
            Tower::Projector => &self.projector,
            Tower::Language => &self.language,
        }
    }
}

/// A tensor as plain data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorData {
    pub shape: Vec<i64>,
    pub values: Vec<f32>,
}

impl TensorData {
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
        let values = Vec::<f32>::try_from(&t.reshape([-1]))?;
        Ok(Self { shape: t.size(), values })
    }

    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.values).reshape(self.shape.as_slice())
    }
}

/// A site's chosen activation quantizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteAct {
    pub spec: ActSpec,
    /// Static ranges (broadcast against the site's input), absent for dynamic ranges.
    pub range: Option<(TensorData, TensorData)>,
}

impl SiteAct {
    pub fn quantizer(&self) -> ActQuantizer {
        match &self.range {
            Some((lo, hi)) => ActQuantizer::with_range(self.spec, &lo.to_tensor(), &hi.to_tensor()),
            None => ActQuantizer { spec: self.spec, params: None },
        }
    }
}

/// What happens to one site's input and consumers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SitePlan {
    pub site: Site,
    pub act: Option<SiteAct>,
    /// AWQ's per-input-channel scale s: the input is divided by s (folded into the previous op in
    /// a deployment), the consumers' weight columns multiplied by s before quantization.
    pub input_scale: Option<TensorData>,
}

/// One linear's weight treatment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightPlan {
    pub spec: WeightSpec,
    /// Per-output-row clipping ratio of the weight range (AWQ's clip search); 1 = min–max.
    pub clip_ratio: Option<TensorData>,
    /// The integer weight a solver chose (GPTQ), when it is not a function of the float weight
    /// and the spec alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solved: Option<SolvedWeight>,
}

impl WeightPlan {
    pub fn new(spec: WeightSpec, clip_ratio: Option<TensorData>) -> Self {
        Self { spec, clip_ratio, solved: None }
    }
}

/// Integer codes as plain data: `u8` per weight, written as one base64 string in `plan.json`
/// (about 1.33 bytes per weight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Codes(pub Vec<u8>);

impl Serialize for Codes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Codes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use base64::Engine as _;
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Codes)
            .map_err(|e| serde::de::Error::custom(format!("codes: not base64 ({e})")))
    }
}

/// A uniform weight in integer form as data: codes `[out, in]` (offset by −qmin, as
/// [`QuantizedWeight::Uniform`]), scales and zero points `[out, in / group]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolvedWeight {
    pub grid: Grid,
    pub group: i64,
    pub shape: [i64; 2],
    pub codes: Codes,
    pub scale: TensorData,
    pub zero_point: TensorData,
}

impl SolvedWeight {
    pub fn from_quantized(q: &QuantizedWeight, layer: LayerId) -> Result<Self> {
        let QuantizedWeight::Uniform { grid, group, codes, scale, zero_point } = q else {
            return Err(SearchError::Unsupported {
                layer: layer.to_string(),
                reason: "only uniform weights are stored as solved codes".into(),
            });
        };
        let shape = [codes.size()[0], codes.size()[1]];
        let codes = codes.to_kind(Kind::Uint8).to_device(tch::Device::Cpu).contiguous();
        Ok(Self {
            grid: *grid,
            group: *group,
            shape,
            codes: Codes(Vec::<u8>::try_from(&codes.reshape([-1]))?),
            scale: TensorData::from_tensor(scale)?,
            zero_point: TensorData::from_tensor(zero_point)?,
        })
    }

    /// The integer weight, after checking the stored sizes agree with each other and with the
    /// layer's weight shape `expected`.
    pub fn to_quantized(&self, expected: &[i64], layer: LayerId) -> Result<QuantizedWeight> {
        let [out, inp] = self.shape;
        let groups = if self.group > 0 && inp % self.group == 0 { inp / self.group } else { -1 };
        let params = [out, groups];
        let bad = |what: String| {
            SearchError::PlanMismatch(format!("{layer}: stored solved weight: {what}"))
        };
        if expected != self.shape {
            return Err(bad(format!("shape {:?}, the model's weight is {expected:?}", self.shape)));
        }
        if groups < 1 {
            return Err(bad(format!("group {} does not divide {inp}", self.group)));
        }
        if self.codes.0.len() as i64 != out * inp {
            return Err(bad(format!("{} codes for {out}×{inp}", self.codes.0.len())));
        }
        if self.scale.shape != params || self.zero_point.shape != params {
            return Err(bad(format!(
                "scale {:?} / zero point {:?}, expected {params:?}",
                self.scale.shape, self.zero_point.shape
            )));
        }
        let (qmin, qmax) = self.grid.range();
        if let Some(c) = self.codes.0.iter().find(|&&c| i64::from(c) > qmax - qmin) {
            return Err(bad(format!("code {c} outside the {}-bit grid", self.grid.bits)));
        }
        Ok(QuantizedWeight::Uniform {
            grid: self.grid,
            group: self.group,
            codes: Tensor::from_slice(&self.codes.0).reshape([out, inp]),
            scale: self.scale.to_tensor(),
            zero_point: self.zero_point.to_tensor(),
        })
    }
}

/// Consecutive sites searched jointly, and why they were grouped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub sites: Vec<LayerId>,
    /// Dependency of each consecutive pair inside the group (or of the pair that closed it).
    pub dependencies: Vec<f64>,
    pub reason: String,
    /// Chosen candidate index per site.
    pub choice: Vec<usize>,
    /// Objective (error at the group's last site) of the chosen combination.
    pub objective: f64,
    /// The same objective at the sequential (layer-wise) solution the joint search started from.
    pub sequential_objective: f64,
}

/// Fig. 2, one calibration sample and one window of consecutive sites: the rounding functions
/// searched for this sample alone, layer-wise (each site in turn, Eq. 2) and jointly (the whole
/// window), among the window's candidates. DED = (layer-wise error − joint error) at the
/// window's last site, divided by the sample's float output energy there (≥ 0: the joint search
/// includes the layer-wise choice); beside the sample's dependency over the window (Eq. 6: the
/// sum of its consecutive pairs' conditional entropies, under the window's batch-level
/// sequential quantizers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DedPoint {
    /// The window's first site.
    pub site: LayerId,
    pub sample: usize,
    pub ded: f64,
    pub entropy: f64,
    /// Sites in the window.
    #[serde(default)]
    pub window: usize,
    /// The unnormalised errors and the energy they are divided by.
    #[serde(default)]
    pub layerwise_error: f64,
    #[serde(default)]
    pub joint_error: f64,
    #[serde(default)]
    pub energy: f64,
}

/// The result of a strategy: enough to apply it, explain it and account for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantPlan {
    pub strategy: String,
    pub scheme: Scheme,
    pub sites: Vec<SitePlan>,
    pub weights: BTreeMap<LayerId, WeightPlan>,
    pub groups: Vec<GroupRecord>,
    /// Dependency D(k, k+1) between consecutive sites (entropy or the chosen proxy), by the
    /// first site's id, when the strategy measured it.
    pub dependencies: BTreeMap<LayerId, f64>,
    pub cost: CostReport,
    /// Free-form notes (e.g. VEO's loss curve).
    pub notes: BTreeMap<String, String>,
    /// DED measurements (joint searches only).
    #[serde(default)]
    pub ded: Vec<DedPoint>,
    /// Non-finite values met in calibration activations (replaced before use; an incident).
    #[serde(default)]
    pub nonfinite_inputs: u64,
    /// What VEO measured and learned (disentangled strategies only).
    #[serde(default)]
    pub veo: Option<VeoRecord>,
    /// The model the plan was searched on; applying the plan to a model with other weights is
    /// an error ([`ModelIdentity::check`]). Absent in plans written before it was recorded.
    #[serde(default)]
    pub model: Option<ModelIdentity>,
    /// The rotation the model was searched under (QuaRot-style); [`apply`] and
    /// [`crate::pack::pack`] rotate an unrotated model the same way first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,
}

/// Which model a plan belongs to: its name as the run knew it and a hash of its weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// The run's model name (e.g. `tiny-llava-outliers`) and where it was loaded from.
    pub name: String,
    pub path: String,
    /// [`SearchModel::weights_sha256`]: every tensor's name, dtype, shape and bytes as searched on
    /// (after any outlier planting, before quantization).
    pub weights_sha256: String,
}

impl ModelIdentity {
    pub fn of(model: &dyn SearchModel, name: &str, path: &str) -> Result<Self> {
        Ok(Self { name: name.into(), path: path.into(), weights_sha256: model.weights_sha256()? })
    }

    /// An error unless `model`'s weights are the ones `plan` was searched on.
    pub fn check(plan: &QuantPlan, model: &dyn SearchModel) -> Result<()> {
        let Some(id) = &plan.model else {
            return Err(SearchError::PlanMismatch(
                "the plan records no model (it was written before plans recorded one): run the \
                 search again to get a plan that can be applied outside its run"
                    .into(),
            ));
        };
        let have = model.weights_sha256()?;
        if have != id.weights_sha256 {
            return Err(SearchError::PlanMismatch(format!(
                "the plan was searched on `{}` ({}; weights sha256 {}), this model's weights hash \
                 to {have}: a plan applies only to the model it was found on",
                id.name, id.path, id.weights_sha256
            )));
        }
        Ok(())
    }
}

/// VEO's record in a plan: per round, the Jacobian weights of Eq. 8, the loss curve and the
/// objective the rounds are compared by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VeoRecord {
    pub lambda1: f64,
    pub lambda2: f64,
    pub eta: f64,
    /// Which consecutive site pairs L_ent covers (`all`: both towers; `vision`).
    pub entropy_pairs: String,
    pub rounds: Vec<VeoRound>,
    /// The round whose plan this is (the lowest objective).
    pub chosen_round: usize,
}

/// One round: VEO on the vision ranges with the rest of the plan in the loop, then the base
/// strategy on the remaining sites.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VeoRound {
    /// w_k = ‖∂E⁽ⁿ⁾/∂X⁽ᵏ⁾‖ per quantized site (the sum over calibration batches), at the
    /// round's start, before normalisation.
    pub jacobian_norms: BTreeMap<LayerId, f64>,
    /// The weights L_ent uses: the norms normalised to mean 1 over the sites that open a pair.
    pub jacobian_weights: BTreeMap<LayerId, f64>,
    /// Mean loss per epoch, and its three terms in the first and last epoch.
    pub loss_per_epoch: Vec<f64>,
    pub first_epoch_terms: LossTerms,
    pub last_epoch_terms: LossTerms,
    /// Relative error of the final hidden states on the calibration set under the round's whole
    /// plan (what the rounds are compared by).
    pub objective: f64,
}

/// VEO's loss terms (means over a round's batches).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossTerms {
    pub reg: f64,
    pub ent: f64,
    pub err: f64,
}

/// The hook a plan puts on the model: AWQ input scaling, then activation fake-quantization.
#[derive(Debug, Default)]
pub struct PlanHook {
    sites: BTreeMap<LayerId, (Option<Tensor>, Option<ActQuantizer>)>,
}

impl PlanHook {
    pub fn new(plan: &QuantPlan) -> Self {
        let mut sites = BTreeMap::new();
        for sp in &plan.sites {
            let inv = sp.input_scale.as_ref().map(|s| s.to_tensor().reciprocal());
            let q = sp.act.as_ref().map(SiteAct::quantizer);
            for c in &sp.site.consumers {
                sites.insert(*c, (inv.as_ref().map(Tensor::shallow_clone), q.clone()));
            }
        }
        Self { sites }
    }

    /// The input scaling (1/s) and quantizer the hook applies at `consumer`, if it holds one.
    pub fn at(&self, consumer: LayerId) -> Option<(Option<&Tensor>, Option<&ActQuantizer>)> {
        self.sites.get(&consumer).map(|(inv, q)| (inv.as_ref(), q.as_ref()))
    }

    /// Replaces (or removes, with `None`) one site's quantizer — search candidates.
    pub fn set_site(
        &mut self,
        site: &Site,
        act: Option<ActQuantizer>,
        input_scale: Option<&Tensor>,
    ) {
        for c in &site.consumers {
            let inv = input_scale.map(Tensor::reciprocal);
            self.sites.insert(*c, (inv, act.clone()));
        }
    }
}

impl LinearHook for PlanHook {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        match self.sites.get(&id) {
            None => x,
            Some((inv, q)) => {
                let x = match inv {
                    Some(inv) => {
                        let inv = inv.to_device(x.device()).to_kind(x.kind());
                        x * inv
                    }
                    None => x,
                };
                match q {
                    Some(q) => q.apply(&x),
                    None => x,
                }
            }
        }
    }
}

/// Quantized weight of one linear under a plan: `Q(W · s) ` (fake-quantized, f32), with the AWQ
/// scale `s` of its site and the plan's clipping ratios, or the plan's solved codes (GPTQ).
pub fn quantize_weight(
    w: &Tensor,
    plan: &WeightPlan,
    input_scale: Option<&Tensor>,
    layer: LayerId,
) -> Result<Tensor> {
    let w = w.to_kind(Kind::Float);
    let w = match input_scale {
        Some(s) => &w * s.to_device(w.device()).unsqueeze(0),
        None => w,
    };
    if let Some(solved) = &plan.solved {
        // Solved in the scaled domain already (`W · s` when the site has a scale).
        let q = solved.to_quantized(&w.size(), layer)?;
        return Ok(q.dequantize().to_device(w.device()));
    }
    let name = layer.to_string();
    let deq = match (&plan.clip_ratio, plan.spec) {
        (Some(ratio), WeightSpec::Rtn { grid, granularity }) => {
            let r = ratio.to_tensor().to_device(w.device()).view([-1, 1]);
            crate::awq::clipped_rtn(&w, grid, granularity, &r, &name)?
        }
        _ => QuantizedWeight::quantize(&w, &plan.spec, &name)?.dequantize().to_device(w.device()),
    };
    Ok(deq)
}

/// AWQ's input scale s of every linear whose site has one, by the linear's id.
pub fn input_scales(plan: &QuantPlan) -> BTreeMap<LayerId, Tensor> {
    plan.sites
        .iter()
        .filter_map(|sp| sp.input_scale.as_ref().map(|s| (sp, s.to_tensor())))
        .flat_map(|(sp, s)| sp.site.consumers.iter().map(move |c| (*c, s.shallow_clone())))
        .collect()
}

/// Brings the model to the plan's rotation: an unrotated model is rotated as the plan says, a
/// model rotated the same way is left as it is, any other combination is an error.
pub fn ensure_rotation(model: &mut dyn SearchModel, plan: &QuantPlan) -> Result<()> {
    match (&plan.rotation, model.rotation()) {
        (None, None) => Ok(()),
        (Some(wanted), None) => model.rotate(wanted),
        (Some(wanted), Some(have)) if wanted == have => Ok(()),
        (wanted, have) => Err(SearchError::PlanMismatch(format!(
            "the plan was searched on a model with rotation {wanted:?}, this model has {have:?}"
        ))),
    }
}

/// Fake-quantizes the model's weights in place as the plan says (after rotating it when the
/// plan was searched on a rotated model); returns the hook for the activations. The model's
/// float weights are replaced: keep a copy if you need them.
pub fn apply(model: &mut dyn SearchModel, plan: &QuantPlan) -> Result<PlanHook> {
    ensure_rotation(model, plan)?;
    let scales = input_scales(plan);
    let _guard = tch::no_grad_guard();
    for linear in model.linears_mut() {
        let Some(wp) = plan.weights.get(&linear.id) else {
            if scales.contains_key(&linear.id) {
                return Err(SearchError::PlanMismatch(format!(
                    "{} has an input scale but no weight plan",
                    linear.id
                )));
            }
            continue;
        };
        let w = linear.float_weight();
        let q = quantize_weight(&w, wp, scales.get(&linear.id), linear.id)?;
        linear.weight = LinearWeight::Float(q.to_kind(w.kind()).to_device(w.device()));
    }
    Ok(PlanHook::new(plan))
}
