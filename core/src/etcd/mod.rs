//! The shared state store on an etcd v3 cluster (C_API §9): the idempotency keys (§8) and
//! the log-backup retry records (§7) of every host of a taosX cluster, under one prefix.
//!
//! [`client::EtcdClient`] owns one small tokio runtime on a thread of the plugin (started
//! only when the etcd backend is configured) and turns each store call into a synchronous
//! request with failover across the endpoints within `etcd_timeout`.
//! [`idempotency::EtcdIdempotencyStore`] and [`log_records::EtcdLogRecords`] implement the
//! store traits on it: claims are single transactions compared on the key's revision,
//! bound to the instance's [`session::Session`] lease (one per host, kept alive by the
//! runtime). [`EtcdBackend`] is what a plugin instance holds: one client (and so one
//! session) for both stores, opened from the configuration.

//!
//! The client and the stores need the `etcd` feature (on by default); the settings do not,
//! so that a build without it still reads an etcd configuration and refuses it by name.

#[cfg(feature = "etcd")]
mod batch;
#[cfg(feature = "etcd")]
pub mod client;
#[cfg(feature = "etcd")]
pub mod idempotency;
#[cfg(feature = "etcd")]
pub mod log_records;
#[cfg(feature = "etcd")]
mod runtime;
#[cfg(feature = "etcd")]
pub mod session;

use crate::error::{Error, Result};

#[cfg(feature = "etcd")]
pub use backend::EtcdBackend;
#[cfg(feature = "etcd")]
pub use client::EtcdClient;
#[cfg(not(feature = "etcd"))]
pub use without_etcd::EtcdBackend;

#[cfg(feature = "etcd")]
mod backend {
    use super::idempotency::EtcdIdempotencyStore;
    use super::log_records::EtcdLogRecords;
    use super::EtcdClient;
    use crate::error::Result;
    use crate::idempotency::IdempotencyStore;
    use crate::log_backup::records::LogRecordStore;
    use std::sync::Arc;
    use std::time::Duration;

    /// The etcd backend of a plugin instance: one client (its runtime thread started, nothing
    /// connected) shared by both stores. Dropping the last handle stops the runtime thread.
    #[derive(Clone)]
    pub struct EtcdBackend {
        client: Arc<EtcdClient>,
        lease: Duration,
        ttl: Duration,
    }

    impl EtcdBackend {
        /// `None` unless `state_backend = "etcd"`. Init does not need the cluster: this only
        /// checks the settings, reads the TLS files and starts the runtime thread.
        pub fn open(config: &crate::config::PluginConfig) -> Result<Option<Self>> {
            if config.state_backend != crate::config::StateBackend::Etcd {
                return Ok(None);
            }
            Ok(Some(EtcdBackend {
                client: Arc::new(EtcdClient::new(&config.etcd)?),
                lease: config.idempotency_lease,
                ttl: config.idempotency_ttl,
            }))
        }

        /// The idempotency keys (§8) on etcd, with `idempotency_lease` and `idempotency_ttl`.
        pub fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
            Arc::new(EtcdIdempotencyStore::new(
                self.client.clone(),
                self.lease,
                self.ttl,
            ))
        }

        /// The log-backup retry records (§7) on etcd; a dead runner's claim of a (task,
        /// command) ends with its lease, `idempotency_lease`.
        pub fn log_records(&self) -> Box<dyn LogRecordStore> {
            Box::new(EtcdLogRecords::new(self.client.clone(), self.lease))
        }

        /// The client both stores use (for the operator's command line, docs/C_API.md §11).
        pub fn client(&self) -> Arc<EtcdClient> {
            self.client.clone()
        }

        /// Requests moved to another endpoint since the start (for the metrics).
        pub fn failovers(&self) -> u64 {
            self.client.failovers()
        }
    }
}

/// A build without the `etcd` feature: the backend cannot be opened, and a configuration
/// asking for it is refused at init, naming the key.
#[cfg(not(feature = "etcd"))]
mod without_etcd {
    use crate::error::{Error, Result};
    use crate::idempotency::IdempotencyStore;
    use crate::log_backup::records::LogRecordStore;
    use std::sync::Arc;

    /// No value of it exists: every method is unreachable.
    #[derive(Clone)]
    pub enum EtcdBackend {}

    impl EtcdBackend {
        pub fn open(config: &crate::config::PluginConfig) -> Result<Option<Self>> {
            if config.state_backend != crate::config::StateBackend::Etcd {
                return Ok(None);
            }
            Err(Error::InvalidArgument(
                "key `state_backend`: \"etcd\" needs a build with the `etcd` feature (on by default); this library was built without it".into(),
            ))
        }

        pub fn idempotency_store(&self) -> Arc<dyn IdempotencyStore> {
            match *self {}
        }

        pub fn log_records(&self) -> Box<dyn LogRecordStore> {
            match *self {}
        }

        pub fn failovers(&self) -> u64 {
            match *self {}
        }
    }
}

/// The defaults of C_API §5, written once in the configuration.
pub use crate::config::{
    DEFAULT_ETCD_PREFIX as DEFAULT_PREFIX, DEFAULT_ETCD_TIMEOUT as DEFAULT_TIMEOUT,
};

/// How to reach the cluster: the `etcd_*` configuration keys, as the configuration parsed
/// them (one type for both; the password is a `Secret`, never shown).
pub use crate::config::EtcdSettings;

impl EtcdSettings {
    /// Settings with the defaults of C_API §5 for everything but the endpoints.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdSettings {
            endpoints,
            ..EtcdSettings::default()
        }
    }

    /// Checks what can be checked without the cluster; the message names the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(what));
        if self.endpoints.is_empty() {
            return bad(
                "`etcd_endpoints` must list at least one endpoint for state_backend = \"etcd\""
                    .into(),
            );
        }
        let tls = self.ca_file.is_some() || self.cert_file.is_some();
        for endpoint in &self.endpoints {
            let rest = if let Some(rest) = endpoint.strip_prefix("http://") {
                if tls {
                    return bad(format!("`etcd_endpoints`: {endpoint:?} is plain http, but TLS files are configured: use https://"));
                }
                rest
            } else if let Some(rest) = endpoint.strip_prefix("https://") {
                rest
            } else {
                return bad(format!(
                    "`etcd_endpoints`: {endpoint:?} must start with http:// or https://"
                ));
            };
            // Endpoints are shown in messages: credentials go in etcd_user / etcd_password.
            if rest.contains('@') {
                return bad(
                    "`etcd_endpoints`: an endpoint must not carry credentials (user@host); use `etcd_user` and `etcd_password`"
                .into());
            }
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                return bad(format!(
                    "`etcd_endpoints`: {endpoint:?} must be http(s)://host:port"
                ));
            }
        }
        if self.prefix.is_empty() {
            return bad("`etcd_prefix` must not be empty".into());
        }
        if self.timeout.is_zero() {
            return bad("`etcd_timeout` must be more than 0".into());
        }
        if self.user.is_some() != self.password.is_some() {
            return bad("`etcd_user` and `etcd_password` go together".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("`etcd_cert_file` and `etcd_key_file` go together".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_shown() {
        let mut s = EtcdSettings::new(vec!["http://127.0.0.1:2379".into()]);
        s.user = Some("backup".into());
        s.password = Some(crate::config::Secret::new("s3cret-pw"));
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(shown.contains("[REDACTED]"), "{shown}");
    }

    #[test]
    fn settings_come_from_the_configuration() {
        let config = crate::config::PluginConfig::parse(
            "state_backend = \"etcd\"\netcd_endpoints = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\netcd_timeout = \"2s\"\netcd_user = \"backup\"\netcd_password = \"pw-1\"\n".as_bytes(),
        )
        .unwrap();
        let s = &config.etcd;
        assert_eq!(
            s.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(s.prefix, DEFAULT_PREFIX);
        assert_eq!(s.timeout, std::time::Duration::from_secs(2));
        assert_eq!(
            (s.user.as_deref(), s.password.as_ref().map(|p| p.expose())),
            (Some("backup"), Some("pw-1"))
        );
        assert!(s.validate().is_ok());
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn the_backend_opens_only_for_etcd_and_without_the_cluster() {
        let file = crate::config::PluginConfig::parse(b"").unwrap();
        assert!(EtcdBackend::open(&file).unwrap().is_none());
        // Nothing listens on port 1: opening connects nothing.
        let etcd = crate::config::PluginConfig::parse(
            b"state_backend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:1\"]\n",
        )
        .unwrap();
        let backend = EtcdBackend::open(&etcd).unwrap().expect("an etcd backend");
        assert_eq!(backend.failovers(), 0);
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn without_the_feature_etcd_is_refused_naming_the_key_and_the_feature() {
        let file = crate::config::PluginConfig::parse(b"").unwrap();
        assert!(EtcdBackend::open(&file).unwrap().is_none());
        let etcd = crate::config::PluginConfig::parse(
            b"state_backend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:1\"]\n",
        )
        .unwrap();
        let detail = EtcdBackend::open(&etcd).err().expect("refused").detail();
        assert!(
            detail.contains("state_backend") && detail.contains("`etcd` feature"),
            "{detail}"
        );
    }

    #[test]
    fn validation_names_the_key() {
        let ok = EtcdSettings::new(vec!["http://127.0.0.1:2379".into()]);
        assert!(ok.validate().is_ok());
        let none = EtcdSettings::new(vec![]);
        assert!(none
            .validate()
            .unwrap_err()
            .detail()
            .contains("etcd_endpoints"));
        let creds = EtcdSettings::new(vec!["http://u:secret@127.0.0.1:2379".into()]);
        let detail = creds.validate().unwrap_err().detail();
        assert!(
            detail.contains("etcd_user") && !detail.contains("secret"),
            "{detail}"
        );
        let scheme = EtcdSettings::new(vec!["127.0.0.1:2379".into()]);
        assert!(scheme.validate().unwrap_err().detail().contains("http://"));
        let mut user_only = ok.clone();
        user_only.user = Some("u".into());
        assert!(user_only
            .validate()
            .unwrap_err()
            .detail()
            .contains("etcd_password"));
        let mut plain_tls = ok.clone();
        plain_tls.ca_file = Some("/ca.pem".into());
        assert!(plain_tls
            .validate()
            .unwrap_err()
            .detail()
            .contains("https://"));
        let mut cert_only = EtcdSettings::new(vec!["https://h:1".into()]);
        cert_only.cert_file = Some("/c.pem".into());
        assert!(cert_only
            .validate()
            .unwrap_err()
            .detail()
            .contains("etcd_key_file"));
    }
}
