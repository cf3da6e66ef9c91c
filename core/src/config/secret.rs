//! Values never shown: the encryption key and the etcd password.

use std::fmt;

/// Keys whose values are never echoed, whatever is wrong with them.
pub(super) const SECRET_KEYS: [&str; 2] = ["encryption_key", "etcd_password"];

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

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, PluginConfig};

    fn parse(text: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(text.as_bytes())
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
}
