//! `backup-coordinator`, the operator's command line (docs/C_API.md §11): what a person
//! on a taosX host runs to see and repair the plugin's state while taosX runs.
//!
//! It reads the plugin's own config (a taosX config, whose plugin section is read, or a
//! bare section) with [`PluginConfig`], and works on the same store the plugin uses: the
//! file store opened with [`FileIdempotencyStore::open`] (multi-process safe: the same locks), or the
//! etcd cluster through the same client. Every change it makes (release, forget, reset,
//! compact) is written to stderr and, when `log_path` is configured, to the diagnostics
//! log, with the reason given.
//!
//! Exit codes (docs/C_API.md §11): 0 done; 1 refused or failed, the reason on stderr;
//! 2 bad usage (clap's own usage errors).

mod check;
mod etcd_keys;
mod fmt;
mod keys;
mod records;
mod store;

use backup_coordinator_core::config::{PluginConfig, StateBackend};
use backup_coordinator_core::error::Error;
use backup_coordinator_core::etcd::EtcdBackend;
use backup_coordinator_core::idempotency::file_store::{
    FileIdempotencySettings, FileIdempotencyStore,
};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The plugin's section in a taosX config.
pub const DEFAULT_SECTION: &str = "plugins.incremental_bitmap";

#[derive(Debug, Parser)]
#[command(
    name = "backup-coordinator",
    version,
    about = "Inspect and repair the state of the taosX incremental-bitmap backup plugin (docs/C_API.md §11)"
)]
pub struct Cli {
    /// The taosX config (its plugin section is read) or a bare plugin section.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The plugin's section in a taosX config.
    #[arg(long, value_name = "SECTION", default_value = DEFAULT_SECTION)]
    pub section: String,
    /// Print one JSON document (stable snake_case keys) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The config.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Idempotency keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Log-backup retry records.
    #[command(subcommand)]
    Records(RecordsCommand),
    /// The embedded file store.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config as init does; errors name the key, line and column.
    Check,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateFilter {
    Claimed,
    Completed,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List the live keys.
    List {
        #[arg(long, value_enum)]
        state: Option<StateFilter>,
        /// Only keys claimed (last renewed) or completed longer ago than this ("90s", "2h", "7d").
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
        older_than: Option<u64>,
        /// Only keys starting with these bytes.
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
    },
    /// State, token, fingerprint (hex), owner, lease left and expiry of one key.
    Show { key: String },
    /// Why a call for KEY would not run now (or why it would), in words.
    Why {
        key: String,
        /// The fingerprint (SHA-256 of the payload, hex) the call would carry: said whether it matches.
        #[arg(long, value_name = "HEX")]
        fingerprint: Option<String>,
    },
    /// End a claim whose owner is known dead; only the claim with token N. Its token is
    /// fenced: the next claim's is higher.
    Release {
        key: String,
        #[arg(long, value_name = "N")]
        if_token: u64,
        /// Why (written to the diagnostics log).
        #[arg(long, value_name = "TEXT", default_value = "its owner is known dead")]
        reason: String,
    },
    /// Let a completed key run again; refused while it is claimed.
    Forget {
        key: String,
        /// Why (written to the diagnostics log).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RecordsCommand {
    /// Every (task, command) with retry records.
    List,
    /// The retry records of TASK (of one command, or of each).
    Show {
        task: String,
        #[arg(value_parser = parse_command)]
        command: Option<backup_coordinator_core::log_backup::SubCommand>,
    },
    /// Remove the retry records of (TASK, COMMAND); refused while a run holds them.
    Reset {
        task: String,
        #[arg(value_parser = parse_command)]
        command: backup_coordinator_core::log_backup::SubCommand,
        /// Why (written to the diagnostics log).
        #[arg(long, value_name = "TEXT", default_value = "reset by the operator")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Keys, bytes, bytes per key.
    Stats,
    /// Check every record of the journal and the token counters; exit 1 on corruption.
    Verify,
    /// Rewrite the journal with the live records only.
    Compact {
        /// Why (written to the diagnostics log).
        #[arg(long, value_name = "TEXT", default_value = "compacted by the operator")]
        reason: String,
    },
}

fn parse_command(name: &str) -> Result<backup_coordinator_core::log_backup::SubCommand, String> {
    backup_coordinator_core::log_backup::SubCommand::ALL
        .into_iter()
        .find(|c| c.name() == name)
        .ok_or_else(|| format!("{name:?} is not one of start, stop, pause, resume, truncate"))
}

/// "90s", "15m", "2h", "7d", "500ms", or bare seconds; in ms.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 15m, 2h or 7d"))?;
    let scale = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (ms, s, m, h, d)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// What a command did: its text and JSON, and whether it was refused.
pub struct Done {
    pub text: String,
    pub json: Value,
    /// Set when the command was refused or found a problem: exit 1 with this on stderr.
    pub refused: Option<String>,
}

impl Done {
    pub fn ok(text: String, json: Value) -> Self {
        Done {
            text,
            json,
            refused: None,
        }
    }

    pub fn refused(text: String, json: Value, why: String) -> Self {
        Done {
            text,
            json,
            refused: Some(why),
        }
    }
}

/// A failure that ends the command: exit 1, the message on stderr.
#[derive(Debug)]
pub struct CliError(pub String);

impl From<Error> for CliError {
    fn from(failure: Error) -> Self {
        CliError(failure.detail())
    }
}

/// What every command works with.
pub struct Ctx {
    pub config: PluginConfig,
    pub now_ms: u64,
    pub json: bool,
}

/// Where the plugin keeps its state, as the config says.
pub enum Backend {
    File(PathBuf),
    Etcd(EtcdBackend),
}

impl Ctx {
    pub fn backend(&self) -> Result<Backend, CliError> {
        if self.config.state_backend == StateBackend::Etcd {
            let backend = EtcdBackend::open(&self.config)?.expect("state_backend is etcd");
            return Ok(Backend::Etcd(backend));
        }
        match &self.config.state_dir {
            Some(dir) => Ok(Backend::File(dir.clone())),
            None => Err(CliError(
                "no state store is configured (set `state_dir`, or `state_backend = \"etcd\"` with `etcd_endpoints`)".to_string(),
            )),
        }
    }

    /// The file store under `state_dir`, opened as the plugin opens it; `None` when there
    /// is none yet: nothing is created (files made by another user than taosX's would lock
    /// the plugin out).
    pub fn file_store(&self, state_dir: &Path) -> Result<Option<FileIdempotencyStore>, CliError> {
        if !state_dir.join("idempotency").join("journal").exists() {
            return Ok(None);
        }
        let settings = FileIdempotencySettings {
            lease: self.config.idempotency_lease,
            ttl: self.config.idempotency_ttl,
            compaction_slack_bytes: self.config.idempotency_compaction_slack,
        };
        Ok(Some(FileIdempotencyStore::open(state_dir, settings)?))
    }

    pub fn lease_ms(&self) -> u64 {
        self.config.idempotency_lease.as_millis() as u64
    }

    pub fn ttl_ms(&self) -> u64 {
        self.config.idempotency_ttl.as_millis() as u64
    }
}

/// The plugin's config in `text`: a taosX config's `[section]` as taosX passes it to the
/// plugin, or the text itself when it has no such section (a bare plugin section).
///
/// The lines outside the section are blanked rather than cut, and its headers rewritten
/// in place (`[section]` blank, `[section.etcd]` as `[etcd]`), so that the line and column
/// of an error are those of the file.
pub fn section_text(text: &[u8], section: &str) -> Result<Vec<u8>, CliError> {
    let Ok(doc) = std::str::from_utf8(text) else {
        // PluginConfig says where the bad byte is.
        return Ok(text.to_vec());
    };
    let Ok(table) = doc.parse::<toml::Table>() else {
        // A syntax error: PluginConfig names its line and column.
        return Ok(text.to_vec());
    };
    let mut value = Some(&toml::Value::Table(table.clone()));
    for part in section.split('.') {
        value = value.and_then(|v| v.get(part));
    }
    match value {
        None if section == DEFAULT_SECTION => return Ok(text.to_vec()),
        None => return Err(CliError(format!("the config has no section [{section}]"))),
        Some(toml::Value::Table(_)) => {}
        Some(_) => return Err(CliError(format!("[{section}] is not a table"))),
    }
    let header = |line: &str| -> Option<String> {
        let line = line.trim();
        let inner = line.strip_prefix('[')?;
        let inner = inner.split(']').next()?.trim();
        (!inner.starts_with('[')).then(|| inner.to_string())
    };
    let mut out = String::with_capacity(doc.len());
    let mut inside = false;
    for line in doc.split_inclusive('\n') {
        let newline = if line.ends_with('\n') { "\n" } else { "" };
        if let Some(name) = header(line) {
            if name == section {
                inside = true;
                out.push_str(newline);
                continue;
            }
            if let Some(sub) = name.strip_prefix(section).and_then(|r| r.strip_prefix('.')) {
                inside = true;
                out.push_str(&format!("[{sub}]{newline}"));
                continue;
            }
            inside = false;
        }
        if inside {
            out.push_str(line);
        } else {
            out.push_str(newline);
        }
    }
    Ok(out.into_bytes())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Notes a change the command made: on stderr, and in the diagnostics log when one is
/// configured (installed for the command, flushed when it ends).
pub fn note_change(ctx: &Ctx, what: &str, reason: &str) {
    eprintln!("backup-coordinator: {what} (reason: {reason})");
    if ctx.config.log_path.is_some() {
        tracing::warn!(target: "backup_coordinator::cli", change = what, reason, "operator change");
    }
}

fn run(cli: &Cli) -> Result<Done, CliError> {
    let bytes = std::fs::read(&cli.config)
        .map_err(|e| CliError(format!("cannot read {}: {e}", cli.config.display())))?;
    let text = section_text(&bytes, &cli.section)?;
    if let Command::Config(ConfigCommand::Check) = cli.command {
        return check::check(&cli.config, &cli.section, &text);
    }
    // As init loads it: the configured directories are created when missing.
    let config =
        PluginConfig::load(&text).map_err(|e| CliError(check::located(e.to_string(), &text)))?;
    let changes = matches!(
        cli.command,
        Command::Keys(KeysCommand::Release { .. } | KeysCommand::Forget { .. })
            | Command::Records(RecordsCommand::Reset { .. })
            | Command::Store(StoreCommand::Compact { .. })
    );
    if changes {
        backup_coordinator_core::diagnostics::install_for(&config)
            .map_err(|e| CliError(e.to_string()))?;
    }
    let ctx = Ctx {
        config,
        now_ms: now_ms(),
        json: cli.json,
    };
    let done = match &cli.command {
        Command::Config(_) => unreachable!("handled above"),
        Command::Keys(command) => keys::run(&ctx, command),
        Command::Records(command) => records::run(&ctx, command),
        Command::Store(command) => store::run(&ctx, command),
    };
    if changes {
        // Every line is on disk before the process exits.
        backup_coordinator_core::diagnostics::uninstall();
    }
    done
}

/// The program: parses the arguments (usage errors exit 2), runs the command, prints its
/// text or JSON on stdout and any reason for refusing on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(done) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&done.json).expect("JSON values serialize")
                );
            } else if !done.text.is_empty() {
                print!("{}", done.text);
                if !done.text.ends_with('\n') {
                    println!();
                }
            }
            match done.refused {
                None => ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("backup-coordinator: {why}");
                    ExitCode::from(1)
                }
            }
        }
        Err(CliError(why)) => {
            if cli.json {
                println!("{}", serde_json::json!({ "ok": false, "error": why }));
            }
            eprintln!("backup-coordinator: {why}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("90"), Ok(90_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert!(parse_duration_ms("5 parsecs").is_err());
        assert!(parse_duration_ms("s").is_err());
    }

    #[test]
    fn the_section_is_read_as_taosx_passes_it_and_errors_keep_their_lines() {
        let text = b"data_dir = \"/x\"\n[plugins.other]\nerror_retry_max = 3\n\
                     [plugins.incremental_bitmap]\nerror_retry_max = 4\n";
        let own = section_text(text, DEFAULT_SECTION).unwrap();
        assert_eq!(PluginConfig::parse(&own).unwrap().error_retry_max, 4);
        let other = section_text(text, "plugins.other").unwrap();
        assert_eq!(PluginConfig::parse(&other).unwrap().error_retry_max, 3);
        assert!(section_text(text, "plugins.none").is_err());
        // A bare section is read as it is.
        let bare = b"error_retry_max = 5\n";
        assert_eq!(section_text(bare, DEFAULT_SECTION).unwrap(), bare);
        // An error in the section is on the file's line.
        let bad = b"data_dir = \"/x\"\n[plugins.incremental_bitmap]\nenable = true\nerror_retry_max = \"many\"\n";
        let section = section_text(bad, DEFAULT_SECTION).unwrap();
        let err = PluginConfig::parse(&section).unwrap_err().to_string();
        let err = check::located(err, &section);
        assert!(
            err.contains("error_retry_max") && err.contains("line 4, column 1"),
            "{err}"
        );
    }

    #[test]
    fn commands_are_named_as_in_the_records() {
        assert_eq!(
            parse_command("truncate"),
            Ok(backup_coordinator_core::log_backup::SubCommand::Truncate)
        );
        assert!(parse_command("restart").is_err());
    }
}
