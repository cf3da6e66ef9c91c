//! Plugin configuration (ABI §5): TOML text, keys at top level, under
//! `[plugins.incremental_bitmap]`, or as taosX dotted keys (`error.retry.max`).
//! Durations are integer seconds or strings ("250ms", "5s", "30m", "24h"); sizes are
//! integer bytes or strings ("512KB", "64MB", "1GB", powers of 1024). Every error names
//! the key and the bad value, because a typo in a config file is the usual cause.

use crate::retry::RetryPolicy;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use toml::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
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
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
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
        }
    }
}

/// Upper bounds that keep a typo from turning into an absurd allocation or wait.
const MAX_ERROR_BUFFER: i64 = 1_000_000;
const MAX_ROTATION_COUNT: i64 = 100_000;
const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {0}")]
pub struct ConfigError(pub String);

impl PluginConfig {
    /// Parses the config bytes taosX passes (not necessarily NUL-terminated).
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            ConfigError(format!(
                "the config is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        if text.trim().is_empty() {
            return Ok(PluginConfig::default());
        }
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError(format!("TOML syntax: {}", e.message())))?;
        let mut entries = BTreeMap::new();
        collect(&table, "", &mut entries)?;
        let mut config = PluginConfig::default();
        for (key, (written_as, value)) in &entries {
            config.apply(key, written_as, value)?;
        }
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

    fn apply(&mut self, key: &str, written_as: &str, value: &Value) -> Result<(), ConfigError> {
        let k = written_as;
        match key {
            "error_retry_max" => {
                self.error_retry_max = integer(k, value, 0, u32::MAX as i64)? as u32
            }
            "error_retry_interval" => self.error_retry_interval = duration(k, value)?,
            "error_retry_max_interval" => {
                self.error_retry_max_interval = nonzero(duration(k, value)?)
            }
            "error_retry_multiplier" => {
                let m = match value {
                    Value::Float(f) => *f,
                    Value::Integer(i) => *i as f64,
                    other => return Err(bad(k, other, "a number >= 1.0")),
                };
                if !(m.is_finite() && (1.0..=1000.0).contains(&m)) {
                    return Err(bad(k, value, "a number from 1.0 to 1000.0"));
                }
                self.error_retry_multiplier = m;
            }
            "error_retry_jitter" => self.error_retry_jitter = boolean(k, value)?,
            "error_retry_timeout" => self.error_retry_timeout = nonzero(duration(k, value)?),
            "error_store_path" => self.error_store_path = Some(path(k, value)?),
            "enable_error_logging" => self.enable_error_logging = boolean(k, value)?,
            "error_buffer_size" => {
                self.error_buffer_size = integer(k, value, 0, MAX_ERROR_BUFFER)? as usize
            }
            "error_log_rotation_size" => {
                let size = size(k, value)?;
                if size < 1024 {
                    return Err(bad(k, value, "a size of at least 1KB"));
                }
                self.error_log_rotation_size = size;
            }
            "error_log_rotation_count" => {
                self.error_log_rotation_count = integer(k, value, 1, MAX_ROTATION_COUNT)? as u32
            }
            "state_dir" => self.state_dir = Some(path(k, value)?),
            "idempotency_ttl" => self.idempotency_ttl = positive(k, value, duration(k, value)?)?,
            "idempotency_lease" => {
                self.idempotency_lease = positive(k, value, duration(k, value)?)?
            }
            "idempotency_compaction_slack" => {
                let size = size(k, value)?;
                if size < 4096 {
                    return Err(bad(k, value, "a size of at least 4KB"));
                }
                self.idempotency_compaction_slack = size;
            }
            _ => return Err(ConfigError(format!("unknown key `{k}`"))),
        }
        Ok(())
    }
}

/// The canonical name of a key as written; taosX spells some as dotted paths.
fn canonical(key: &str) -> String {
    match key.strip_prefix("error.retry.") {
        Some(rest) => format!("error_retry_{}", rest.replace('.', "_")),
        None => key.to_string(),
    }
}

/// Flattens the document into `canonical key -> (key as written, value)`.
fn collect(
    table: &toml::Table,
    prefix: &str,
    out: &mut BTreeMap<String, (String, Value)>,
) -> Result<(), ConfigError> {
    for (name, value) in table {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if let Value::Table(inner) = value {
            if path == "plugins" {
                // Other plugins' sections belong to other plugins.
                if let Some(Value::Table(ours)) = inner.get("incremental_bitmap") {
                    collect(ours, "", out)?;
                }
                continue;
            }
            collect(inner, &path, out)?;
            continue;
        }
        let key = canonical(&path);
        if let Some((earlier, _)) = out.get(&key) {
            return Err(ConfigError(format!(
                "key `{path}` is given twice (also as `{earlier}`)"
            )));
        }
        out.insert(key, (path, value.clone()));
    }
    Ok(())
}

fn bad(key: &str, value: &Value, expected: &str) -> ConfigError {
    ConfigError(format!("key `{key}`: expected {expected}, got {value}"))
}

fn integer(key: &str, value: &Value, min: i64, max: i64) -> Result<i64, ConfigError> {
    match value {
        Value::Integer(i) if (min..=max).contains(i) => Ok(*i),
        _ => Err(bad(key, value, &format!("an integer from {min} to {max}"))),
    }
}

fn boolean(key: &str, value: &Value) -> Result<bool, ConfigError> {
    value
        .as_bool()
        .ok_or_else(|| bad(key, value, "true or false"))
}

fn path(key: &str, value: &Value) -> Result<PathBuf, ConfigError> {
    match value {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_PATH_BYTES && !s.contains('\0') => {
            Ok(PathBuf::from(s))
        }
        _ => Err(bad(key, value, "a non-empty path string")),
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn positive(key: &str, value: &Value, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(bad(key, value, "a duration greater than zero"));
    }
    Ok(d)
}

/// Ten years: longer is a typo, and keeps deadline arithmetic far from overflow.
const MAX_DURATION_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

fn duration(key: &str, value: &Value) -> Result<Duration, ConfigError> {
    let expected =
        "a duration: integer seconds or a string like \"250ms\", \"5s\", \"30m\", \"24h\"";
    let ms = match value {
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
        _ => Err(bad(key, value, expected)),
    }
}

fn size(key: &str, value: &Value) -> Result<u64, ConfigError> {
    let bytes = match value {
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
        bad(
            key,
            value,
            "a size: integer bytes or a string like \"512KB\", \"64MB\", \"1GB\"",
        )
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
