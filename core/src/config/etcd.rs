//! The etcd settings (`etcd_*` keys, C_API §5, §9): their type and defaults, and the syntax
//! of an endpoint.

use super::values::Checked;
use super::{ConfigError, Secret};
use std::path::PathBuf;
use std::time::Duration;
use toml::Value;

/// Default prefix of every key the plugin writes (C_API §5).
pub const DEFAULT_ETCD_PREFIX: &str = "/taosx/backup/";
/// Default deadline of one etcd request, retries across endpoints included (C_API §5).
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(5);

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
            prefix: DEFAULT_ETCD_PREFIX.to_string(),
            timeout: DEFAULT_ETCD_TIMEOUT,
            user: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl Checked<'_> {
    /// One "http(s)://host:port" or a list of them (an array, or one comma-separated string).
    pub(super) fn endpoints(&self) -> Result<Vec<String>, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, PluginConfig, StateBackend};
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(text.as_bytes())
    }

    #[test]
    fn etcd_keys() {
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
}
