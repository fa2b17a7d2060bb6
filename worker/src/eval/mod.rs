//! The metrics every trial reports, computed on the host from a finished forward pass.
//!
//! [`evaluate`] takes the inputs, reconstructions and codes of an evaluation pass (usually the
//! validation split), optionally the router scores, labels, decoder atoms and the synthetic
//! ground truth, and returns the metrics under the stable names of [`msae_shared::metrics`]
//! and, with labels, the per-class statistics ([`ClassStats`], summed by [`classes`]). It runs
//! in O(rows * (dim + N)) for the per-row metrics and O(features * N * dim) for MMCS, both split
//! across threads with rayon.

mod classes;

use crate::data::GroundTruth;
use crate::sae::trainer::Inference;
use classes::ClassTally;
use msae_shared::class_stats::ClassStats;
use msae_shared::metrics;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// One evaluation pass, all row-major.
#[derive(Debug, Clone, Copy)]
pub struct EvalInputs<'a> {
    /// Inputs, (rows, dim).
    pub x: &'a [f32],
    /// Reconstructions, (rows, dim).
    pub recon: &'a [f32],
    /// Codes after every sparsity, (rows, num_stripes * stripe_dim); stripe s is the columns
    /// `s * stripe_dim .. (s + 1) * stripe_dim`.
    pub codes: &'a [f32],
    pub dim: usize,
    pub num_stripes: usize,
    pub stripe_dim: usize,
    /// Router scores, (rows, num_stripes), in routing mode: averaged per class when `labels`
    /// are given.
    pub routing: Option<&'a [f32]>,
    /// Decoder atoms, (N, dim) row-major, N = num_stripes * stripe_dim: atom i is the direction
    /// code i writes into the input space. Only read when `truth` is given.
    pub atoms: &'a [f32],
    /// One label per row, for per-class statistics.
    pub labels: Option<&'a [u32]>,
    /// Ground truth, for MMCS and stripe/cluster match.
    pub truth: Option<&'a GroundTruth>,
}

impl<'a> EvalInputs<'a> {
    /// An evaluation pass of a trial config's SAE over `x`: its inference and the rows'
    /// labels, without atoms or ground truth (what an evaluation during training reads; the
    /// final one adds them).
    pub fn pass(
        x: &'a [f32],
        inf: &'a Inference,
        dim: usize,
        cfg: &msae_shared::TrialConfig,
        labels: Option<&'a [u32]>,
    ) -> Self {
        EvalInputs {
            x,
            recon: &inf.recon,
            codes: &inf.codes,
            dim,
            num_stripes: cfg.num_stripes,
            stripe_dim: cfg.stripe_dim,
            routing: inf.routing.as_deref(),
            atoms: &[],
            labels,
            truth: None,
        }
    }
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The metrics, under the stable names of [`msae_shared::metrics`].
    pub scalars: BTreeMap<String, f64>,
    /// With labels: per class, the rows activating each stripe, the mean router score per
    /// stripe (routing mode) and the reconstruction MSE.
    pub classes: Option<ClassStats>,
}

/// Rows per parallel work item: large enough to amortise the per-item count vectors.
const CHUNK_ROWS: usize = 256;

/// Compute the metrics of one evaluation pass.
///
/// Always: `mse` (mean squared error per element), `fvu` (sum (x - x_hat)^2 over
/// sum (x - mean_col(x))^2 with per-dimension means; 0 when both are 0 and +inf when only the
/// denominator is), `l0` (mean non-zero codes per row), `active_stripes` (mean stripes with a
/// non-zero code per row), `dead_neurons` / `dead_stripes` (fraction never non-zero over these
/// rows), `stripe_entropy` (entropy in nats of p_s = count_s / sum count, count_s = rows in which
/// stripe s is active; 0 when nothing fired).
/// With `truth`: `mmcs` and `stripe_cluster_match` (see [`feature_matches`] and
/// [`stripe_cluster_match`]). With `labels`: [`Evaluation::classes`], for classes 0 to the
/// largest label (none, with a warning, when that table would exceed
/// [`msae_shared::class_stats::MAX_CELLS`] cells); a stripe is active in a row when any of its
/// codes is non-zero.
///
/// With zero rows every mean is 0 and every neuron and stripe counts as dead.
///
/// # Panics
/// When the slice lengths disagree with `dim`, `num_stripes * stripe_dim` and the row count
/// (a programming error in the caller, not a data problem).
pub fn evaluate(inp: &EvalInputs) -> Evaluation {
    let dim = inp.dim;
    let s_count = inp.num_stripes;
    let sd = inp.stripe_dim;
    let n_codes = s_count * sd;
    assert!(dim > 0, "evaluate: dim must be positive");
    assert_eq!(
        inp.x.len() % dim,
        0,
        "evaluate: x has {} values, not a multiple of dim {dim}",
        inp.x.len()
    );
    let rows = inp.x.len() / dim;
    assert_eq!(inp.recon.len(), inp.x.len(), "evaluate: recon and x differ in length");
    assert_eq!(
        inp.codes.len(),
        rows * n_codes,
        "evaluate: codes should be rows ({rows}) x num_stripes ({s_count}) x stripe_dim ({sd})"
    );
    if let Some(l) = inp.labels {
        assert_eq!(l.len(), rows, "evaluate: {} labels for {rows} rows", l.len());
    }
    if let Some(r) = inp.routing {
        assert_eq!(r.len(), rows * s_count, "evaluate: routing should be rows x num_stripes");
    }
    let labelled = inp.labels.and_then(|l| Some((l, classes::class_count(l, s_count)?)));
    let routing = inp.routing.filter(|_| labelled.is_some());
    let new_stats = || {
        RowStats::new(
            n_codes,
            s_count,
            labelled.map(|(_, c)| ClassTally::new(c, s_count, routing.is_some())),
        )
    };

    let col_mean = column_means(inp.x, dim);
    let stats = inp
        .x
        .par_chunks(CHUNK_ROWS * dim)
        .enumerate()
        .map(|(chunk, xs)| {
            let r0 = chunk * CHUNK_ROWS;
            let nr = xs.len() / dim;
            let mut st = new_stats();
            let recon = &inp.recon[r0 * dim..(r0 + nr) * dim];
            let codes = &inp.codes[r0 * n_codes..(r0 + nr) * n_codes];
            for i in 0..nr {
                let (xr, rr) = (&xs[i * dim..(i + 1) * dim], &recon[i * dim..(i + 1) * dim]);
                let mut row_sse = 0.0;
                for ((&a, &b), &m) in xr.iter().zip(rr).zip(&col_mean) {
                    let e = (a - b) as f64;
                    row_sse += e * e;
                    let d = a as f64 - m;
                    st.sst += d * d;
                }
                st.sse += row_sse;
                let r = r0 + i;
                let class = labelled.map(|(l, _)| l[r] as usize);
                if let (Some(tally), Some(c)) = (st.classes.as_mut(), class) {
                    let scores = routing.map(|sc| &sc[r * s_count..(r + 1) * s_count]);
                    tally.add_row(c, row_sse, scores);
                }
                let row = &codes[i * n_codes..(i + 1) * n_codes];
                for (s, stripe) in row.chunks_exact(sd.max(1)).enumerate().take(s_count) {
                    let mut any = false;
                    for (j, &v) in stripe.iter().enumerate() {
                        if v != 0.0 {
                            any = true;
                            st.l0 += 1;
                            st.neuron_fired[s * sd + j] = true;
                        }
                    }
                    if any {
                        st.active_stripes += 1;
                        st.stripe_count[s] += 1;
                        if let (Some(tally), Some(c)) = (st.classes.as_mut(), class) {
                            tally.add_active(c, s);
                        }
                    }
                }
            }
            st
        })
        .reduce(new_stats, RowStats::merge);

    let mut out = BTreeMap::new();
    let per_row = |v: f64| if rows > 0 { v / rows as f64 } else { 0.0 };
    let total = (rows * dim) as f64;
    out.insert(metrics::MSE.into(), if rows > 0 { stats.sse / total } else { 0.0 });
    let fvu = if stats.sst > 0.0 {
        stats.sse / stats.sst
    } else if stats.sse == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    out.insert(metrics::FVU.into(), fvu);
    out.insert(metrics::L0.into(), per_row(stats.l0 as f64));
    out.insert(metrics::ACTIVE_STRIPES.into(), per_row(stats.active_stripes as f64));
    let dead_neurons = stats.neuron_fired.iter().filter(|&&f| !f).count();
    out.insert(metrics::DEAD_NEURONS.into(), fraction(dead_neurons, n_codes));
    let dead_stripes = stats.stripe_count.iter().filter(|&&c| c == 0).count();
    out.insert(metrics::DEAD_STRIPES.into(), fraction(dead_stripes, s_count));
    out.insert(metrics::STRIPE_ENTROPY.into(), entropy(&stats.stripe_count));

    if let Some(truth) = inp.truth {
        assert_eq!(
            inp.atoms.len(),
            n_codes * dim,
            "evaluate: atoms should be N ({n_codes}) x dim ({dim})"
        );
        assert_eq!(
            truth.features.len(),
            truth.num_features * dim,
            "evaluate: ground-truth features are not num_features x dim ({dim})"
        );
        let matches = feature_matches(&truth.features, inp.atoms, dim);
        let mmcs = if matches.is_empty() {
            0.0
        } else {
            matches.iter().map(|m| m.map_or(0.0, |(_, c)| c as f64)).sum::<f64>()
                / matches.len() as f64
        };
        out.insert(metrics::MMCS.into(), mmcs);
        let stripe_of: Vec<Option<usize>> =
            matches.iter().map(|m| m.map(|(atom, _)| atom / sd.max(1))).collect();
        out.insert(
            metrics::STRIPE_CLUSTER_MATCH.into(),
            stripe_cluster_match(&stripe_of, &truth.feature_cluster, truth.num_clusters, s_count),
        );
    }
    Evaluation { scalars: out, classes: stats.classes.map(|t| t.finish(dim)) }
}

fn fraction(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Per-dimension means of row-major `x`, in f64.
fn column_means(x: &[f32], dim: usize) -> Vec<f64> {
    let rows = x.len() / dim;
    let sums = x
        .par_chunks(CHUNK_ROWS * dim)
        .map(|xs| {
            let mut s = vec![0f64; dim];
            for row in xs.chunks_exact(dim) {
                s.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
            }
            s
        })
        .reduce(
            || vec![0f64; dim],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    sums.into_iter().map(|s| if rows > 0 { s / rows as f64 } else { 0.0 }).collect()
}

/// Partial sums of one chunk of rows.
struct RowStats {
    sse: f64,
    sst: f64,
    l0: u64,
    active_stripes: u64,
    neuron_fired: Vec<bool>,
    stripe_count: Vec<u64>,
    classes: Option<ClassTally>,
}

impl RowStats {
    fn new(n_codes: usize, stripes: usize, classes: Option<ClassTally>) -> Self {
        RowStats {
            sse: 0.0,
            sst: 0.0,
            l0: 0,
            active_stripes: 0,
            neuron_fired: vec![false; n_codes],
            stripe_count: vec![0; stripes],
            classes,
        }
    }

    fn merge(mut self, o: RowStats) -> RowStats {
        self.sse += o.sse;
        self.sst += o.sst;
        self.l0 += o.l0;
        self.active_stripes += o.active_stripes;
        self.neuron_fired.iter_mut().zip(&o.neuron_fired).for_each(|(a, &b)| *a |= b);
        self.stripe_count.iter_mut().zip(&o.stripe_count).for_each(|(a, b)| *a += b);
        self.classes = match (self.classes, o.classes) {
            (Some(a), Some(b)) => Some(a.merge(b)),
            (a, b) => a.or(b),
        };
        self
    }
}

/// Entropy in nats of the distribution proportional to `counts` (0 when all are 0).
pub fn entropy(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let t = total as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / t;
            -p * p.ln()
        })
        .sum()
}

/// For every true feature (rows of `features`, width `dim`), the atom with the largest cosine
/// similarity and that similarity, or `None` when every atom is zero.
///
/// The cosine is signed: codes are non-negative (ReLU), so a negated atom cannot express its
/// feature and must not count as a match. Zero atoms (dead or pruned) are ignored. The
/// similarities are one GEMM (features x atoms^T on unit vectors), done in blocks of features so
/// memory stays bounded for large dictionaries.
pub fn feature_matches(features: &[f32], atoms: &[f32], dim: usize) -> Vec<Option<(usize, f32)>> {
    let num_features = features.len() / dim.max(1);
    // Normalise the atoms once; zero atoms are dropped but keep their original index.
    let mut unit: Vec<f32> = Vec::with_capacity(atoms.len());
    let mut index: Vec<usize> = Vec::with_capacity(atoms.len() / dim.max(1));
    for (i, a) in atoms.chunks_exact(dim).enumerate() {
        let norm = norm(a);
        if norm > 0.0 && norm.is_finite() {
            unit.extend(a.iter().map(|v| v / norm));
            index.push(i);
        }
    }
    let na = index.len();
    if na == 0 {
        return vec![None; num_features];
    }
    let unit_features: Vec<f32> = features
        .chunks_exact(dim)
        .flat_map(|f| {
            let n = norm(f);
            let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
            f.iter().map(move |v| v * inv)
        })
        .collect();
    // At most ~4M similarities (16 MB) at a time.
    let block = (4 << 20) / na.max(1);
    let block = block.clamp(1, num_features.max(1));
    let mut out = Vec::with_capacity(num_features);
    let mut sims = vec![0f32; block * na];
    for (b, fb) in unit_features.chunks(block * dim).enumerate() {
        let rows = fb.len() / dim;
        // sims[rows, na] = fb[rows, dim] * unit^T.
        crate::sae::linalg::matmul(
            rows,
            na,
            dim,
            &mut sims,
            crate::sae::linalg::Mat::rows(fb, dim),
            crate::sae::linalg::Mat::t(&unit, dim),
        );
        let f0 = b * block;
        let best: Vec<Option<(usize, f32)>> = sims[..rows * na]
            .par_chunks_exact(na)
            .enumerate()
            .map(|(r, row)| {
                let f = &features[(f0 + r) * dim..(f0 + r + 1) * dim];
                if norm(f) == 0.0 {
                    return None;
                }
                let (k, c) =
                    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bk, bc), (k, &c)| {
                        if c > bc { (k, c) } else { (bk, bc) }
                    });
                Some((index[k], c))
            })
            .collect();
        out.extend(best);
    }
    out
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32
}

/// How well learned stripes reproduce the true clusters, in [0, 1].
///
/// Each true feature f is assigned the stripe `stripe_of[f]` of its best-matching atom (features
/// with no match are left out). With n(c, s) the number of cluster-c features assigned to stripe s:
/// - completeness C = mean over clusters (with assigned features) of max_s n(c, s) / n(c): each
///   cluster should land in a single stripe;
/// - purity P = sum over stripes of max_c n(c, s) / total assigned: each stripe should hold a
///   single cluster (without it, collapsing every feature into one stripe would score 1);
/// - the match is their harmonic mean 2CP / (C + P), 1.0 exactly when clusters and the stripes
///   they use correspond one to one, and 0 when no feature is matched.
pub fn stripe_cluster_match(
    stripe_of: &[Option<usize>],
    feature_cluster: &[usize],
    num_clusters: usize,
    num_stripes: usize,
) -> f64 {
    let mut n = vec![0u64; num_clusters * num_stripes];
    let mut total = 0u64;
    for (s, &c) in stripe_of.iter().zip(feature_cluster) {
        if let Some(s) = *s
            && s < num_stripes
            && c < num_clusters
        {
            n[c * num_stripes + s] += 1;
            total += 1;
        }
    }
    if total == 0 {
        return 0.0;
    }
    let mut comp_sum = 0.0;
    let mut clusters_seen = 0usize;
    for c in 0..num_clusters {
        let row = &n[c * num_stripes..(c + 1) * num_stripes];
        let size: u64 = row.iter().sum();
        if size > 0 {
            comp_sum += *row.iter().max().unwrap_or(&0) as f64 / size as f64;
            clusters_seen += 1;
        }
    }
    let completeness = comp_sum / clusters_seen as f64;
    let pure: u64 = (0..num_stripes)
        .map(|s| (0..num_clusters).map(|c| n[c * num_stripes + s]).max().unwrap_or(0))
        .sum();
    let purity = pure as f64 / total as f64;
    2.0 * completeness * purity / (completeness + purity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn hand_computed_metrics() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let recon = [1.0, 2.0, 3.0, 3.0];
        // 3 stripes of 2 neurons.
        let codes = [1.0, 0.0, 0.0, 0.0, 2.0, 3.0, /* row 1 */ 0.0, 0.0, 0.0, 0.0, 0.0, 5.0];
        let labels = [0u32, 2];
        let m = evaluate(&EvalInputs {
            x: &x,
            recon: &recon,
            codes: &codes,
            dim: 2,
            num_stripes: 3,
            stripe_dim: 2,
            routing: None,
            atoms: &[],
            labels: Some(&labels),
            truth: None,
        })
        .scalars;
        assert!(close(m[metrics::MSE], 0.25));
        // Column means (2, 3): total variance 4, error 1.
        assert!(close(m[metrics::FVU], 0.25));
        assert!(close(m[metrics::L0], 2.0));
        assert!(close(m[metrics::ACTIVE_STRIPES], 1.5));
        assert!(close(m[metrics::DEAD_NEURONS], 0.5));
        assert!(close(m[metrics::DEAD_STRIPES], 1.0 / 3.0));
        // Stripe counts (1, 0, 2).
        let h = -(1.0f64 / 3.0 * (1.0f64 / 3.0).ln() + 2.0 / 3.0 * (2.0f64 / 3.0).ln());
        assert!(close(m[metrics::STRIPE_ENTROPY], h));
        assert!(!m.contains_key(metrics::MMCS), "no truth, no mmcs");
        assert_eq!(m.len(), 7, "per-class statistics are no scalars: {m:?}");
    }

    /// Many rows (several parallel chunks) against a plain serial computation.
    #[test]
    fn parallel_chunks_match_serial() {
        let (rows, dim, s, d) = (1000, 3, 4, 2);
        let x: Vec<f32> = (0..rows * dim).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let recon: Vec<f32> =
            x.iter().enumerate().map(|(i, v)| v + ((i % 7) as f32 - 3.0) * 0.1).collect();
        let codes: Vec<f32> = (0..rows * s * d)
            .map(|i| if (i * 13) % 5 == 0 && i % 8 != 7 { 1.0 } else { 0.0 })
            .collect();
        let m = evaluate(&EvalInputs {
            x: &x,
            recon: &recon,
            codes: &codes,
            dim,
            num_stripes: s,
            stripe_dim: d,
            routing: None,
            atoms: &[],
            labels: None,
            truth: None,
        })
        .scalars;
        let sse: f64 = x.iter().zip(&recon).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let mut sst = 0.0;
        for j in 0..dim {
            let col: Vec<f64> = x.iter().skip(j).step_by(dim).map(|&v| v as f64).collect();
            let mean = col.iter().sum::<f64>() / rows as f64;
            sst += col.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
        }
        assert!((m[metrics::MSE] - sse / (rows * dim) as f64).abs() < 1e-9);
        assert!((m[metrics::FVU] - sse / sst).abs() < 1e-9);
        let nz = codes.iter().filter(|&&v| v != 0.0).count();
        assert!(close(m[metrics::L0], nz as f64 / rows as f64));
        let active: usize =
            codes.chunks(d).map(|st| usize::from(st.iter().any(|&v| v != 0.0))).sum();
        assert!(close(m[metrics::ACTIVE_STRIPES], active as f64 / rows as f64));
        assert!(close(m[metrics::DEAD_NEURONS], 1.0 / 8.0), "neuron 7 never fires");
        assert_eq!(m[metrics::DEAD_STRIPES], 0.0);
    }

    #[test]
    fn empty_pass_is_all_dead() {
        let m = evaluate(&EvalInputs {
            x: &[],
            recon: &[],
            codes: &[],
            dim: 4,
            num_stripes: 2,
            stripe_dim: 3,
            routing: None,
            atoms: &[],
            labels: None,
            truth: None,
        })
        .scalars;
        assert_eq!((m[metrics::MSE], m[metrics::L0], m[metrics::FVU]), (0.0, 0.0, 0.0));
        assert_eq!((m[metrics::DEAD_NEURONS], m[metrics::DEAD_STRIPES]), (1.0, 1.0));
    }

    fn eye3_truth() -> GroundTruth {
        GroundTruth {
            features: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            num_features: 3,
            feature_cluster: vec![0, 0, 1],
            num_clusters: 2,
        }
    }

    fn with_atoms(truth: &GroundTruth, atoms: &[f32]) -> BTreeMap<String, f64> {
        let x = [0.0f32; 3];
        evaluate(&EvalInputs {
            x: &x,
            recon: &x,
            codes: &[0.0; 4],
            dim: 3,
            num_stripes: 2,
            stripe_dim: 2,
            routing: None,
            atoms,
            labels: None,
            truth: Some(truth),
        })
        .scalars
    }

    #[test]
    fn mmcs_and_stripe_match_with_known_atoms() {
        let t = eye3_truth();
        // Perfect: cluster 0 (e0, e1) in stripe 0, cluster 1 (e2) in stripe 1, one zero atom.
        let perfect = [1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0];
        let m = with_atoms(&t, &perfect);
        assert!(close(m[metrics::MMCS], 1.0));
        assert!(close(m[metrics::STRIPE_CLUSTER_MATCH], 1.0));
        // Permuted and scaled: e2 -> atom 0 (stripe 0), e0 -> atom 1 (stripe 0), e1 -> atom 3
        // (stripe 1). Cluster 0 splits over two stripes (C = 3/4) and stripe 0 mixes both
        // clusters (P = 2/3): 2CP / (C + P) = 12/17.
        let scrambled = [0.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0];
        let m = with_atoms(&t, &scrambled);
        assert!(close(m[metrics::MMCS], 1.0), "permutation and scale do not matter");
        assert!(close(m[metrics::STRIPE_CLUSTER_MATCH], 12.0 / 17.0));
        // Negated atoms do not count (codes are non-negative): e0 and e1 only find (1,1,0)/sqrt2
        // at cos 1/sqrt2; e2 matches atom 3 exactly.
        let negated = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let m = with_atoms(&t, &negated);
        let want = (2.0 * std::f64::consts::FRAC_1_SQRT_2 + 1.0) / 3.0;
        assert!((m[metrics::MMCS] - want).abs() < 1e-6, "{} vs {want}", m[metrics::MMCS]);
        // All atoms zero: nothing matches.
        let m = with_atoms(&t, &[0.0; 12]);
        assert_eq!((m[metrics::MMCS], m[metrics::STRIPE_CLUSTER_MATCH]), (0.0, 0.0));
    }

    #[test]
    fn stripe_cluster_match_penalises_splits_and_collapse() {
        let clusters = [0, 0, 1, 1];
        let perfect = [Some(1), Some(1), Some(0), Some(0)];
        assert!(close(stripe_cluster_match(&perfect, &clusters, 2, 2), 1.0));
        let scrambled = [Some(0), Some(1), Some(0), Some(1)];
        assert!(close(stripe_cluster_match(&scrambled, &clusters, 2, 2), 0.5));
        // Everything in one stripe: each cluster is whole (C = 1) but the stripe is mixed
        // (P = 1/2), so it scores 2/3, not 1.
        let collapsed = [Some(0); 4];
        assert!(close(stripe_cluster_match(&collapsed, &clusters, 2, 2), 2.0 / 3.0));
        assert_eq!(stripe_cluster_match(&[None; 4], &clusters, 2, 2), 0.0);
    }

    #[test]
    fn entropy_of_uniform_counts() {
        assert!(close(entropy(&[5, 5, 5, 5]), 4f64.ln()));
        assert_eq!(entropy(&[0, 0]), 0.0);
    }

    /// The ground truth itself, laid out as an ideal modular SAE would (cluster c in stripe c),
    /// scores perfectly on synthetic data.
    #[test]
    fn ideal_model_on_synthetic_data() {
        use crate::data::synthetic;
        let cfg = msae_shared::config::SyntheticConfig { num_samples: 500, ..Default::default() };
        let d = synthetic::generate(&cfg, 3).unwrap();
        let (dim, fpc, nc) = (cfg.input_dim, cfg.features_per_cluster, cfg.num_clusters);
        // One stripe per cluster plus two unused stripes, stripe_dim = features_per_cluster.
        let stripes = nc + 2;
        let n = stripes * fpc;
        let mut atoms = vec![0f32; n * dim];
        atoms[..d.truth.features.len()].copy_from_slice(&d.truth.features);
        let mut codes = vec![0f32; d.num_samples * n];
        for i in 0..d.num_samples {
            for &(f, c) in d.active_of(i) {
                codes[i * n + f as usize] = c;
            }
        }
        let m = evaluate(&EvalInputs {
            x: &d.samples,
            recon: &d.samples,
            codes: &codes,
            dim,
            num_stripes: stripes,
            stripe_dim: fpc,
            routing: None,
            atoms: &atoms,
            labels: None,
            truth: Some(&d.truth),
        })
        .scalars;
        assert_eq!(m[metrics::FVU], 0.0);
        assert!(close(m[metrics::L0], 4.0));
        assert!(close(m[metrics::ACTIVE_STRIPES], 2.0));
        assert!(close(m[metrics::DEAD_STRIPES], 2.0 / stripes as f64));
        assert!((m[metrics::MMCS] - 1.0).abs() < 1e-6);
        assert!(close(m[metrics::STRIPE_CLUSTER_MATCH], 1.0));
        // 8 clusters used about equally: entropy close to ln 8.
        assert!((m[metrics::STRIPE_ENTROPY] - 8f64.ln()).abs() < 0.02);
    }

    /// Five rows, two stripes of two codes, labels 0, 2, 2, 0, 2 (class 1 absent), router
    /// scores given: every per-class number worked out by hand.
    fn labelled_pass() -> Evaluation {
        let x = [1.0, 1.0, 2.0, 0.0, 0.0, 2.0, 3.0, 3.0, 4.0, 4.0];
        let recon = [1.0, 0.0, 2.0, 0.0, 1.0, 2.0, 3.0, 1.0, 4.0, 4.0];
        #[rustfmt::skip]
        let codes = [
            0.5, 0.0,  0.0, 0.0, // class 0: stripe 0
            0.0, 0.0,  0.0, 2.0, // class 2: stripe 1
            1.0, 1.0,  0.0, 3.0, // class 2: both
            0.0, 0.0,  0.0, 0.0, // class 0: none
            0.0, 0.0,  0.0, 0.0, // class 2: none
        ];
        let routing = [0.5, -1.0, 0.0, 2.0, 1.0, 1.0, 1.5, 0.0, 2.0, 0.0];
        let labels = [0u32, 2, 2, 0, 2];
        evaluate(&EvalInputs {
            x: &x,
            recon: &recon,
            codes: &codes,
            dim: 2,
            num_stripes: 2,
            stripe_dim: 2,
            routing: Some(&routing),
            atoms: &[],
            labels: Some(&labels),
            truth: None,
        })
    }

    #[test]
    fn per_class_stripe_activations_routing_scores_and_losses() {
        let e = labelled_pass();
        let c = e.classes.expect("labels give per-class statistics");
        assert_eq!((c.num_stripes(), c.num_classes()), (2, 3));
        assert_eq!(c.class_samples(), [2, 0, 3]);
        assert_eq!(c.present_classes().collect::<Vec<_>>(), [0, 2]);
        // Stripe 0: one class-0 row, one class-2 row; stripe 1: two class-2 rows.
        assert_eq!(c.active_counts(), [1, 0, 1, 0, 0, 2]);
        // Class 0 rows score (0.5, -1) and (1.5, 0); class 2 rows (0, 2), (1, 1), (2, 0).
        assert_eq!(c.routing_scores().unwrap(), [1.0, 0.0, 1.0, -0.5, 0.0, 1.0]);
        // Squared errors per row: 1, 0, 1, 4, 0 over dim 2: class 0 (1 + 4) / 4, class 2
        // (0 + 1 + 0) / 6.
        assert_eq!(c.class_mse(), [1.25, 0.0, 1.0 / 6.0]);
        // The per-class losses are the overall MSE split by class.
        assert!(close(e.scalars[metrics::MSE], 6.0 / 10.0));
    }

    #[test]
    fn without_router_scores_or_labels_fewer_statistics() {
        let x = [0.0f32; 3];
        let base = EvalInputs {
            x: &x,
            recon: &x,
            codes: &[1.0, 0.0, 0.0],
            dim: 1,
            num_stripes: 1,
            stripe_dim: 1,
            routing: Some(&[0.25, 0.5, 0.75]),
            atoms: &[],
            labels: None,
            truth: None,
        };
        assert_eq!(evaluate(&base).classes, None, "no labels, no per-class statistics");
        let c = evaluate(&EvalInputs { routing: None, labels: Some(&[1, 1, 0]), ..base })
            .classes
            .unwrap();
        assert_eq!((c.active_counts(), c.routing_scores()), (&[0, 1][..], None));
        let c = evaluate(&EvalInputs { labels: Some(&[1, 1, 0]), ..base }).classes.unwrap();
        assert_eq!(c.routing_scores().unwrap(), [0.75, 0.375]);
    }

    /// Many rows (several parallel chunks) against a serial count.
    #[test]
    fn per_class_counts_survive_parallel_chunks() {
        let (rows, s) = (1000usize, 3usize);
        let codes: Vec<f32> = (0..rows * s).map(|i| ((i * 7) % 4 == 0) as u8 as f32).collect();
        let labels: Vec<u32> = (0..rows).map(|r| (r % 5) as u32).collect();
        let x = vec![0.0f32; rows];
        let c = evaluate(&EvalInputs {
            x: &x,
            recon: &x,
            codes: &codes,
            dim: 1,
            num_stripes: s,
            stripe_dim: 1,
            routing: None,
            atoms: &[],
            labels: Some(&labels),
            truth: None,
        })
        .classes
        .unwrap();
        for stripe in 0..s {
            for class in 0..5 {
                let want = (0..rows)
                    .filter(|&r| r % 5 == class && codes[r * s + stripe] != 0.0)
                    .count() as u64;
                assert_eq!(c.active(stripe, class), want, "stripe {stripe} class {class}");
            }
        }
        assert_eq!(c.class_samples(), [200; 5]);
    }

    #[test]
    fn huge_labels_skip_class_statistics() {
        let x = [0.0f32; 2];
        let e = evaluate(&EvalInputs {
            x: &x,
            recon: &x,
            codes: &[1.0, 0.0],
            dim: 1,
            num_stripes: 1,
            stripe_dim: 1,
            routing: None,
            atoms: &[],
            labels: Some(&[3_000_000_000, 1]),
            truth: None,
        });
        assert_eq!(e.classes, None);
        assert_eq!(e.scalars[metrics::L0], 0.5);
    }
}
