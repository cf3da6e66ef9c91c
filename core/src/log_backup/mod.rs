//! Log-backup commands made safe to repeat (C_API §7): each command is checked against the
//! task's observed state, skipped when its effect is already there, translated when the
//! state calls for another command, and retried through the retry core with records that
//! survive a restart.

pub mod metrics;
pub mod records;
mod run_lock;
pub mod runner;

/// The state of a task as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelState {
    Unknown = 0,
    NotExist = 1,
    Running = 2,
    Paused = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubCommand {
    Start = 0,
    Stop = 1,
    Pause = 2,
    Resume = 3,
    Truncate = 4,
}

impl KernelState {
    pub fn from_raw(raw: i32) -> Option<Self> {
        [Self::Unknown, Self::NotExist, Self::Running, Self::Paused]
            .into_iter()
            .find(|s| *s as i32 == raw)
    }
}

impl SubCommand {
    pub const ALL: [SubCommand; 5] = [
        SubCommand::Start,
        SubCommand::Stop,
        SubCommand::Pause,
        SubCommand::Resume,
        SubCommand::Truncate,
    ];

    pub fn from_raw(raw: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as i32 == raw)
    }

    pub fn name(self) -> &'static str {
        match self {
            SubCommand::Start => "start",
            SubCommand::Stop => "stop",
            SubCommand::Pause => "pause",
            SubCommand::Resume => "resume",
            SubCommand::Truncate => "truncate",
        }
    }
}

/// What to do with a command in an observed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The command's effect is already there.
    pub should_skip: bool,
    /// The observed state disagrees with the command.
    pub need_sync: bool,
    /// The command to run, if any.
    pub actual: Option<SubCommand>,
}

impl Decision {
    fn skip() -> Self {
        Decision {
            should_skip: true,
            need_sync: false,
            actual: None,
        }
    }
    fn run(command: SubCommand) -> Self {
        Decision {
            should_skip: false,
            need_sync: false,
            actual: Some(command),
        }
    }
    fn sync(actual: Option<SubCommand>) -> Self {
        Decision {
            should_skip: false,
            need_sync: true,
            actual,
        }
    }
}

/// The decision table of C_API §7.
pub fn decide(command: SubCommand, state: KernelState, already_truncated: bool) -> Decision {
    use KernelState::*;
    use SubCommand::*;
    match (command, state) {
        (_, Unknown) => Decision::sync(None),
        (Start, NotExist) => Decision::run(Start),
        (Start, Running) => Decision::skip(),
        (Start, Paused) => Decision::sync(Some(Resume)),
        (Stop, NotExist) => Decision::skip(),
        (Stop, Running) | (Stop, Paused) => Decision::run(Stop),
        (Pause, NotExist) => Decision::sync(None),
        (Pause, Running) => Decision::run(Pause),
        (Pause, Paused) => Decision::skip(),
        (Resume, NotExist) => Decision::sync(Some(Start)),
        (Resume, Running) => Decision::skip(),
        (Resume, Paused) => Decision::run(Resume),
        (Truncate, Running) if already_truncated => Decision::skip(),
        (Truncate, Running) => Decision::run(Truncate),
        (Truncate, NotExist) | (Truncate, Paused) => Decision::sync(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use KernelState::*;
    use SubCommand::*;

    /// The whole table, written out as the contract prints it.
    #[test]
    fn every_command_in_every_state() {
        let skip = Decision::skip();
        let run = Decision::run;
        let sync = Decision::sync;
        let table = [
            (Start, [run(Start), skip, sync(Some(Resume)), sync(None)]),
            (Stop, [skip, run(Stop), run(Stop), sync(None)]),
            (Pause, [sync(None), run(Pause), skip, sync(None)]),
            (Resume, [sync(Some(Start)), skip, run(Resume), sync(None)]),
            (
                Truncate,
                [sync(None), run(Truncate), sync(None), sync(None)],
            ),
        ];
        for (command, row) in table {
            for (state, expected) in [NotExist, Running, Paused, Unknown].into_iter().zip(row) {
                assert_eq!(
                    decide(command, state, false),
                    expected,
                    "{command:?} in {state:?}"
                );
            }
        }
        assert_eq!(decide(Truncate, Running, true), skip);
        assert_eq!(decide(Truncate, Paused, true), sync(None));
        // Neither skip nor run: a state the command cannot act on.
        let stuck = |d: Decision| !d.should_skip && d.actual.is_none();
        assert!(stuck(decide(Pause, NotExist, false)));
        assert!(!stuck(decide(Start, Paused, false)));
    }

    #[test]
    fn raw_values_are_checked() {
        assert_eq!(SubCommand::from_raw(4), Some(Truncate));
        assert_eq!(SubCommand::from_raw(5), None);
        assert_eq!(SubCommand::from_raw(-1), None);
        assert_eq!(KernelState::from_raw(3), Some(Paused));
        assert_eq!(KernelState::from_raw(4), None);
    }
}
