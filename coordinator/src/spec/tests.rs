//! Tests of sweep parsing and validation: shapes, messages with line and column, fingerprints.

use super::*;
use serde_json::json;

fn parse(text: &str) -> Result<SweepSpec, SpecError> {
    SweepSpec::parse(text, "sweep.yaml")
}

fn parse_err(text: &str) -> SpecError {
    match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

const FULL: &str = "\
# A full example.
name: demo-1.x
description: all the keys
metric:
  name: mse
  goal: maximize
method: random
run_cap: 20
max_concurrent: 4
seed: 9
max_attempts: 5
timeout: 1h30m
task: {kind: noop, sleep_ms: 25}
base:
  steps: 600
  data.synthetic.noise_std: 0.01
  data:
    synthetic:
      num_clusters: 4
parameters:
  lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}
  layer_k: {min: 2, max: 16}
  l1_weight: {min: 0, max: 0.5}
  kl_target: {q: 0.05, min: 0.05, max: 0.5}
  optimizer: {values: [adam, sgd], probabilities: [0.25, 0.75]}
  stripe_sparsity_mode: {values: [none, ordinary]}
  seed: {value: 3}
";

#[test]
fn full_spec_parses() {
    let s = parse(FULL).unwrap();
    assert_eq!(s.name, "demo-1.x");
    assert_eq!(s.description.as_deref(), Some("all the keys"));
    assert_eq!(s.metric, MetricSpec { name: "mse".into(), goal: Goal::Maximize, custom: false });
    assert_eq!(s.method, Method::Random);
    assert_eq!((s.run_cap, s.max_concurrent, s.seed, s.max_attempts), (Some(20), Some(4), 9, 5));
    assert_eq!(s.timeout, Some(Duration::from_secs(5400)));
    assert_eq!(s.task, TaskSpec { kind: RunnerKind::Noop, sleep_ms: 25 });
    // Dotted and nested base keys merge into one nested block.
    assert_eq!(
        Value::Object(s.base.clone()),
        json!({"steps": 600, "data": {"synthetic": {"noise_std": 0.01, "num_clusters": 4}}})
    );
    // Distributions inferred as W&B does.
    assert_eq!(
        s.parameters["layer_k"],
        ParamSpec::Distribution(Distribution::IntUniform { min: 2, max: 16 })
    );
    assert_eq!(
        s.parameters["l1_weight"],
        ParamSpec::Distribution(Distribution::Uniform { min: 0.0, max: 0.5 })
    );
    assert_eq!(
        s.parameters["kl_target"],
        ParamSpec::Distribution(Distribution::QUniform { min: 0.05, max: 0.5, q: 0.05 })
    );
    assert_eq!(
        s.parameters["optimizer"],
        ParamSpec::Distribution(Distribution::Categorical {
            values: vec![json!("adam"), json!("sgd")],
            probabilities: Some(vec![0.25, 0.75])
        })
    );
    assert_eq!(
        s.parameters["stripe_sparsity_mode"],
        ParamSpec::Values(vec![json!("none"), json!("ordinary")])
    );
    assert_eq!(s.parameters["seed"], ParamSpec::Value(json!(3)));
    assert_eq!(s.planned_trials(), Some(20));
}

#[test]
fn defaults() {
    let s = parse("name: d\nmethod: grid\n").unwrap();
    assert_eq!(s.metric, MetricSpec { name: "fvu".into(), goal: Goal::Minimize, custom: false });
    assert_eq!((s.max_attempts, s.seed, s.run_cap, s.timeout), (3, 0, None, None));
    assert_eq!(s.task, TaskSpec { kind: RunnerKind::Sae, sleep_ms: 0 });
    assert!(s.parameters.is_empty() && s.base.is_empty());
    assert_eq!(s.planned_trials(), Some(1));
}

#[test]
fn error_display_has_file_line_column() {
    let e = SpecError {
        source: "a.yaml".into(),
        line: Some(3),
        column: Some(7),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "a.yaml:3:7: bad");
    let e = SpecError { source: "a.yaml".into(), line: None, column: None, message: "bad".into() };
    assert_eq!(e.to_string(), "a.yaml: bad");
}

#[test]
fn syntax_error_has_location() {
    let e = parse_err("name: x\nmethod: grid\nparameters:\n  lr: {values: [1, 2}\n");
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.to_string().starts_with("sweep.yaml:4:"), "{e}");
}

#[test]
fn unknown_top_level_key_suggests() {
    let e = parse_err("name: x\nmethod: random\nrun_caps: 5\n");
    assert_eq!((e.line, e.column), (Some(3), Some(1)), "{e}");
    assert!(e.message.contains("unknown key `run_caps`"), "{e}");
    assert!(e.message.contains("did you mean `run_cap`?"), "{e}");
}

#[test]
fn unknown_nested_keys_suggest() {
    let e = parse_err("name: x\nmethod: grid\nmetric:\n  name: fvu\n  gaol: minimize\n");
    assert_eq!((e.line, e.column), (Some(5), Some(3)), "{e}");
    assert!(e.message.contains("did you mean `goal`?"), "{e}");

    let e = parse_err("name: x\nmethod: grid\ntask: {kind: noop, sleep: 3}\n");
    assert_eq!((e.line, e.column), (Some(3), Some(20)), "{e}");
    assert!(e.message.contains("did you mean `sleep_ms`?"), "{e}");

    let e = parse_err("name: x\nmethod: grid\nparameters:\n  lr:\n    valuess: [0.1]\n");
    assert_eq!((e.line, e.column), (Some(5), Some(5)), "{e}");
    assert!(e.message.contains("did you mean `values`?"), "{e}");
}

#[test]
fn unknown_choices_suggest() {
    let e = parse_err("name: x\nmethod: grdi\n");
    assert!(e.message.contains("did you mean `grid`?"), "{e}");
    assert_eq!(e.line, Some(2));
    let e = parse_err("name: x\nmethod: grid\nmetric: {goal: minimise}\n");
    assert!(e.message.contains("did you mean `minimize`?"), "{e}");
    let e = parse_err(
        "name: x\nmethod: random\nrun_cap: 3\nparameters:\n  lr: {distribution: log_uniform, min: 1, max: 2}\n",
    );
    assert!(e.message.contains("did you mean `log_uniform_values`?"), "{e}");
    assert_eq!(e.line, Some(5));
    let e = parse_err("name: x\nmethod: nelder_mead\n");
    assert!(e.message.contains("searches numeric parameters"), "{e}");
}

#[test]
fn unknown_metric_is_refused_unless_declared_custom() {
    // Regression: `metric: {name: fuv}` ran the whole sweep with nothing to rank by.
    let e = parse_err("name: x\nmethod: grid\nmetric:\n  name: fuv\n");
    assert!(e.message.contains("unknown metric `fuv`"), "{e}");
    assert!(e.message.contains("did you mean `fvu`?"), "{e}");
    assert_eq!(e.line, Some(4), "{e}");
    let s =
        parse("name: x\nmethod: grid\nmetric: {name: my_score, goal: maximize, custom: true}\n")
            .unwrap();
    assert!(s.metric.custom);
    let e = parse_err("name: x\nmethod: grid\nmetric: {name: fvu, custom: yes please}\n");
    assert!(e.message.contains("true or false"), "{e}");
    for ok in ["samples_per_s", "steps", "mmcs"] {
        parse(&format!("name: x\nmethod: grid\nmetric: {{name: {ok}}}\n")).unwrap();
    }
    // `custom: false` (the default) does not change the fingerprint of existing sweeps.
    let a = parse("name: x\nmethod: grid\nmetric: {name: fvu}\n").unwrap();
    let b = parse("name: x\nmethod: grid\nmetric: {name: fvu, custom: false}\n").unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
}

/// The metric table drives the parser: every row is a known metric (ranked in the goal the
/// sweep says, minimize by default), and the refusal lists exactly the table's names.
#[test]
fn known_metrics_are_the_metric_table() {
    for m in msae_shared::metrics::TABLE {
        let s = parse(&format!("name: x\nmethod: grid\nmetric: {{name: {}}}\n", m.name)).unwrap();
        assert_eq!(
            s.metric,
            MetricSpec { name: m.name.into(), goal: Goal::Minimize, custom: false }
        );
    }
    let e = parse_err("name: x\nmethod: grid\nmetric: {name: nothing_like_it}\n");
    let names: Vec<&str> = msae_shared::metrics::TABLE.iter().map(|m| m.name).collect();
    assert!(e.message.contains(&format!("standard metrics: {};", names.join(", "))), "{e}");
    for goal in Goal::NAMES {
        parse(&format!("name: x\nmethod: grid\nmetric: {{name: fvu, goal: {goal}}}\n")).unwrap();
    }
    let e = parse_err("name: x\nmethod: grid\nmetric: {name: fvu, goal: maximise}\n");
    assert!(e.message.contains("must be one of minimize, maximize"), "{e}");
}

#[test]
fn unknown_parameter_and_base_keys_suggest_config_paths() {
    let e = parse_err("name: x\nmethod: grid\nparameters:\n  stripe_kk: {values: [1]}\n");
    assert_eq!((e.line, e.column), (Some(4), Some(3)), "{e}");
    assert!(
        e.message.contains("`stripe_kk` is not a trial-config field; did you mean `stripe_k`?"),
        "{e}"
    );

    let e =
        parse_err("name: x\nmethod: grid\nbase:\n  data:\n    synthetic:\n      noise_sd: 0.1\n");
    assert_eq!((e.line, e.column), (Some(6), Some(7)), "{e}");
    assert!(e.message.contains("data.synthetic.noise_sd"), "{e}");
    assert!(e.message.contains("did you mean `data.synthetic.noise_std`?"), "{e}");
}

#[test]
fn required_fields() {
    assert!(parse_err("method: grid\n").message.contains("missing `name`"));
    assert!(parse_err("name: x\n").message.contains("missing `method`"));
    let e = parse_err("name: x\nmethod: random\n");
    assert!(e.message.contains("needs `run_cap`"), "{e}");
    assert_eq!(e.line, Some(2));
    let e = parse_err("name: has space\nmethod: grid\n");
    assert!(e.message.contains("may only use"), "{e}");
}

#[test]
fn value_checks() {
    let head = "name: x\nmethod: random\nrun_cap: 3\nparameters:\n";
    let cases = [
        ("  lr: {distribution: uniform, min: 0.1, max: 0.1}\n", "must be less than max", 5),
        ("  lr: {distribution: log_uniform_values, min: 0, max: 1}\n", "needs min > 0", 5),
        ("  kl_target: {distribution: q_uniform, min: 0.1, max: 0.5, q: 0}\n", "q must be > 0", 5),
        ("  layer_k: {distribution: int_uniform, min: 1.5, max: 4}\n", "integer `min`", 5),
        ("  optimizer: {values: [adam, sgd], probabilities: [0.5, 0.6]}\n", "sum to 1.1", 5),
        (
            "  optimizer: {values: [adam, sgd], probabilities: [1.0]}\n",
            "1 probabilities for 2 values",
            5,
        ),
        ("  optimizer: {values: []}\n", "non-empty list", 5),
        ("  lr: {value: 0.1, values: [0.2]}\n", "cannot be combined with `value`", 5),
        ("  lr: {distribution: uniform, min: 0.1, max: 0.2, q: 0.1}\n", "only to q_uniform", 5),
        ("  lr: {distribution: uniform, min: 0.1}\n", "needs `max`", 5),
        ("  lr: 0.1\n", "must be a mapping", 5),
        ("  lr: {}\n", "needs `value`, `values` or `distribution`", 5),
    ];
    for (param, want, line) in cases {
        let e = parse_err(&format!("{head}{param}"));
        assert!(e.message.contains(want), "{param}: {e}");
        assert_eq!(e.line, Some(line), "{param}: {e}");
    }
    let e = parse_err("name: x\nmethod: grid\nmax_attempts: 0\n");
    assert!(e.message.contains("at least 1"), "{e}");
    let e = parse_err("name: x\nmethod: grid\ntimeout: 5 parsecs\n");
    assert!(e.message.contains("unknown unit `parsecs`"), "{e}");
    let e = parse_err("name: x\nmethod: grid\nrun_cap: lots\n");
    assert!(e.message.contains("non-negative integer"), "{e}");
}

#[test]
fn durations() {
    let d = |t: &str| parse(&format!("name: x\nmethod: grid\ntimeout: {t}\n")).map(|s| s.timeout);
    assert_eq!(d("90").unwrap(), Some(Duration::from_secs(90)));
    assert_eq!(d("2.5").unwrap(), Some(Duration::from_millis(2500)));
    assert_eq!(d("90s").unwrap(), Some(Duration::from_secs(90)));
    assert_eq!(d("30m").unwrap(), Some(Duration::from_secs(1800)));
    assert_eq!(d("2h").unwrap(), Some(Duration::from_secs(7200)));
    assert_eq!(d("1h30m").unwrap(), Some(Duration::from_secs(5400)));
    assert_eq!(d("250ms").unwrap(), Some(Duration::from_millis(250)));
    assert!(d("0").is_err());
    assert!(d("-3s").is_err());
}

#[test]
fn grid_point_refused_names_parameter_value_and_line() {
    let text = "\
name: x
method: grid
parameters:
  layer_sparsity_mode: {value: ordinary}
  layer_k:
    values:
      - 8
      - 300
";
    let e = parse_err(text);
    assert_eq!((e.line, e.column), (Some(8), Some(9)), "{e}");
    assert_eq!(
        e.message,
        "parameter `layer_k`: value 300 (with layer_sparsity_mode = \"ordinary\"): layer_k: 300 is larger \
         than the code layer (16 stripes x 16 = 256 neurons)"
    );
}

#[test]
fn grid_cross_parameter_rule_checked_for_every_point() {
    // stripe_k = 8 is fine with 16 stripes but not with 4: only that combination fails.
    let text = "\
name: x
method: grid
base:
  stripe_sparsity_mode: ordinary
parameters:
  num_stripes: {values: [16, 4]}
  stripe_k: {values: [2, 8]}
";
    let e = parse_err(text);
    assert!(e.message.contains("parameter `stripe_k`: value 8 (with num_stripes = 4)"), "{e}");
    assert!(e.message.contains("larger than num_stripes (4)"), "{e}");
    assert_eq!(e.line, Some(7), "{e}");
    // A combination that is valid everywhere passes, even if a value alone would not be valid
    // with the defaults (layer_k 300 needs the wider stripes).
    parse("name: x\nmethod: grid\nbase: {stripe_dim: 32}\nparameters:\n  layer_k: {values: [300, 400]}\n").unwrap();
}

#[test]
fn base_value_refused_is_located() {
    let e = parse_err(
        "name: x\nmethod: grid\nbase:\n  stripe_sparsity_mode: routing\n  stripe_k: 20\n",
    );
    assert_eq!((e.line, e.column), (Some(5), Some(3)), "{e}");
    assert!(e.message.contains("base `stripe_k`"), "{e}");
    let e = parse_err("name: x\nmethod: grid\nbase:\n  steps: many\n");
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("base `steps`: value \"many\""), "{e}");
    let e =
        parse_err("name: x\nmethod: grid\nbase: {lr: 0.1}\nparameters:\n  lr: {values: [0.2]}\n");
    assert!(e.message.contains("also set in `base`"), "{e}");
}

#[test]
fn type_errors_name_the_value() {
    let e = parse_err("name: x\nmethod: grid\nparameters:\n  layer_k: {values: [4, 2.5]}\n");
    assert!(e.message.contains("parameter `layer_k`: value 2.5"), "{e}");
    assert_eq!((e.line, e.column), (Some(4), Some(25)), "{e}");
    let e = parse_err("name: x\nmethod: grid\nparameters:\n  optimizer: {values: [adam, lion]}\n");
    assert!(e.message.contains("value \"lion\""), "{e}");
    assert!(e.message.contains("unknown variant `lion`"), "{e}");
}

#[test]
fn random_edges_checked() {
    // stripe_k up to 20 can be drawn with 16 stripes: refused at the bound that breaks it.
    let text = "\
name: x
method: random
run_cap: 10
base: {stripe_sparsity_mode: ordinary}
parameters:
  stripe_k: {distribution: int_uniform, min: 1, max: 20}
";
    let e = parse_err(text);
    assert!(e.message.contains("parameter `stripe_k`: value 20"), "{e}");
    assert_eq!((e.line, e.column), (Some(6), Some(49)), "{e}");
    // uniform excludes max: momentum in [0, 1) is fine although momentum = 1 is not.
    parse("name: x\nmethod: random\nrun_cap: 3\nparameters:\n  momentum: {distribution: uniform, min: 0, max: 1}\n")
        .unwrap();
    // Every categorical value is checked.
    let e = parse_err(
        "name: x\nmethod: random\nrun_cap: 3\nparameters:\n  lifetime_rate: {values: [0.1, 0.5, 2.0]}\n",
    );
    assert!(e.message.contains("value 2.0"), "{e}");
    assert_eq!((e.line, e.column), (Some(5), Some(38)), "{e}");
}

#[test]
fn grid_refuses_continuous_and_expands_integers() {
    let e = parse_err(
        "name: x\nmethod: grid\nparameters:\n  lr: {distribution: uniform, min: 0.1, max: 0.2}\n",
    );
    assert!(e.message.contains("cannot be enumerated by a grid"), "{e}");
    assert_eq!(e.line, Some(4));
    let s = parse(
        "name: x\nmethod: grid\nparameters:\n  layer_k: {distribution: int_uniform, min: 2, max: 5}\n  \
         kl_target: {distribution: q_uniform, min: 0.1, max: 0.3, q: 0.1}\n",
    )
    .unwrap();
    assert_eq!(s.planned_trials(), Some(12));
    assert_eq!(
        s.parameters["kl_target"].grid_values().unwrap(),
        vec![json!(0.1), json!(0.2), json!(0.3)]
    );
    let e = parse_err(
        "name: x\nmethod: grid\nparameters:\n  steps: {distribution: int_uniform, min: 1, max: 5000}\n",
    );
    assert!(e.message.contains("5000 values"), "{e}");
}

#[test]
fn huge_grid_refused_unless_capped() {
    let values: Vec<String> = (1..=50).map(|i| i.to_string()).collect();
    let list = values.join(", ");
    let text = format!(
        "name: x\nmethod: grid\nparameters:\n  steps: {{values: [{list}]}}\n  batch_size: {{values: [{list}]}}\n  \
         eval_every: {{values: [{list}]}}\n"
    );
    let e = parse_err(&text);
    assert!(e.message.contains("125000 points"), "{e}");
    let capped = text.replace("method: grid\n", "method: grid\nrun_cap: 500\n");
    assert_eq!(parse(&capped).unwrap().planned_trials(), Some(500));
}

#[test]
fn trial_config_merges_base_and_params() {
    let s = parse(FULL).unwrap();
    let params: BTreeMap<String, Value> = [
        ("lr".to_string(), json!(0.002)),
        ("layer_k".to_string(), json!(12.0)),
        ("data.synthetic.input_dim".to_string(), json!(32)),
    ]
    .into_iter()
    .collect();
    let cfg = s.trial_config(&params).unwrap();
    assert_eq!(cfg["lr"], json!(0.002));
    assert_eq!(cfg["layer_k"], json!(12));
    assert_eq!(cfg["steps"], json!(600));
    assert_eq!(cfg["data"]["synthetic"]["input_dim"], json!(32));
    assert_eq!(cfg["data"]["synthetic"]["num_clusters"], json!(4));
    assert_eq!(cfg["data"]["synthetic"]["noise_std"], json!(0.01));
    assert_eq!(cfg["batch_size"], json!(256), "defaults are filled in");
    let bad: BTreeMap<String, Value> = [("layer_k".to_string(), json!(1000))].into_iter().collect();
    assert_eq!(s.trial_config(&bad).unwrap_err().field, "layer_k");
}

#[test]
fn fingerprint_ignores_formatting_but_not_values() {
    let a = parse("name: f\nmethod: grid\nseed: 1\nparameters:\n  lr: {values: [0.1, 0.01]}\nbase: {steps: 600}\n").unwrap();
    let b = parse(
        "# comment\nbase:\n  steps: 600.0   # same number\nparameters:\n  lr:\n    values:\n      - 1.0e-1\n      - 0.01\n\
         seed: 1\nmethod: grid\nname: f\n",
    )
    .unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.fingerprint().len(), 16);
    let c = parse("name: f\nmethod: grid\nseed: 1\nparameters:\n  lr: {values: [0.1, 0.02]}\nbase: {steps: 600}\n").unwrap();
    assert_ne!(a.fingerprint(), c.fingerprint());
    let d = parse("name: f\nmethod: grid\nseed: 2\nparameters:\n  lr: {values: [0.1, 0.01]}\nbase: {steps: 600}\n").unwrap();
    assert_ne!(a.fingerprint(), d.fingerprint());
    // Golden value: the hash must not drift between builds (stored fingerprints compare to it).
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
}

#[test]
fn q_multiple_is_clean() {
    assert_eq!(q_multiple(3.0, 0.1), 0.3);
    assert_eq!(q_multiple(7.0, 0.05), 0.35);
    assert_eq!(q_multiple(4.0, 8.0), 32.0);
}

#[test]
fn the_result_driven_example_sweeps_parse_with_their_search_settings() {
    let examples = [
        (
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/nelder_mead.yaml")),
            Method::NelderMead,
        ),
        (
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/particle_swarm.yaml")),
            Method::ParticleSwarm,
        ),
        (
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../sweeps/simulated_annealing.yaml"
            )),
            Method::SimulatedAnnealing,
        ),
        (include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/bayes.yaml")), Method::Bayes),
    ];
    for (text, method) in examples {
        let s = SweepSpec::parse(text, "example.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.method, method);
        assert_eq!(s.planned_trials(), Some(16));
        // The first points build valid trial configs.
        let mut strategy = crate::search::make_strategy(&s);
        for _ in 0..2 {
            match strategy.propose() {
                crate::search::Proposal::Point(p) => {
                    s.trial_config(&p.params).unwrap_or_else(|e| panic!("{method:?}: {e}"));
                }
                other => panic!("{method:?}: {other:?}"),
            }
        }
    }
    let pso = SweepSpec::parse(examples[1].0, "p.yaml").unwrap();
    assert_eq!(pso.search.population, 6);
}

#[test]
fn search_settings_are_checked_and_refused_where_unread() {
    let base =
        "name: x\nrun_cap: 5\nparameters:\n  lr: {distribution: uniform, min: 0.001, max: 0.1}\n";
    let e = parse_err(&format!("{base}method: grid\nsearch: {{population: 4}}\n"));
    assert!(e.message.contains("method grid reads none of it"), "{e}");
    let e = parse_err(&format!("{base}method: particle_swarm\nsearch: {{population: 1}}\n"));
    assert!(e.message.contains("`population` must be 2 to 10000"), "{e}");
    assert_eq!(e.line, Some(6));
    let e =
        parse_err(&format!("{base}method: nelder_mead\nsearch: {{initial_simplex_scale: 2}}\n"));
    assert!(e.message.contains("(0, 1]"), "{e}");
    let e = parse_err(&format!("{base}method: bayes\nsearch: {{startup_trails: 4}}\n"));
    assert!(e.message.contains("did you mean `startup_trials`?"), "{e}");
    let e = parse_err("name: x\nmethod: bayes\nparameters:\n  lr: {value: 0.01}\n");
    assert!(e.message.contains("method bayes needs `run_cap`"), "{e}");
    // The fingerprint of a sweep without a search: block is what it was before the block existed.
    let plain = SweepSpec::parse(&format!("{base}method: random\n"), "x.yaml").unwrap();
    assert!(!serde_json::to_string(&plain).unwrap().contains("search"));
}

#[test]
fn example_sweeps_parse_and_validate() {
    let stripes = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/stripes.yaml"));
    let s = SweepSpec::parse(stripes, "sweeps/stripes.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.method, Method::Grid);
    assert_eq!(s.planned_trials(), Some(12));
    let large = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/large.yaml"));
    let l = SweepSpec::parse(large, "sweeps/large.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(l.method, Method::Random);
    assert_eq!(l.planned_trials(), Some(200));
    // Every planned point of both builds a valid trial config.
    let mut strategy = crate::search::make_strategy(&l);
    let mut n = 0;
    while let crate::search::Proposal::Point(p) = strategy.propose() {
        l.trial_config(&p.params).unwrap_or_else(|e| panic!("point {}: {e}", p.index));
        n += 1;
    }
    assert_eq!(n, 200);
    let mut strategy = crate::search::make_strategy(&s);
    while let crate::search::Proposal::Point(p) = strategy.propose() {
        s.trial_config(&p.params).unwrap_or_else(|e| panic!("point {}: {e}", p.index));
    }
    let et = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/early_terminate.yaml"));
    let et = SweepSpec::parse(et, "sweeps/early_terminate.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(et.early_terminate, Some(EarlyTerminate::Asha { .. })), "{et:?}");
}

#[test]
fn early_terminate_types_parse_with_their_defaults() {
    let et = |block: &str| {
        parse(&format!("name: x\nmethod: grid\nearly_terminate: {block}\n"))
            .unwrap_or_else(|e| panic!("{e}"))
            .early_terminate
            .unwrap()
    };
    assert_eq!(
        et("{type: hyperband, min_iter: 3}"),
        EarlyTerminate::Hyperband { min_iter: Some(3), max_iter: None, s: None, eta: 3 }
    );
    assert_eq!(
        et("{type: hyperband, max_iter: 27, s: 2, eta: 3}"),
        EarlyTerminate::Hyperband { min_iter: None, max_iter: Some(27), s: Some(2), eta: 3 }
    );
    assert_eq!(
        et("{type: asha, min_steps: 100}"),
        EarlyTerminate::Asha { min_steps: 100, reduction_factor: 3, max_steps: None }
    );
    assert_eq!(
        et("{type: asha, min_steps: 100, reduction_factor: 2, max_steps: 1600}"),
        EarlyTerminate::Asha { min_steps: 100, reduction_factor: 2, max_steps: Some(1600) }
    );
    assert_eq!(et("{type: median}"), EarlyTerminate::Median { warmup_steps: 0, min_trials: 5 });
    assert_eq!(
        et("{type: median, warmup_steps: 500, min_trials: 2}"),
        EarlyTerminate::Median { warmup_steps: 500, min_trials: 2 }
    );
    assert_eq!(parse("name: x\nmethod: grid\n").unwrap().early_terminate, None);
}

#[test]
fn early_terminate_errors_are_located_and_suggest() {
    let e = parse_err("name: x\nmethod: grid\nearly_terminate:\n  min_iter: 3\n");
    assert_eq!(e.line, Some(3), "{e}");
    assert!(e.message.contains("needs `type` (hyperband, asha or median)"), "{e}");

    let e = parse_err("name: x\nmethod: grid\nearly_terminate: {type: asah, min_steps: 1}\n");
    assert_eq!((e.line, e.column), (Some(3), Some(19)), "{e}");
    assert!(e.message.contains("did you mean `asha`?"), "{e}");

    // Each type takes its own keys only.
    let e = parse_err("name: x\nmethod: grid\nearly_terminate:\n  type: asha\n  min_step: 10\n");
    assert_eq!((e.line, e.column), (Some(5), Some(3)), "{e}");
    assert!(e.message.contains("unknown key `min_step` in early_terminate (type asha)"), "{e}");
    assert!(e.message.contains("did you mean `min_steps`?"), "{e}");
    let e = parse_err("name: x\nmethod: grid\nearly_terminate: {type: median, min_iter: 3}\n");
    assert!(e.message.contains("unknown key `min_iter` in early_terminate (type median)"), "{e}");

    let cases: &[(&str, usize, &str)] = &[
        ("{type: hyperband}", 3, "hyperband needs `min_iter`"),
        ("{type: hyperband, max_iter: 27}", 3, "needs `s`"),
        ("{type: hyperband, min_iter: 3, eta: 1}", 3, "`eta` must be at least 2, not 1"),
        ("{type: hyperband, min_iter: 0}", 3, "`min_iter` must be at least 1, not 0"),
        ("{type: hyperband, min_iter: 30, max_iter: 27}", 3, "must be less than max_iter"),
        ("{type: hyperband, max_iter: 2, s: 1, eta: 3}", 3, "no bracket"),
        ("{type: asha}", 3, "asha needs `min_steps`"),
        ("{type: asha, min_steps: 100, max_steps: 100}", 3, "must be greater than min_steps"),
        ("{type: asha, min_steps: 10, reduction_factor: 1}", 3, "at least 2"),
        ("{type: median, min_trials: 0}", 3, "`min_trials` must be at least 1"),
        ("{type: median, warmup_steps: -5}", 3, "non-negative integer"),
        ("[asha]", 3, "must be a mapping"),
    ];
    for (block, line, want) in cases {
        let e = parse_err(&format!("name: x\nmethod: grid\nearly_terminate: {block}\n"));
        assert_eq!(e.line, Some(*line), "{block}: {e}");
        assert!(e.message.contains(want), "{block}: {e}");
    }

    // Without evaluations during training there is nothing to judge.
    let e = parse_err(
        "name: x\nmethod: grid\nearly_terminate: {type: median}\nbase:\n  steps: 100\n  eval_every: 0\n",
    );
    assert_eq!((e.line, e.column), (Some(6), Some(3)), "{e}");
    assert!(e.message.contains("`eval_every: 0` makes none"), "{e}");
    // Swept, it is the sweep's business.
    parse(
        "name: x\nmethod: grid\nearly_terminate: {type: median}\nparameters:\n  eval_every: {values: [0, 50]}\n",
    )
    .unwrap();
}

#[test]
fn early_terminate_changes_the_fingerprint_only_when_present() {
    let plain = parse("name: x\nmethod: grid\n").unwrap();
    let json = serde_json::to_value(&plain).unwrap();
    assert!(json.get("early_terminate").is_none(), "sweeps stored before keep their fingerprint");
    let asha = parse("name: x\nmethod: grid\nearly_terminate: {type: asha, min_steps: 10}\n");
    let asha = asha.unwrap();
    assert_ne!(plain.fingerprint(), asha.fingerprint());
    let defaults_spelt =
        parse("name: x\nmethod: grid\nearly_terminate: {type: asha, min_steps: 10, reduction_factor: 3}\n")
            .unwrap();
    assert_eq!(asha.fingerprint(), defaults_spelt.fingerprint());
}

#[test]
fn repeats_multiply_the_planned_trials_and_exclude_sweeping_the_seed() {
    let grid = "name: x\nmethod: grid\nrepeats: 3\nparameters:\n  lr: {values: [0.001, 0.01]}\n";
    let s = SweepSpec::parse(grid, "x.yaml").unwrap();
    assert_eq!((s.repeats, s.planned_trials()), (3, Some(6)));
    let e = parse_err("name: x\nmethod: grid\nrepeats: 2\nparameters:\n  seed: {values: [1, 2]}\n");
    assert!(e.message.contains("`seed` is what `repeats` varies"), "{e}");
    let e = parse_err("name: x\nmethod: grid\nrepeats: 0\n");
    assert!(e.message.contains("`repeats` must be 1 to 1000"), "{e}");
    // repeats: 1 leaves the fingerprint as it was.
    let one = SweepSpec::parse("name: x\nmethod: grid\nrepeats: 1\n", "x.yaml").unwrap();
    let none = SweepSpec::parse("name: x\nmethod: grid\n", "x.yaml").unwrap();
    assert_eq!(one.fingerprint(), none.fingerprint());
}

#[test]
fn search_combinations_that_would_mislead_are_refused() {
    let lr = "parameters:\n  lr: {distribution: uniform, min: 0.001, max: 0.1}\n  optimizer: {values: [adam, sgd]}\n";
    let e = parse_err(&format!(
        "name: x\nmethod: random\nrun_cap: 6\nrepeats: 3\nbase: {{eval_every: 10}}\nearly_terminate: {{type: asha, min_steps: 10}}\n{lr}"
    ));
    assert!(e.message.contains("prune a point's seeds against each other"), "{e}");
    let e = parse_err(&format!("name: x\nmethod: random\nrun_cap: 7\nrepeats: 3\n{lr}"));
    assert!(e.message.contains("must be a multiple of `repeats`"), "{e}");
    let e = parse_err(&format!(
        "name: x\nmethod: particle_swarm\nrun_cap: 8\nsearch: {{population: 8}}\n{lr}"
    ));
    assert!(
        e.message.contains("less than one generation of every swarm (2 cells x population 8)"),
        "{e}"
    );
    let e =
        parse_err(&format!("name: x\nmethod: nelder_mead\nsearch: {{iterations: 1000000}}\n{lr}"));
    assert!(e.message.contains("`iterations` must be 1 to 100000"), "{e}");
}
