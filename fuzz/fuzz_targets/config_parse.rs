//! The config parser with arbitrary bytes, as taosX passes them (any length, NULs, bad
//! UTF-8): a config or a `ConfigError` that says something, never a panic. What parses
//! must also be usable: its retry policy builds from it.
#![no_main]

use backup_coordinator::config::PluginConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match PluginConfig::parse(data) {
        Ok(config) => {
            let policy = config.retry_policy();
            assert_eq!(policy.max_retry, config.error_retry_max);
            let _ = format!("{config:?}");
        }
        Err(error) => {
            assert!(!error.0.is_empty(), "a config error says nothing");
        }
    }
});
