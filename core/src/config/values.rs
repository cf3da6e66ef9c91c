//! Reading one value as the type its key takes: integers in a range, booleans, strings and
//! paths, durations ("250ms", "5s", integer seconds), sizes ("64MB", integer bytes) and log
//! levels. Every error names the key and quotes the value as written (never a secret's).

use super::document::Entry;
use super::secret::SECRET_KEYS;
use super::ConfigError;
use std::path::PathBuf;
use std::time::Duration;
use toml::Value;

pub(super) const MAX_PATH_BYTES: usize = 4096;
/// Levels `log_level` takes alone; anything else must be a `target=level` filter.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// One entry being read as the type its key takes; errors name the key and quote the value.
pub(super) struct Checked<'a> {
    pub(super) entry: &'a Entry,
    secret: bool,
}

impl<'a> Checked<'a> {
    pub(super) fn new(key: &str, entry: &'a Entry) -> Self {
        Checked {
            entry,
            secret: SECRET_KEYS.contains(&key),
        }
    }

    pub(super) fn bad(&self, expected: &str) -> ConfigError {
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

    pub(super) fn integer(&self, min: i64, max: i64) -> Result<i64, ConfigError> {
        match self.entry.value {
            Value::Integer(i) if (min..=max).contains(&i) => Ok(i),
            _ => Err(self.bad(&format!("an integer from {min} to {max}"))),
        }
    }

    pub(super) fn boolean(&self) -> Result<bool, ConfigError> {
        self.entry
            .value
            .as_bool()
            .ok_or_else(|| self.bad("true or false"))
    }

    /// A non-empty string without NUL.
    pub(super) fn text(&self) -> Result<String, ConfigError> {
        match &self.entry.value {
            Value::String(s) if !s.is_empty() && s.len() <= MAX_PATH_BYTES && !s.contains('\0') => {
                Ok(s.clone())
            }
            _ => Err(self.bad("a non-empty string")),
        }
    }

    pub(super) fn path(&self) -> Result<PathBuf, ConfigError> {
        match &self.entry.value {
            Value::String(s) if !s.is_empty() && s.len() <= MAX_PATH_BYTES && !s.contains('\0') => {
                Ok(PathBuf::from(s))
            }
            _ => Err(self.bad("a non-empty path string")),
        }
    }

    pub(super) fn duration(&self) -> Result<Duration, ConfigError> {
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
    pub(super) fn positive_duration(&self, min_ms: u64) -> Result<Duration, ConfigError> {
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

    pub(super) fn size(&self) -> Result<u64, ConfigError> {
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

    pub(super) fn size_at_least(&self, min: u64, shown: &str) -> Result<u64, ConfigError> {
        let size = self.size()?;
        if size < min {
            return Err(self.bad(&format!("a size of at least {shown}")));
        }
        Ok(size)
    }

    /// A level alone, or comma-separated `target=level` directives (a level alone among them
    /// is the default); a bare word that is no level is a typo, not a target.
    pub(super) fn log_level(&self) -> Result<String, ConfigError> {
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
}

pub(super) fn nonzero(d: Duration) -> Option<Duration> {
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

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, PluginConfig};
    use std::path::Path;
    use std::time::Duration;

    fn parse(text: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(text.as_bytes())
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
    fn log_keys() {
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
    }
}
