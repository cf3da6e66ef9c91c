//! The operator's files against the plugin itself: docs/prometheus/alerts.yml passes
//! `promtool check rules` and its unit tests (`promtool test rules` on alerts.test.yml,
//! where every alert fires for one instance and stays quiet for another), and every metric
//! that an alert or a panel of docs/grafana/backup_coordinator.json names is one the plugin
//! exposes: the names are checked against the exposition `backup_plugin_get_metrics`
//! renders, with `metrics_textfile` set so that every family is there; the label values
//! a query matches on (`code="-10"`) must be ones the plugin writes. The dashboard's
//! queries go through promtool's parser too.
#[path = "common/tools.rs"]
mod tools;

use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_metrics, backup_plugin_init,
    backup_plugin_record_error,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn docs(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs promtool with `args`; fails with its output unless it succeeds.
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(tools::require("promtool", "prometheus"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Every sample of the plugin's exposition: its name, and the label sets it appears with.
struct Exposed {
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

/// The exposition of a plugin initialized with every optional family on (a state store,
/// an error log, `metrics_textfile`) after an error was recorded: rendered once.
fn exposed() -> &'static Exposed {
    static EXPOSED: OnceLock<Exposed> = OnceLock::new();
    EXPOSED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "state_dir = \"{0}/state\"\nerror_store_path = \"{0}/errors\"\n\
             metrics_textfile = \"{0}/backup_coordinator.prom\"\n",
            dir.path().display()
        );
        backup_plugin_cleanup();
        assert_eq!(
            backup_plugin_init(config.as_ptr() as *const _, config.len() as u32),
            0
        );
        backup_plugin_record_error(-5, std::ptr::null());
        let mut len = 0usize;
        backup_plugin_get_metrics(std::ptr::null_mut(), 0, &mut len);
        let mut buffer = vec![0u8; len + 1];
        assert_eq!(
            backup_plugin_get_metrics(buffer.as_mut_ptr() as *mut _, buffer.len(), &mut len),
            0
        );
        backup_plugin_cleanup();
        buffer.truncate(len);
        let text = String::from_utf8(buffer).unwrap();
        let mut samples: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, _value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            samples.entry(name.to_string()).or_default().push(labels);
        }
        Exposed { samples }
    })
}

/// A metric a query names, with the label matchers written after it.
#[derive(Debug)]
struct Selector {
    metric: String,
    /// (label, operator, value).
    matchers: Vec<(String, String, String)>,
}

/// Identifiers of PromQL that are not metric names: aggregations, keywords, and the
/// modifiers whose parenthesized label lists follow them.
const AGGREGATIONS: [&str; 12] = [
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
];
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 6] = ["bool", "and", "or", "unless", "offset", "atan2"];

/// The metric selectors of a PromQL expression (Grafana's `$variables` allowed): every
/// identifier that is not a function (followed by `(`), an aggregation, a keyword or a label
/// of a `by (...)` list, outside strings, label matchers and range brackets.
fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out: Vec<Selector> = Vec::new();
    // Whether the last token was a metric name, so that a `{` belongs to it.
    let mut after_metric = false;
    let mut i = 0;
    let skip_ws = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    let closing = |open: usize, close: char| {
        let mut j = open;
        while j < chars.len() && chars[j] != close {
            if chars[j] == '"' || chars[j] == '\'' {
                let quote = chars[j];
                j += 1;
                while j < chars.len() && chars[j] != quote {
                    j += if chars[j] == '\\' { 2 } else { 1 };
                }
            }
            j += 1;
        }
        assert!(j < chars.len(), "unclosed {close} in {expr}");
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '{' {
            let end = closing(i, '}');
            let inner: String = chars[i + 1..end].iter().collect();
            let matchers = parse_matchers(&inner, expr);
            match out.last_mut() {
                Some(selector) if after_metric => selector.matchers = matchers,
                _ => panic!("a selector without a metric name in {expr}"),
            }
            after_metric = false;
            i = end + 1;
            continue;
        }
        after_metric = false;
        if c == '[' {
            i = closing(i, ']') + 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '$' {
            // A Grafana variable: `$name` or `${name}`.
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = closing(i, '}') + 1;
            } else {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            if LABEL_LISTS.contains(&word.as_str()) {
                if chars.get(next) == Some(&'(') {
                    i = closing(next, ')') + 1;
                }
            } else if AGGREGATIONS.contains(&word.as_str())
                || KEYWORDS.contains(&word.as_str())
                || chars.get(next) == Some(&'(')
            {
                // An aggregation, a keyword or a function.
            } else {
                out.push(Selector {
                    metric: word,
                    matchers: Vec::new(),
                });
                after_metric = true;
            }
        } else {
            i += 1;
        }
    }
    out
}

fn parse_matchers(inner: &str, expr: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or_else(|| panic!("bad matcher in {expr}"));
        let name = rest[..name_end].to_string();
        rest = rest[name_end..].trim_start();
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| rest.starts_with(op))
            .unwrap_or_else(|| panic!("bad matcher operator in {expr}"));
        rest = rest[op.len()..].trim_start();
        let quote = rest.chars().next().unwrap();
        assert!(quote == '"' || quote == '\'', "unquoted value in {expr}");
        let close = rest[1..]
            .find(quote)
            .unwrap_or_else(|| panic!("unclosed value in {expr}"))
            + 1;
        out.push((name, op.to_string(), rest[1..close].to_string()));
        rest = rest[close + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    out
}

/// Fails unless `expr` names at least one metric, and each one it names is a sample name
/// of the exposition, with the label values it matches by equality. Returns the names.
fn check_names(what: &str, expr: &str) -> Vec<String> {
    let found = selectors(expr);
    assert!(!found.is_empty(), "{what}: `{expr}` names no metric");
    let exposed = exposed();
    for selector in &found {
        let Some(label_sets) = exposed.samples.get(&selector.metric) else {
            panic!(
                "{what}: `{expr}` names {}, which the plugin does not expose; it exposes {:?}",
                selector.metric,
                exposed.samples.keys().collect::<Vec<_>>()
            );
        };
        for (label, op, value) in &selector.matchers {
            // The scrape adds instance and job; a variable is the dashboard's choice.
            if op != "=" || ["instance", "job"].contains(&label.as_str()) || value.contains('$') {
                continue;
            }
            assert!(
                label_sets
                    .iter()
                    .any(|labels| labels.get(label) == Some(value)),
                "{what}: `{expr}` matches {label}=\"{value}\", which no sample of {} has",
                selector.metric
            );
        }
    }
    found.into_iter().map(|s| s.metric).collect()
}

#[test]
fn the_extractor_finds_metrics_and_only_metrics() {
    let names =
        |expr: &str| -> Vec<String> { selectors(expr).into_iter().map(|s| s.metric).collect() };
    assert_eq!(
        names("histogram_quantile(0.9, sum by (command, le) (rate(a_bucket{instance=~\"$instance\"}[$__rate_interval])))"),
        vec!["a_bucket"]
    );
    assert_eq!(
        names("sum without (x) (increase(b_total[5m] offset 1h)) / on (y) group_left c > bool 0 and d"),
        vec!["b_total", "c", "d"]
    );
    let s = selectors("increase(e_total{code=\"-10\", job!~'x'}[5m]) > 0");
    assert_eq!(
        s[0].matchers,
        vec![
            ("code".into(), "=".into(), "-10".into()),
            ("job".into(), "!~".into(), "x".into())
        ]
    );
}

/// (alert name, expression) of every rule of alerts.yml. Expressions are written on their
/// `expr:` line, or as a block (`expr: |`) on the lines below it.
fn alert_rules(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut name = None;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if let Some(alert) = trimmed.strip_prefix("- alert:") {
            name = Some(alert.trim().to_string());
        } else if let Some(expr) = trimmed.strip_prefix("expr:") {
            let expr = expr.trim();
            let expr = if expr == "|" || expr == ">" || expr.starts_with("|-") {
                let indent = line.len() - trimmed.len();
                lines[i + 1..]
                    .iter()
                    .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                    .map(|l| l.trim())
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                expr.trim_matches(|c| c == '\'' || c == '"').to_string()
            };
            let alert = name.take().expect("every expr belongs to an alert");
            rules.push((alert, expr));
        }
    }
    rules
}

#[test]
fn alerts_pass_promtool_check_and_their_unit_tests() {
    let dir = docs("docs/prometheus");
    let checked = promtool(&["check", "rules", "alerts.yml"], &dir);
    let rules = alert_rules(&std::fs::read_to_string(dir.join("alerts.yml")).unwrap());
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "{checked}"
    );
    promtool(&["test", "rules", "alerts.test.yml"], &dir);
}

#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let dir = docs("docs/prometheus");
    let rules = alert_rules(&std::fs::read_to_string(dir.join("alerts.yml")).unwrap());
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname:") {
            let name = name.trim().to_string();
            if lines.get(i + 1) == Some(&"exp_alerts: []") {
                quiet.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    for (alert, _) in &rules {
        assert!(
            firing.contains(alert) && quiet.contains(alert),
            "{alert}: alerts.test.yml must check it firing and not firing"
        );
    }
}

#[test]
fn alerts_name_only_metrics_the_plugin_exposes() {
    let text = std::fs::read_to_string(docs("docs/prometheus/alerts.yml")).unwrap();
    let rules = alert_rules(&text);
    assert_eq!(
        rules.len(),
        text.matches("- alert:").count(),
        "one expression per alert"
    );
    let mut used = BTreeSet::new();
    for (alert, expr) in &rules {
        used.extend(check_names(alert, expr));
    }
    // What the issue asks alerts for: stuck claims, retries exhausted, store DISK_FULL,
    // etcd failovers, error-log write failures.
    for family in [
        "backup_idempotency_in_progress_total",
        "backup_idempotency_takeovers_total",
        "backup_retries_exhausted_total",
        "backup_state_store_errors_total",
        "backup_state_store_failovers_total",
        "backup_error_log_write_failures_total",
    ] {
        assert!(used.contains(family), "no alert over {family}");
    }
}

/// Every panel of the dashboard, rows' panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(inner) = panel["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

#[test]
fn the_dashboard_queries_only_metrics_the_plugin_exposes() {
    let text = std::fs::read_to_string(docs("docs/grafana/backup_coordinator.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 39);
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let datasource = serde_json::json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});

    let mut used = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            ["timeseries", "stat"].contains(&panel["type"].as_str().unwrap()),
            "{title}: {}",
            panel["type"]
        );
        assert_eq!(panel["datasource"], datasource, "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert_eq!(target["datasource"], datasource, "{title}");
            let expr = target["expr"].as_str().expect("expr");
            used.extend(check_names(title, expr));
            exprs.push(expr.to_string());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let query = variable["definition"].as_str().unwrap();
        let metric = query
            .strip_prefix("label_values(")
            .and_then(|q| q.split(',').next())
            .unwrap_or_else(|| panic!("variable query {query}"));
        check_names("variable", metric);
    }
    // What the issue asks panels for.
    for family in [
        "backup_errors_total",
        "backup_retries_total",
        "backup_retries_exhausted_total",
        "backup_idempotency_claims_total",
        "backup_idempotency_replays_total",
        "backup_idempotency_conflicts_total",
        "backup_idempotency_in_progress_total",
        "backup_idempotency_takeovers_total",
        "backup_state_store_errors_total",
        "backup_state_store_failovers_total",
        "backup_error_log_write_failures_total",
    ] {
        assert!(used.contains(family), "no panel queries {family}");
    }

    // Prometheus's own parser reads every query, Grafana's variables given values.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "6h")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: '{}'\n",
            expr.replace('\'', "''")
        ));
    }
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    promtool(&["check", "rules", "dashboard.yml"], dir.path());
}
