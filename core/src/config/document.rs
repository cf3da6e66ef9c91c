//! The TOML document flattened into `canonical key -> entry`: keys at top level, under
//! `[plugins.incremental_bitmap]` or dotted as taosX spells them, each with its value and its
//! text as written.

use super::spans::{inner_spans, span_of};
use super::ConfigError;
use std::collections::BTreeMap;
use toml::Value;

/// One key of the document: where it was written, its value, and its text as written.
pub(super) struct Entry {
    pub(super) written_as: String,
    pub(super) value: Value,
    pub(super) raw: String,
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

/// Flattens the document into `canonical key -> entry`, applying the `[plugins]` rules:
/// only *tables* of other plugins are ignored there.
pub(super) fn collect(
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

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, PluginConfig};
    use std::path::PathBuf;
    use std::time::Duration;

    fn parse(text: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(text.as_bytes())
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
}
