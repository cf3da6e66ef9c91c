//! Plugin configuration (C_API §5): TOML text, keys at top level, under
//! `[plugins.incremental_bitmap]`, or as taosX dotted keys (`error.retry.max`, `log.path`,
//! `etcd.endpoints`). Durations are integer seconds or strings ("250ms", "5s", "30m", "24h");
//! sizes are integer bytes or strings ("512KB", "64MB", "1GB", powers of 1024). Every error
//! names the key and quotes the value as it was written (never the value of a secret),
//! because a typo in a config file is the usual cause.

use crate::retry::RetryPolicy;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// The host's switch for the plugin (taosX spec): kept and reported, never acted on here.
    pub enable: bool,
    pub error_retry_max: u32,
    pub error_retry_interval: Duration,
    /// `None`: no cap.
    pub error_retry_max_interval: Option<Duration>,
    pub error_retry_multiplier: f64,
    pub error_retry_jitter: bool,
    /// `None`: no budget.
    pub error_retry_timeout: Option<Duration>,
    pub error_store_path: Option<PathBuf>,
    pub enable_error_logging: bool,
    pub error_buffer_size: usize,
    pub error_log_rotation_size: u64,
    pub error_log_rotation_count: u32,
    pub state_dir: Option<PathBuf>,
    pub idempotency_ttl: Duration,
    pub idempotency_lease: Duration,
    /// The idempotency journal is compacted once it exceeds twice its live size plus this.
    pub idempotency_compaction_slack: u64,
    /// The original plugin's coordinator settings (`SBackupCoordinatorConfig` names).
    pub coordinator: CoordinatorKeys,
    /// Directory of the diagnostics log (C_API §10); `None`: no diagnostics file.
    pub log_path: Option<PathBuf>,
    /// A level ("info") or a target filter ("backup_coordinator=debug,warn").
    pub log_level: String,
    /// Where idempotency keys and log-backup retry records live.
    pub state_backend: StateBackend,
    /// The etcd connection; used when `state_backend` is `Etcd` (then `endpoints` is not empty).
    pub etcd: EtcdSettings,
    /// The file the metrics exposition is rewritten to, for node_exporter's textfile
    /// collector (C_API §5); `None`: no file, no thread.
    pub metrics_textfile: Option<PathBuf>,
    /// How often `metrics_textfile` is rewritten; at least [`MIN_METRICS_INTERVAL`].
    pub metrics_interval: Duration,
}

/// The coordinator settings of the original C plugin, accepted under their struct names.
/// The plugin keeps them for the host; the retry core itself does not act on them.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorKeys {
    pub max_blocks_per_batch: u32,
    pub batch_timeout_ms: u32,
    pub enable_compression: bool,
    pub enable_encryption: bool,
    pub encryption_key: Option<Secret>,
    pub backup_path: Option<PathBuf>,
    /// Bytes; 0 = no limit.
    pub backup_max_size: u64,
    /// 0 (none) to 9 (best).
    pub compression_level: u8,
}

impl Default for CoordinatorKeys {
    fn default() -> Self {
        CoordinatorKeys {
            max_blocks_per_batch: 1000,
            batch_timeout_ms: 5000,
            enable_compression: true,
            enable_encryption: false,
            encryption_key: None,
            backup_path: None,
            backup_max_size: 1 << 30,
            compression_level: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateBackend {
    /// Files under `state_dir` (the default).
    #[default]
    File,
    /// An etcd v3 cluster (C_API §9).
    Etcd,
}

/// How to reach the etcd cluster: the `etcd_*` keys (also `etcd::EtcdSettings`, which checks
/// them). `Debug` never shows the password.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSettings {
    /// "http://host:port" or "https://host:port", in the order given.
    pub endpoints: Vec<String>,
    /// Every key the plugin writes starts with it.
    pub prefix: String,
    /// One request's deadline.
    pub timeout: Duration,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for EtcdSettings {
    fn default() -> Self {
        EtcdSettings {
            endpoints: Vec::new(),
            prefix: crate::etcd::DEFAULT_PREFIX.to_string(),
            timeout: crate::etcd::DEFAULT_TIMEOUT,
            user: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// A value that must never be shown: `Debug` and `Display` print `[REDACTED]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the code that uses it (never for a message).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            enable: true,
            error_retry_max: 10,
            error_retry_interval: Duration::from_secs(5),
            error_retry_max_interval: Some(Duration::from_secs(300)),
            error_retry_multiplier: 1.0,
            error_retry_jitter: false,
            error_retry_timeout: None,
            error_store_path: None,
            enable_error_logging: true,
            error_buffer_size: 1000,
            error_log_rotation_size: 64 * 1024 * 1024,
            error_log_rotation_count: 30,
            state_dir: None,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            idempotency_lease: Duration::from_secs(90),
            idempotency_compaction_slack: 4 * 1024 * 1024,
            coordinator: CoordinatorKeys::default(),
            log_path: None,
            log_level: "info".to_string(),
            state_backend: StateBackend::File,
            etcd: EtcdSettings::default(),
            metrics_textfile: None,
            metrics_interval: Duration::from_secs(15),
        }
    }
}

/// Upper bounds that keep a typo from turning into an absurd allocation or wait.
const MAX_ERROR_BUFFER: i64 = crate::tracker::MAX_HISTORY as i64;
const MAX_ROTATION_COUNT: i64 = 100_000;
const MAX_PATH_BYTES: usize = 4096;
/// Keys whose values are never echoed, whatever is wrong with them.
const SECRET_KEYS: [&str; 2] = ["encryption_key", "etcd_password"];
/// Levels `log_level` takes alone; anything else must be a `target=level` filter.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
/// The shortest `metrics_interval` (C_API §5): a rewrite per second is already more than any
/// scrape needs.
pub const MIN_METRICS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {0}")]
pub struct ConfigError(pub String);

/// One key of the document: where it was written, its value, and its text as written.
struct Entry {
    written_as: String,
    value: Value,
    raw: String,
}

impl PluginConfig {
    /// Parses the config bytes taosX passes (not necessarily NUL-terminated; trailing NULs
    /// inside the length, as C hosts passing `strlen + 1` send, are ignored).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let bytes = &bytes[..end];
        if let Some(at) = bytes.iter().position(|&b| b == 0) {
            return Err(ConfigError(format!(
                "the config contains a NUL byte at offset {at} (only trailing NULs are ignored)"
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ConfigError(format!(
                "the config is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        if text.trim().is_empty() {
            return Ok(PluginConfig::default());
        }
        let table: toml::Table = text.parse().map_err(|e| syntax_error(text, &e))?;
        let spans = toml::de::DeTable::parse(text).map_err(|e| syntax_error(text, &e))?;
        let mut entries = BTreeMap::new();
        collect(&table, Some(spans.get_ref()), text, "", &mut entries)?;
        let mut config = PluginConfig::default();
        for (key, entry) in &entries {
            config.apply(key, entry)?;
        }
        config.check_combinations(&entries)?;
        Ok(config)
    }

    /// Parses, then checks what init can check at once (C_API §5): the directories of
    /// `error_store_path`, `state_dir` and `log_path` are created 0750 when missing and must
    /// be writable directories; the directory of `metrics_textfile` must exist and be
    /// writable (it is not created: node_exporter reads one directory, a typo must show).
    pub fn load(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config = Self::parse(bytes)?;
        config.prepare_directories()?;
        Ok(config)
    }

    /// Creates the configured directories that are missing (0750, whatever the umask) and
    /// checks that each is a directory this process can write; the error names the key,
    /// the path and the operating system's reason.
    pub fn prepare_directories(&self) -> Result<(), ConfigError> {
        let error_store = self
            .error_store_path
            .as_deref()
            .filter(|_| self.enable_error_logging);
        let dirs = [
            ("error_store_path", error_store),
            ("state_dir", self.state_dir.as_deref()),
            ("log_path", self.log_path.as_deref()),
        ];
        for (key, dir) in dirs {
            if let Some(dir) = dir {
                ensure_writable_dir(dir).map_err(|e| {
                    ConfigError(format!("key `{key}`: directory {}: {e}", dir.display()))
                })?;
            }
        }
        if let Some(file) = &self.metrics_textfile {
            let dir = crate::durable::parent_dir(file);
            writable_existing_dir(dir).map_err(|e| {
                ConfigError(format!(
                    "key `metrics_textfile`: directory {} of {}: {e}",
                    dir.display(),
                    file.display()
                ))
            })?;
        }
        if self.state_backend == StateBackend::Etcd {
            let files = [
                ("etcd_ca_file", &self.etcd.ca_file),
                ("etcd_cert_file", &self.etcd.cert_file),
                ("etcd_key_file", &self.etcd.key_file),
            ];
            for (key, file) in files {
                if let Some(file) = file {
                    std::fs::File::open(file).map_err(|e| {
                        ConfigError(format!("key `{key}`: file {}: {e}", file.display()))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// The retry policy operations of the plugin run under.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::fixed(self.error_retry_max, self.error_retry_interval)
            .with_multiplier(self.error_retry_multiplier)
            .with_max_interval(self.error_retry_max_interval)
            .with_jitter(self.error_retry_jitter)
            .with_timeout(self.error_retry_timeout)
    }

    /// The secrets of this config, for redaction by whoever prints messages.
    pub fn secrets(&self) -> Vec<&str> {
        [&self.coordinator.encryption_key, &self.etcd.password]
            .into_iter()
            .flatten()
            .map(Secret::expose)
            .filter(|s| !s.is_empty())
            .collect()
    }

    fn apply(&mut self, key: &str, entry: &Entry) -> Result<(), ConfigError> {
        let v = &Checked::new(key, entry);
        match key {
            "enable" => self.enable = v.boolean()?,
            "error_retry_max" => self.error_retry_max = v.integer(0, u32::MAX as i64)? as u32,
            "error_retry_interval" => self.error_retry_interval = v.duration()?,
            "error_retry_max_interval" => self.error_retry_max_interval = nonzero(v.duration()?),
            "error_retry_multiplier" => {
                let m = match entry.value {
                    Value::Float(f) => f,
                    Value::Integer(i) => i as f64,
                    _ => return Err(v.bad("a number from 1.0 to 1000.0")),
                };
                if !(m.is_finite() && (1.0..=1000.0).contains(&m)) {
                    return Err(v.bad("a number from 1.0 to 1000.0"));
                }
                self.error_retry_multiplier = m;
            }
            "error_retry_jitter" => self.error_retry_jitter = v.boolean()?,
            "error_retry_timeout" => self.error_retry_timeout = nonzero(v.duration()?),
            "error_store_path" => self.error_store_path = Some(v.path()?),
            "enable_error_logging" => self.enable_error_logging = v.boolean()?,
            "error_buffer_size" => {
                self.error_buffer_size = v.integer(0, MAX_ERROR_BUFFER)? as usize
            }
            "error_log_rotation_size" => {
                self.error_log_rotation_size = v.size_at_least(1024, "1KB")?
            }
            "error_log_rotation_count" => {
                self.error_log_rotation_count = v.integer(1, MAX_ROTATION_COUNT)? as u32
            }
            "state_dir" => self.state_dir = Some(v.path()?),
            "idempotency_ttl" => self.idempotency_ttl = v.positive_duration(1)?,
            "idempotency_lease" => self.idempotency_lease = v.positive_duration(1000)?,
            "idempotency_compaction_slack" => {
                self.idempotency_compaction_slack = v.size_at_least(4096, "4KB")?
            }
            "max_blocks_per_batch" => {
                self.coordinator.max_blocks_per_batch = v.integer(1, u32::MAX as i64)? as u32
            }
            "batch_timeout_ms" => {
                self.coordinator.batch_timeout_ms = v.integer(0, u32::MAX as i64)? as u32
            }
            "enable_compression" => self.coordinator.enable_compression = v.boolean()?,
            "enable_encryption" => self.coordinator.enable_encryption = v.boolean()?,
            "encryption_key" => self.coordinator.encryption_key = Some(Secret(v.text()?)),
            "backup_path" => self.coordinator.backup_path = Some(v.path()?),
            "backup_max_size" => self.coordinator.backup_max_size = v.size()?,
            "compression_level" => self.coordinator.compression_level = v.integer(0, 9)? as u8,
            "log_path" => self.log_path = Some(v.path()?),
            "log_level" => self.log_level = v.log_level()?,
            "state_backend" => {
                self.state_backend = match &entry.value {
                    Value::String(s) if s == "file" => StateBackend::File,
                    Value::String(s) if s == "etcd" => StateBackend::Etcd,
                    _ => return Err(v.bad("\"file\" or \"etcd\"")),
                }
            }
            "etcd_endpoints" => self.etcd.endpoints = v.endpoints()?,
            "etcd_prefix" => {
                let prefix = v.text()?;
                if !prefix.starts_with('/') {
                    return Err(v.bad("a key prefix starting with `/`"));
                }
                self.etcd.prefix = prefix;
            }
            "etcd_timeout" => self.etcd.timeout = v.positive_duration(1)?,
            "etcd_user" => self.etcd.user = Some(v.text()?),
            "etcd_password" => self.etcd.password = Some(Secret(v.text()?)),
            "etcd_ca_file" => self.etcd.ca_file = Some(v.path()?),
            "etcd_cert_file" => self.etcd.cert_file = Some(v.path()?),
            "etcd_key_file" => self.etcd.key_file = Some(v.path()?),
            "metrics_textfile" => {
                let path = v.path()?;
                if crate::durable::target_file_name(&path).is_err() {
                    return Err(v.bad("the path of a file, such as \"/var/lib/node_exporter/textfile_collector/backup_coordinator.prom\""));
                }
                self.metrics_textfile = Some(path);
            }
            "metrics_interval" => {
                let interval = v.duration()?;
                if interval < MIN_METRICS_INTERVAL {
                    return Err(v.bad("a duration of at least \"1s\""));
                }
                self.metrics_interval = interval;
            }
            _ => return Err(ConfigError(format!("unknown key `{}`", entry.written_as))),
        }
        Ok(())
    }

    /// Rules that span keys, checked once every key is read.
    fn check_combinations(&self, entries: &BTreeMap<String, Entry>) -> Result<(), ConfigError> {
        let written = |key: &str| {
            entries
                .get(key)
                .map_or_else(|| key.to_string(), |e| e.written_as.clone())
        };
        if self.state_backend == StateBackend::Etcd {
            if self.etcd.endpoints.is_empty() {
                return Err(ConfigError(format!(
                    "key `{}`: state_backend = \"etcd\" needs at least one endpoint (\"http://host:port\")",
                    written("etcd_endpoints")
                )));
            }
            if self.etcd.cert_file.is_some() != self.etcd.key_file.is_some() {
                let missing = if self.etcd.cert_file.is_none() {
                    "etcd_cert_file"
                } else {
                    "etcd_key_file"
                };
                return Err(ConfigError(format!(
                    "key `{missing}`: a client certificate needs both etcd_cert_file and etcd_key_file"
                )));
            }
        }
        Ok(())
    }
}

/// A TOML syntax error with its line and column (1-based, columns in characters).
fn syntax_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim_end();
    match err.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            let line_text = text.lines().nth(line - 1).unwrap_or("");
            if defines_secret(line_text) {
                // The parser may quote what it found; on a secret's line that is the secret.
                return ConfigError(format!(
                    "TOML syntax error at line {line}, column {column}, in the value of a secret key (not shown)"
                ));
            }
            // An invalid config names its key (C_API §4), also when the parser refused the
            // line (a duplicate key, an integer beyond 64 bits).
            let key = key_of_line(line_text)
                .map(|key| format!(" (key `{key}`)"))
                .unwrap_or_default();
            ConfigError(format!(
                "TOML syntax error at line {line}, column {column}{key}: {message}"
            ))
        }
        None => ConfigError(format!("TOML syntax error: {message}")),
    }
}

/// The key a `key = value` line assigns, as written; `None` for any other line.
fn key_of_line(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let keyish = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ' | '"');
    (!key.is_empty() && key.chars().all(keyish)).then_some(key)
}

/// Whether a line assigns `encryption_key` or `etcd_password` (in any spelling).
fn defines_secret(line: &str) -> bool {
    let Some((key, _)) = line.split_once('=') else {
        return false;
    };
    let key: String = key
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '"' && *c != '\'')
        .collect();
    // `password` alone: `[etcd]` then `password = ...`, or `etcd.password`.
    let key = key.rsplit('.').next().unwrap_or("");
    SECRET_KEYS.contains(&key) || key == "password"
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The canonical name of a key as written; taosX spells some as dotted paths
/// (`error.retry.max`, `log.path`, `etcd.endpoints`).
fn canonical(key: &str) -> String {
    for (dotted, flat) in [
        ("error.retry.", "error_retry_"),
        ("log.", "log_"),
        ("etcd.", "etcd_"),
        ("metrics.", "metrics_"),
    ] {
        if let Some(rest) = key.strip_prefix(dotted) {
            return format!("{flat}{}", rest.replace('.', "_"));
        }
    }
    key.to_string()
}

/// The source span of `name` in the parsed-with-spans table, if any.
fn span_of(spans: Option<&toml::de::DeTable<'_>>, name: &str) -> Option<Range<usize>> {
    spans?
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == name)
        .map(|(_, v)| v.span())
}

fn inner_spans<'a, 'i>(
    spans: Option<&'a toml::de::DeTable<'i>>,
    name: &str,
) -> Option<&'a toml::de::DeTable<'i>> {
    spans?
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == name)
        .and_then(|(_, v)| v.get_ref().as_table())
}

/// Flattens the document into `canonical key -> entry`, applying the `[plugins]` rules:
/// only *tables* of other plugins are ignored there.
fn collect(
    table: &toml::Table,
    spans: Option<&toml::de::DeTable<'_>>,
    text: &str,
    prefix: &str,
    out: &mut BTreeMap<String, Entry>,
) -> Result<(), ConfigError> {
    for (name, value) in table {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if path == "plugins" {
            let Value::Table(plugins) = value else {
                return Err(ConfigError(format!(
                    "key `plugins` must be a table of plugin sections such as [plugins.incremental_bitmap], got {}",
                    value.type_str()
                )));
            };
            collect_plugins(plugins, inner_spans(spans, name), text, out)?;
            continue;
        }
        if let Value::Table(inner) = value {
            collect(inner, inner_spans(spans, name), text, &path, out)?;
            continue;
        }
        let key = canonical(&path);
        if let Some(earlier) = out.get(&key) {
            return Err(ConfigError(format!(
                "key `{path}` is given twice (also as `{}`)",
                earlier.written_as
            )));
        }
        let raw = span_of(spans, name)
            .and_then(|span| text.get(span))
            .map_or_else(|| value.to_string(), str::to_string);
        out.insert(
            key,
            Entry {
                written_as: path,
                value: value.clone(),
                raw,
            },
        );
    }
    Ok(())
}

fn collect_plugins(
    plugins: &toml::Table,
    spans: Option<&toml::de::DeTable<'_>>,
    text: &str,
    out: &mut BTreeMap<String, Entry>,
) -> Result<(), ConfigError> {
    for (name, value) in plugins {
        match (name.as_str(), value) {
            ("incremental_bitmap", Value::Table(ours)) => {
                collect(ours, inner_spans(spans, name), text, "", out)?
            }
            ("incremental_bitmap", Value::Array(_)) => {
                return Err(ConfigError(
                    "key `plugins.incremental_bitmap` is an array (`[[plugins.incremental_bitmap]]`); \
                     the plugin's section is one table, `[plugins.incremental_bitmap]`"
                        .to_string(),
                ))
            }
            ("incremental_bitmap", other) => {
                return Err(ConfigError(format!(
                    "key `plugins.incremental_bitmap` must be the table [plugins.incremental_bitmap], got the {} {}",
                    other.type_str(),
                    span_of(spans, name).and_then(|s| text.get(s)).map_or_else(|| other.to_string(), str::to_string)
                )))
            }
            // Other plugins' sections belong to other plugins.
            (_, Value::Table(_)) => {}
            (other, _) => {
                return Err(ConfigError(format!(
                    "key `plugins.{other}` is straight under [plugins], where only plugin sections belong; \
                     this plugin's keys go under [plugins.incremental_bitmap]"
                )))
            }
        }
    }
    Ok(())
}

/// One entry being read as the type its key takes; errors name the key and quote the value.
struct Checked<'a> {
    entry: &'a Entry,
    secret: bool,
}

impl<'a> Checked<'a> {
    fn new(key: &str, entry: &'a Entry) -> Self {
        Checked {
            entry,
            secret: SECRET_KEYS.contains(&key),
        }
    }

    fn bad(&self, expected: &str) -> ConfigError {
        let key = &self.entry.written_as;
        if self.secret {
            ConfigError(format!(
                "key `{key}`: expected {expected}, got a value of type {} (not shown: it is a secret)",
                self.entry.value.type_str()
            ))
        } else {
            ConfigError(format!(
                "key `{key}`: expected {expected}, got {}",
                self.entry.raw
            ))
        }
    }

    fn integer(&self, min: i64, max: i64) -> Result<i64, ConfigError> {
        match self.entry.value {
            Value::Integer(i) if (min..=max).contains(&i) => Ok(i),
            _ => Err(self.bad(&format!("an integer from {min} to {max}"))),
        }
    }

    fn boolean(&self) -> Result<bool, ConfigError> {
        self.entry
            .value
            .as_bool()
            .ok_or_else(|| self.bad("true or false"))
    }

    /// A non-empty string without NUL.
    fn text(&self) -> Result<String, ConfigError> {
        match &self.entry.value {
            Value::String(s) if !s.is_empty() && s.len() <= MAX_PATH_BYTES && !s.contains('\0') => {
                Ok(s.clone())
            }
            _ => Err(self.bad("a non-empty string")),
        }
    }

    fn path(&self) -> Result<PathBuf, ConfigError> {
        match &self.entry.value {
            Value::String(s) if !s.is_empty() && s.len() <= MAX_PATH_BYTES && !s.contains('\0') => {
                Ok(PathBuf::from(s))
            }
            _ => Err(self.bad("a non-empty path string")),
        }
    }

    fn duration(&self) -> Result<Duration, ConfigError> {
        let expected =
            "a duration: integer seconds or a string like \"250ms\", \"5s\", \"30m\", \"24h\"";
        let ms = match &self.entry.value {
            Value::Integer(secs) if *secs >= 0 => (*secs as u64).checked_mul(1000),
            Value::String(s) => parse_with_units(
                s,
                &[
                    ("ms", 1),
                    ("s", 1000),
                    ("m", 60_000),
                    ("h", 3_600_000),
                    ("d", 86_400_000),
                ],
            ),
            _ => None,
        };
        match ms {
            Some(ms) if ms <= MAX_DURATION_MS => Ok(Duration::from_millis(ms)),
            _ => Err(self.bad(expected)),
        }
    }

    /// A duration of at least `min_ms` milliseconds.
    fn positive_duration(&self, min_ms: u64) -> Result<Duration, ConfigError> {
        let d = self.duration()?;
        if d < Duration::from_millis(min_ms) {
            return Err(self.bad(&if min_ms <= 1 {
                "a duration greater than zero".to_string()
            } else {
                format!("a duration of at least {min_ms}ms")
            }));
        }
        Ok(d)
    }

    fn size(&self) -> Result<u64, ConfigError> {
        let bytes = match &self.entry.value {
            Value::Integer(b) if *b >= 0 => Some(*b as u64),
            Value::String(s) => parse_with_units(
                &s.to_ascii_uppercase(),
                &[
                    ("B", 1),
                    ("KB", 1 << 10),
                    ("K", 1 << 10),
                    ("KIB", 1 << 10),
                    ("MB", 1 << 20),
                    ("M", 1 << 20),
                    ("MIB", 1 << 20),
                    ("GB", 1 << 30),
                    ("G", 1 << 30),
                    ("GIB", 1 << 30),
                    ("TB", 1 << 40),
                    ("TIB", 1 << 40),
                ],
            ),
            _ => None,
        };
        bytes.ok_or_else(|| {
            self.bad("a size: integer bytes or a string like \"512KB\", \"64MB\", \"1GB\"")
        })
    }

    fn size_at_least(&self, min: u64, shown: &str) -> Result<u64, ConfigError> {
        let size = self.size()?;
        if size < min {
            return Err(self.bad(&format!("a size of at least {shown}")));
        }
        Ok(size)
    }

    /// A level alone, or comma-separated `target=level` directives (a level alone among them
    /// is the default); a bare word that is no level is a typo, not a target.
    fn log_level(&self) -> Result<String, ConfigError> {
        let expected = "a level (error, warn, info, debug, trace, off) or a filter such as \"backup_coordinator=debug\"";
        let Value::String(s) = &self.entry.value else {
            return Err(self.bad(expected));
        };
        let valid = !s.trim().is_empty()
            && s.split(',').all(|directive| {
                let level = match directive.split_once('=') {
                    Some((target, level)) if !target.trim().is_empty() => level,
                    Some(_) => return false,
                    None => directive,
                };
                LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
            });
        if !valid {
            return Err(self.bad(expected));
        }
        Ok(s.trim().to_string())
    }

    /// One "http(s)://host:port" or a list of them (an array, or one comma-separated string).
    fn endpoints(&self) -> Result<Vec<String>, ConfigError> {
        let expected = "a list of etcd endpoints such as [\"http://127.0.0.1:2379\"]";
        let items: Vec<&str> = match &self.entry.value {
            Value::String(s) => s.split(',').map(str::trim).collect(),
            Value::Array(items) => {
                let strings: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                strings.ok_or_else(|| self.bad(expected))?
            }
            _ => return Err(self.bad(expected)),
        };
        if items.is_empty() || !items.iter().all(|e| valid_endpoint(e)) {
            return Err(self.bad(expected));
        }
        Ok(items.into_iter().map(str::to_string).collect())
    }
}

/// "http://host:port" or "https://host:port" with a port from 1 to 65535 (host may be
/// a name, an IPv4 address or a bracketed IPv6 address).
fn valid_endpoint(endpoint: &str) -> bool {
    let Some(rest) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
    else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|h| !h.is_empty())
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Ten years: longer is a typo, and keeps deadline arithmetic far from overflow.
const MAX_DURATION_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// "<digits><unit>" with one of `units` (exact match); `None` when malformed or overflowing.
fn parse_with_units(text: &str, units: &[(&str, u64)]) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return None;
    }
    let number: u64 = digits.parse().ok()?;
    let (_, factor) = units.iter().find(|(name, _)| *name == unit.trim())?;
    number.checked_mul(*factor)
}

/// Creates `dir` and its missing parents 0750 (chmod after create, so the umask does not
/// matter), then checks it is a directory this process may write and enter.
fn ensure_writable_dir(dir: &Path) -> io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        Ok(_) => {}
        // 0750 whatever the umask, parents included, their entries fsynced.
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            crate::durable::create_private_dir(dir).map_err(|e| e.source)?
        }
        Err(err) => return Err(err),
    }
    writable_existing_dir(dir)
}

/// Checks that `dir` exists and is a directory this process may write and enter (nothing
/// is created).
fn writable_existing_dir(dir: &Path) -> io::Result<()> {
    if !std::fs::metadata(dir)?.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    let c_path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c_path is a NUL-terminated path.
    if unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn parse(text: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(text.as_bytes())
    }

    #[test]
    fn empty_config_is_all_defaults() {
        assert_eq!(parse("").unwrap(), PluginConfig::default());
        assert_eq!(
            parse("  \n# only a comment\n").unwrap(),
            PluginConfig::default()
        );
        let d = PluginConfig::default();
        assert_eq!(d.error_retry_max, 10);
        assert_eq!(d.error_retry_interval, Duration::from_secs(5));
        assert_eq!(d.error_buffer_size, 1000);
    }

    #[test]
    fn keys_are_accepted_at_top_level_in_the_section_and_dotted() {
        let top = parse("error_retry_max = 3\nerror_retry_interval = \"250ms\"").unwrap();
        assert_eq!(top.error_retry_max, 3);
        assert_eq!(top.error_retry_interval, Duration::from_millis(250));

        let section = parse(
            "[plugins.incremental_bitmap]\nerror_retry_max = 4\nerror_store_path = \"/var/log/x\"\n\
             [plugins.other]\nwhatever = 1\n",
        )
        .unwrap();
        assert_eq!(section.error_retry_max, 4);
        assert_eq!(section.error_store_path, Some(PathBuf::from("/var/log/x")));

        let dotted = parse("error.retry.max = 7\nerror.retry.interval = 2").unwrap();
        assert_eq!(dotted.error_retry_max, 7);
        assert_eq!(dotted.error_retry_interval, Duration::from_secs(2));

        let table = parse("[error.retry]\nmax = 8\ninterval = \"1s\"").unwrap();
        assert_eq!(table.error_retry_max, 8);
    }

    #[test]
    fn durations_and_sizes_take_units() {
        let c = parse(
            "error_retry_timeout = \"30m\"\nidempotency_ttl = \"24h\"\nerror_log_rotation_size = \"512KB\"\n\
             error_retry_max_interval = 0\nidempotency_lease = 90",
        )
        .unwrap();
        assert_eq!(c.error_retry_timeout, Some(Duration::from_secs(1800)));
        assert_eq!(c.idempotency_ttl, Duration::from_secs(86_400));
        assert_eq!(c.error_log_rotation_size, 512 * 1024);
        assert_eq!(c.error_retry_max_interval, None);
        assert_eq!(c.idempotency_lease, Duration::from_secs(90));
        let c = parse("idempotency_compaction_slack = \"64KB\"").unwrap();
        assert_eq!(c.idempotency_compaction_slack, 64 * 1024);
        let err = parse("idempotency_compaction_slack = 100")
            .unwrap_err()
            .to_string();
        assert!(err.contains("idempotency_compaction_slack"), "{err}");
        assert_eq!(
            parse("error_log_rotation_size = \"1GB\"")
                .unwrap()
                .error_log_rotation_size,
            1 << 30
        );
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let err = parse("error_retry_max = -3").unwrap_err().to_string();
        assert!(
            err.contains("error_retry_max") && err.contains("-3"),
            "{err}"
        );
        let err = parse("error_retry_interval = \"5 parsecs\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("error_retry_interval") && err.contains("5 parsecs"),
            "{err}"
        );
        let err = parse("eror_retry_max = 3").unwrap_err().to_string();
        assert!(err.contains("unknown key `eror_retry_max`"), "{err}");
        let err = parse("[plugins.incremental_bitmap]\nstate_dri = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("state_dri"), "{err}");
        let err = parse("error_retry_multiplier = 0.5")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("error_retry_multiplier") && err.contains("0.5"),
            "{err}"
        );
        let err = parse("error_retry_max = 1\nerror.retry.max = 2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("twice"), "{err}");
        assert!(parse("not toml at all")
            .unwrap_err()
            .to_string()
            .contains("TOML"));
        assert!(PluginConfig::parse(b"error_retry_max = \xff")
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
        let err = parse("idempotency_lease = 0").unwrap_err().to_string();
        assert!(err.contains("idempotency_lease"), "{err}");
        let err = parse("error_retry_interval = \"99999999999999999999s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("error_retry_interval"), "{err}");
    }

    /// The section taosX's own spec shows, verbatim.
    const SPEC_SECTION: &str = "[plugins.incremental_bitmap]\n\
        enable = true\n\
        error_retry_max = 10\n\
        error_retry_interval = 5\n\
        error_store_path = \"/var/log/taosx/backup_errors\"\n\
        enable_error_logging = true\n\
        error_buffer_size = 1000\n";

    #[test]
    fn the_spec_section_parses_as_it_is() {
        let c = parse(SPEC_SECTION).unwrap();
        assert!(c.enable);
        assert_eq!(c.error_retry_max, 10);
        assert_eq!(c.error_retry_interval, Duration::from_secs(5));
        assert_eq!(
            c.error_store_path.as_deref(),
            Some(Path::new("/var/log/taosx/backup_errors"))
        );
        assert!(!parse("enable = false").unwrap().enable);
    }

    #[test]
    fn coordinator_keys_are_typed_and_ranged() {
        let c = parse(
            "max_blocks_per_batch = 500\nbatch_timeout_ms = 2500\nenable_compression = false\n\
             enable_encryption = true\nencryption_key = \"k3y\"\nbackup_path = \"/data/backup\"\n\
             backup_max_size = \"2GB\"\ncompression_level = 9",
        )
        .unwrap();
        let k = &c.coordinator;
        assert_eq!(k.max_blocks_per_batch, 500);
        assert_eq!(k.batch_timeout_ms, 2500);
        assert!(!k.enable_compression && k.enable_encryption);
        assert_eq!(k.encryption_key.as_ref().map(Secret::expose), Some("k3y"));
        assert_eq!(k.backup_path.as_deref(), Some(Path::new("/data/backup")));
        assert_eq!(k.backup_max_size, 2 << 30);
        assert_eq!(k.compression_level, 9);
        assert!(!format!("{c:?}").contains("k3y"), "Debug shows the key");
        assert_eq!(c.secrets(), vec!["k3y"]);
        for (text, key) in [
            ("max_blocks_per_batch = 0", "max_blocks_per_batch"),
            ("batch_timeout_ms = \"5s\"", "batch_timeout_ms"),
            ("enable_compression = 1", "enable_compression"),
            ("enable_encryption = \"yes\"", "enable_encryption"),
            ("backup_path = 7", "backup_path"),
            ("backup_max_size = \"lots\"", "backup_max_size"),
            ("compression_level = 10", "compression_level"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            let written = text.split(" = ").nth(1).unwrap();
            assert!(err.contains(key) && err.contains(written), "{text}: {err}");
        }
    }

    #[test]
    fn secrets_are_never_echoed() {
        for text in [
            "encryption_key = 12345678",
            "encryption_key = \"\"",
            "etcd_password = 12345678",
            "etcd.password = [12345678]",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains("secret") && !err.contains("12345678"), "{err}");
        }
        let c = parse("etcd_user = \"root\"\netcd_password = \"hunter22\"").unwrap();
        assert!(!format!("{c:?}").contains("hunter22"));
    }

    #[test]
    fn syntax_errors_on_a_secret_line_do_not_quote_it() {
        for text in [
            "encryption_key = s3cr3tvalue",
            "etcd_password = \"s3cr3tvalue",
            "etcd.password = s3cr3tvalue x",
            "[etcd]\npassword = 's3cr3tvalue",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains("secret") && !err.contains("s3cr3t"), "{err}");
        }
    }

    #[test]
    fn values_are_echoed_as_written() {
        let err = parse("error_buffer_size = 1e308").unwrap_err().to_string();
        assert!(err.contains("got 1e308"), "{err}");
        assert!(err.len() < 200, "{err}");
        let err = parse("error_retry_max = 0x_ff_ff").unwrap_err().to_string();
        assert!(err.contains("TOML syntax error"), "{err}");
        let err = parse("error_retry_max = 1_000_000_000_000")
            .unwrap_err()
            .to_string();
        assert!(err.contains("got 1_000_000_000_000"), "{err}");
        let err = parse("state_dir = 'lit'\nerror_retry_max = 'x'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("got 'x'"), "{err}");
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let err = parse("error_retry_max = 3\nerror_retry_interval = = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2, column 24"), "{err}");
        let err = parse("[plugins.incremental_bitmap]\nenable = true\nenable = false\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("key `enable`"), "{err}");
        let err = parse("[plugins.incremental_bitmap]\nerror_retry_max = 99999999999999999999\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("key `error_retry_max`"),
            "{err}"
        );
        let err = parse("[plugins.incremental_bitmap\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("key `"), "{err}");
    }

    #[test]
    fn mistyped_plugin_sections_are_refused() {
        for (text, named) in [
            (
                "[plugins]\nerror_retry_max = 3\n",
                "plugins.error_retry_max",
            ),
            (
                "[[plugins.incremental_bitmap]]\nerror_retry_max = 3\n",
                "[[plugins.incremental_bitmap]]",
            ),
            ("plugins.incremental_bitmap = \"oops\"", "\"oops\""),
            ("plugins = 3", "plugins"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
        let c = parse("[plugins.other]\nx = 1\n[plugins.incremental_bitmap]\nerror_retry_max = 2")
            .unwrap();
        assert_eq!(c.error_retry_max, 2);
    }

    #[test]
    fn trailing_nuls_are_ignored_and_inner_nuls_refused() {
        let c = PluginConfig::parse(b"error_retry_max = 3\n\0").unwrap();
        assert_eq!(c.error_retry_max, 3);
        assert_eq!(
            PluginConfig::parse(b"\0\0").unwrap(),
            PluginConfig::default()
        );
        let err = PluginConfig::parse(b"error_retry_max = 3\0\nstate_dir = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("NUL byte at offset 19"), "{err}");
    }

    #[test]
    fn log_and_etcd_keys() {
        let c = parse("log.path = \"/var/log/taosx/plugin\"\nlog.level = \"debug\"").unwrap();
        assert_eq!(
            c.log_path.as_deref(),
            Some(Path::new("/var/log/taosx/plugin"))
        );
        assert_eq!(c.log_level, "debug");
        let c = parse("log_level = \"backup_coordinator=trace,warn\"").unwrap();
        assert_eq!(c.log_level, "backup_coordinator=trace,warn");
        for bad in ["\"verbose\"", "3", "\"=debug\"", "\"x=loud\""] {
            let err = parse(&format!("log_level = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("log_level") && err.contains(bad), "{err}");
        }

        let d = PluginConfig::default();
        assert_eq!(d.state_backend, StateBackend::File);
        assert_eq!(d.etcd.prefix, "/taosx/backup/");
        assert_eq!(d.etcd.timeout, Duration::from_secs(5));

        let c = parse(
            "state_backend = \"etcd\"\netcd.endpoints = [\"http://127.0.0.1:2379\", \"https://[::1]:2380\"]\n\
             etcd.prefix = \"/p/\"\netcd.timeout = \"750ms\"\netcd_user = \"root\"\netcd_password = \"pw\"\n\
             etcd_ca_file = \"/ca.pem\"\netcd_cert_file = \"/c.pem\"\netcd_key_file = \"/k.pem\"",
        )
        .unwrap();
        assert_eq!(c.state_backend, StateBackend::Etcd);
        assert_eq!(
            c.etcd.endpoints,
            vec!["http://127.0.0.1:2379", "https://[::1]:2380"]
        );
        assert_eq!(c.etcd.prefix, "/p/");
        assert_eq!(c.etcd.timeout, Duration::from_millis(750));
        assert_eq!(c.etcd.user.as_deref(), Some("root"));
        assert_eq!(c.etcd.password.as_ref().map(Secret::expose), Some("pw"));
        assert_eq!(c.etcd.key_file.as_deref(), Some(Path::new("/k.pem")));
        let c = parse("etcd_endpoints = \"http://a:1, http://b:2\"").unwrap();
        assert_eq!(c.etcd.endpoints, vec!["http://a:1", "http://b:2"]);

        for (text, named) in [
            ("state_backend = \"redis\"", "\"redis\""),
            ("state_backend = \"etcd\"", "etcd_endpoints"),
            ("etcd_endpoints = [\"127.0.0.1:2379\"]", "127.0.0.1:2379"),
            ("etcd_endpoints = [\"http://h:0\"]", "http://h:0"),
            ("etcd_endpoints = []", "etcd_endpoints"),
            ("etcd_prefix = \"taosx\"", "\"taosx\""),
            ("etcd_timeout = 0", "etcd_timeout"),
            ("etcd_user = 5", "etcd_user"),
            ("etcd_ca_file = \"\"", "etcd_ca_file"),
            (
                "state_backend = \"etcd\"\netcd_endpoints = \"http://a:1\"\netcd_cert_file = \"/c\"",
                "etcd_key_file",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
    }

    #[test]
    fn directories_are_created_0750_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("a/b/state");
        let text = format!(
            "state_dir = \"{}\"\nlog_path = \"{}\"",
            state.display(),
            tmp.path().join("logs").display()
        );
        PluginConfig::load(text.as_bytes()).unwrap();
        for dir in [tmp.path().join("a"), state.clone(), tmp.path().join("logs")] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o750, "{}", dir.display());
        }
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err =
            PluginConfig::load(format!("error_store_path = \"{}\"", file.display()).as_bytes())
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("error_store_path") && err.contains("Not a directory"),
            "{err}"
        );
        let err = PluginConfig::load(format!("state_dir = \"{}/sub\"", file.display()).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("state_dir") && err.contains("Not a directory"),
            "{err}"
        );
    }

    #[test]
    fn metrics_textfile_and_interval() {
        let d = PluginConfig::default();
        assert_eq!(
            (d.metrics_textfile.as_deref(), d.metrics_interval),
            (None, Duration::from_secs(15))
        );
        let c = parse("metrics_textfile = \"/t/backup.prom\"\nmetrics_interval = \"1s\"").unwrap();
        assert_eq!(
            c.metrics_textfile.as_deref(),
            Some(Path::new("/t/backup.prom"))
        );
        assert_eq!(c.metrics_interval, Duration::from_secs(1));
        let c = parse("[metrics]\ntextfile = \"b.prom\"\ninterval = 60").unwrap();
        assert_eq!(c.metrics_textfile.as_deref(), Some(Path::new("b.prom")));
        assert_eq!(c.metrics_interval, Duration::from_secs(60));
        for (text, written) in [
            ("metrics_interval = \"0s\"", "\"0s\""),
            ("metrics_interval = \"500ms\"", "\"500ms\""),
            ("metrics_interval = 0", "0"),
            ("metrics.interval = \"soon\"", "\"soon\""),
            ("metrics_textfile = \"\"", "\"\""),
            ("metrics_textfile = \"/t/\"", "\"/t/\""),
            ("metrics_textfile = \"/t/..\"", "\"/t/..\""),
            ("metrics_textfile = 3", "3"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            let key = text.split(" = ").next().unwrap();
            assert!(
                err.contains(&format!("key `{key}`")) && err.contains(written),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn the_metrics_textfile_directory_must_exist_and_is_not_created() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nowhere/backup.prom");
        let err =
            PluginConfig::load(format!("metrics_textfile = \"{}\"", missing.display()).as_bytes())
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("key `metrics_textfile`") && err.contains("No such file or directory"),
            "{err}"
        );
        assert!(!tmp.path().join("nowhere").exists());
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = PluginConfig::load(
            format!("metrics_textfile = \"{}/b.prom\"", file.display()).as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("key `metrics_textfile`") && err.contains("Not a directory"),
            "{err}"
        );
        let ok = tmp.path().join("backup.prom");
        let c = PluginConfig::load(format!("metrics_textfile = \"{}\"", ok.display()).as_bytes())
            .unwrap();
        assert_eq!(c.metrics_textfile, Some(ok.clone()));
        assert!(
            !ok.exists(),
            "init checks the directory; the thread writes the file"
        );
    }
}
