//! The plugin's own diagnostics log (C_API §10).
//!
//! A dlopen'ed cdylib carries its own copy of `tracing`, whose dispatcher a host's subscriber
//! never reaches: without this module the plugin's events (retries, give-ups, store warnings,
//! failed error-log writes) go nowhere. With `log_path` set, init installs a subscriber that
//! writes one line per event, with its fields, to `<log_path>/backup_plugin.log.<YYYY-MM-DD>`
//! (UTC date, a new file each day), through `tracing-appender`'s non-blocking writer so that
//! a slow disk never stalls a plugin thread. Cleanup removes it and flushes every line.
//!
//! The process-wide default dispatcher can be set only once, so it is set (on first use) to
//! [`Switch`], which forwards to whichever subscriber the current init installed, from every
//! thread (the host's calling threads and the plugin's own). With none installed it reports
//! a max level of OFF, so the `tracing` macros cost one relaxed load.

use crate::config::{ConfigError, PluginConfig};
use parking_lot::RwLock;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Subscriber};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;

/// File name prefix; the UTC date follows after a dot.
pub const FILE_PREFIX: &str = "backup_plugin.log";

/// What the current init installed.
struct Installed {
    dispatch: Dispatch,
    max_level: LevelFilter,
    /// Dropping it flushes every buffered line and stops the writer thread.
    guard: WorkerGuard,
}

static CURRENT: RwLock<Option<Installed>> = RwLock::new(None);
/// Whether [`Switch`] is the process's default dispatcher (false if a host linking the Rust
/// library set its own first: then that one sees the events, and no file is written).
static SWITCH_IS_GLOBAL: OnceLock<bool> = OnceLock::new();
/// Set while a subscriber is installed; read on the hot path without the lock.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The process-wide default dispatcher: forwards to the installed subscriber, if any.
struct Switch;

impl Subscriber for Switch {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // Installations come and go: ask `enabled` every time rather than cache an answer.
        Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(
            CURRENT
                .read()
                .as_ref()
                .map_or(LevelFilter::OFF, |i| i.max_level),
        )
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // The plugin emits no spans; events only.
        ACTIVE.load(Ordering::Relaxed)
            && metadata.is_event()
            && CURRENT
                .read()
                .as_ref()
                .is_some_and(|i| i.dispatch.enabled(metadata))
    }

    fn event(&self, event: &Event<'_>) {
        if let Some(installed) = CURRENT.read().as_ref() {
            if installed.dispatch.enabled(event.metadata()) {
                installed.dispatch.event(event);
            }
        }
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        // Never reached: `enabled` refuses spans. An id is still required by the trait.
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// The filter `log_level` names: a level ("info") or `target=level` directives.
/// The config has validated it; a string it cannot read falls back to "info".
pub fn filter_of(log_level: &str) -> Targets {
    let level = log_level.trim();
    match LevelFilter::from_str(level) {
        Ok(level) => Targets::new().with_default(level),
        Err(_) => Targets::from_str(level)
            .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO)),
    }
}

fn max_level_of(filter: &Targets) -> LevelFilter {
    tracing_subscriber::Layer::<tracing_subscriber::Registry>::max_level_hint(filter)
        .unwrap_or(LevelFilter::TRACE)
}

/// Installs the diagnostics log in `dir` at `log_level` (replacing any earlier one).
/// The directory exists: init has checked it.
pub fn install(dir: &Path, log_level: &str) -> io::Result<()> {
    let is_global = *SWITCH_IS_GLOBAL
        .get_or_init(|| tracing::dispatcher::set_global_default(Dispatch::new(Switch)).is_ok());
    let writer = DailyFile::open(dir.to_path_buf())?;
    let (non_blocking, guard) = tracing_appender::non_blocking(writer);
    let filter = filter_of(log_level);
    let max_level = max_level_of(&filter);
    let subscriber = tracing_subscriber::registry().with(filter).with(
        tracing_subscriber::fmt::layer()
            .with_writer(non_blocking)
            .with_ansi(false)
            .with_target(true)
            .with_thread_ids(true),
    );
    // Built before the lock is taken: registering a dispatch asks `Switch` for its level.
    let installed = Installed {
        dispatch: Dispatch::new(subscriber),
        max_level,
        guard,
    };
    let previous = CURRENT.write().replace(installed);
    ACTIVE.store(true, Ordering::Relaxed);
    tracing::callsite::rebuild_interest_cache();
    drop(previous);
    if !is_global {
        // Only a Rust program linking the library can get here (a dlopen'ed copy of
        // `tracing` has no other default): its own subscriber sees the events instead.
        eprintln!("backup_coordinator: the process has its own tracing subscriber; {FILE_PREFIX} stays empty");
    }
    Ok(())
}

/// Installs the diagnostics log the config asks for (none without `log_path`); the error
/// names `log_path` and the reason.
pub fn install_for(config: &PluginConfig) -> Result<(), ConfigError> {
    match &config.log_path {
        Some(dir) => install(dir, &config.log_level).map_err(|e| {
            ConfigError(format!(
                "key `log_path`: diagnostics log in {}: {e}",
                dir.display()
            ))
        }),
        None => {
            uninstall();
            Ok(())
        }
    }
}

/// Removes the diagnostics log and flushes it: every line logged before returns is on disk.
pub fn uninstall() {
    let previous = CURRENT.write().take();
    ACTIVE.store(false, Ordering::Relaxed);
    tracing::callsite::rebuild_interest_cache();
    // Dropping the guard flushes the writer thread's queue and joins it.
    drop(previous.map(|i| i.guard));
}

/// Whether a diagnostics log is installed now.
pub fn is_installed() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// The file of `date` ("YYYY-MM-DD") in `dir`.
pub fn file_for(dir: &Path, date: &str) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}.{date}"))
}

/// Today's UTC date, "YYYY-MM-DD".
pub fn utc_date_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_date(secs)
}

/// The UTC civil date of a unix time (Howard Hinnant's days-to-civil).
pub fn utc_date(unix_secs: u64) -> String {
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The file the non-blocking writer thread appends to: a new file each UTC day, created 0640
/// whatever the umask, append-only, symlinks not followed.
struct DailyFile {
    dir: PathBuf,
    date: String,
    file: File,
}

impl DailyFile {
    fn open(dir: PathBuf) -> io::Result<Self> {
        let date = utc_date_now();
        let file = open_log(&file_for(&dir, &date))?;
        Ok(DailyFile { dir, date, file })
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o640))?;
    Ok(file)
}

impl Write for DailyFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let today = utc_date_now();
        if today != self.date {
            // On failure keep the old file: a line in yesterday's file beats a lost line.
            if let Ok(file) = open_log(&file_for(&self.dir, &today)) {
                self.file = file;
                self.date = today;
            }
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_795_428_950), "2026-11-23");
        assert_eq!(utc_date(4_107_542_399), "2100-02-28");
    }

    #[test]
    fn filters_take_a_level_or_directives() {
        assert_eq!(max_level_of(&filter_of("warn")), LevelFilter::WARN);
        let f = filter_of("backup_coordinator=trace,error");
        assert_eq!(max_level_of(&f), LevelFilter::TRACE);
        assert!(f.would_enable("backup_coordinator::retry", &tracing::Level::TRACE));
        assert!(!f.would_enable("other", &tracing::Level::WARN));
    }
}
