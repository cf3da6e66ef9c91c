//! The log-backup commands' counters and the metric families they are shown as: retries by
//! the code they follow, recoveries, skips, state syncs and retry durations, by command.
//! Label values are bounded: commands, kernel states and the codes of the fixed table.

use super::records::Sequence;
use super::{decide, KernelState, SubCommand};
use crate::error::ErrorCode;
use crate::metrics::{CodeCounters, Counter, Family, Histogram, Sample};
use std::time::Duration;

/// Counters by command (indexed by `SubCommand as usize`), shown as the metric families of
/// [`LogMetrics::families`].
#[derive(Default)]
pub struct LogMetrics {
    /// Retries made, by the code of the failure each one follows.
    pub retries: [CodeCounters; 5],
    pub recoveries: [Counter; 5],
    pub skips: [Counter; 5],
    /// State syncs, by the observed state (indexed by `KernelState as usize`).
    pub syncs: [[Counter; 4]; 5],
    /// From a sequence's first detected failure to its terminal outcome.
    pub retry_duration: [Histogram; 5],
}

impl LogMetrics {
    pub(super) fn bump(counter: &[Counter; 5], command: SubCommand) {
        counter[command as usize].inc();
    }

    /// (retries, recoveries, skips, syncs) of a command, over every reason and state.
    pub fn of(&self, command: SubCommand) -> [u64; 4] {
        let i = command as usize;
        [
            self.retries[i].total(),
            self.recoveries[i].get(),
            self.skips[i].get(),
            self.syncs[i].iter().map(Counter::get).sum(),
        ]
    }

    /// A sequence reached its terminal outcome at `now_ms`: how long its retries took.
    pub(super) fn finished(&self, command: SubCommand, sequence: &Sequence, now_ms: u64) {
        if let Some(first) = sequence.first_failure_ms {
            self.retry_duration[command as usize]
                .observe(Duration::from_millis(now_ms.saturating_sub(first)));
        }
    }

    /// The families of the log-backup commands, for the plugin's exposition.
    pub fn families(&self) -> Vec<Family> {
        let durations = SubCommand::ALL
            .iter()
            .map(|command| {
                (
                    vec![("command", command.name().to_string())],
                    self.retry_duration[*command as usize].snapshot(),
                )
            })
            .collect();
        vec![
            Family::counter(
                "backup_log_command_retries_total",
                "Retries made by log-backup commands, by the code of the failure they follow.",
                self.retry_samples(),
            ),
            Family::counter(
                "backup_log_command_recoveries_total",
                "Log-backup commands that succeeded after a failure (after retries, or when the effect was there despite the failure).",
                by_command(&self.recoveries),
            ),
            Family::counter(
                "backup_log_command_skips_total",
                "Log-backup commands skipped because their effect was already there.",
                by_command(&self.skips),
            ),
            Family::counter(
                "backup_log_command_state_syncs_total",
                "Log-backup commands whose observed kernel state disagreed with them, by that state.",
                self.sync_samples(),
            ),
            Family::histogram(
                "backup_log_command_retry_duration_seconds",
                "Time from a log-backup sequence's first detected failure to its terminal outcome.",
                durations,
            ),
        ]
    }

    /// Retries by (command, reason): every retryable reason always, any other once counted.
    fn retry_samples(&self) -> Vec<Sample> {
        let mut samples = Vec::new();
        for command in SubCommand::ALL {
            for (reason, value) in self.retries[command as usize].series(&RETRY_REASONS) {
                samples.push(Sample {
                    labels: vec![("command", command.name().to_string()), ("reason", reason)],
                    value,
                });
            }
        }
        samples
    }

    /// State syncs by (command, state), for the pairs that can disagree only.
    fn sync_samples(&self) -> Vec<Sample> {
        let mut samples = Vec::new();
        for command in SubCommand::ALL {
            for state in STATES {
                if can_need_sync(command, state) {
                    samples.push(Sample {
                        labels: vec![
                            ("command", command.name().to_string()),
                            ("state", state_name(state).to_string()),
                        ],
                        value: self.syncs[command as usize][state as usize].get(),
                    });
                }
            }
        }
        samples
    }
}

/// Codes always shown for log-backup retries: what a retry can follow.
const RETRY_REASONS: [ErrorCode; 5] = [
    ErrorCode::FileIo,
    ErrorCode::Network,
    ErrorCode::Timeout,
    ErrorCode::ConnectionLost,
    ErrorCode::Unknown,
];

const STATES: [KernelState; 4] = [
    KernelState::Unknown,
    KernelState::NotExist,
    KernelState::Running,
    KernelState::Paused,
];

fn state_name(state: KernelState) -> &'static str {
    match state {
        KernelState::Unknown => "unknown",
        KernelState::NotExist => "not_exist",
        KernelState::Running => "running",
        KernelState::Paused => "paused",
    }
}

/// Whether a state can ever disagree with a command (the C_API §7 table): only those pairs
/// are shown as state-sync series.
fn can_need_sync(command: SubCommand, state: KernelState) -> bool {
    [false, true]
        .into_iter()
        .any(|truncated| decide(command, state, truncated).need_sync)
}

fn by_command(counters: &[Counter; 5]) -> Vec<Sample> {
    SubCommand::ALL
        .iter()
        .map(|c| Sample {
            labels: vec![("command", c.name().to_string())],
            value: counters[*c as usize].get(),
        })
        .collect()
}
