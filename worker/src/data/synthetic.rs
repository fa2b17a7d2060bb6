//! The synthetic default: sparse sums of clustered ground-truth features, generated from a seed.
//!
//! `num_clusters * features_per_cluster` unit-norm features in R^input_dim (Gaussian, then
//! normalised), feature `f` belonging to cluster `f / features_per_cluster`. Each sample picks
//! `active_clusters` distinct clusters and `active_features` distinct features in each, with
//! coefficients uniform in [coef_min, coef_max]: x = sum c_i g_i + N(0, noise_std^2) per element.
//! The clusters are the "true stripes" a modular SAE should discover; the known features let a
//! trial report MMCS. Everything comes from one `StdRng` (ChaCha12) seeded with the seed, so every
//! worker builds identical bytes without shipping files; samples are generated in order, so the
//! first k samples do not depend on how many are generated.

use super::{DataError, GroundTruth};
use msae_shared::config::SyntheticConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// Generated samples and how they were made.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticData {
    /// Row-major (num_samples, dim).
    pub samples: Vec<f32>,
    pub num_samples: usize,
    pub dim: usize,
    /// The active (feature, coefficient) pairs, `active_per_sample` per sample, sample-major.
    /// Noise-free samples are exactly `sum coefficient * feature` over a sample's pairs.
    pub active: Vec<(u32, f32)>,
    /// `active_clusters * active_features`.
    pub active_per_sample: usize,
    pub truth: GroundTruth,
}

impl SyntheticData {
    /// The active (feature, coefficient) pairs of sample `i`.
    pub fn active_of(&self, i: usize) -> &[(u32, f32)] {
        &self.active[i * self.active_per_sample..(i + 1) * self.active_per_sample]
    }
}

/// Generate `cfg.num_samples` samples from `seed`.
pub fn generate(cfg: &SyntheticConfig, seed: u64) -> Result<SyntheticData, DataError> {
    generate_n(cfg, seed, cfg.num_samples)
}

/// Generate the first `n` samples of the dataset `cfg` and `seed` describe (identical to the
/// first `n` rows of [`generate`]).
pub fn generate_n(cfg: &SyntheticConfig, seed: u64, n: usize) -> Result<SyntheticData, DataError> {
    check(cfg)?;
    let dim = cfg.input_dim;
    let fpc = cfg.features_per_cluster;
    let num_features = cfg.num_features();
    let mut rng = StdRng::seed_from_u64(seed);

    let mut features = vec![0f32; num_features * dim];
    let mut g = vec![0f64; dim];
    for row in features.chunks_exact_mut(dim) {
        // A zero Gaussian draw has probability 0, but redraw rather than divide by zero.
        loop {
            g.iter_mut().for_each(|v| *v = StandardNormal.sample(&mut rng));
            let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 1e-12 {
                row.iter_mut().zip(&g).for_each(|(r, v)| *r = (v / norm) as f32);
                break;
            }
        }
    }
    let feature_cluster: Vec<usize> = (0..num_features).map(|f| f / fpc).collect();

    let per_sample = cfg.active_clusters * cfg.active_features;
    let mut samples = vec![0f32; n * dim];
    let mut active = Vec::with_capacity(n * per_sample);
    // Partial Fisher-Yates on persistent permutations: any permutation as a starting point
    // yields a uniform k-subset, so the buffers need no reset between samples.
    let mut clusters: Vec<usize> = (0..cfg.num_clusters).collect();
    let mut within: Vec<usize> = (0..fpc).collect();
    let noise = cfg.noise_std;
    for x in samples.chunks_exact_mut(dim) {
        for a in 0..cfg.active_clusters {
            let j = rng.random_range(a..clusters.len());
            clusters.swap(a, j);
            let c = clusters[a];
            for b in 0..cfg.active_features {
                let j = rng.random_range(b..within.len());
                within.swap(b, j);
                let f = c * fpc + within[b];
                let coef = rng.random_range(cfg.coef_min..=cfg.coef_max) as f32;
                active.push((f as u32, coef));
                let g = &features[f * dim..(f + 1) * dim];
                x.iter_mut().zip(g).for_each(|(xv, gv)| *xv += coef * gv);
            }
        }
        if noise > 0.0 {
            for xv in x.iter_mut() {
                let z: f64 = StandardNormal.sample(&mut rng);
                *xv += (z * noise) as f32;
            }
        }
    }
    Ok(SyntheticData {
        samples,
        num_samples: n,
        dim,
        active,
        active_per_sample: per_sample,
        truth: GroundTruth {
            features,
            num_features,
            feature_cluster,
            num_clusters: cfg.num_clusters,
        },
    })
}

/// The checks generation needs: the config's own (`load` may be called on a config that was
/// never validated).
fn check(cfg: &SyntheticConfig) -> Result<(), DataError> {
    cfg.validate().map_err(|e| DataError::InvalidConfig { field: e.field, reason: e.message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            input_dim: 16,
            num_clusters: 5,
            features_per_cluster: 4,
            active_clusters: 2,
            active_features: 3,
            num_samples: 300,
            coef_min: 0.5,
            coef_max: 1.5,
            noise_std: 0.0,
        }
    }

    fn bytes(d: &SyntheticData) -> Vec<u8> {
        d.samples.iter().chain(&d.truth.features).flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn same_seed_same_bytes_different_seed_differs() {
        let cfg = SyntheticConfig { noise_std: 0.1, ..small() };
        let a = generate(&cfg, 7).unwrap();
        let b = generate(&cfg, 7).unwrap();
        assert_eq!(bytes(&a), bytes(&b));
        assert_eq!(a.active, b.active);
        let c = generate(&cfg, 8).unwrap();
        assert_ne!(a.samples, c.samples);
        assert_ne!(a.truth.features, c.truth.features);
    }

    #[test]
    fn prefix_does_not_depend_on_count() {
        let cfg = small();
        let all = generate(&cfg, 3).unwrap();
        let few = generate_n(&cfg, 3, 10).unwrap();
        assert_eq!(few.samples[..], all.samples[..10 * cfg.input_dim]);
        assert_eq!(few.truth, all.truth);
    }

    #[test]
    fn features_are_unit_norm_and_clustered() {
        let cfg = small();
        let d = generate(&cfg, 1).unwrap();
        let t = &d.truth;
        assert_eq!(t.num_features, 20);
        assert_eq!(t.num_clusters, 5);
        assert_eq!(t.features.len(), 20 * 16);
        for f in t.features.chunks_exact(16) {
            let n: f32 = f.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5, "norm {n}");
        }
        assert_eq!(t.feature_cluster, (0..20).map(|f| f / 4).collect::<Vec<_>>());
    }

    #[test]
    fn samples_are_exact_sparse_sums_of_features() {
        let cfg = small();
        let d = generate(&cfg, 11).unwrap();
        let dim = cfg.input_dim;
        assert_eq!(d.active_per_sample, 6);
        assert_eq!(d.active.len(), 300 * 6);
        let mut used_clusters = std::collections::BTreeSet::new();
        for i in 0..d.num_samples {
            let act = d.active_of(i);
            let mut feats: Vec<u32> = act.iter().map(|a| a.0).collect();
            feats.sort();
            feats.dedup();
            assert_eq!(feats.len(), 6, "sample {i}: features not distinct: {act:?}");
            let mut per_cluster = std::collections::BTreeMap::new();
            for &(f, c) in act {
                assert!((0.5..=1.5).contains(&c), "coefficient {c}");
                *per_cluster.entry(d.truth.feature_cluster[f as usize]).or_insert(0) += 1;
            }
            assert_eq!(per_cluster.len(), 2, "sample {i}: {per_cluster:?}");
            assert!(per_cluster.values().all(|&k| k == 3), "sample {i}: {per_cluster:?}");
            used_clusters.extend(per_cluster.keys().copied());
            let mut expect = vec![0f32; dim];
            for &(f, c) in act {
                let g = &d.truth.features[f as usize * dim..(f as usize + 1) * dim];
                expect.iter_mut().zip(g).for_each(|(e, g)| *e += c * g);
            }
            let x = &d.samples[i * dim..(i + 1) * dim];
            for (a, b) in x.iter().zip(&expect) {
                assert!((a - b).abs() < 1e-6, "sample {i}: {a} vs {b}");
            }
        }
        assert_eq!(used_clusters.len(), 5, "every cluster is drawn at some point");
    }

    #[test]
    fn noise_has_the_requested_std() {
        let cfg = SyntheticConfig { noise_std: 0.2, num_samples: 2000, ..small() };
        let noisy = generate(&cfg, 5).unwrap();
        let dim = cfg.input_dim;
        let mut sq = 0f64;
        for i in 0..noisy.num_samples {
            let mut clean = vec![0f32; dim];
            for &(f, c) in noisy.active_of(i) {
                let g = &noisy.truth.features[f as usize * dim..(f as usize + 1) * dim];
                clean.iter_mut().zip(g).for_each(|(e, g)| *e += c * g);
            }
            let x = &noisy.samples[i * dim..(i + 1) * dim];
            sq += x.iter().zip(&clean).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        }
        let std = (sq / (2000 * dim) as f64).sqrt();
        assert!((std - 0.2).abs() < 0.01, "noise std {std}");
    }

    #[test]
    fn invalid_config_names_the_field() {
        let cfg = SyntheticConfig { active_features: 9, ..small() };
        let e = generate(&cfg, 0).unwrap_err().to_string();
        assert!(e.contains("data.synthetic.active_features"), "{e}");
        let cfg = SyntheticConfig { coef_min: 2.0, ..small() };
        assert!(generate(&cfg, 0).unwrap_err().to_string().contains("coef_min"));
    }

    #[test]
    fn default_generation_is_fast() {
        let cfg = SyntheticConfig::default();
        let t = std::time::Instant::now();
        let d = generate(&cfg, 0).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(d.num_samples, 16384);
        // Generous bound for slow debug CI; typically a few ms.
        assert!(ms < 500.0, "generating the default took {ms:.1} ms");
    }
}
