//! The process-wide plugin instance taosX drives (C_API §4), in plain Rust.
//!
//! One instance at a time: `init` parses the config and installs it, `cleanup` removes it,
//! cancels every wait in progress and flushes the error log. Calls in flight hold their own
//! `Arc` of the instance, so a concurrent cleanup never frees anything under them.
//!
//! Cancellation belongs to the instance: its [`CancelToken`] is taken at init, and the
//! cleanup that removes the instance cancels it. Every call that took the instance is thus
//! cancelled at its next wait, wherever it was when cleanup came (even before its first
//! wait, or inside a claim's fsync).

use crate::cancel::{self, CancelToken};
use crate::clock::{Clock, SystemClock};
use crate::config::PluginConfig;
use crate::durable;
use crate::error::{Error, ErrorCode, Result};
use crate::error_log::{ErrorLog, LogSettings};
use crate::etcd::EtcdBackend;
use crate::fenced_write;
use crate::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
use crate::idempotency::keyed::{Keyed, KeyedMetrics};
use crate::idempotency::{self as idem, IdempotencyStore};
use crate::log_backup::records::{FileLogRecords, LogRecordStore, Sequence};
use crate::log_backup::runner::{LogMetrics, LogRetryPolicy, Runner, TaskDriver};
use crate::log_backup::SubCommand;
use crate::metrics::textfile::{Textfile, FINAL_WRITE_PATIENCE};
use crate::metrics::{self, Counter, Family};
use crate::retry::{self, CancellableSleeper, RetryProgress};
use crate::tracker::ErrorTracker;
use parking_lot::{Mutex, RwLock};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const NOT_INITIALIZED: &str = "Plugin not initialized";

pub struct Plugin {
    config: PluginConfig,
    tracker: ErrorTracker,
    clock: Arc<dyn Clock>,
    /// Cancelled by the cleanup that removes this instance.
    cancel: CancelToken,
    /// Log-backup retry records, when a state store is configured.
    log_records: Option<Box<dyn LogRecordStore>>,
    log_metrics: LogMetrics,
    /// The shared state store on etcd (C_API §9), when `state_backend = "etcd"`.
    etcd: Option<EtcdBackend>,
    /// The idempotency store, opened on first use (an open that fails is tried again).
    keyed: Mutex<Option<Arc<Keyed>>>,
    /// Retried work whose policy gave up (`backup_retries_exhausted_total`).
    retries_exhausted: Counter,
    /// The thread rewriting `metrics_textfile` (C_API §5), when the key is set.
    textfile: Mutex<Option<Textfile>>,
    textfile_failures: Arc<Counter>,
}

static INSTANCE: RwLock<Option<Arc<Plugin>>> = RwLock::new(None);
/// Why the last init failed; kept until the next init or cleanup.
static INIT_FAILURE: Mutex<Option<Arc<str>>> = Mutex::new(None);

/// Installs the instance from the config bytes taosX passes.
pub fn init(config_bytes: &[u8]) -> Result<()> {
    init_with_clock(config_bytes, Arc::new(SystemClock))
}

pub fn init_with_clock(config_bytes: &[u8], clock: Arc<dyn Clock>) -> Result<()> {
    let mut slot = INSTANCE.write();
    if slot.is_some() {
        let failure = Error::InitFailed(
            "the plugin is already initialized (call backup_plugin_cleanup first)".to_string(),
        );
        // The running instance's last error stays what it was.
        return Err(failure);
    }
    let config = match PluginConfig::load(config_bytes)
        .and_then(|c| crate::diagnostics::install_for(&c).map(|()| c))
    {
        Ok(config) => config,
        Err(err) => {
            let failure = Error::from(err);
            *INIT_FAILURE.lock() = Some(Arc::from(failure.detail().as_str()));
            tracing::error!(reason = %failure.detail(), "plugin init failed");
            return Err(failure);
        }
    };
    let plugin = match Plugin::new(config, clock) {
        Ok(plugin) => plugin,
        Err(failure) => {
            *INIT_FAILURE.lock() = Some(Arc::from(failure.detail().as_str()));
            tracing::error!(reason = %failure.detail(), "plugin init failed");
            return Err(failure);
        }
    };
    let plugin = Arc::new(plugin);
    if let Err(failure) = plugin.start_textfile() {
        *INIT_FAILURE.lock() = Some(Arc::from(failure.detail().as_str()));
        tracing::error!(reason = %failure.detail(), "plugin init failed");
        return Err(failure);
    }
    *INIT_FAILURE.lock() = None;
    tracing::info!(
        enable = plugin.config.enable,
        retry_max = plugin.config.error_retry_max,
        retry_interval_ms = plugin.config.error_retry_interval.as_millis() as u64,
        error_log = ?plugin.config.error_store_path,
        "plugin initialized"
    );
    *slot = Some(plugin);
    Ok(())
}

/// Records why an init failed before a config could be parsed (NULL, oversized).
pub fn fail_init(failure: Error) -> Error {
    if INSTANCE.read().is_none() {
        *INIT_FAILURE.lock() = Some(Arc::from(failure.detail().as_str()));
    }
    failure
}

/// Removes the instance, cancels every wait in progress and flushes the error log.
pub fn cleanup() {
    // Cancelled under the instance lock: an init racing this cleanup cannot install an
    // instance whose token the cancellation would then void.
    let previous = {
        let mut slot = INSTANCE.write();
        cancel::cancel_all();
        slot.take()
    };
    *INIT_FAILURE.lock() = None;
    if let Some(plugin) = previous {
        // The final exposition, while the diagnostics log still carries a failure's warning.
        plugin.stop_textfile();
        if let Some(log) = plugin.tracker.log() {
            log.flush();
        }
        tracing::info!("plugin cleaned up; waits in progress cancelled");
    }
    // Flushes the diagnostics log; under the instance lock, so that an init racing this
    // cleanup keeps the log it installed.
    let slot = INSTANCE.write();
    if slot.is_none() {
        crate::diagnostics::uninstall();
    }
}

/// The running instance, or NOT_INITIALIZED.
pub fn instance() -> Result<Arc<Plugin>> {
    INSTANCE.read().clone().ok_or_else(not_initialized)
}

pub fn not_initialized() -> Error {
    Error::NotInitialized
}

/// What `backup_plugin_get_last_error` shows.
pub fn last_error_text() -> Arc<str> {
    if let Some(plugin) = INSTANCE.read().as_ref() {
        return plugin
            .tracker
            .last_error()
            .unwrap_or_else(|| Arc::from(ErrorCode::Success.message()));
    }
    INIT_FAILURE
        .lock()
        .clone()
        .unwrap_or_else(|| Arc::from(NOT_INITIALIZED))
}

/// What calls that keep durable state return when no state store is configured.
fn no_state_store() -> Error {
    Error::InvalidArgument(
        "no state store is configured (set `state_dir`, or `state_backend = \"etcd\"` with `etcd_endpoints`); this operation keeps durable state there".to_string(),
    )
}

impl Plugin {
    fn new(config: PluginConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        // Only checks the settings and starts the runtime thread: the cluster may be down.
        let etcd = EtcdBackend::open(&config)?;
        let log = match (&config.error_store_path, config.enable_error_logging) {
            (Some(dir), true) => Some(ErrorLog::shared(LogSettings {
                dir: dir.clone(),
                rotation_size: config.error_log_rotation_size,
                rotation_count: config.error_log_rotation_count,
            })),
            _ => None,
        };
        if let (None, Some(dir)) = (&etcd, config.state_dir.as_deref()) {
            let estimate = FileIdempotencyStore::maintenance_estimate_at(dir);
            crate::idempotency::keyed::warn_if_lease_is_short(config.idempotency_lease, estimate);
        }
        let log_records = match (&etcd, config.state_dir.as_deref()) {
            (Some(etcd), _) => Some(etcd.log_records()),
            (None, Some(dir)) => {
                Some(Box::new(FileLogRecords::new(dir)) as Box<dyn LogRecordStore>)
            }
            (None, None) => None,
        };
        Ok(Plugin {
            tracker: ErrorTracker::new(
                config.error_buffer_size,
                log,
                // Every configured secret (encryption_key, etcd_password) is redacted.
                config.secrets().into_iter().map(str::to_string),
            ),
            log_records,
            log_metrics: LogMetrics::default(),
            etcd,
            keyed: Mutex::new(None),
            retries_exhausted: Counter::new(),
            textfile: Mutex::new(None),
            textfile_failures: Arc::new(Counter::new()),
            cancel: cancel::token(),
            config,
            clock,
        })
    }

    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    pub fn tracker(&self) -> &ErrorTracker {
        &self.tracker
    }

    /// The directory for durable state, or INVALID_PARAM naming `state_dir`.
    pub fn state_dir(&self) -> Result<&Path> {
        self.config.state_dir.as_deref().ok_or_else(no_state_store)
    }

    pub fn record_error(&self, code: i32, message: Option<&str>) {
        self.tracker.record(self.clock(), code, message);
    }

    /// Counts the retries of a plugin-level operation. Its failure is booked by the C
    /// frame (`ffi::frame::booked`), once per call, whatever failed.
    fn count_retries(&self, retries: u32) {
        self.tracker.add_retries(retries as u64);
    }

    /// Runs `op` under the configured policy, unbooked; a policy that gives up is counted.
    fn run_configured<F>(&self, op: F) -> retry::Execution
    where
        F: FnMut(u32) -> Result<()>,
    {
        let mut progress = RetryProgress::default();
        let execution = retry::run_until_cancelled(
            &self.config.retry_policy(),
            &mut progress,
            retry::no_progress,
            self.cancel,
            op,
        );
        self.count_give_up(&execution.result);
        execution
    }

    /// Counts `result` in `backup_retries_exhausted_total` when it is a policy giving up.
    fn count_give_up<T>(&self, result: &Result<T>) {
        if result.as_ref().is_err_and(crate::metrics::gave_up) {
            self.retries_exhausted.inc();
        }
    }

    /// Runs `op` under the configured policy, counting its retries.
    pub fn execute<F>(&self, op: F) -> Result<()>
    where
        F: FnMut(u32) -> Result<()>,
    {
        let execution = self.run_configured(op);
        self.count_retries(execution.retries);
        execution.result
    }

    /// Durable, atomic replacement of `path`, retried under the configured policy.
    pub fn write_file(&self, path: &Path, data: &[u8]) -> Result<()> {
        self.execute(|_| durable::write_atomic(path, data).map_err(Error::from))
    }

    /// [`Plugin::write_file`], made only if no write of `path` with a higher fencing token
    /// was made (`crate::fenced_write`). The whole check and write is one attempt under the
    /// configured policy: FILE_IO is retried, FENCED (permanent), DISK_FULL,
    /// PERMISSION_DENIED, DATA_CORRUPTION and INVALID_PARAM end the call at once.
    pub fn write_file_fenced(&self, path: &Path, data: &[u8], token: u64) -> Result<()> {
        self.execute(|_| fenced_write::write_fenced(path, data, token))
    }

    fn log_records(&self) -> Result<&dyn LogRecordStore> {
        self.log_records.as_deref().ok_or_else(no_state_store)
    }

    /// `backup_log_run_command`, counting its retries.
    pub fn run_log_command(
        &self,
        task: &str,
        command: SubCommand,
        policy: &LogRetryPolicy,
        driver: &mut dyn TaskDriver,
    ) -> Result<()> {
        let store = self.log_records()?;
        let mut sleeper = CancellableSleeper(self.cancel);
        let mut runner = Runner {
            store,
            clock: self.clock(),
            sleeper: &mut sleeper,
            metrics: &self.log_metrics,
        };
        // A record store that does not answer is retried through the configured policy
        // (C_API §9), before anything is queried or executed.
        let outcome = runner.run_retrying_store(task, command, policy, driver, |start| {
            self.run_configured(start)
        });
        self.count_retries(outcome.retries);
        // The runner's own policy giving up (a store's that gave up was counted above).
        self.count_give_up(&outcome.result);
        outcome.result
    }

    /// A call's access to the state store, retried through the configured policy like the
    /// operations (C_API §9: an etcd cluster that does not answer, an I/O error), its retries
    /// counted; when the policy gives up, the store's own failure, saying `nothing_done`.
    fn store_access<T>(&self, nothing_done: &str, access: impl FnMut() -> Result<T>) -> Result<T> {
        let (result, retries) =
            retry::retry_store_access(|op| self.run_configured(op), nothing_done, access);
        self.count_retries(retries);
        result
    }

    pub fn log_retry_records(&self, task: &str, command: SubCommand) -> Result<Sequence> {
        let store = self.log_records()?;
        let loaded = self.store_access("nothing was read", || store.load(task, command))?;
        Ok(loaded.unwrap_or_default())
    }

    pub fn reset_log_retry_records(&self, task: &str, command: SubCommand) -> Result<()> {
        let store = self.log_records()?;
        self.store_access("nothing was removed", || store.reset(task, command))
    }

    fn keyed(&self) -> Result<Arc<Keyed>> {
        let mut slot = self.keyed.lock();
        if let Some(keyed) = slot.as_ref() {
            return Ok(keyed.clone());
        }
        let store: Arc<dyn IdempotencyStore> = match &self.etcd {
            Some(etcd) => etcd.idempotency_store(),
            None => {
                let settings = FileIdempotencySettings {
                    lease: self.config.idempotency_lease,
                    ttl: self.config.idempotency_ttl,
                    compaction_slack_bytes: self.config.idempotency_compaction_slack,
                };
                Arc::new(FileIdempotencyStore::open(self.state_dir()?, settings)?)
            }
        };
        let keyed = Arc::new(Keyed::new(
            store,
            self.clock.clone(),
            self.config.idempotency_lease,
        )?);
        *slot = Some(keyed.clone());
        Ok(keyed)
    }

    /// `backup_execute_idempotent`: `op` runs at most once for `key` under the configured
    /// retry policy, its retries counted. `Ok(replayed)`.
    pub fn execute_idempotent<F>(&self, key: &[u8], payload: &[u8], op: F) -> Result<bool>
    where
        F: FnMut(u32) -> Result<()>,
    {
        let keyed = self.keyed()?;
        // The claim goes through the configured policy too (C_API §9: an unreachable store
        // is retried like the operation), then the operation.
        let execution = keyed.execute_retrying_claim(
            self.clock(),
            key,
            &idem::fingerprint(payload),
            |claim| self.run_configured(claim),
            || self.run_configured(op),
        );
        self.count_retries(execution.retries);
        execution.result
    }

    /// `backup_execute_idempotent_fenced`: [`Self::execute_idempotent`] whose `op` gets the
    /// claim's fencing token (the same on every attempt), and whose success after the claim
    /// stopped being held is LEASE_LOST (docs/C_API.md §8.1).
    pub fn execute_idempotent_fenced<F>(
        &self,
        key: &[u8],
        payload: &[u8],
        mut op: F,
    ) -> Result<bool>
    where
        F: FnMut(u64) -> Result<()>,
    {
        let keyed = self.keyed()?;
        let execution = keyed.execute_fenced(
            self.clock(),
            key,
            &idem::fingerprint(payload),
            |claim| self.run_configured(claim),
            |token| self.run_configured(|_| op(token.0)),
        );
        self.count_retries(execution.retries);
        execution.result
    }

    /// `backup_idempotency_check_claim`.
    pub fn check_claim(&self, key: &[u8], token: u64) -> Result<()> {
        if token == 0 {
            return Err(Error::InvalidArgument(
                "`fencing_token` 0 is never a claim's token".into(),
            ));
        }
        self.keyed()?
            .check_claim(self.clock(), key, idem::ClaimToken(token))
    }

    /// `backup_idempotency_forget`.
    pub fn forget_idempotency_key(&self, key: &[u8]) -> Result<()> {
        let keyed = self.keyed()?;
        self.store_access("nothing was forgotten", || keyed.forget(self.clock(), key))
    }

    /// Prometheus text of every family of the plugin (see [`exposition`]).
    pub fn metrics_text(&self) -> String {
        let (errors, retries) = self.tracker.stats();
        let keyed = self.keyed.lock().clone();
        let own = OwnCounters {
            errors,
            retries,
            retries_exhausted: self.retries_exhausted.get(),
            error_log_write_failures: self.tracker.log().map_or(0, |log| log.write_failures()),
            textfile_write_failures: self
                .config
                .metrics_textfile
                .as_ref()
                .map(|_| self.textfile_failures.get()),
        };
        exposition(&own, &self.log_metrics, keyed.as_ref().map(|k| &k.metrics))
    }

    pub fn error_log_path(&self) -> Option<PathBuf> {
        self.tracker.log().and_then(|log| log.current_path())
    }

    /// Starts the thread rewriting `metrics_textfile` (C_API §5), when it is set. The thread
    /// holds the instance weakly: it renders while the instance lives, and cleanup, which
    /// holds it during the final write, ends it.
    fn start_textfile(self: &Arc<Self>) -> Result<()> {
        let Some(path) = self.config.metrics_textfile.clone() else {
            return Ok(());
        };
        let instance = Arc::downgrade(self);
        let textfile = Textfile::start(
            path,
            self.config.metrics_interval,
            self.textfile_failures.clone(),
            move || instance.upgrade().map(|plugin| plugin.metrics_text()),
        )?;
        *self.textfile.lock() = Some(textfile);
        Ok(())
    }

    /// The final write of `metrics_textfile` and the end of its thread (waits at most
    /// [`FINAL_WRITE_PATIENCE`]).
    fn stop_textfile(&self) {
        let textfile = self.textfile.lock().take();
        if let Some(textfile) = textfile {
            textfile.stop(FINAL_WRITE_PATIENCE);
        }
    }
}

/// What the plugin instance counts itself, for its exposition.
struct OwnCounters {
    errors: u64,
    retries: u64,
    /// Retried work whose policy gave up (see [`metrics::gave_up`]).
    retries_exhausted: u64,
    error_log_write_failures: u64,
    /// Failed rewrites of `metrics_textfile`; `None` (no family) when it is not set.
    textfile_write_failures: Option<u64>,
}

impl OwnCounters {
    fn families(&self) -> Vec<Family> {
        let mut families = vec![
            Family::plain_counter(
                "backup_errors_total",
                "Errors recorded by the plugin since init.",
                self.errors,
            ),
            Family::plain_counter(
                "backup_retries_total",
                "Retries made by plugin-level operations since init.",
                self.retries,
            ),
            Family::plain_counter(
                "backup_retries_exhausted_total",
                "Retried work that gave up since init: retry attempts exhausted or the retry budget spent (operations, state-store accesses, log-backup commands).",
                self.retries_exhausted,
            ),
            Family::plain_counter(
                "backup_error_log_write_failures_total",
                "Error log lines that could not be written.",
                self.error_log_write_failures,
            ),
        ];
        if let Some(failures) = self.textfile_write_failures {
            families.push(Family::plain_counter(
                "backup_metrics_textfile_write_failures_total",
                "Rewrites of metrics_textfile that failed (the file kept its previous exposition).",
                failures,
            ));
        }
        families
    }
}

/// The whole exposition: the plugin's own families, then those of the log-backup commands,
/// of the idempotency keys (all zero until the store is opened) and of the state store.
fn exposition(own: &OwnCounters, log: &LogMetrics, keyed: Option<&KeyedMetrics>) -> String {
    let mut families = own.families();
    families.extend(log.families());
    families.extend(keyed.map_or_else(
        || KeyedMetrics::default().families(),
        KeyedMetrics::families,
    ));
    families.extend(metrics::store_families());
    metrics::render(&families)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

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
        let own = OwnCounters {
            errors: 3,
            retries: 2,
            retries_exhausted: 4,
            error_log_write_failures: 1,
            textfile_write_failures: Some(5),
        };
        let text = exposition(&own, &log, Some(&keyed));
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
    fn the_textfile_family_is_there_only_with_a_textfile() {
        let log = LogMetrics::default();
        let text = |textfile_write_failures| {
            let own = OwnCounters {
                errors: 0,
                retries: 0,
                retries_exhausted: 0,
                error_log_write_failures: 0,
                textfile_write_failures,
            };
            exposition(&own, &log, None)
        };
        assert!(!text(None).contains("backup_metrics_textfile"));
        assert!(text(Some(0)).contains("\nbackup_metrics_textfile_write_failures_total 0\n"));
    }
}
