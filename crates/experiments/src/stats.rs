//! Statistics for claims: the mean and spread of a row over calibration seeds, and a paired test
//! between two rows on the same questions.
//!
//! The paired test is a cluster bootstrap of the difference in per-question score (each question
//! averaged over its row's seeds): questions about one image are not independent (easy-VQA asks
//! ~10 questions per image), so whole images are resampled, not questions. The two-sided p-value
//! inverts the percentile interval, p = 2·min(P*(Δ* ≤ 0), P*(Δ* ≥ 0)) with the +1 correction
//! ((k + 1)/(B + 1)), so it is never 0; the 95 % interval is the 2.5 and 97.5 percentiles.
//! Resampling is seeded: the same scores give the same numbers.

use std::collections::BTreeMap;

use qvlm_core::rng::SplitMix64;

/// Bootstrap resamples of a paired test.
pub const RESAMPLES: usize = 10_000;
/// The significance level the tables mark differences at.
pub const ALPHA: f64 = 0.05;

/// Mean of `xs` (`None` when empty).
pub fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Sample standard deviation (n − 1; `None` below two values).
pub fn std(xs: &[f64]) -> Option<f64> {
    let m = mean(xs)?;
    (xs.len() >= 2)
        .then(|| (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt())
}

/// Pearson correlation of (x, y) pairs.
pub fn pearson(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if n < 2.0 {
        return None;
    }
    let (mx, my) =
        (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Spearman's rank correlation: Pearson's of the ranks (ties get their average rank).
pub fn spearman(points: &[(f64, f64)]) -> Option<f64> {
    let ranks = |values: Vec<f64>| -> Vec<f64> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
        let mut ranks = vec![0.0; values.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
                j += 1;
            }
            let rank = (i + j) as f64 / 2.0 + 1.0;
            for &k in &order[i..=j] {
                ranks[k] = rank;
            }
            i = j + 1;
        }
        ranks
    };
    let rx = ranks(points.iter().map(|p| p.0).collect());
    let ry = ranks(points.iter().map(|p| p.1).collect());
    pearson(&rx.into_iter().zip(ry).collect::<Vec<_>>())
}

/// Two-sided permutation test of "no association" for the correlation `r` of (x, y) pairs: the
/// share of [`RESAMPLES`] random re-pairings of the same x and y values whose |r| reaches the
/// observed |r|, with the +1 correction ((k + 1)/(B + 1)); seeded, so the same points give the
/// same p. `None` where `r` is undefined (fewer than two points, or a constant coordinate).
/// Valid only for independent pairs.
pub fn correlation_p(points: &[(f64, f64)], r: fn(&[(f64, f64)]) -> Option<f64>) -> Option<f64> {
    let observed = r(points)?.abs();
    let xs: Vec<f64> = points.iter().map(|p| p.0).collect();
    let mut ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    let mut rng = SplitMix64::new(0);
    let mut paired = Vec::with_capacity(points.len());
    let mut reached = 0usize;
    for _ in 0..RESAMPLES {
        // Fisher–Yates shuffle of the y values against fixed x values.
        for i in (1..ys.len()).rev() {
            ys.swap(i, rng.below(i + 1));
        }
        paired.clear();
        paired.extend(xs.iter().copied().zip(ys.iter().copied()));
        // A tolerance of a few ulps, so that a re-pairing equal to the observed one counts.
        if r(&paired).is_some_and(|v| v.abs() >= observed * (1.0 - 1e-12)) {
            reached += 1;
        }
    }
    Some((reached + 1) as f64 / (RESAMPLES + 1) as f64)
}

/// One row's per-question scores: question → (cluster, score per seed).
pub type Scores = BTreeMap<String, (String, Vec<f64>)>;

/// A paired comparison of row A against row B.
#[derive(Clone, Debug, PartialEq)]
pub struct PairedTest {
    /// Questions both rows scored, and the clusters (images) they fall in.
    pub questions: usize,
    pub clusters: usize,
    /// Mean per-question score difference A − B, in percentage points.
    pub diff: f64,
    /// 95 % bootstrap interval of `diff`.
    pub ci: (f64, f64),
    /// Two-sided p-value of "no difference".
    pub p: f64,
}

impl PairedTest {
    pub fn significant(&self) -> bool {
        self.p < ALPHA
    }
}

/// The paired cluster bootstrap of A − B over the questions both scored (`None` without any).
pub fn paired_test(a: &Scores, b: &Scores) -> Option<PairedTest> {
    // Per cluster: the sum of per-question differences and the question count.
    let mut clusters: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (q, (cluster, sa)) in a {
        let Some((_, sb)) = b.get(q) else { continue };
        let (Some(ma), Some(mb)) = (mean(sa), mean(sb)) else { continue };
        let c = clusters.entry(cluster.as_str()).or_default();
        c.0 += ma - mb;
        c.1 += 1;
    }
    let units: Vec<(f64, usize)> = clusters.values().copied().collect();
    let questions: usize = units.iter().map(|u| u.1).sum();
    if questions == 0 {
        return None;
    }
    let diff = 100.0 * units.iter().map(|u| u.0).sum::<f64>() / questions as f64;
    let mut rng = SplitMix64::new(0);
    let mut draws = Vec::with_capacity(RESAMPLES);
    for _ in 0..RESAMPLES {
        let (mut sum, mut n) = (0.0, 0usize);
        for _ in 0..units.len() {
            let u = units[rng.below(units.len())];
            sum += u.0;
            n += u.1;
        }
        draws.push(100.0 * sum / n.max(1) as f64);
    }
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((q * (RESAMPLES - 1) as f64).round() as usize).min(RESAMPLES - 1)];
    let below = draws.iter().filter(|d| **d <= 0.0).count();
    let above = draws.iter().filter(|d| **d >= 0.0).count();
    let tail = |k: usize| (k + 1) as f64 / (RESAMPLES + 1) as f64;
    let p = (2.0 * tail(below).min(tail(above))).min(1.0);
    Some(PairedTest { questions, clusters: units.len(), diff, ci: (at(0.025), at(0.975)), p })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permutation_test_finds_a_clear_correlation_and_not_a_pairing_without_one() {
        // y = x plus a small wobble: |r| near 1, no re-pairing reaches it.
        let related: Vec<(f64, f64)> =
            (0..40).map(|i| (i as f64, i as f64 + ((i * 7) % 5) as f64)).collect();
        let p = correlation_p(&related, pearson).expect("defined");
        assert!(p < 1e-3, "p = {p}");
        assert_eq!(p, 1.0 / (RESAMPLES + 1) as f64);
        assert!(correlation_p(&related, spearman).expect("defined") < 1e-3);
        // A symmetric V: y depends on x, but with correlation 0, so every re-pairing reaches it.
        let v: Vec<(f64, f64)> = (-20..=20).map(|i| (i as f64, (i as f64).abs())).collect();
        assert!(pearson(&v).expect("defined").abs() < 1e-12);
        assert!(correlation_p(&v, pearson).expect("defined") > 0.5);
        // Undefined correlations have no test.
        assert_eq!(correlation_p(&[(1.0, 2.0)], pearson), None);
        assert_eq!(correlation_p(&[(1.0, 2.0), (1.0, 3.0)], pearson), None);
        // Seeded: the same points give the same p.
        let noisy: Vec<(f64, f64)> = (0..30).map(|i| (i as f64, ((i * 13) % 11) as f64)).collect();
        assert_eq!(correlation_p(&noisy, spearman), correlation_p(&noisy, spearman));
    }

    fn scores(per_cluster: &[(&str, &[f64])]) -> Scores {
        let mut out = Scores::new();
        for (c, qs) in per_cluster {
            for (i, s) in qs.iter().enumerate() {
                out.insert(format!("{c}-{i}"), (c.to_string(), vec![*s]));
            }
        }
        out
    }

    #[test]
    fn pearson_of_a_line_is_one_and_of_its_mirror_minus_one() {
        let up: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 2.0 * i as f64 + 1.0)).collect();
        let down: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, -(i as f64))).collect();
        assert!((pearson(&up).unwrap_or(0.0) - 1.0).abs() < 1e-12);
        assert!((pearson(&down).unwrap_or(0.0) + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[(1.0, 1.0)]), None);
    }

    #[test]
    fn spearman_ranks_with_ties() {
        let monotone = [(1.0, 1.0), (2.0, 8.0), (3.0, 27.0), (4.0, 64.0)];
        assert!((spearman(&monotone).unwrap_or(0.0) - 1.0).abs() < 1e-12);
        assert!(pearson(&monotone).unwrap_or(1.0) < 1.0);
        let ties = [(1.0, 1.0), (1.0, 2.0), (2.0, 3.0)];
        assert!(spearman(&ties).is_some_and(|r| r > 0.8 && r < 1.0));
    }

    #[test]
    fn mean_and_std() {
        assert_eq!(mean(&[]), None);
        assert_eq!(std(&[1.0]), None);
        assert_eq!(mean(&[1.0, 2.0, 3.0]), Some(2.0));
        assert!((std(&[1.0, 2.0, 3.0]).unwrap_or(0.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn identical_rows_differ_by_nothing_and_a_clear_gap_is_significant() {
        let a = scores(
            &(0..200)
                .map(|i| if i % 2 == 0 { ("x", &[1.0, 0.0][..]) } else { ("y", &[1.0][..]) })
                .collect::<Vec<_>>(),
        );
        let t = paired_test(&a, &a).expect("paired");
        assert_eq!((t.diff, t.p), (0.0, 1.0));
        // 60 images, A right on all 10 questions of each, B on 5 of 10: +50 points.
        let names: Vec<String> = (0..60).map(|i| format!("img{i}")).collect();
        let ones = [1.0; 10];
        let half = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let a = scores(&names.iter().map(|n| (n.as_str(), &ones[..])).collect::<Vec<_>>());
        let b = scores(&names.iter().map(|n| (n.as_str(), &half[..])).collect::<Vec<_>>());
        let t = paired_test(&a, &b).expect("paired");
        assert!((t.diff - 50.0).abs() < 1e-9);
        assert!(t.significant() && t.p < 1e-3 && t.ci.0 > 40.0, "{t:?}");
        assert_eq!((t.questions, t.clusters), (600, 60));
    }

    #[test]
    fn clustered_noise_is_not_significant() {
        // Half the images favour A on all their questions, half favour B: no effect, and
        // resampling images (not questions) says so.
        let names: Vec<String> = (0..40).map(|i| format!("img{i}")).collect();
        let mut a = Scores::new();
        let mut b = Scores::new();
        for (i, n) in names.iter().enumerate() {
            for q in 0..10 {
                let key = format!("{n}-{q}");
                let (sa, sb) = if i % 2 == 0 { (1.0, 0.0) } else { (0.0, 1.0) };
                a.insert(key.clone(), (n.clone(), vec![sa]));
                b.insert(key, (n.clone(), vec![sb]));
            }
        }
        let t = paired_test(&a, &b).expect("paired");
        assert!(t.diff.abs() < 1e-9 && !t.significant(), "{t:?}");
        assert!(t.ci.0 < 0.0 && t.ci.1 > 0.0);
    }
}
