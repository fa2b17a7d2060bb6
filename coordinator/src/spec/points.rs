//! The whole-space check of a parsed sweep: every point that can run is built into a trial
//! config and validated, so cross-field rules (`stripe_k <= num_stripes`, `layer_k` within the
//! code layer) hold everywhere before the first trial starts. A refused point is blamed on the
//! parameter value (or `base` key) the config error names, at its YAML line and column.

use super::locate::{Seg, segs};
use super::parse::{Parser, join, show};
use super::*;
use std::collections::HashMap;

/// A parameter's candidate values, each with the YAML path (below the parameter) to blame.
type Candidates = Vec<(Value, Vec<Seg>)>;

impl Parser<'_> {
    /// Build and validate every point that can run (see the module doc for what is checked).
    pub(super) fn check_points(
        &self,
        spec: &SweepSpec,
        base_leaves: &HashMap<String, Vec<Seg>>,
    ) -> Result<(), SpecError> {
        // Per parameter: the candidate values and where each is written.
        let mut axes: Vec<(&str, Candidates)> = Vec::new();
        for (pname, p) in &spec.parameters {
            let at = segs!["parameters", pname.as_str()];
            let candidates: Candidates = match spec.method {
                Method::Grid => {
                    let values = p
                        .grid_values()
                        .map_err(|m| self.err(&at, format!("parameter `{pname}`: {m}")))?;
                    let blame = p.edge_values();
                    values
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| {
                            // Lists blame the element; expanded ranges blame the distribution.
                            let seg = match p {
                                ParamSpec::Distribution(
                                    Distribution::IntUniform { .. } | Distribution::QUniform { .. },
                                ) => segs!["distribution"].to_vec(),
                                _ => blame.get(i).map(|b| b.1.clone()).unwrap_or_default(),
                            };
                            (normalize_value(pname, v), seg)
                        })
                        .collect()
                }
                // Sampled or searched: the edges of each range bound every value.
                _ => p
                    .edge_values()
                    .into_iter()
                    .map(|(v, seg)| match v.as_f64() {
                        Some(x) if v.is_f64() => (sample_value(pname, x), seg),
                        _ => (normalize_value(pname, v), seg),
                    })
                    .collect(),
            };
            // Types first, one value at a time, so a type error names its own value.
            for (v, seg) in &candidates {
                let mut single = Value::Object(Map::new());
                set_path(&mut single, pname, v.clone())
                    .map_err(|e| self.err(&at, e.to_string()))?;
                if let Err(e) = TrialConfig::from_value(single) {
                    return Err(self.err(
                        &join(&at, seg),
                        format!("parameter `{pname}`: value {}: {}", show(v), e.message),
                    ));
                }
            }
            axes.push((pname.as_str(), candidates));
        }

        let total = axes.iter().try_fold(1u64, |acc, (_, c)| acc.checked_mul(c.len() as u64));
        let to_check = match spec.method {
            Method::Grid => {
                let runnable = match (total, spec.run_cap) {
                    (Some(t), Some(cap)) => Some(t.min(cap)),
                    (t, None) => t,
                    (None, Some(cap)) => Some(cap),
                };
                match runnable {
                    Some(n) if n <= MAX_CHECKED_POINTS => n,
                    _ => {
                        return Err(self.err(
                            &segs!["parameters"],
                            format!(
                                "the grid has {} points; at most {MAX_CHECKED_POINTS} can be checked before the \
                                 sweep starts: reduce it or set `run_cap`",
                                total.map(|t| t.to_string()).unwrap_or_else(|| "more than 2^64".into())
                            ),
                        ));
                    }
                }
            }
            _ => match total {
                Some(t) if t <= MAX_CHECKED_POINTS => t,
                _ => {
                    // Too many edge combinations: each parameter's edges alone against base.
                    for (pname, candidates) in &axes {
                        for (i, _) in candidates.iter().enumerate() {
                            let mut point = BTreeMap::new();
                            point.insert(pname.to_string(), candidates[i].0.clone());
                            let choice: Vec<usize> = axes
                                .iter()
                                .map(|(n, _)| if n == pname { i } else { usize::MAX })
                                .collect();
                            self.check_one(spec, &axes, &choice, &point, base_leaves)?;
                        }
                    }
                    return Ok(());
                }
            },
        };

        // Mixed-radix enumeration, last parameter fastest (the grid's proposal order).
        let mut choice = vec![0usize; axes.len()];
        for _ in 0..to_check {
            let point: BTreeMap<String, Value> = axes
                .iter()
                .zip(&choice)
                .map(|((n, c), &i)| (n.to_string(), c[i].0.clone()))
                .collect();
            self.check_one(spec, &axes, &choice, &point, base_leaves)?;
            for d in (0..axes.len()).rev() {
                choice[d] += 1;
                if choice[d] < axes[d].1.len() {
                    break;
                }
                choice[d] = 0;
            }
        }
        Ok(())
    }

    /// Validate one point; on failure blame the parameter (or base key) the config error names.
    fn check_one(
        &self,
        spec: &SweepSpec,
        axes: &[(&str, Candidates)],
        choice: &[usize],
        point: &BTreeMap<String, Value>,
        base_leaves: &HashMap<String, Vec<Seg>>,
    ) -> Result<(), SpecError> {
        let Err(e) = spec.build_config(point) else { return Ok(()) };
        let others = |skip: &str| -> String {
            let rest: Vec<String> = point
                .iter()
                .filter(|(k, _)| *k != skip)
                .map(|(k, v)| format!("{k} = {}", show(v)))
                .collect();
            if rest.is_empty() { String::new() } else { format!(" (with {})", rest.join(", ")) }
        };
        if let Some(d) = axes.iter().position(|(n, _)| *n == e.field)
            && let Some((v, seg)) = axes[d].1.get(choice[d])
        {
            let at = join(&segs!["parameters", axes[d].0], seg);
            return Err(self.err(
                &at,
                format!("parameter `{}`: value {}{}: {e}", e.field, show(v), others(&e.field)),
            ));
        }
        if let Some(at) = base_leaves.get(&e.field) {
            return Err(self.err(at, format!("base `{}`{}: {e}", e.field, others(""))));
        }
        let what = if point.is_empty() {
            "the base config".to_string()
        } else {
            format!("the point{}", others(""))
        };
        Err(self.err(&segs!["parameters"], format!("{what} is not a valid trial config: {e}")))
    }
}
