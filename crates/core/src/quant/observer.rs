//! Calibration statistics of linear inputs, streamed and mergeable: memory is fixed by the layer
//! widths (and the vision sequence length), not by the number of calibration samples.
//!
//! Pass 1 records ranges (per tensor, per channel, per token position), |x| sums (AWQ's
//! activation scale) and non-finite counts; pass 2 fills histograms inside the pass-1 ranges, for
//! percentile clipping and entropy.

use std::collections::BTreeMap;

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::hook::LinearHook;
use crate::layer_id::LayerId;

/// Histograms of rows (one per channel, token position, or the whole tensor) over fixed ranges.
#[derive(Debug)]
pub struct Histograms {
    pub lo: Tensor,
    pub hi: Tensor,
    /// `[rows, bins]` f64 counts.
    pub counts: Tensor,
}

impl Histograms {
    fn new(lo: &Tensor, hi: &Tensor, bins: i64) -> Self {
        let rows = lo.numel() as i64;
        Self {
            lo: lo.to_kind(Kind::Float).reshape([rows]),
            hi: hi.to_kind(Kind::Float).reshape([rows]),
            counts: Tensor::zeros([rows, bins], (Kind::Double, tch::Device::Cpu)),
        }
    }

    /// `values` `[N, rows]` (finite); column r goes to histogram r.
    fn add(&mut self, values: &Tensor) {
        let (rows, bins) = (self.counts.size()[0], self.counts.size()[1]);
        let v = values.to_kind(Kind::Float).to_device(tch::Device::Cpu);
        let width = (&self.hi - &self.lo).clamp_min(f64::from(f32::MIN_POSITIVE));
        let idx =
            ((v - &self.lo) / width * bins as f64).floor().clamp(0, bins - 1).to_kind(Kind::Int64);
        let flat = idx + Tensor::arange(rows, (Kind::Int64, tch::Device::Cpu)) * bins;
        let counts = flat.reshape([-1]).bincount::<Tensor>(None, rows * bins).to_kind(Kind::Double);
        self.counts += counts.view([rows, bins]);
    }

    fn merge(&mut self, other: &Histograms) {
        self.counts += &other.counts;
    }

    /// The `q`-quantile of each row (linear inside the bin), `[rows]`.
    pub fn quantile(&self, q: f64) -> Tensor {
        let bins = self.counts.size()[1];
        let cdf = self.counts.cumsum(1, Kind::Double);
        let total = cdf.select(1, bins - 1).unsqueeze(1);
        let target = &total * q;
        let idx = cdf.lt_tensor(&target).sum_dim_intlist(1, true, Kind::Int64).clamp_max(bins - 1);
        let before = (&cdf - &self.counts).gather(1, &idx, false);
        let in_bin = self.counts.gather(1, &idx, false).clamp_min(1e-12);
        let frac = ((target - before) / in_bin).clamp(0.0, 1.0);
        let pos = (idx.to_kind(Kind::Double) + frac).squeeze_dim(1) / bins as f64;
        let width = (&self.hi - &self.lo).to_kind(Kind::Double);
        (self.lo.to_kind(Kind::Double) + pos * width).to_kind(Kind::Float)
    }

    /// Shannon entropy (nats) of each row's histogram.
    pub fn entropy(&self) -> Tensor {
        let total = self.counts.sum_dim_intlist(1, true, Kind::Double).clamp_min(1e-12);
        let p = &self.counts / total;
        -(&p * (&p + 1e-30).log()).sum_dim_intlist(1, false, Kind::Double)
    }
}

/// Streaming statistics of one site's input.
#[derive(Debug)]
pub struct SiteStats {
    pub channels: i64,
    /// Rows (tokens) observed in pass 1.
    pub rows: i64,
    /// NaN or ±inf values seen (they are left out of every statistic).
    pub nonfinite: i64,
    pub channel_min: Tensor,
    pub channel_max: Tensor,
    /// Σ|x| per channel (f64).
    pub abs_sum: Tensor,
    /// Per token position, while every batch had the same sequence length.
    pub token_range: Option<(Tensor, Tensor)>,
    pub seq_len: Option<i64>,
    pub tensor_hist: Option<Histograms>,
    pub channel_hist: Option<Histograms>,
    pub token_hist: Option<Histograms>,
}

fn rows_and_tokens(x: &Tensor) -> (Tensor, Option<i64>) {
    let size = x.size();
    let c = *size.last().unwrap_or(&1);
    let t = if size.len() >= 3 { Some(size[size.len() - 2]) } else { None };
    (x.reshape([-1, c]), t)
}

impl SiteStats {
    fn new(channels: i64) -> Self {
        let cpu = (Kind::Float, tch::Device::Cpu);
        Self {
            channels,
            rows: 0,
            nonfinite: 0,
            channel_min: Tensor::full([channels], f64::INFINITY, cpu),
            channel_max: Tensor::full([channels], f64::NEG_INFINITY, cpu),
            abs_sum: Tensor::zeros([channels], (Kind::Double, tch::Device::Cpu)),
            token_range: None,
            seq_len: None,
            tensor_hist: None,
            channel_hist: None,
            token_hist: None,
        }
    }

    /// Pass 1: ranges, |x| sums, non-finite counts.
    pub fn observe_ranges(&mut self, x: &Tensor) {
        let x = x.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu);
        let ok = x.isfinite();
        self.nonfinite += (x.numel() as i64) - ok.sum(Kind::Int64).int64_value(&[]);
        let lo = x.where_self(&ok, &Tensor::from(f64::INFINITY));
        let hi = x.where_self(&ok, &Tensor::from(f64::NEG_INFINITY));
        let (lo_rows, t) = rows_and_tokens(&lo);
        let (hi_rows, _) = rows_and_tokens(&hi);
        self.rows += lo_rows.size()[0];
        self.channel_min = self.channel_min.minimum(&lo_rows.amin(0, false));
        self.channel_max = self.channel_max.maximum(&hi_rows.amax(0, false));
        let abs = x.where_self(&ok, &Tensor::from(0.0)).abs();
        self.abs_sum += rows_and_tokens(&abs).0.sum_dim_intlist(0, false, Kind::Double);
        // Per token position: reduce over batch and channels.
        match (t, self.seq_len, self.rows == lo_rows.size()[0]) {
            (Some(t), _, true) => {
                self.seq_len = Some(t);
                let lo_t = lo.reshape([-1, t, self.channels]).amin([0, 2], false);
                let hi_t = hi.reshape([-1, t, self.channels]).amax([0, 2], false);
                self.token_range = Some((lo_t, hi_t));
            }
            (Some(t), Some(seen), false) if t == seen => {
                if let Some((a, b)) = &self.token_range {
                    let lo_t = lo.reshape([-1, t, self.channels]).amin([0, 2], false);
                    let hi_t = hi.reshape([-1, t, self.channels]).amax([0, 2], false);
                    self.token_range = Some((a.minimum(&lo_t), b.maximum(&hi_t)));
                }
            }
            _ => {
                self.seq_len = None;
                self.token_range = None;
            }
        }
    }

    /// Pass 2: histograms inside the pass-1 ranges.
    pub fn observe_histograms(&mut self, x: &Tensor, bins: i64) {
        let x = x.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu);
        let x = super::uniform::finite(&x);
        let (rows, t) = rows_and_tokens(&x);
        let (lo, hi) = (self.min_max().0, self.min_max().1);
        self.tensor_hist
            .get_or_insert_with(|| Histograms::new(&lo, &hi, bins))
            .add(&rows.reshape([-1, 1]));
        let (cmin, cmax) = (self.channel_min.shallow_clone(), self.channel_max.shallow_clone());
        self.channel_hist.get_or_insert_with(|| Histograms::new(&cmin, &cmax, bins)).add(&rows);
        if let (Some(t), Some((tmin, tmax))) = (t, &self.token_range) {
            if Some(t) == self.seq_len {
                let per_token = x.reshape([-1, t, self.channels]).transpose(1, 2).reshape([-1, t]);
                self.token_hist
                    .get_or_insert_with(|| Histograms::new(tmin, tmax, bins))
                    .add(&per_token);
            }
        }
    }

    /// Whole-tensor range.
    pub fn min_max(&self) -> (Tensor, Tensor) {
        (self.channel_min.min(), self.channel_max.max())
    }

    /// Mean |x| per channel (AWQ's activation statistic).
    pub fn abs_mean(&self) -> Tensor {
        (&self.abs_sum / self.rows.max(1) as f64).to_kind(Kind::Float)
    }

    /// Combines statistics of another shard of the calibration data.
    pub fn merge(&mut self, other: &SiteStats) {
        self.rows += other.rows;
        self.nonfinite += other.nonfinite;
        self.channel_min = self.channel_min.minimum(&other.channel_min);
        self.channel_max = self.channel_max.maximum(&other.channel_max);
        self.abs_sum += &other.abs_sum;
        self.token_range = match (&self.token_range, &other.token_range) {
            (Some((a, b)), Some((c, d))) if self.seq_len == other.seq_len => {
                Some((a.minimum(c), b.maximum(d)))
            }
            _ => None,
        };
        for (mine, theirs) in [
            (&mut self.tensor_hist, &other.tensor_hist),
            (&mut self.channel_hist, &other.channel_hist),
            (&mut self.token_hist, &other.token_hist),
        ] {
            if let (Some(m), Some(t)) = (mine.as_mut(), theirs) {
                m.merge(t);
            }
        }
    }
}

/// Which pass an [`Observer`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Ranges,
    Histograms { bins: i64 },
}

/// A hook that records [`SiteStats`] for the sites it is asked to watch (all when `sites` is
/// `None`); inputs pass through unchanged.
#[derive(Debug)]
pub struct Observer {
    pub stats: BTreeMap<LayerId, SiteStats>,
    pub pass: Pass,
    sites: Option<Vec<LayerId>>,
}

/// Non-finite calibration values seen, per site (for the run's manifest).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Incidents {
    pub nonfinite_values: BTreeMap<String, i64>,
}

impl Observer {
    pub fn new(sites: Option<Vec<LayerId>>) -> Self {
        Self { stats: BTreeMap::new(), pass: Pass::Ranges, sites }
    }

    pub fn incidents(&self) -> Incidents {
        Incidents {
            nonfinite_values: self
                .stats
                .iter()
                .filter(|(_, s)| s.nonfinite > 0)
                .map(|(id, s)| (id.to_string(), s.nonfinite))
                .collect(),
        }
    }
}

impl LinearHook for Observer {
    fn input(&mut self, id: LayerId, x: Tensor) -> Tensor {
        if self.sites.as_ref().is_some_and(|s| !s.contains(&id)) {
            return x;
        }
        let channels = *x.size().last().unwrap_or(&1);
        let stats = self.stats.entry(id).or_insert_with(|| SiteStats::new(channels));
        match self.pass {
            Pass::Ranges => stats.observe_ranges(&x),
            Pass::Histograms { bins } => stats.observe_histograms(&x, bins),
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer_id::{Slot, Tower};

    fn id() -> LayerId {
        LayerId::new(Tower::Language, 0, Slot::QProj)
    }

    #[test]
    fn streaming_equals_one_shot_and_skips_non_finite() {
        let a = Tensor::from_slice(&[1.0f32, -2.0, 3.0, f32::NAN, 0.5, 8.0]).view([1, 2, 3]);
        let b = Tensor::from_slice(&[-4.0f32, 1.0, f32::INFINITY, 2.0, 2.0, 2.0]).view([1, 2, 3]);
        let mut split = Observer::new(None);
        let _ = split.input(id(), a.shallow_clone());
        let mut other = Observer::new(None);
        let _ = other.input(id(), b.shallow_clone());
        if let Some(s) = split.stats.get_mut(&id()) {
            s.merge(&other.stats[&id()]);
        }
        let mut once = Observer::new(None);
        let _ = once.input(id(), Tensor::cat(&[&a, &b], 0));
        let (s, o) = (&split.stats[&id()], &once.stats[&id()]);
        assert_eq!(Vec::<f32>::try_from(&s.channel_min).ok(), Some(vec![-4.0, -2.0, 2.0]));
        assert_eq!(Vec::<f32>::try_from(&s.channel_max).ok(), Some(vec![2.0, 2.0, 8.0]));
        assert_eq!(s.nonfinite, 2);
        assert_eq!(s.rows, o.rows);
        assert_eq!(
            Vec::<f32>::try_from(&s.abs_mean()).ok(),
            Vec::<f32>::try_from(&o.abs_mean()).ok()
        );
        let (tmin, tmax) =
            s.token_range.as_ref().map(|(a, b)| (a.shallow_clone(), b.shallow_clone())).unzip();
        assert_eq!(tmin.and_then(|t| Vec::<f32>::try_from(&t).ok()), Some(vec![-4.0, 0.5]));
        assert_eq!(tmax.and_then(|t| Vec::<f32>::try_from(&t).ok()), Some(vec![3.0, 8.0]));
    }

    #[test]
    fn histogram_quantiles_are_close_to_exact_ones() {
        tch::manual_seed(0);
        let x = Tensor::randn([4000, 2], (Kind::Float, tch::Device::Cpu));
        let mut obs = Observer::new(None);
        let _ = obs.input(id(), x.shallow_clone());
        obs.pass = Pass::Histograms { bins: 2048 };
        let _ = obs.input(id(), x.shallow_clone());
        let hist = obs.stats[&id()].channel_hist.as_ref().map(|h| h.quantile(0.99));
        let exact = x.quantile_scalar(0.99, 0, false, "linear");
        let d = hist.map(|h| (h - exact).abs().max().double_value(&[]));
        assert!(d.is_some_and(|d| d < 0.02), "{d:?}");
    }
}
