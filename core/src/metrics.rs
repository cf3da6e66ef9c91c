//! The plugin's Prometheus metrics: lock-free counters and histograms for the hot paths, and
//! one renderer that writes each family as one group (`# HELP`, `# TYPE`, then its samples),
//! as the text exposition format requires: a parser reads a sample only into the family
//! whose `# TYPE` line came last.
//!
//! Label values are bounded by construction: commands, kernel states and error codes of the
//! fixed table (a code outside it is counted as "other"), never task names or keys.

use crate::error::{Error, ErrorCode};
use crate::idempotency::keyed::KeyedMetrics;
use crate::log_backup::runner::LogMetrics;
use crate::log_backup::{decide, KernelState, SubCommand};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub mod textfile;

/// A monotonic counter; relaxed atomics, since a scrape needs no ordering between counters.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Slots of [`CodeCounters`]: each code of the table, then "other".
const CODE_SLOTS: usize = ErrorCode::ALL.len() + 1;

/// Counters by error code: one per code of the contract's table and one ("other") for any
/// value outside it (a host's own code), so the label set stays bounded.
#[derive(Debug)]
pub struct CodeCounters([Counter; CODE_SLOTS]);

impl Default for CodeCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl CodeCounters {
    pub const fn new() -> Self {
        CodeCounters([const { Counter::new() }; CODE_SLOTS])
    }

    fn slot(code: i32) -> usize {
        ErrorCode::ALL
            .iter()
            .position(|c| c.raw() == code)
            .unwrap_or(CODE_SLOTS - 1)
    }

    pub fn inc(&self, code: i32) {
        self.0[Self::slot(code)].inc();
    }

    /// The count of `code` (any code outside the table reads the "other" slot).
    pub fn get(&self, code: i32) -> u64 {
        self.0[Self::slot(code)].get()
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(Counter::get).sum()
    }

    /// (label value, count) of every code in `always` and of every other code counted.
    fn series(&self, always: &[ErrorCode]) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (i, counter) in self.0.iter().enumerate() {
            let value = counter.get();
            let code = ErrorCode::ALL.get(i);
            if value == 0 && !code.is_some_and(|c| always.contains(c)) {
                continue;
            }
            out.push((code_label(code.copied()), value));
        }
        out
    }
}

/// The label value of a code: its number ("-6"), or "other" outside the table.
fn code_label(code: Option<ErrorCode>) -> String {
    code.map_or_else(|| "other".to_string(), |c| c.raw().to_string())
}

/// Upper bounds of the retry-duration buckets, in seconds: 1 s doubling to 512 s, which
/// covers the default log-backup policy (30 s doubling, capped at 8 min, 30 min budget).
pub(crate) const DURATION_BUCKETS_S: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

/// A histogram of durations with [`DURATION_BUCKETS_S`] and +Inf. Buckets are kept
/// non-cumulative and summed at render time, so `_count` always equals the +Inf bucket.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [Counter; DURATION_BUCKETS_S.len() + 1],
    sum_ms: Counter,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts for each bound of [`DURATION_BUCKETS_S`], then +Inf.
    pub cumulative: [u64; DURATION_BUCKETS_S.len() + 1],
    pub sum_ms: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative[DURATION_BUCKETS_S.len()]
    }
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let ms = duration.as_millis().min(u64::MAX as u128) as u64;
        let i = DURATION_BUCKETS_S
            .iter()
            .position(|bound| ms <= bound * 1000)
            .unwrap_or(DURATION_BUCKETS_S.len());
        self.buckets[i].inc();
        self.sum_ms.add(ms);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0; DURATION_BUCKETS_S.len() + 1];
        let mut running = 0u64;
        for (out, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            running += bucket.get();
            *out = running;
        }
        HistogramSnapshot {
            cumulative,
            sum_ms: self.sum_ms.get(),
        }
    }
}

/// Counters of the shared state store (log-backup records and idempotency keys), process-wide
/// so that any backend can count without a handle on the plugin instance.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// Store operations that failed, by the code they failed with.
    pub errors: CodeCounters,
    /// Requests moved to another etcd endpoint (a lost member, a leader election).
    pub failovers: Counter,
    /// Requests whose outcome was unknown (a timeout after sending), resolved by reading back.
    pub unknown_outcomes: Counter,
}

impl StoreMetrics {
    pub const fn new() -> Self {
        StoreMetrics {
            errors: CodeCounters::new(),
            failovers: Counter::new(),
            unknown_outcomes: Counter::new(),
        }
    }

    /// Counts a failed store operation.
    pub fn error(&self, code: i32) {
        self.errors.inc(code);
    }
}

static STORE: StoreMetrics = StoreMetrics::new();

/// Counts `failure`, returned by a state-store operation, and passes it on:
/// `store.save(..).map_err(store_failed)`.
pub fn store_failed(failure: Error) -> Error {
    STORE.error(failure.code());
    failure
}

/// The state store's counters, e.g. `metrics::store().failovers.inc()`.
pub fn store() -> &'static StoreMetrics {
    &STORE
}

/// Whether `failure` is a retry policy giving up: its attempts exhausted (RETRY_EXHAUSTED)
/// or its budget spent (TIMEOUT), as the retry core and the log-backup runner say it. A
/// state store's failure passed on after its retries (`Error::store_gave_up`) is not
/// one: its access was counted where the policy gave up.
pub fn gave_up(failure: &Error) -> bool {
    matches!(
        failure,
        Error::RetryExhausted { .. } | Error::Timeout { .. }
    )
}

/// Codes always shown for the store errors: what a file or etcd store can fail with.
const STORE_CODES: [ErrorCode; 7] = [
    ErrorCode::FileIo,
    ErrorCode::Network,
    ErrorCode::Timeout,
    ErrorCode::DataCorruption,
    ErrorCode::PermissionDenied,
    ErrorCode::DiskFull,
    ErrorCode::ConnectionLost,
];

/// Codes always shown for log-backup retries: what a retry can follow.
const RETRY_REASONS: [ErrorCode; 5] = [
    ErrorCode::FileIo,
    ErrorCode::Network,
    ErrorCode::Timeout,
    ErrorCode::ConnectionLost,
    ErrorCode::Unknown,
];

fn state_name(state: KernelState) -> &'static str {
    match state {
        KernelState::Unknown => "unknown",
        KernelState::NotExist => "not_exist",
        KernelState::Running => "running",
        KernelState::Paused => "paused",
    }
}

const STATES: [KernelState; 4] = [
    KernelState::Unknown,
    KernelState::NotExist,
    KernelState::Running,
    KernelState::Paused,
];

/// Whether a state can ever disagree with a command (the C_API §7 table): only those pairs
/// are shown as state-sync series.
fn can_need_sync(command: SubCommand, state: KernelState) -> bool {
    [false, true]
        .into_iter()
        .any(|truncated| decide(command, state, truncated).need_sync)
}

/// One sample: its labels (name, value) and its value.
pub struct Sample {
    pub labels: Vec<(&'static str, String)>,
    pub value: u64,
}

impl Sample {
    pub fn plain(value: u64) -> Self {
        Sample {
            labels: Vec::new(),
            value,
        }
    }
}

/// The text exposition being written; each call writes one whole family.
#[derive(Default)]
pub struct Exposition {
    out: String,
    families: Vec<&'static str>,
}

impl Exposition {
    fn header(&mut self, name: &'static str, help: &str, kind: &str) {
        debug_assert!(valid_name(name), "bad metric name {name}");
        debug_assert!(
            !self.families.contains(&name),
            "family {name} written twice: its samples would split"
        );
        self.families.push(name);
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {kind}",
            escape_help(help)
        );
    }

    fn sample_line(
        &mut self,
        name: &str,
        labels: &[(&str, String)],
        value: impl std::fmt::Display,
    ) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter family and all its samples.
    pub fn counter(&mut self, name: &'static str, help: &str, samples: &[Sample]) {
        self.header(name, help, "counter");
        for sample in samples {
            self.sample_line(name, &sample.labels, sample.value);
        }
    }

    /// A histogram family (seconds): for each series its buckets, `_sum` and `_count`.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &str,
        series: &[(Vec<(&'static str, String)>, HistogramSnapshot)],
    ) {
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        for (labels, snapshot) in series {
            for (i, count) in snapshot.cumulative.iter().enumerate() {
                let le = DURATION_BUCKETS_S
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                let mut with_le = labels.clone();
                with_le.push(("le", le));
                self.sample_line(&bucket, &with_le, count);
            }
            let sum = format!("{}.{:03}", snapshot.sum_ms / 1000, snapshot.sum_ms % 1000);
            self.sample_line(&format!("{name}_sum"), labels, sum);
            self.sample_line(&format!("{name}_count"), labels, snapshot.count());
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What the plugin instance counts, for [`render`].
pub struct PluginCounters<'a> {
    pub errors: u64,
    pub retries: u64,
    /// Retried work whose policy gave up (see [`gave_up`]).
    pub retries_exhausted: u64,
    pub error_log_write_failures: u64,
    /// Failed rewrites of `metrics_textfile`; `None` (no family) when it is not set.
    pub textfile_write_failures: Option<u64>,
    pub log: &'a LogMetrics,
    /// The idempotency store's counters, once it was opened.
    pub keyed: Option<&'a KeyedMetrics>,
}

fn by_command(counters: &[Counter; 5]) -> Vec<Sample> {
    SubCommand::ALL
        .iter()
        .map(|c| Sample {
            labels: vec![("command", c.name().to_string())],
            value: counters[*c as usize].get(),
        })
        .collect()
}

/// The whole exposition: every family of the plugin, the log-backup commands, the
/// idempotency keys and the state store.
pub fn render(c: &PluginCounters) -> String {
    let mut x = Exposition::default();
    x.counter(
        "backup_errors_total",
        "Errors recorded by the plugin since init.",
        &[Sample::plain(c.errors)],
    );
    x.counter(
        "backup_retries_total",
        "Retries made by plugin-level operations since init.",
        &[Sample::plain(c.retries)],
    );
    x.counter(
        "backup_retries_exhausted_total",
        "Retried work that gave up since init: retry attempts exhausted or the retry budget spent (operations, state-store accesses, log-backup commands).",
        &[Sample::plain(c.retries_exhausted)],
    );
    x.counter(
        "backup_error_log_write_failures_total",
        "Error log lines that could not be written.",
        &[Sample::plain(c.error_log_write_failures)],
    );
    if let Some(failures) = c.textfile_write_failures {
        x.counter(
            "backup_metrics_textfile_write_failures_total",
            "Rewrites of metrics_textfile that failed (the file kept its previous exposition).",
            &[Sample::plain(failures)],
        );
    }

    let log = c.log;
    let mut retries = Vec::new();
    for command in SubCommand::ALL {
        for (reason, value) in log.retries[command as usize].series(&RETRY_REASONS) {
            retries.push(Sample {
                labels: vec![("command", command.name().to_string()), ("reason", reason)],
                value,
            });
        }
    }
    x.counter(
        "backup_log_command_retries_total",
        "Retries made by log-backup commands, by the code of the failure they follow.",
        &retries,
    );
    x.counter(
        "backup_log_command_recoveries_total",
        "Log-backup commands that succeeded after a failure (after retries, or when the effect was there despite the failure).",
        &by_command(&log.recoveries),
    );
    x.counter(
        "backup_log_command_skips_total",
        "Log-backup commands skipped because their effect was already there.",
        &by_command(&log.skips),
    );
    let mut syncs = Vec::new();
    for command in SubCommand::ALL {
        for state in STATES {
            if can_need_sync(command, state) {
                syncs.push(Sample {
                    labels: vec![
                        ("command", command.name().to_string()),
                        ("state", state_name(state).to_string()),
                    ],
                    value: log.syncs[command as usize][state as usize].get(),
                });
            }
        }
    }
    x.counter(
        "backup_log_command_state_syncs_total",
        "Log-backup commands whose observed kernel state disagreed with them, by that state.",
        &syncs,
    );
    let durations: Vec<_> = SubCommand::ALL
        .iter()
        .map(|command| {
            (
                vec![("command", command.name().to_string())],
                log.retry_duration[*command as usize].snapshot(),
            )
        })
        .collect();
    x.histogram(
        "backup_log_command_retry_duration_seconds",
        "Time from a log-backup sequence's first detected failure to its terminal outcome.",
        &durations,
    );

    let empty = KeyedMetrics::default();
    for (name, help, value) in c.keyed.unwrap_or(&empty).snapshot() {
        x.counter(name, help, &[Sample::plain(value)]);
    }

    let store = store();
    let errors: Vec<Sample> = store
        .errors
        .series(&STORE_CODES)
        .into_iter()
        .map(|(code, value)| Sample {
            labels: vec![("code", code)],
            value,
        })
        .collect();
    x.counter(
        "backup_state_store_errors_total",
        "State store operations that failed, by error code.",
        &errors,
    );
    x.counter(
        "backup_state_store_failovers_total",
        "State store requests moved to another etcd endpoint.",
        &[Sample::plain(store.failovers.get())],
    );
    x.counter(
        "backup_state_store_unknown_outcomes_total",
        "State store requests whose outcome was unknown (a timeout after sending), resolved by reading the key back.",
        &[Sample::plain(store.unknown_outcomes.get())],
    );
    x.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Per family, in order of appearance: its type and the label-name sets of its samples.
    /// Fails when a sample does not belong to the family whose `# TYPE` came last, or a
    /// family appears twice.
    fn families(text: &str) -> Vec<(String, String, BTreeSet<Vec<String>>)> {
        let mut out: Vec<(String, String, BTreeSet<Vec<String>>)> = Vec::new();
        let mut help_of = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help_of = rest.split(' ').next().map(str::to_string);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(help_of.as_deref(), Some(name), "HELP right before TYPE");
                assert!(
                    out.iter().all(|f| f.0 != name),
                    "family {name} appears twice"
                );
                out.push((name.into(), kind.into(), BTreeSet::new()));
            } else {
                let (series, _value) = line.rsplit_once(' ').unwrap();
                let (metric, labels) = match series.split_once('{') {
                    Some((m, l)) => (m, l.trim_end_matches('}')),
                    None => (series, ""),
                };
                let family = out.last_mut().expect("a sample before any TYPE");
                let belongs = metric == family.0
                    || (family.1 == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| metric == format!("{}{s}", family.0)));
                assert!(belongs, "{metric} sits in family {}", family.0);
                let names = labels
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|l| l.split_once('=').unwrap().0.to_string())
                    .collect();
                family.2.insert(names);
            }
        }
        out
    }

    fn labels(sets: &[&[&str]]) -> BTreeSet<Vec<String>> {
        sets.iter()
            .map(|s| s.iter().map(|l| l.to_string()).collect())
            .collect()
    }

    #[test]
    fn every_family_is_one_group_with_bounded_label_sets() {
        let log = LogMetrics::default();
        log.retries[SubCommand::Pause as usize].inc(-6);
        log.retries[SubCommand::Pause as usize].inc(-4242);
        log.retry_duration[SubCommand::Stop as usize].observe(Duration::from_secs(3));
        let keyed = KeyedMetrics::default();
        let text = render(&PluginCounters {
            errors: 3,
            retries: 2,
            retries_exhausted: 4,
            error_log_write_failures: 1,
            textfile_write_failures: Some(5),
            log: &log,
            keyed: Some(&keyed),
        });
        let found: BTreeMap<_, _> = families(&text)
            .into_iter()
            .map(|(name, kind, sets)| (name, (kind, sets)))
            .collect();
        let expect = |name: &str, kind: &str, sets: &[&[&str]]| {
            assert_eq!(found[name], (kind.to_string(), labels(sets)), "{name}");
        };
        for plain in [
            "backup_errors_total",
            "backup_retries_total",
            "backup_retries_exhausted_total",
            "backup_error_log_write_failures_total",
            "backup_metrics_textfile_write_failures_total",
            "backup_idempotency_claims_total",
            "backup_idempotency_replays_total",
            "backup_idempotency_conflicts_total",
            "backup_idempotency_in_progress_total",
            "backup_idempotency_takeovers_total",
            "backup_idempotency_leases_lost_total",
            "backup_state_store_failovers_total",
            "backup_state_store_unknown_outcomes_total",
        ] {
            expect(plain, "counter", &[&[]]);
        }
        expect(
            "backup_log_command_retries_total",
            "counter",
            &[&["command", "reason"]],
        );
        for per_command in [
            "backup_log_command_recoveries_total",
            "backup_log_command_skips_total",
        ] {
            expect(per_command, "counter", &[&["command"]]);
        }
        expect(
            "backup_log_command_state_syncs_total",
            "counter",
            &[&["command", "state"]],
        );
        expect(
            "backup_log_command_retry_duration_seconds",
            "histogram",
            &[&["command", "le"], &["command"]],
        );
        expect("backup_state_store_errors_total", "counter", &[&["code"]]);
        assert_eq!(found.len(), 19, "no family more or less: {text}");
        assert!(text.contains("backup_errors_total 3\n"));
        assert!(text.contains("backup_retries_exhausted_total 4\n"));
        assert!(text.contains("backup_metrics_textfile_write_failures_total 5\n"));
        assert!(
            text.contains("backup_log_command_retries_total{command=\"pause\",reason=\"-6\"} 1\n")
        );
        // A host's own code is counted as "other", never as its raw value.
        assert!(text
            .contains("backup_log_command_retries_total{command=\"pause\",reason=\"other\"} 1\n"));
        assert!(!text.contains("-4242"));
        // Zero series of the retryable reasons exist before any retry.
        assert!(text
            .contains("backup_log_command_retries_total{command=\"truncate\",reason=\"-11\"} 0\n"));
        assert!(text.contains(
            "backup_log_command_state_syncs_total{command=\"start\",state=\"paused\"} 0\n"
        ));
        // RUNNING never disagrees with START: no such series.
        assert!(!text.contains("command=\"start\",state=\"running\""));
        assert!(text.contains(
            "backup_log_command_retry_duration_seconds_bucket{command=\"stop\",le=\"2\"} 0\n\
             backup_log_command_retry_duration_seconds_bucket{command=\"stop\",le=\"4\"} 1\n"
        ));
        assert!(text
            .contains("backup_log_command_retry_duration_seconds_sum{command=\"stop\"} 3.000\n"));
        assert!(text.contains(
            "backup_log_command_retry_duration_seconds_bucket{command=\"stop\",le=\"+Inf\"} 1\n\
             backup_log_command_retry_duration_seconds_sum{command=\"stop\"} 3.000\n\
             backup_log_command_retry_duration_seconds_count{command=\"stop\"} 1\n"
        ));
        assert!(text.contains("backup_state_store_errors_total{code=\"-10\"} "));
    }

    #[test]
    fn histogram_buckets_hold_their_upper_bound_and_overflow_to_inf() {
        let h = Histogram::default();
        for ms in [0, 1_000, 1_001, 512_000, 512_001, u64::MAX] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        // le=1: 0 and 1000 ms; le=2: + 1001 ms; le=512: + 512000 ms; +Inf: all six.
        assert_eq!(s.cumulative, [2, 3, 3, 3, 3, 3, 3, 3, 3, 4, 6]);
        assert_eq!(s.count(), 6);
    }

    #[test]
    fn code_counters_keep_one_slot_per_known_code_and_one_for_the_rest() {
        let c = CodeCounters::new();
        c.inc(-6);
        c.inc(7);
        c.inc(i32::MIN);
        assert_eq!(
            (c.get(-6), c.get(-7), c.get(12345), c.total()),
            (1, 0, 2, 3)
        );
        let series = c.series(&[ErrorCode::Timeout]);
        assert_eq!(
            series,
            vec![("-6".into(), 1), ("-7".into(), 0), ("other".into(), 2)]
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut x = Exposition::default();
        x.counter(
            "backup_test_total",
            "a \\ help\nline",
            &[Sample {
                labels: vec![("v", "a\"b\\c\nd".into())],
                value: 1,
            }],
        );
        assert_eq!(
            x.finish(),
            "# HELP backup_test_total a \\\\ help\\nline\n# TYPE backup_test_total counter\nbackup_test_total{v=\"a\\\"b\\\\c\\nd\"} 1\n"
        );
    }

    #[test]
    fn the_textfile_family_is_there_only_with_a_textfile() {
        let log = LogMetrics::default();
        let counters = |textfile_write_failures| PluginCounters {
            errors: 0,
            retries: 0,
            retries_exhausted: 0,
            error_log_write_failures: 0,
            textfile_write_failures,
            log: &log,
            keyed: None,
        };
        assert!(!render(&counters(None)).contains("backup_metrics_textfile"));
        assert!(render(&counters(Some(0)))
            .contains("\nbackup_metrics_textfile_write_failures_total 0\n"));
    }

    #[test]
    fn only_a_policy_giving_up_counts_as_retries_exhausted() {
        let last = || Box::new(Error::Host(-6));
        let exhausted = Error::RetryExhausted {
            context: "3 retries failed".into(),
            last: last(),
        };
        let budget = Error::Timeout {
            context: "budget".into(),
            last: last(),
        };
        assert!(gave_up(&exhausted) && gave_up(&budget));
        // A store's own failure after its retries, an operation's own timeout, a cleanup.
        assert!(!gave_up(&exhausted.store_gave_up("nothing was read")));
        assert!(!gave_up(&Error::Host(-7)));
        assert!(!gave_up(&Error::Cancelled("cleanup".into())));
    }
}
