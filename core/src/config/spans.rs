//! Where in the text: TOML syntax errors with their line and column, the key a line assigns
//! (named in the message; a secret's line never quoted), and the source span of a key.

use super::secret::SECRET_KEYS;
use super::ConfigError;
use std::ops::Range;

/// A TOML syntax error with its line and column (1-based, columns in characters).
pub(super) fn syntax_error(text: &str, err: &toml::de::Error) -> ConfigError {
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

/// The source span of `name` in the parsed-with-spans table, if any.
pub(super) fn span_of(spans: Option<&toml::de::DeTable<'_>>, name: &str) -> Option<Range<usize>> {
    spans?
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == name)
        .map(|(_, v)| v.span())
}

pub(super) fn inner_spans<'a, 'i>(
    spans: Option<&'a toml::de::DeTable<'i>>,
    name: &str,
) -> Option<&'a toml::de::DeTable<'i>> {
    spans?
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == name)
        .and_then(|(_, v)| v.get_ref().as_table())
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, PluginConfig};

    fn parse(text: &str) -> Result<PluginConfig, ConfigError> {
        PluginConfig::parse(text.as_bytes())
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
}
