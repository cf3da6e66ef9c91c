//! Plugin configuration (C_API §5): TOML text, keys at top level, under
//! `[plugins.incremental_bitmap]`, or as taosX dotted keys (`error.retry.max`, `log.path`,
//! `etcd.endpoints`). Durations are integer seconds or strings ("250ms", "5s", "30m", "24h");
//! sizes are integer bytes or strings ("512KB", "64MB", "1GB", powers of 1024). Every error
//! names the key and quotes the value as it was written (never the value of a secret),
//! because a typo in a config file is the usual cause.
//!
//! The pieces: [`PluginConfig`] and its keys here; `document` flattens the TOML document into
//! canonical keys with their text as written, `spans` says where in the text (syntax errors
//! with line and column), `values` reads each value as its type (durations, sizes, paths,
//! levels), `etcd` the etcd settings, `secret` the values never shown, and `dirs` the
//! directories init creates and checks.

mod dirs;
mod document;
mod etcd;
mod secret;
mod spans;
mod values;

pub use etcd::{EtcdSettings, DEFAULT_ETCD_PREFIX, DEFAULT_ETCD_TIMEOUT};
pub use secret::Secret;

use crate::error::Error;
use crate::retry::RetryPolicy;
use document::Entry;
use spans::syntax_error;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use toml::Value;
use values::{nonzero, Checked};

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
/// The shortest `metrics_interval` (C_API §5): a rewrite per second is already more than any
/// scrape needs.
pub const MIN_METRICS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {0}")]
pub struct ConfigError(pub String);

impl From<ConfigError> for Error {
    fn from(err: ConfigError) -> Self {
        Error::Config(err.0)
    }
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
        document::collect(&table, Some(spans.get_ref()), text, "", &mut entries)?;
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
            "encryption_key" => self.coordinator.encryption_key = Some(Secret::new(v.text()?)),
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
            "etcd_password" => self.etcd.password = Some(Secret::new(v.text()?)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
}
