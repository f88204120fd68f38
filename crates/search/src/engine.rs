//! The block-by-block walk every strategy shares. For each block (transformer layer or
//! projector) it caches the block's float and quantized-prefix inputs, captures the float inputs
//! of the block's sites, quantizes the block's weights (after AWQ when asked), lets the strategy
//! decide the block's sites, and advances both paths. Weights of the block being searched are
//! swapped between float and quantized copies in place and restored at the end.

use std::collections::BTreeMap;

use qvlm_core::hook::NoHook;
use qvlm_core::layer_id::LayerId;
use qvlm_core::model::linear::LinearWeight;
use qvlm_core::quant::activation::ActQuantizer;
use qvlm_core::quant::spec::{Clip, RangeMode};
use tch::{Kind, Tensor};

use crate::calib::{CalibrationSet, Capture};
use crate::cost::{bytes_of, CostMeter};
use crate::error::{Result, SearchError};
use crate::model::{Pipeline, SearchModel};
use crate::plan::{
    quantize_weight, PlanHook, QuantPlan, Scheme, SiteAct, SitePlan, TensorData, WeightPlan,
};
use crate::site::{Block, Site};

/// Candidate clipping settings for a site.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates(pub Vec<Clip>);

/// What a strategy sees of one block.
pub struct BlockState<'e> {
    pub block: Block,
    /// Indices (into `Engine::sites`) of the block's sites, in order.
    pub site_indices: Vec<usize>,
    /// Float inputs of the block's sites (full shape).
    pub float_inputs: BTreeMap<LayerId, Tensor>,
    /// The block's quantized-path input.
    quant_in: Tensor,
    pub(crate) _marker: std::marker::PhantomData<&'e ()>,
}

/// The walk's state.
pub struct Engine<'a> {
    model: &'a mut dyn SearchModel,
    pipe: Pipeline<'a>,
    pub sites: Vec<Site>,
    pub scheme: Scheme,
    pub meter: CostMeter,
    float_weights: BTreeMap<LayerId, Tensor>,
    quant_weights: BTreeMap<LayerId, Tensor>,
    /// Decided sites, by site id.
    pub decided: BTreeMap<LayerId, SitePlan>,
    /// AWQ input scales, by site id.
    scales: BTreeMap<LayerId, TensorData>,
    pub weight_plans: BTreeMap<LayerId, WeightPlan>,
    /// Whether the block-by-block walk is in its quantized-weights state.
    quantized_loaded: bool,
    /// DED points recorded by joint searches.
    pub ded: Vec<crate::plan::DedPoint>,
    /// Float outputs `W_r x_r` (real rows) of the current block's consumers, computed once.
    float_outputs: BTreeMap<LayerId, Tensor>,
    /// Non-finite values met in captured site inputs (replaced before use).
    pub nonfinite: u64,
}

impl std::fmt::Debug for Engine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({} sites, {} decided)", self.sites.len(), self.decided.len())
    }
}

/// How the engine treats weights before activations are searched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightMethod {
    /// Round-to-nearest / NF4 as the scheme says.
    Plain,
    /// AWQ scale (grid of `grid` α values) and clip search (`clip_steps` ratios down to 0.5) at
    /// the sites `sites` says; elsewhere the clip search alone.
    Awq { grid: usize, clip_steps: usize, sites: crate::awq::AwqSites },
    /// GPTQ on the Hessian of each site's inputs on the quantized path (the inputs the
    /// reference implementation collects: earlier blocks quantized, this block in float).
    Gptq(crate::gptq::GptqSettings),
    /// SmoothQuant's migration at the sites that follow a norm, then round-to-nearest.
    SmoothQuant(crate::smoothquant::SmoothSettings),
}

impl<'a> Engine<'a> {
    pub fn new(
        model: &'a mut dyn SearchModel,
        calib: &'a CalibrationSet,
        scheme: Scheme,
    ) -> Result<Self> {
        let sites = model.sites();
        let float_weights = model.linears().iter().map(|l| (l.id, l.float_weight())).collect();
        Ok(Self {
            pipe: Pipeline::new(calib)?,
            model,
            sites,
            scheme,
            meter: CostMeter::new(),
            float_weights,
            quant_weights: BTreeMap::new(),
            decided: BTreeMap::new(),
            scales: BTreeMap::new(),
            weight_plans: BTreeMap::new(),
            quantized_loaded: false,
            ded: Vec::new(),
            float_outputs: BTreeMap::new(),
            nonfinite: 0,
        })
    }

    pub fn model(&self) -> &dyn SearchModel {
        self.model
    }

    fn load_weights(&mut self, quantized: bool) {
        if self.quantized_loaded == quantized {
            return;
        }
        let source = if quantized { &self.quant_weights } else { &self.float_weights };
        for l in self.model.linears_mut() {
            if let Some(w) = source.get(&l.id).or_else(|| self.float_weights.get(&l.id)) {
                l.weight = LinearWeight::Float(w.shallow_clone());
            }
        }
        self.quantized_loaded = quantized;
    }

    /// Hook of every decided site plus `overrides` (site id → quantizer; `None` = float).
    pub fn hook_with(&self, overrides: &BTreeMap<LayerId, Option<ActQuantizer>>) -> PlanHook {
        let plan_sites: Vec<SitePlan> = self.decided.values().cloned().collect();
        let mut hook = PlanHook::new(&QuantPlan {
            strategy: String::new(),
            scheme: self.scheme,
            sites: plan_sites,
            weights: BTreeMap::new(),
            groups: vec![],
            dependencies: BTreeMap::new(),
            cost: Default::default(),
            notes: BTreeMap::new(),
            ded: vec![],
            nonfinite_inputs: 0,
            veo: None,
            model: None,
            rotation: None,
        });
        // Undecided sites with an AWQ scale still need x/s: their weights are Q(W·s).
        for site in &self.sites {
            if !self.decided.contains_key(&site.id) && self.scales.contains_key(&site.id) {
                hook.set_site(site, None, self.input_scale(site).as_ref());
            }
        }
        for (id, q) in overrides {
            if let Some(site) = self.sites.iter().find(|s| s.id == *id) {
                hook.set_site(site, q.clone(), self.input_scale(site).as_ref());
            }
        }
        hook
    }

    /// Runs the block on the quantized path (quantized weights, decided sites + `overrides`) and
    /// captures the pre-quantization input of `capture` sites.
    pub fn capture_quantized(
        &mut self,
        state: &BlockState<'_>,
        overrides: &BTreeMap<LayerId, Option<ActQuantizer>>,
        capture: &[LayerId],
    ) -> Result<BTreeMap<LayerId, Tensor>> {
        self.load_weights(true);
        let mut hook = self.hook_with(overrides);
        let mut cap = Capture::new(&mut hook, capture.to_vec());
        let _ = self.pipe.run_block(self.model, state.block, &state.quant_in, &mut cap)?;
        self.meter.report.block_forwards += 1;
        self.nonfinite += cap.nonfinite;
        Ok(cap.captured)
    }

    /// The site's input scale (AWQ), if any.
    pub fn input_scale(&self, site: &Site) -> Option<Tensor> {
        self.scales.get(&site.id).map(TensorData::to_tensor)
    }

    /// Rows of a site input entering objectives (padding rows of the decoder excluded), `[N, C]`.
    pub fn real_rows(&self, site: &Site, x: &Tensor) -> Tensor {
        let rows = crate::calib::rows(x);
        match self.pipe.real_rows(site.block) {
            Some(idx) => rows.index_select(0, &idx.to_device(rows.device())),
            None => rows,
        }
    }

    /// The quantizer a clip setting gives for a site whose quantized-path input is `xq`.
    pub fn quantizer(&self, site: &Site, xq: &Tensor, clip: Clip) -> Result<Option<ActQuantizer>> {
        Ok(self.quantizers(site, xq, &[clip])?.pop().flatten())
    }

    /// The quantizers of several clip settings (the input is sorted once).
    pub fn quantizers(
        &self,
        site: &Site,
        xq: &Tensor,
        clips: &[Clip],
    ) -> Result<Vec<Option<ActQuantizer>>> {
        let Some(act) = self.scheme.tower(site.tower()).act else {
            return Ok(vec![None; clips.len()]);
        };
        if act.range == RangeMode::Dynamic {
            return clips
                .iter()
                .map(|&c| Ok(Some(ActQuantizer { spec: act.spec(c)?, params: None })))
                .collect();
        }
        let x = match self.input_scale(site) {
            Some(s) => xq * s.reciprocal().to_device(xq.device()),
            None => xq.shallow_clone(),
        };
        let sorted = crate::ranges::SortedInput::new(
            &x,
            self.pipe.real_rows(site.block).as_ref(),
            act.granularity,
        )?;
        clips
            .iter()
            .map(|&c| {
                let (lo, hi) = sorted.range(c);
                Ok(Some(ActQuantizer::with_range(act.spec(c)?, &lo, &hi)))
            })
            .collect()
    }

    /// Σ over the site's consumers of ‖W_q Q(x_q) − W_r x_r‖² on the real rows (Eq. 2).
    pub fn site_error(
        &mut self,
        site: &Site,
        q: Option<&ActQuantizer>,
        xq: &Tensor,
        xr: &Tensor,
    ) -> Result<f64> {
        Ok(self.site_error_rows(site, q, xq, xr)?.sum(Kind::Double).double_value(&[]))
    }

    /// Per-row squared error summed over consumers and channels, `[N]`.
    pub fn site_error_rows(
        &mut self,
        site: &Site,
        q: Option<&ActQuantizer>,
        xq: &Tensor,
        xr: &Tensor,
    ) -> Result<Tensor> {
        let scale = self.input_scale(site);
        let x = match &scale {
            Some(s) => xq * s.reciprocal().to_device(xq.device()).to_kind(xq.kind()),
            None => xq.shallow_clone(),
        };
        let x = match q {
            Some(q) => q.apply(&x),
            None => x,
        };
        let x = self.real_rows(site, &x);
        let mut total = Tensor::zeros([x.size()[0]], (Kind::Double, x.device()));
        for c in &site.consumers {
            let reference = self.float_output(site, *c, xr)?;
            let wr = &self.float_weights[c];
            let wq = self.quant_weights.get(c).unwrap_or(wr);
            let diff = x.matmul(&wq.to_kind(Kind::Float).tr()) - reference;
            total += diff.pow_tensor_scalar(2).sum_dim_intlist(1, false, Kind::Double);
            self.meter.report.layer_forwards += 1;
        }
        self.meter.report.candidate_evaluations += 1;
        Ok(total)
    }

    /// Consumer `c`'s float output `W_r x_r` on the site's real rows (computed once per block).
    fn float_output(&mut self, site: &Site, c: LayerId, xr: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.float_outputs.get(&c) {
            return Ok(y.shallow_clone());
        }
        let wr = self
            .float_weights
            .get(&c)
            .ok_or_else(|| SearchError::PlanMismatch(format!("no weight for {c}")))?;
        let y = self.real_rows(site, xr).matmul(&wr.to_kind(Kind::Float).tr());
        self.meter.report.layer_forwards += 1;
        self.float_outputs.insert(c, y.shallow_clone());
        Ok(y)
    }

    /// Per-row energy of the site's float outputs, Σ over consumers ‖W_r x_r‖², `[N]` (what a
    /// per-sample error is normalised by).
    pub fn float_output_energy_rows(&mut self, site: &Site, xr: &Tensor) -> Result<Tensor> {
        let rows = self.real_rows(site, xr).size()[0];
        let mut total = Tensor::zeros([rows], (Kind::Double, xr.device()));
        for c in &site.consumers {
            let y = self.float_output(site, *c, xr)?;
            total += y.pow_tensor_scalar(2).sum_dim_intlist(1, false, Kind::Double);
        }
        Ok(total)
    }

    /// Calibration sample of each real row of a site input `x` (`[B, T, C]`), `[N]`.
    pub fn row_samples(&self, site: &Site, x: &Tensor) -> Tensor {
        let size = x.size();
        let t = if size.len() >= 3 { size[size.len() - 2] } else { 1 };
        let n = x.numel() as i64 / size.last().copied().unwrap_or(1);
        let flat = Tensor::arange(n, (Kind::Int64, x.device()));
        let flat = match self.pipe.real_rows(site.block) {
            Some(idx) => idx.to_device(x.device()),
            None => flat,
        };
        flat.divide_scalar_mode(t, "floor")
    }

    /// Forgets every decision (weights stay quantized): for strategies that walk twice.
    pub fn reset_decisions(&mut self) {
        self.decided.clear();
    }

    /// Marks a site decided.
    pub fn decide(&mut self, site: &Site, q: Option<&ActQuantizer>) -> Result<()> {
        let act = match q {
            None => None,
            Some(q) => Some(SiteAct {
                spec: q.spec,
                range: match &q.params {
                    Some(p) => {
                        // Store (lo, hi) equivalent ranges: lo = (qmin − z)·s, hi = (qmax − z)·s.
                        let (qmin, qmax) = p.grid.range();
                        let lo = (Tensor::from(qmin as f64) - &p.zero_point) * &p.scale;
                        let hi = (Tensor::from(qmax as f64) - &p.zero_point) * &p.scale;
                        Some((TensorData::from_tensor(&lo)?, TensorData::from_tensor(&hi)?))
                    }
                    None => None,
                },
            }),
        };
        let input_scale = self.scales.get(&site.id).cloned();
        self.decided.insert(site.id, SitePlan { site: site.clone(), act, input_scale });
        Ok(())
    }

    /// Walks all blocks; `decide_block` must decide every site of each block it is given.
    pub fn walk(
        &mut self,
        weights: WeightMethod,
        mut decide_block: impl FnMut(&mut Engine<'a>, &BlockState<'_>) -> Result<()>,
        mut progress: impl FnMut(usize, usize, Block),
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let all_blocks = self.model.blocks();
        let mut xr = self.pipe.initial_input(self.model)?;
        let mut xq = xr.shallow_clone();
        self.meter.hold(2 * bytes_of(&xr));
        for (bi, &block) in all_blocks.iter().enumerate() {
            // What the previous block (or the loading, before the first) freed goes back to the
            // system before this block allocates its own: without it, glibc keeps the freed
            // pages resident and the peak carries them (issue #21, README "Scale": rtn on s4
            // peaked 630 MiB lower with it; cdm on s2 took 4 % longer, paired).
            if qvlm_core::memory::release_freed_heap().is_ok() {
                self.meter.report.heap_trims += 1;
            }
            progress(bi, all_blocks.len(), block);
            let site_indices: Vec<usize> = self
                .sites
                .iter()
                .enumerate()
                .filter(|(_, s)| s.block == block)
                .map(|(i, _)| i)
                .collect();
            let ids: Vec<LayerId> = site_indices.iter().map(|&i| self.sites[i].id).collect();
            // Float path with captures.
            self.float_outputs.clear();
            self.load_weights(false);
            let mut no = NoHook;
            let mut cap = Capture::new(&mut no, ids.clone());
            let xr_out = self.pipe.run_block(self.model, block, &xr, &mut cap)?;
            self.meter.report.block_forwards += 1;
            self.nonfinite += cap.nonfinite;
            let float_inputs = cap.captured;
            let held: u64 = float_inputs.values().map(bytes_of).sum();
            self.meter.hold(held);
            // GPTQ's Hessians come from the quantized path's inputs to this (float) block.
            let quant_path_inputs = if let WeightMethod::Gptq(_) = weights {
                let mut no = NoHook;
                let mut cap = Capture::new(&mut no, ids.clone());
                let _ = self.pipe.run_block(self.model, block, &xq, &mut cap)?;
                self.meter.report.block_forwards += 1;
                self.nonfinite += cap.nonfinite;
                Some(cap.captured)
            } else {
                None
            };
            let extra: u64 = quant_path_inputs.iter().flat_map(|m| m.values()).map(bytes_of).sum();
            self.meter.hold(extra);
            // Weights of the block.
            for &i in &site_indices {
                let site = self.sites[i].clone();
                let hessian_input = match &quant_path_inputs {
                    Some(m) => &m[&site.id],
                    None => &float_inputs[&site.id],
                };
                self.quantize_site_weights(&site, &float_inputs[&site.id], hessian_input, weights)?;
            }
            drop(quant_path_inputs);
            self.meter.release(extra);
            let state = BlockState {
                block,
                site_indices: site_indices.clone(),
                float_inputs,
                quant_in: xq.shallow_clone(),
                _marker: std::marker::PhantomData,
            };
            decide_block(self, &state)?;
            for &i in &site_indices {
                if !self.decided.contains_key(&self.sites[i].id) {
                    return Err(SearchError::PlanMismatch(format!(
                        "site {} left undecided",
                        self.sites[i].id
                    )));
                }
            }
            // Quantized path advances with every site of the block decided.
            self.load_weights(true);
            let mut hook = self.hook_with(&BTreeMap::new());
            let xq_out = self.pipe.run_block(self.model, block, &xq, &mut hook)?;
            self.meter.report.block_forwards += 1;
            self.meter.release(held);
            let (old, new) = (2 * bytes_of(&xr), bytes_of(&xr_out) + bytes_of(&xq_out));
            self.meter.release(old);
            self.meter.hold(new);
            xr = xr_out;
            xq = xq_out;
        }
        self.load_weights(false);
        Ok(())
    }

    /// Quantizes the weights of a site's consumers by `method`: `xr` is the site's float input,
    /// `xq` its quantized-path input (GPTQ's Hessian).
    fn quantize_site_weights(
        &mut self,
        site: &Site,
        xr: &Tensor,
        xq: &Tensor,
        method: WeightMethod,
    ) -> Result<()> {
        let Some(spec) = self.scheme.tower(site.tower()).weight else { return Ok(()) };
        let mut input_scale = None;
        let mut clips: BTreeMap<LayerId, TensorData> = BTreeMap::new();
        if let WeightMethod::Gptq(settings) = method {
            let qvlm_core::quant::spec::WeightSpec::Rtn { grid, granularity } = spec else {
                return Err(SearchError::Unsupported {
                    layer: site.id.to_string(),
                    reason: format!("GPTQ needs a uniform weight grid, the scheme has {spec:?}"),
                });
            };
            let h = crate::gptq::hessian(&self.real_rows(site, xq));
            for c in &site.consumers {
                let w = &self.float_weights[c];
                let q = crate::gptq::quantize(w, &h, grid, granularity, &settings, &c.to_string())?;
                let solved = crate::plan::SolvedWeight::from_quantized(&q, *c)?;
                let deq = q.dequantize();
                self.quant_weights.insert(*c, deq.to_kind(w.kind()).to_device(w.device()));
                self.weight_plans
                    .insert(*c, WeightPlan { spec, clip_ratio: None, solved: Some(solved) });
            }
            return Ok(());
        }
        if let WeightMethod::SmoothQuant(settings) = method {
            if crate::smoothquant::smooths(site) {
                let rows = self.real_rows(site, xr);
                let ws: Vec<Tensor> =
                    site.consumers.iter().map(|c| self.float_weights[c].shallow_clone()).collect();
                input_scale = Some(TensorData::from_tensor(&crate::smoothquant::scale(
                    &rows, &ws, &settings,
                )?)?);
            }
        }
        if let WeightMethod::Awq { grid, clip_steps, sites } = method {
            let rows = self.real_rows(site, xr);
            let rows = crate::entropy::subsample(
                &rows,
                &crate::entropy::EntropyConfig {
                    max_rows: 2048,
                    max_channels: i64::MAX,
                    temperature: 1.0,
                },
            );
            let ws: Vec<Tensor> =
                site.consumers.iter().map(|c| self.float_weights[c].to_kind(Kind::Float)).collect();
            let scaled = sites == crate::awq::AwqSites::All
                || crate::awq::foldable(site, &self.float_weights);
            let s = if scaled {
                let (s, _) =
                    crate::awq::search_scale(&rows, &ws, &spec, grid, &site.id.to_string())?;
                self.meter.report.candidate_evaluations += grid as u64;
                Some(s)
            } else {
                None
            };
            if let qvlm_core::quant::spec::WeightSpec::Rtn { grid: g, granularity } = spec {
                let xs = match &s {
                    Some(s) => &rows / s,
                    None => rows.shallow_clone(),
                };
                for (c, w) in site.consumers.iter().zip(&ws) {
                    let w = match &s {
                        Some(s) => w * s.unsqueeze(0),
                        None => w.shallow_clone(),
                    };
                    let r = crate::awq::search_clip(
                        &xs,
                        &w,
                        g,
                        granularity,
                        clip_steps,
                        0.5,
                        &c.to_string(),
                    )?;
                    self.meter.report.candidate_evaluations += clip_steps as u64;
                    clips.insert(*c, TensorData::from_tensor(&r)?);
                }
            }
            input_scale = s.as_ref().map(TensorData::from_tensor).transpose()?;
        }
        let scale_t = input_scale.as_ref().map(TensorData::to_tensor);
        for c in &site.consumers {
            let wp = WeightPlan::new(spec, clips.remove(c));
            let w = &self.float_weights[c];
            let q = quantize_weight(w, &wp, scale_t.as_ref(), *c)?;
            self.quant_weights.insert(*c, q.to_kind(w.kind()).to_device(w.device()));
            self.weight_plans.insert(*c, wp);
        }
        if let Some(s) = input_scale {
            self.scales.insert(site.id, s);
        }
        Ok(())
    }

    /// The plan the walk produced.
    pub fn into_plan(self, strategy: &str) -> QuantPlan {
        let mut sites: Vec<SitePlan> = Vec::new();
        for s in &self.sites {
            if let Some(d) = self.decided.get(&s.id) {
                sites.push(d.clone());
            }
        }
        QuantPlan {
            strategy: strategy.to_string(),
            scheme: self.scheme,
            sites,
            weights: self.weight_plans,
            groups: vec![],
            dependencies: BTreeMap::new(),
            cost: self.meter.finish(),
            notes: BTreeMap::new(),
            ded: self.ded,
            nonfinite_inputs: self.nonfinite,
            veo: None,
            model: None,
            rotation: self.model.rotation().cloned(),
        }
    }
}

/// Whether the scheme quantizes the site's activations at all.
pub fn quantizes_activations(scheme: &Scheme, site: &Site) -> bool {
    scheme.tower(site.tower()).act.is_some()
}
