//! The plugin's Prometheus metrics: lock-free counters and histograms for the hot paths, and
//! one renderer that writes each family as one group (`# HELP`, `# TYPE`, then its samples),
//! as the text exposition format requires: a parser reads a sample only into the family
//! whose `# TYPE` line came last.
//!
//! Label values are bounded by construction: commands, kernel states and error codes of the
//! fixed table (a code outside it is counted as "other"), never task names or keys.
//!
//! Neutral ground: this module knows no capability. Each one describes its own families
//! with [`Family`] and [`Sample`] (`log_backup::metrics`, `idempotency::keyed`, the state
//! store's here), and the plugin assembles them into one exposition with [`render`].

use crate::error::{Error, ErrorCode};
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
    pub fn series(&self, always: &[ErrorCode]) -> Vec<(String, u64)> {
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

/// The labels of one series: (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

/// The samples of a family, by its type.
pub enum Samples {
    Counter(Vec<Sample>),
    /// A histogram of durations (seconds): one snapshot per series.
    Histogram(Vec<(Labels, HistogramSnapshot)>),
}

/// One metric family as the capability that counts it describes it; [`render`] writes it.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Samples,
}

impl Family {
    pub fn counter(name: &'static str, help: &'static str, samples: Vec<Sample>) -> Self {
        Family {
            name,
            help,
            samples: Samples::Counter(samples),
        }
    }

    /// A counter family of one series without labels.
    pub fn plain_counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Self::counter(name, help, vec![Sample::plain(value)])
    }

    pub fn histogram(
        name: &'static str,
        help: &'static str,
        series: Vec<(Labels, HistogramSnapshot)>,
    ) -> Self {
        Family {
            name,
            help,
            samples: Samples::Histogram(series),
        }
    }
}

/// The exposition of `families`, in their order, each one group (`# HELP`, `# TYPE`, its
/// samples). A name given twice is a bug (its samples would split): checked in debug builds.
pub fn render(families: &[Family]) -> String {
    let mut x = Exposition::default();
    for family in families {
        match &family.samples {
            Samples::Counter(samples) => x.counter(family.name, family.help, samples),
            Samples::Histogram(series) => x.histogram(family.name, family.help, series),
        }
    }
    x.finish()
}

/// The state store's families, from its process-wide counters ([`store`]).
pub fn store_families() -> Vec<Family> {
    let store = store();
    let errors = store
        .errors
        .series(&STORE_CODES)
        .into_iter()
        .map(|(code, value)| Sample {
            labels: vec![("code", code)],
            value,
        })
        .collect();
    vec![
        Family::counter(
            "backup_state_store_errors_total",
            "State store operations that failed, by error code.",
            errors,
        ),
        Family::plain_counter(
            "backup_state_store_failovers_total",
            "State store requests moved to another etcd endpoint.",
            store.failovers.get(),
        ),
        Family::plain_counter(
            "backup_state_store_unknown_outcomes_total",
            "State store requests whose outcome was unknown (a timeout after sending), resolved by reading the key back.",
            store.unknown_outcomes.get(),
        ),
    ]
}

/// The text exposition being written; each call writes one whole family.
#[derive(Default)]
struct Exposition {
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
    fn counter(&mut self, name: &'static str, help: &str, samples: &[Sample]) {
        self.header(name, help, "counter");
        for sample in samples {
            self.sample_line(name, &sample.labels, sample.value);
        }
    }

    /// A histogram family (seconds): for each series its buckets, `_sum` and `_count`.
    fn histogram(
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

    fn finish(self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = render(&[Family::counter(
            "backup_test_total",
            "a \\ help\nline",
            vec![Sample {
                labels: vec![("v", "a\"b\\c\nd".into())],
                value: 1,
            }],
        )]);
        assert_eq!(
            text,
            "# HELP backup_test_total a \\\\ help\\nline\n# TYPE backup_test_total counter\nbackup_test_total{v=\"a\\\"b\\\\c\\nd\"} 1\n"
        );
    }

    #[test]
    fn families_are_written_in_order_each_as_one_group() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_millis(1500));
        let text = render(&[
            Family::plain_counter("backup_a_total", "A.", 2),
            Family::histogram(
                "backup_b_seconds",
                "B.",
                vec![(vec![("command", "stop".into())], histogram.snapshot())],
            ),
        ]);
        assert!(text.starts_with(
            "# HELP backup_a_total A.\n# TYPE backup_a_total counter\nbackup_a_total 2\n\
             # HELP backup_b_seconds B.\n# TYPE backup_b_seconds histogram\n\
             backup_b_seconds_bucket{command=\"stop\",le=\"1\"} 0\n\
             backup_b_seconds_bucket{command=\"stop\",le=\"2\"} 1\n"
        ));
        assert!(text.ends_with(
            "backup_b_seconds_bucket{command=\"stop\",le=\"+Inf\"} 1\n\
             backup_b_seconds_sum{command=\"stop\"} 1.500\n\
             backup_b_seconds_count{command=\"stop\"} 1\n"
        ));
        let names: Vec<_> = store_families().iter().map(|f| f.name).collect();
        assert_eq!(
            names,
            [
                "backup_state_store_errors_total",
                "backup_state_store_failovers_total",
                "backup_state_store_unknown_outcomes_total"
            ]
        );
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
