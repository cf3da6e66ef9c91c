//! `config check` (docs/C_API.md §11): the config as init reads it, with init's messages
//! (key, line, column), and the directories it names looked at without creating any.

use super::{CliError, Done};
use backup_coordinator_core::config::{PluginConfig, StateBackend};
use serde_json::json;
use std::fmt::Write as _;
use std::path::Path;

/// What init would make of `dir` for `key`: an error, or a note.
fn look_at_dir(key: &str, dir: &Path) -> Result<String, String> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_err() {
                return Err(format!(
                    "key `{key}`: directory {} is not writable by this user",
                    dir.display()
                ));
            }
            Ok(format!("{key}: {} (exists)", dir.display()))
        }
        Ok(_) => Err(format!(
            "key `{key}`: {} exists and is not a directory",
            dir.display()
        )),
        Err(_) => Ok(format!(
            "{key}: {} (missing: init creates it, mode 0750)",
            dir.display()
        )),
    }
}

/// Init's message, and where the key it names is written when the message does not say
/// (a value init refuses names its key, not its line): " (line L, column C)".
pub fn located(message: String, text: &[u8]) -> String {
    if message.contains(" line ") {
        return message;
    }
    let Some(key) = message
        .split("key `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
    else {
        return message;
    };
    let text = String::from_utf8_lossy(text);
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix(key) else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with('=') {
            let column = line.len() - trimmed.len() + 1;
            return format!("{message} (line {}, column {column})", n + 1);
        }
    }
    message
}

pub fn check(file: &Path, section: &str, text: &[u8]) -> Result<Done, CliError> {
    let config = PluginConfig::parse(text).map_err(|e| CliError(located(e.to_string(), text)))?;
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let error_store = config
        .error_store_path
        .as_deref()
        .filter(|_| config.enable_error_logging);
    for (key, dir) in [
        ("error_store_path", error_store),
        ("state_dir", config.state_dir.as_deref()),
        ("log_path", config.log_path.as_deref()),
    ] {
        if let Some(dir) = dir {
            match look_at_dir(key, dir) {
                Ok(note) => notes.push(note),
                Err(problem) => problems.push(problem),
            }
        }
    }
    let backend = match config.state_backend {
        StateBackend::Etcd => {
            if let Err(failure) = config.etcd.validate() {
                problems.push(failure.detail());
            }
            "etcd"
        }
        _ => "file",
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} [{section}]: {}",
        file.display(),
        if problems.is_empty() {
            "valid"
        } else {
            "INVALID"
        }
    );
    let _ = writeln!(out, "state backend: {backend}");
    for note in &notes {
        let _ = writeln!(out, "{note}");
    }
    for problem in &problems {
        let _ = writeln!(out, "error: {problem}");
    }
    let json = json!({
        "ok": problems.is_empty(),
        "file": file.display().to_string(),
        "section": section,
        "state_backend": backend,
        "state_dir": config.state_dir.as_ref().map(|p| p.display().to_string()),
        "log_path": config.log_path.as_ref().map(|p| p.display().to_string()),
        "notes": notes,
        "errors": problems,
    });
    match problems.first() {
        None => Ok(Done::ok(out, json)),
        Some(first) => {
            let why = format!("invalid config: {}", located(first.clone(), text));
            Ok(Done::refused(out, json, why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_value_is_located_where_it_is_written() {
        let text = b"\n\nenable = true\n  error_retry_max = \"many\"\n";
        let message = "invalid config: key `error_retry_max`: expected an integer".to_string();
        assert_eq!(
            located(message.clone(), text),
            format!("{message} (line 4, column 3)")
        );
        let syntax = "TOML syntax error at line 2, column 10 (key `enable`)".to_string();
        assert_eq!(located(syntax.clone(), text), syntax);
    }
}
