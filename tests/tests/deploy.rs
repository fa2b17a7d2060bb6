//! The deploy/ folder checked against the code: every shell script passes `bash -n` (and
//! shellcheck where it is installed), every Kubernetes manifest parses and its references hold,
//! every msae command line the files run parses with the binaries' own clap definitions (a
//! renamed or removed flag fails here), every MSAE_* variable they name is one the binaries
//! read, `msae-coordinator health` (the coordinator pod's probe) answers for a real
//! coordinator serving TLS, and slurm/sweep.sbatch runs real coordinator and worker processes
//! on this machine with stand-ins for `srun` and `scontrol`. No GPU, network, SLURM or
//! Kubernetes needed.

use clap::{CommandFactory, Parser};
use msae_coordinator::model::TrialStatus;
use msae_tests::*;
use serde::Deserialize as _;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BINARIES: [&str; 2] = ["msae-coordinator", "msae-worker"];

/// What shell variables, `$(...)`, systemd specifiers and Kubernetes `$(VAR)` references become
/// in the command lines checked: a value every flag they feed accepts (a GPU index, a port, a
/// count, a duration in seconds, a path, a URL host).
const PLACEHOLDER: &str = "1";

/// Variables the deploy files define for themselves (not read by the binaries).
const DEPLOY_ONLY_VARIABLES: [&str; 2] = ["MSAE_PORT", "MSAE_SWEEP"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every file under deploy/, as paths relative to it, sorted.
fn deploy_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), &deploy_dir(), &mut out);
    out.sort();
    out
}

fn read(rel: &Path) -> String {
    std::fs::read_to_string(deploy_dir().join(rel)).unwrap()
}

fn is_shell_script(rel: &Path) -> bool {
    let by_extension =
        matches!(rel.extension().and_then(|e| e.to_str()), Some("sh" | "bash" | "sbatch"));
    by_extension
        || read(rel).lines().next().is_some_and(|l| l.starts_with("#!") && l.contains("sh"))
}

fn shell_scripts() -> Vec<PathBuf> {
    deploy_files().into_iter().filter(|f| is_shell_script(f)).collect()
}

fn manifests() -> Vec<PathBuf> {
    deploy_files()
        .into_iter()
        .filter(|f| {
            f.starts_with("k8s")
                && matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect()
}

fn systemd_units() -> Vec<PathBuf> {
    deploy_files()
        .into_iter()
        .filter(|f| matches!(f.extension().and_then(|e| e.to_str()), Some("service")))
        .collect()
}

fn container_files() -> Vec<PathBuf> {
    deploy_files()
        .into_iter()
        .filter(|f| {
            let name = f.file_name().unwrap().to_str().unwrap();
            name.starts_with("Containerfile") || name.starts_with("Dockerfile")
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shell scripts

#[test]
fn every_shell_script_passes_bash_n() {
    let scripts = shell_scripts();
    assert!(scripts.len() >= 3, "the SLURM scripts are found: {scripts:?}");
    for rel in scripts {
        let first = read(&rel).lines().next().unwrap_or_default().to_string();
        assert!(first.starts_with("#!") && first.contains("bash"), "{rel:?}: a bash shebang");
        let out = Command::new("bash").arg("-n").arg(deploy_dir().join(&rel)).output().unwrap();
        assert!(out.status.success(), "bash -n {rel:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let scripts: Vec<PathBuf> = shell_scripts().iter().map(|f| deploy_dir().join(f)).collect();
    let out = match Command::new("shellcheck").args(&scripts).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: shellcheck not installed (the deploy scripts were not linted)");
            return;
        }
        Err(e) => panic!("running shellcheck: {e}"),
    };
    assert!(
        out.status.success(),
        "shellcheck {scripts:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Command lines

/// The simple commands of a shell text: words after quote removal, with variables and command
/// substitutions replaced by [`PLACEHOLDER`]. Comments and redirections are dropped; commands
/// end at newlines and `;`, `&`, `|`, `(`, `)`. Enough for the deploy scripts (no here-docs).
fn shell_commands(text: &str) -> Vec<Vec<String>> {
    let c: Vec<char> = text.chars().collect();
    let mut commands = Vec::new();
    let mut command: Vec<String> = Vec::new();
    let mut word: Option<String> = None;
    let mut skip_next_word = false;
    let mut i = 0;
    let end_word = |word: &mut Option<String>, command: &mut Vec<String>, skip: &mut bool| {
        if let Some(w) = word.take() {
            if *skip {
                *skip = false;
            } else {
                command.push(w);
            }
        }
    };
    while i < c.len() {
        match c[i] {
            '\\' if c.get(i + 1) == Some(&'\n') => i += 2,
            '\\' => {
                word.get_or_insert_default().extend(c.get(i + 1));
                i += 2;
            }
            '\'' => {
                let end = find(&c, i + 1, '\'');
                word.get_or_insert_default().extend(&c[i + 1..end]);
                i = end + 1;
            }
            '"' => {
                let w = word.get_or_insert_default();
                i += 1;
                while i < c.len() && c[i] != '"' {
                    match c[i] {
                        '\\' if matches!(c.get(i + 1), Some('$' | '`' | '"' | '\\')) => {
                            w.push(c[i + 1]);
                            i += 2;
                        }
                        '\\' if c.get(i + 1) == Some(&'\n') => i += 2,
                        '$' => i = expansion(&c, i, w),
                        '`' => {
                            w.push_str(PLACEHOLDER);
                            i = find(&c, i + 1, '`') + 1;
                        }
                        ch => {
                            w.push(ch);
                            i += 1;
                        }
                    }
                }
                i += 1;
            }
            '$' => i = expansion(&c, i, word.get_or_insert_default()),
            '`' => {
                word.get_or_insert_default().push_str(PLACEHOLDER);
                i = find(&c, i + 1, '`') + 1;
            }
            '#' if word.is_none() => i = find(&c, i, '\n'),
            '>' | '<' => {
                // A redirection: drop the descriptor number before it and its target after.
                if word.as_deref().is_some_and(|w| w.chars().all(|ch| ch.is_ascii_digit())) {
                    word = None;
                }
                end_word(&mut word, &mut command, &mut skip_next_word);
                while i < c.len() && matches!(c[i], '>' | '<' | '&') {
                    i += 1;
                }
                skip_next_word = true;
            }
            ' ' | '\t' => {
                end_word(&mut word, &mut command, &mut skip_next_word);
                i += 1;
            }
            '\n' | ';' | '&' | '|' | '(' | ')' => {
                end_word(&mut word, &mut command, &mut skip_next_word);
                if !command.is_empty() {
                    commands.push(std::mem::take(&mut command));
                }
                i += 1;
            }
            ch => {
                word.get_or_insert_default().push(ch);
                i += 1;
            }
        }
    }
    end_word(&mut word, &mut command, &mut skip_next_word);
    if !command.is_empty() {
        commands.push(command);
    }
    commands
}

/// The index of the first `what` at or after `from` (the end of the text if none).
fn find(c: &[char], from: usize, what: char) -> usize {
    (from..c.len()).find(|&j| c[j] == what).unwrap_or(c.len())
}

/// The index just past the matching `close` of the `open` at `at`.
fn matching(c: &[char], at: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut j = at;
    while j < c.len() {
        match c[j] {
            '\'' if open == '(' => j = find(c, j + 1, '\''),
            ch if ch == open => depth += 1,
            ch if ch == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    c.len()
}

/// A `$` expansion at `at`, pushed onto `word` (as [`PLACEHOLDER`], or the text of `$'...'`);
/// returns the index after it.
fn expansion(c: &[char], at: usize, word: &mut String) -> usize {
    match c.get(at + 1) {
        Some('{') => {
            word.push_str(PLACEHOLDER);
            matching(c, at + 1, '{', '}')
        }
        Some('(') => {
            word.push_str(PLACEHOLDER);
            matching(c, at + 1, '(', ')')
        }
        Some('\'') => {
            let end = find(c, at + 2, '\'');
            word.push_str(&c[at + 2..end].iter().collect::<String>().replace("\\n", "\n"));
            end + 1
        }
        Some(ch) if ch.is_ascii_alphabetic() || *ch == '_' => {
            word.push_str(PLACEHOLDER);
            (at + 1..c.len())
                .find(|&j| !(c[j].is_ascii_alphanumeric() || c[j] == '_'))
                .unwrap_or(c.len())
        }
        Some(ch) if ch.is_ascii_digit() || "@*#?$!-".contains(*ch) => {
            word.push_str(PLACEHOLDER);
            at + 2
        }
        _ => {
            word.push('$');
            at + 1
        }
    }
}

/// The msae command lines in one simple command (its program, after assignments and wrappers
/// such as `exec` and `srun --opt=value`; `bash -c SCRIPT` is looked into), each starting
/// with the binary's bare name.
fn msae_commands_of(words: &[String], out: &mut Vec<Vec<String>>) {
    let mut k = 0;
    loop {
        while k < words.len() && is_assignment(&words[k]) {
            k += 1;
        }
        if k < words.len() && ["exec", "env", "nohup", "srun", "command"].contains(&&*words[k]) {
            k += 1;
            while k < words.len() && words[k].starts_with('-') {
                k += 1;
            }
            continue;
        }
        break;
    }
    let Some(program) = words.get(k) else { return };
    let name = program.rsplit('/').next().unwrap();
    if BINARIES.contains(&name) {
        let mut line = vec![name.to_string()];
        line.extend(words[k + 1..].iter().cloned());
        out.push(line);
    } else if ["bash", "sh"].contains(&name)
        && let Some(c) = words[k + 1..].iter().position(|w| w == "-c")
        && let Some(script) = words.get(k + 1 + c + 1)
    {
        for command in shell_commands(script) {
            msae_commands_of(&command, out);
        }
    }
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty() && name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    })
}

fn msae_commands_in_shell(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for command in shell_commands(text) {
        msae_commands_of(&command, &mut out);
    }
    out
}

/// `ExecStart=` and friends of a systemd unit, with specifiers (`%i`) and `${VAR}` replaced.
fn msae_commands_in_unit(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        if !key.trim().starts_with("Exec") {
            continue;
        }
        let value = value.trim_start_matches(['@', '-', ':', '+', '!']);
        let mut text = String::new();
        let mut chars = value.chars();
        while let Some(ch) = chars.next() {
            match (ch, chars.clone().next()) {
                ('%', Some('%')) => {
                    text.push('%');
                    chars.next();
                }
                ('%', Some(_)) => {
                    text.push_str(PLACEHOLDER);
                    chars.next();
                }
                _ => text.push(ch),
            }
        }
        out.extend(msae_commands_in_shell(&text));
    }
    out
}

/// The `$(VAR)` references of Kubernetes command and args replaced.
fn k8s_words(list: Option<&Value>) -> Vec<String> {
    let Some(Value::Sequence(items)) = list else { return Vec::new() };
    items
        .iter()
        .map(|v| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_string(),
            };
            let mut out = String::new();
            let mut rest = text.as_str();
            while let Some(at) = rest.find("$(") {
                out.push_str(&rest[..at]);
                let end = rest[at..].find(')').map_or(rest.len(), |e| at + e + 1);
                out.push_str(PLACEHOLDER);
                rest = &rest[end..];
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// Every container (and init container) of every pod template in the manifests, with its
/// pod spec.
fn containers(docs: &[Value]) -> Vec<(&Value, &Value)> {
    let mut out = Vec::new();
    for doc in docs {
        let Some(pod) = pod_spec(doc) else { continue };
        for list in ["initContainers", "containers"] {
            if let Some(Value::Sequence(cs)) = pod.get(list) {
                out.extend(cs.iter().map(|c| (pod, c)));
            }
        }
    }
    out
}

const PROBES: [&str; 3] = ["startupProbe", "readinessProbe", "livenessProbe"];

fn msae_commands_in_manifests(docs: &[Value]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (_, container) in containers(docs) {
        let mut words = k8s_words(container.get("command"));
        words.extend(k8s_words(container.get("args")));
        msae_commands_of(&words, &mut out);
        for probe in PROBES {
            let exec = container.get(probe).and_then(|p| p.get("exec"));
            msae_commands_of(&k8s_words(exec.and_then(|e| e.get("command"))), &mut out);
        }
    }
    out
}

/// Per stage, ENTRYPOINT followed by CMD (JSON arrays); RUN lines as shell.
fn msae_commands_in_container_file(text: &str) -> Vec<Vec<String>> {
    let text = text.replace("\\\n", " ");
    let mut out = Vec::new();
    let (mut entrypoint, mut cmd): (Option<Vec<String>>, Option<Vec<String>>) = (None, None);
    let mut finish = |entrypoint: &mut Option<Vec<String>>, cmd: &mut Option<Vec<String>>| {
        let mut words = entrypoint.take().unwrap_or_default();
        words.extend(cmd.take().unwrap_or_default());
        msae_commands_of(&words, &mut out);
    };
    let mut runs = Vec::new();
    for line in text.lines().map(str::trim) {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        let array = || -> Vec<String> {
            serde_json::from_str(rest.trim())
                .unwrap_or_else(|e| panic!("`{line}`: use the JSON array form ({e})"))
        };
        match instruction.to_ascii_uppercase().as_str() {
            "FROM" => finish(&mut entrypoint, &mut cmd),
            "ENTRYPOINT" => entrypoint = Some(array()),
            "CMD" => cmd = Some(array()),
            "RUN" => runs.extend(msae_commands_in_shell(rest)),
            _ => {}
        }
    }
    finish(&mut entrypoint, &mut cmd);
    out.extend(runs);
    out
}

/// Parses one command line with the binary's own clap definition.
fn parse(words: &[String]) -> Result<(), String> {
    match words[0].as_str() {
        "msae-coordinator" => {
            msae_coordinator::cli::Cli::try_parse_from(words).map(|_| ()).map_err(|e| e.to_string())
        }
        "msae-worker" => {
            msae_worker::cli::Cli::try_parse_from(words).map(|_| ()).map_err(|e| e.to_string())
        }
        other => panic!("not an msae binary: {other}"),
    }
}

/// Every msae command line of every deploy file, by file.
fn all_msae_commands() -> BTreeMap<String, Vec<Vec<String>>> {
    let mut out = BTreeMap::new();
    for rel in shell_scripts() {
        out.insert(rel.display().to_string(), msae_commands_in_shell(&read(&rel)));
    }
    for rel in systemd_units() {
        out.insert(rel.display().to_string(), msae_commands_in_unit(&read(&rel)));
    }
    for rel in manifests() {
        out.insert(rel.display().to_string(), msae_commands_in_manifests(&yaml_docs(&rel)));
    }
    for rel in container_files() {
        out.insert(rel.display().to_string(), msae_commands_in_container_file(&read(&rel)));
    }
    out
}

#[test]
fn the_extractor_reads_shell_the_way_the_scripts_write_it() {
    let script = r#"
# msae-worker --not-a-flag (a comment)
export MSAE_DB=${MSAE_DB:-$SLURM_SUBMIT_DIR/msae.redb}
msae-coordinator "$SWEEP" --listen "0.0.0.0:$PORT" \
    --local-workers 0 --quiet > "$LOG" 2>&1 &
echo "msae-worker --not-a-flag" >&2
cargo build -p msae-worker
srun --ntasks-per-node="${N:?}" \
    bash -c 'exec msae-worker --gpu "$SLURM_LOCALID" --name "$(hostname -s)-gpu$SLURM_LOCALID"' &
X=1 exec /usr/local/bin/msae-worker --coordinator `cat url` --token-file $'a\tb'
"#;
    let got = msae_commands_in_shell(script);
    let want: Vec<Vec<&str>> = vec![
        vec!["msae-coordinator", "1", "--listen", "0.0.0.0:1", "--local-workers", "0", "--quiet"],
        vec!["msae-worker", "--gpu", "1", "--name", "1-gpu1"],
        vec!["msae-worker", "--coordinator", "1", "--token-file", "a\\tb"],
    ];
    assert_eq!(got, want);
    let unit = "ExecStart=-/usr/local/bin/msae-worker --gpu %i --name %H-gpu%i ${X} 100%%\n";
    assert_eq!(
        msae_commands_in_unit(unit),
        [["msae-worker", "--gpu", "1", "--name", "1-gpu1", "1", "100%"]]
    );
    let containerfile = "FROM a AS build\nRUN cargo build -p msae-worker && \\\n  strip x\n\
                         FROM b\nENTRYPOINT [\"msae-worker\"]\nCMD [\"--gpu\", \"0\"]\n";
    assert_eq!(msae_commands_in_container_file(containerfile), [["msae-worker", "--gpu", "0"]]);
    // And the check they feed is real: a flag the binary does not have fails.
    let renamed = ["msae-worker", "--gpu-index", "0"].map(String::from);
    assert!(parse(&renamed).unwrap_err().contains("--gpu-index"));
}

#[test]
fn every_msae_command_line_in_deploy_parses_with_the_real_clis() {
    let all = all_msae_commands();
    // How many command lines each file runs: a line the extraction misses (a new way of
    // writing one) shows up here rather than going unchecked. Update it with the files.
    let expected: BTreeMap<&str, usize> = [
        ("Containerfile", 1),
        ("Containerfile.cuda", 1),
        ("k8s/coordinator.yaml", 4), // the container and its three probes
        ("k8s/secrets.yaml", 0),
        ("k8s/workers.yaml", 1),
        ("slurm/coordinator.sbatch", 1),
        ("slurm/sweep.sbatch", 2), // the coordinator, and the workers through srun bash -c
        ("slurm/worker.sbatch", 1),
        ("systemd/msae-coordinator.service", 1),
        ("systemd/msae-worker@.service", 1),
    ]
    .into();
    let counts: BTreeMap<&str, usize> = all.iter().map(|(f, c)| (f.as_str(), c.len())).collect();
    assert_eq!(counts, expected, "msae command lines per deploy file: {all:#?}");
    let mut failures = Vec::new();
    for (file, commands) in &all {
        for words in commands {
            if let Err(e) = parse(words) {
                failures.push(format!("{file}: `{}`:\n{e}", words.join(" ")));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The workers take their GPU per task in SLURM, and the probes ask for health.
    let sweep = &all["slurm/sweep.sbatch"];
    assert!(sweep.iter().any(|w| w[0] == "msae-worker" && w.windows(2).any(|p| p[0] == "--gpu")));
    let probes = &all["k8s/coordinator.yaml"][1..];
    assert!(probes.iter().all(|w| w[..2] == ["msae-coordinator", "health"]), "{probes:?}");
}

/// Every environment variable either binary reads (any subcommand).
fn clap_env_names() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&msae_coordinator::cli::Cli::command(), &mut out);
    walk(&msae_worker::cli::Cli::command(), &mut out);
    out
}

#[test]
fn every_msae_variable_named_in_deploy_is_read_by_a_binary() {
    let known = clap_env_names();
    for name in ["MSAE_TOKEN_FILE", "MSAE_TLS_CA", "MSAE_TLS_SERVER_CERT", "MSAE_TLS_CLIENT_CA"] {
        assert!(known.contains(name), "{name} in {known:?}");
    }
    let mut unknown = Vec::new();
    for rel in deploy_files() {
        let text = read(&rel);
        for (at, _) in text.match_indices("MSAE_") {
            let name: String = text[at..]
                .chars()
                .take_while(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit() || *ch == '_')
                .collect();
            if !known.contains(&name) && !DEPLOY_ONLY_VARIABLES.contains(&name.as_str()) {
                unknown.push(format!("{}: {name}", rel.display()));
            }
        }
    }
    assert!(unknown.is_empty(), "variables no binary reads: {unknown:?} (known: {known:?})");
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests

fn yaml_docs(rel: &Path) -> Vec<Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: not YAML: {e}", rel.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn all_docs() -> Vec<Value> {
    manifests().iter().flat_map(|m| yaml_docs(m)).collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, key| v.get(*key))
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path).and_then(Value::as_sequence).map_or(&[], Vec::as_slice)
}

/// The pod spec of a workload (or a Pod).
fn pod_spec(doc: &Value) -> Option<&Value> {
    match s(doc, &["kind"])? {
        "Pod" => doc.get("spec"),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            at(doc, &["spec", "template", "spec"])
        }
        "CronJob" => at(doc, &["spec", "jobTemplate", "spec", "template", "spec"]),
        _ => None,
    }
}

fn pod_labels(doc: &Value) -> Option<&serde_yaml::Mapping> {
    let path: &[&str] = match s(doc, &["kind"])? {
        "Pod" => &["metadata", "labels"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "metadata", "labels"],
        _ => &["spec", "template", "metadata", "labels"],
    };
    at(doc, path).and_then(Value::as_mapping)
}

fn subset(small: &serde_yaml::Mapping, big: &serde_yaml::Mapping) -> bool {
    small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// The keys of a Secret or ConfigMap named `name`, if one is defined.
fn keys_of(docs: &[Value], kind: &str, name: &str) -> Option<BTreeSet<String>> {
    let doc = docs
        .iter()
        .find(|d| s(d, &["kind"]) == Some(kind) && s(d, &["metadata", "name"]) == Some(name))?;
    let mut keys = BTreeSet::new();
    for field in ["data", "stringData", "binaryData"] {
        if let Some(m) = doc.get(field).and_then(Value::as_mapping) {
            keys.extend(m.keys().filter_map(Value::as_str).map(String::from));
        }
    }
    Some(keys)
}

fn defined(docs: &[Value], kind: &str, name: &str) -> bool {
    docs.iter().any(|d| s(d, &["kind"]) == Some(kind) && s(d, &["metadata", "name"]) == Some(name))
}

/// Whether `port` (a number or a name, as a Service or probe gives it) is one of `container`'s.
fn container_has_port(container: &Value, port: &Value) -> bool {
    seq(container, &["ports"]).iter().any(|p| match port {
        Value::Number(n) => p.get("containerPort").and_then(Value::as_u64) == n.as_u64(),
        Value::String(name) => s(p, &["name"]) == Some(name),
        _ => false,
    })
}

/// The port of the `--coordinator URL` an exec probe asks.
fn probe_url_port(command: &[String]) -> Option<u64> {
    let url = command.windows(2).find(|w| w[0] == "--coordinator").map(|w| w[1].clone())?;
    url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

#[test]
fn every_manifest_parses_and_names_itself() {
    let files = manifests();
    assert!(files.len() >= 3, "{files:?}");
    for rel in files {
        let docs = yaml_docs(&rel);
        assert!(!docs.is_empty(), "{}: no documents", rel.display());
        for doc in &docs {
            for path in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
                assert!(
                    s(doc, path).is_some_and(|v| !v.is_empty()),
                    "{}: a document without {}: {doc:?}",
                    rel.display(),
                    path.join(".")
                );
            }
        }
    }
    let docs = all_docs();
    let mut names = BTreeSet::new();
    for doc in &docs {
        let key = (s(doc, &["kind"]).unwrap(), s(doc, &["metadata", "name"]).unwrap());
        assert!(names.insert(key), "defined twice: {key:?}");
    }
}

#[test]
fn manifest_references_hold() {
    let docs = all_docs();
    let mut problems = Vec::new();
    let mut problem = |what: String| problems.push(what);
    for doc in &docs {
        let name = s(doc, &["metadata", "name"]).unwrap_or_default();
        let kind = s(doc, &["kind"]).unwrap_or_default();
        let Some(pod) = pod_spec(doc) else { continue };
        let labels = pod_labels(doc).cloned().unwrap_or_default();
        if let Some(selector) = at(doc, &["spec", "selector", "matchLabels"])
            && !selector.as_mapping().is_some_and(|m| subset(m, &labels))
        {
            problem(format!("{kind} {name}: selector {selector:?} is not its pods' labels"));
        }
        let volumes: BTreeSet<&str> =
            seq(pod, &["volumes"]).iter().filter_map(|v| s(v, &["name"])).collect();
        let mut claims = false;
        for v in seq(pod, &["volumes"]) {
            if let Some(secret) = s(v, &["secret", "secretName"]) {
                match keys_of(&docs, "Secret", secret) {
                    None => problem(format!("{name}: volume of the undefined Secret {secret}")),
                    Some(keys) => {
                        for item in seq(v, &["secret", "items"]) {
                            let key = s(item, &["key"]).unwrap_or_default();
                            if !keys.contains(key) {
                                problem(format!("{name}: Secret {secret} has no key {key}"));
                            }
                        }
                    }
                }
            }
            if let Some(map) = s(v, &["configMap", "name"])
                && !defined(&docs, "ConfigMap", map)
            {
                problem(format!("{name}: volume of the undefined ConfigMap {map}"));
            }
            if let Some(claim) = s(v, &["persistentVolumeClaim", "claimName"]) {
                claims = true;
                if !defined(&docs, "PersistentVolumeClaim", claim) {
                    problem(format!("{name}: volume of the undefined PVC {claim}"));
                }
            }
        }
        if claims && kind == "Deployment" {
            // One process holds the database: never two pods, not even during a rollout.
            let replicas = at(doc, &["spec", "replicas"]).and_then(Value::as_u64);
            let strategy = s(doc, &["spec", "strategy", "type"]);
            if replicas != Some(1) || strategy != Some("Recreate") {
                problem(format!(
                    "{name}: a Deployment with a volume claim needs replicas: 1 and strategy \
                     Recreate (has {replicas:?}, {strategy:?})"
                ));
            }
        }
        for c in seq(pod, &["initContainers"]).iter().chain(seq(pod, &["containers"])) {
            let cname = s(c, &["name"]).unwrap_or_default();
            for m in seq(c, &["volumeMounts"]) {
                let v = s(m, &["name"]).unwrap_or_default();
                if !volumes.contains(v) {
                    problem(format!("{name}/{cname}: mounts the undefined volume {v}"));
                }
            }
            for e in seq(c, &["env"]) {
                for (kind, field) in [("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")]
                {
                    let Some(r) = at(e, &["valueFrom", field]) else { continue };
                    let (obj, key) = (s(r, &["name"]).unwrap_or(""), s(r, &["key"]).unwrap_or(""));
                    match keys_of(&docs, kind, obj) {
                        Some(keys) if keys.contains(key) => {}
                        Some(_) => problem(format!("{name}/{cname}: {kind} {obj} has no {key}")),
                        None => problem(format!("{name}/{cname}: undefined {kind} {obj}")),
                    }
                }
            }
            for e in seq(c, &["envFrom"]) {
                for (kind, field) in [("Secret", "secretRef"), ("ConfigMap", "configMapRef")] {
                    if let Some(obj) = s(e, &[field, "name"])
                        && !defined(&docs, kind, obj)
                    {
                        problem(format!("{name}/{cname}: envFrom the undefined {kind} {obj}"));
                    }
                }
            }
            let listens = !seq(c, &["ports"]).is_empty();
            for probe in PROBES {
                let Some(p) = c.get(probe) else {
                    if listens && probe != "startupProbe" {
                        problem(format!("{name}/{cname}: serves a port without a {probe}"));
                    }
                    continue;
                };
                for kind in ["httpGet", "tcpSocket", "grpc"] {
                    if let Some(port) = at(p, &[kind, "port"])
                        && !container_has_port(c, port)
                    {
                        problem(format!("{name}/{cname}: {probe} port {port:?} not served"));
                    }
                }
                if let Some(cmd) = at(p, &["exec", "command"])
                    && let Some(port) = probe_url_port(&k8s_words(Some(cmd)))
                    && !container_has_port(c, &Value::from(port))
                {
                    problem(format!("{name}/{cname}: {probe} asks port {port}, not served"));
                }
            }
        }
    }
    for svc in docs.iter().filter(|d| s(d, &["kind"]) == Some("Service")) {
        let name = s(svc, &["metadata", "name"]).unwrap_or_default();
        let Some(selector) = at(svc, &["spec", "selector"]).and_then(Value::as_mapping) else {
            problem(format!("Service {name}: no selector"));
            continue;
        };
        let pods: Vec<&Value> =
            docs.iter().filter(|d| pod_labels(d).is_some_and(|l| subset(selector, l))).collect();
        if pods.is_empty() {
            problem(format!("Service {name}: its selector {selector:?} matches no pod template"));
        }
        for port in seq(svc, &["spec", "ports"]) {
            let target = port.get("targetPort").or(port.get("port")).cloned().unwrap_or_default();
            let served = pods.iter().any(|d| {
                let pod = pod_spec(d).unwrap();
                seq(pod, &["containers"]).iter().any(|c| container_has_port(c, &target))
            });
            if !served {
                problem(format!("Service {name}: target port {target:?} is no container's"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // What the issue asks of them, in so many words.
    let coordinator = docs
        .iter()
        .find(|d| {
            s(d, &["kind"]) == Some("Deployment")
                && pod_labels(d).is_some_and(|l| {
                    l.get("app").and_then(Value::as_str) == Some("msae-coordinator")
                })
        })
        .expect("a coordinator Deployment");
    assert_eq!(s(coordinator, &["spec", "strategy", "type"]), Some("Recreate"));
    assert!(defined(&docs, "Service", "msae-coordinator"));
}

/// The sweep the coordinator pod runs is one the coordinator accepts.
#[test]
fn the_sweep_config_map_is_a_valid_sweep() {
    let docs = all_docs();
    let maps: Vec<&Value> = docs.iter().filter(|d| s(d, &["kind"]) == Some("ConfigMap")).collect();
    let sweep = maps
        .iter()
        .find_map(|m| s(m, &["data", "sweep.yaml"]))
        .expect("a ConfigMap holding sweep.yaml");
    msae_coordinator::spec::SweepSpec::parse(sweep, "k8s sweep ConfigMap")
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------------------------
// Stop grace: a stopped worker must get to hand its lease back.

/// The longest a stopping worker takes: it waits up to `stop_grace` for the trial to stop,
/// then hands the lease back with one call (`rpc_timeout`).
fn worker_stop_time() -> Duration {
    let opts = msae_worker::client::ClientOptions::new("http://x:1");
    opts.stop_grace + opts.rpc_timeout
}

#[test]
fn workers_are_given_time_to_hand_their_lease_back() {
    let need = worker_stop_time().as_secs();
    let all = all_msae_commands();
    let runs_worker = |file: &str| all[file].iter().any(|w| w[0] == "msae-worker");
    for rel in shell_scripts() {
        let file = rel.display().to_string();
        if !runs_worker(&file) {
            continue;
        }
        let text = read(&rel);
        let lead = text
            .lines()
            .find_map(|l| l.strip_prefix("#SBATCH --signal="))
            .and_then(|v| v.split('@').nth(1))
            .and_then(|t| t.trim().parse::<u64>().ok());
        assert!(lead.is_some_and(|t| t >= need), "{file}: #SBATCH --signal=...@{need} or more");
    }
    for rel in systemd_units() {
        let file = rel.display().to_string();
        if !runs_worker(&file) {
            continue;
        }
        let stop = read(&rel)
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .and_then(|t| t.trim().parse::<u64>().ok());
        assert!(stop.is_some_and(|t| t >= need), "{file}: TimeoutStopSec={need} or more");
    }
    let docs = all_docs();
    let mut seen = 0;
    for (pod, container) in containers(&docs) {
        if k8s_words(container.get("command")).first().map(String::as_str) != Some("msae-worker") {
            continue;
        }
        seen += 1;
        let grace = pod.get("terminationGracePeriodSeconds").and_then(Value::as_u64);
        assert!(grace.is_some_and(|g| g >= need), "terminationGracePeriodSeconds >= {need}");
        let gpus = at(container, &["resources", "limits", "nvidia.com/gpu"]);
        assert!(gpus.is_some(), "the worker pods ask for a GPU");
    }
    assert_eq!(seen, 1, "one worker Deployment");
}

#[test]
fn both_container_files_build_with_the_same_rust() {
    let cpu = read(Path::new("Containerfile"));
    let cuda = read(Path::new("Containerfile.cuda"));
    let cpu_rust = cpu
        .lines()
        .find_map(|l| l.strip_prefix("FROM docker.io/library/rust:"))
        .and_then(|tag| tag.split('-').next())
        .expect("the CPU build stage on the rust image");
    let cuda_rust = cuda
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_TOOLCHAIN="))
        .expect("ARG RUST_TOOLCHAIN in Containerfile.cuda");
    assert!(
        cuda_rust == cpu_rust || cuda_rust.starts_with(&format!("{cpu_rust}.")),
        "Rust {cpu_rust} (CPU) vs {cuda_rust} (CUDA)"
    );
    assert!(cuda.contains("--features cuda") && cuda.contains("-devel-"));
    assert!(cuda.contains("-runtime-"), "the runtime stage on the matching runtime image");
}

// ---------------------------------------------------------------------------------------------
// `msae-coordinator health`, the probe, against a real coordinator

/// `e2e-coordinator health ARGS` with the coordinator pod's environment (which the probe
/// inherits there): success and what it printed.
fn health(pod_env: &[(&str, String)], args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("e2e-coordinator"))
        .arg("health")
        .args(args)
        .envs(pod_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_health_command_probes_a_tls_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    write_pki(dir.path());
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let sweep = dir.path().join("h.yaml");
    std::fs::write(&sweep, noop_sweep("h", 4, 10, 1)).unwrap();
    let db = dir.path().join("h.redb");
    let port = free_port();
    // Configured as the pod is: token and server TLS from the environment, and client
    // certificates required (MSAE_TLS_CLIENT_CA); no worker, so it keeps serving.
    let pod_env = vec![
        ("MSAE_TOKEN_FILE", p("token")),
        ("MSAE_TLS_SERVER_CERT", p("server.pem")),
        ("MSAE_TLS_SERVER_KEY", p("server.key")),
        ("MSAE_TLS_CLIENT_CA", p("ca.pem")),
        ("MSAE_DB", db.to_str().unwrap().to_string()),
    ];
    let log = std::fs::File::create(dir.path().join("coordinator.log")).unwrap();
    let mut coordinator = Command::new(bin("e2e-coordinator"))
        .arg(&sweep)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--local-workers", "0"])
        .args(["--logdir", "none", "--quiet"])
        .envs(pod_env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://localhost:{port}");
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let client = ["--coordinator", &url, "--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let serving = wait_until(Duration::from_secs(60), "health SERVING", || {
        let (ok, text) = health(&pod_env, &client);
        ok.then_some(text)
    });
    assert_eq!(serving.trim(), format!("{url}: msae.v1.Coordinator is SERVING"));
    let (ok, text) = health(&pod_env, &[&client[..], &["--service", ""]].concat());
    assert!(ok && text.contains("the server is SERVING"), "{text}");

    // Each way it can fail exits non-zero and says why.
    let (ok, text) = health(&pod_env, &["--coordinator", &url]);
    assert!(!ok && text.contains("pass --tls-ca FILE"), "{text}");
    let (ok, text) = health(&pod_env, &["--coordinator", &url, "--tls-ca", &ca]);
    assert!(!ok && text.contains(&format!("the coordinator at {url}")), "no client cert: {text}");
    let (ok, text) = health(&pod_env, &[&client[..], &["--service", "nope.v1.Nothing"]].concat());
    assert!(!ok && text.contains("does not know the service \"nope.v1.Nothing\""), "{text}");

    sigterm(&coordinator);
    let exit = wait_exit(&mut coordinator, Duration::from_secs(30), "the coordinator");
    assert_eq!(exit.code(), Some(5), "stopped before the end");
    let (ok, text) = health(&pod_env, &client);
    assert!(!ok && text.contains(&format!("cannot reach the coordinator at {url}")), "{text}");
}

// ---------------------------------------------------------------------------------------------
// slurm/sweep.sbatch run for real, with stand-ins for SLURM's commands

/// A directory of stand-ins: `scontrol show hostnames` names this machine, `srun` starts its
/// command once per task here (SLURM_LOCALID 0..N, SIGTERM passed on, its pid in
/// `$SLURM_SUBMIT_DIR/srun.pid`), and `msae-coordinator`/`msae-worker` are the test builds
/// (the worker without `--gpu`, which a CPU build refuses; the index is logged instead).
fn slurm_stand_ins(dir: &Path) -> PathBuf {
    let bin_dir = dir.join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let scripts = [
        ("scontrol", "#!/usr/bin/env bash\necho localhost\n".to_string()),
        (
            "srun",
            r#"#!/usr/bin/env bash
n=1
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in --ntasks-per-node=*) n=${1#*=} ;; esac
    shift
done
echo $$ > "$SLURM_SUBMIT_DIR/srun.pid"
pids=()
for ((i = 0; i < n; i++)); do
    SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
wait
wait
"#
            .to_string(),
        ),
        (
            "msae-coordinator",
            format!("#!/usr/bin/env bash\nexec {} \"$@\"\n", bin("e2e-coordinator").display()),
        ),
        (
            "msae-worker",
            format!(
                r#"#!/usr/bin/env bash
args=()
while [[ $# -gt 0 ]]; do
    if [[ $1 == --gpu ]]; then echo "$2" >> "$SLURM_SUBMIT_DIR/gpus"; shift 2; continue; fi
    args+=("$1"); shift
done
exec {} "${{args[@]}}"
"#,
                bin("e2e-worker").display()
            ),
        ),
    ];
    for (name, text) in scripts {
        let path = bin_dir.join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin_dir
}

/// `bash deploy/slurm/sweep.sbatch SWEEP` in `dir` as SLURM would start it (job 42, one node,
/// two tasks), listening on `port`.
fn start_sweep_script(dir: &Path, sweep: &Path, port: u16, env: &[(&str, &str)]) -> Child {
    let stand_ins = slurm_stand_ins(dir);
    let path = format!("{}:{}", stand_ins.display(), std::env::var("PATH").unwrap());
    let log = std::fs::File::create(dir.join("job.log")).unwrap();
    Command::new("bash")
        .arg(deploy_dir().join("slurm/sweep.sbatch"))
        .arg(sweep)
        .current_dir(dir)
        .env("PATH", path)
        .envs([
            ("SLURM_SUBMIT_DIR", dir.to_str().unwrap()),
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_NODELIST", "localhost"),
            ("SLURM_NTASKS_PER_NODE", "2"),
            ("SLURM_CPUS_PER_TASK", "1"),
            ("MSAE_PORT", &port.to_string()),
            ("RUST_LOG", "info"),
        ])
        .envs(env.iter().copied())
        .env_remove("MSAE_TOKEN")
        .env_remove("MSAE_DB")
        .env_remove("MSAE_TLS_SERVER_CERT")
        .env_remove("MSAE_TLS_SERVER_KEY")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn job_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("job.log")).unwrap_or_default()
}

#[test]
fn the_sweep_script_runs_a_sweep_to_its_end_and_ends_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("s.yaml");
    std::fs::write(&sweep, noop_sweep("s", 8, 50, 1)).unwrap();
    let mut job = start_sweep_script(dir.path(), &sweep, free_port(), &[]);
    let exit = wait_exit(&mut job, Duration::from_secs(90), "the sweep job");
    let log = job_log(dir.path());
    assert_eq!(exit.code(), Some(0), "{log}");
    // Its own token file (none was given) is gone with the job.
    assert!(!dir.path().join("msae-token.42").exists(), "{log}");
    // The database went to the submit directory; both tasks' workers, each on its own GPU,
    // took trials.
    let trials = stored_trials(&dir.path().join("msae.redb"));
    assert_eq!(trials.len(), 8);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed), "{trials:#?}");
    let workers: BTreeSet<String> = trials.iter().filter_map(|t| t.worker.clone()).collect();
    assert!(workers.iter().all(|w| w.ends_with("-gpu0") || w.ends_with("-gpu1")), "{workers:?}");
    let gpus = std::fs::read_to_string(dir.path().join("gpus")).unwrap();
    let gpus: BTreeSet<&str> = gpus.lines().collect();
    assert_eq!(gpus, BTreeSet::from(["0", "1"]), "--gpu $SLURM_LOCALID per task");
}

#[test]
fn workers_stopped_before_the_time_limit_hand_their_trials_back_and_end_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("s.yaml");
    std::fs::write(&sweep, noop_sweep("s", 400, 300, 1)).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = free_port();
    let mut job = start_sweep_script(
        dir.path(),
        &sweep,
        port,
        &[("MSAE_TOKEN_FILE", token.to_str().unwrap())],
    );
    let url = format!("http://localhost:{port}");
    wait_until(Duration::from_secs(60), "trials completed", || {
        // A runtime per call: its connection closes with it (one left open would hold up the
        // coordinator's shutdown).
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let tls = msae_shared::tls::ClientTls::default();
        let fut = msae_coordinator::service::report::fetch_records(&url, None, Some("t0ken"), &tls);
        let report = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), fut).await });
        let report = report.ok()?.ok()?;
        (count(&report, TrialStatus::Completed) >= 2).then_some(())
    });
    // SLURM's --signal=TERM@180 reaches the job steps: here, the srun stand-in.
    let srun = std::fs::read_to_string(dir.path().join("srun.pid")).unwrap();
    let status = Command::new("kill").args(["-TERM", srun.trim()]).status().unwrap();
    assert!(status.success());
    let exit = wait_exit(&mut job, Duration::from_secs(60), "the stopped sweep job");
    let log = job_log(dir.path());
    assert_eq!(exit.code(), Some(5), "stopped before the end: {log}");
    assert!(log.contains("the workers have exited; stopping the coordinator"), "{log}");
    assert!(token.exists(), "a token file that was given is left alone");
    // The leases were handed back: nothing failed, nothing is left running.
    let trials = stored_trials(&dir.path().join("msae.redb"));
    let of = |s: TrialStatus| trials.iter().filter(|t| t.status == s).count();
    assert_eq!((of(TrialStatus::Failed), of(TrialStatus::Running)), (0, 0), "{log}");
    assert!(of(TrialStatus::Completed) >= 2 && of(TrialStatus::Completed) < 400);
}
