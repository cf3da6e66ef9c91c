//! A child process of the test binary itself: the tests that need a second process (to
//! kill it, stop it, race it) run one of their own `#[test]` functions again, with
//! `--exact <test> --nocapture --test-threads=1`, telling it its role through environment
//! variables; that test is a no-op in the normal run, where they are not set.
//!
//! ```ignore
//! let mut child = Child::command("eo_child").env("EO_ROLE", "owner").env("EO_DIR", dir).spawn();
//! let line = child.wait_for("RUNNING");
//! child.signal(libc::SIGSTOP);
//! ```
//!
//! A [`Child`] is killed (SIGKILL) and reaped when dropped, whatever happened to the test,
//! so that no test leaves a process behind.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::process::{self, ChildStdout, Command, ExitStatus, Output, Stdio};

/// How to start a child: its test, its environment, where its output goes. By default its
/// stdout is read by the parent ([`Child::wait_for`], [`Child::lines`]), its stderr goes
/// to the parent's and its stdin is empty.
pub struct Spawn {
    command: Command,
}

impl Spawn {
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.command.envs(vars);
        self
    }

    /// A pipe to the child's stdin, which [`Child::close_stdin`] closes (a child may wait
    /// for that to exit).
    pub fn stdin_piped(mut self) -> Self {
        self.command.stdin(Stdio::piped());
        self
    }

    /// The child's stdout thrown away (nothing to wait for on it).
    pub fn no_stdout(mut self) -> Self {
        self.command.stdout(Stdio::null());
        self
    }

    /// The child's stderr thrown away.
    pub fn no_stderr(mut self) -> Self {
        self.command.stderr(Stdio::null());
        self
    }

    pub fn spawn(mut self) -> Child {
        let mut process = self.command.spawn().expect("spawn the test binary again");
        let stdout = process.stdout.take().map(BufReader::new);
        Child { process, stdout }
    }

    /// Runs the child to its end (or its death) and returns its status and output.
    pub fn output(mut self) -> Output {
        self.command.output().expect("run the test binary again")
    }
}

/// A running child process of this test binary, killed and reaped when dropped.
pub struct Child {
    process: process::Child,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Child {
    /// The test binary, to run only the test `test_name`.
    pub fn command(test_name: &str) -> Spawn {
        let mut command = Command::new(std::env::current_exe().expect("the test binary"));
        command
            .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        Spawn { command }
    }

    pub fn id(&self) -> u32 {
        self.process.id()
    }

    fn stdout(&mut self) -> &mut BufReader<ChildStdout> {
        self.stdout
            .as_mut()
            .expect("the child's stdout is read by the parent (not no_stdout)")
    }

    /// Reads the child's lines until one holds `prefix`; returns that line from `prefix`
    /// on, trimmed (libtest may have written "test <name> ... " before it on the same
    /// line). Fails the test if the child's stdout ends first.
    pub fn wait_for(&mut self, prefix: &str) -> String {
        let out = self.stdout();
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).expect("read the child's stdout");
            assert!(n > 0, "the child ended before printing {prefix:?}");
            if let Some(at) = line.find(prefix) {
                return line[at..].trim().to_string();
            }
        }
    }

    /// The child's remaining lines, until its stdout ends.
    pub fn lines(&mut self) -> impl Iterator<Item = String> + '_ {
        self.stdout().lines().map_while(Result::ok)
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, SIGKILL, ...) to the child.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped (reaping takes
        // `&mut self`), so the pid cannot have been reused.
        assert_eq!(
            unsafe { libc::kill(self.id() as i32, sig) },
            0,
            "kill({sig})"
        );
    }

    /// Closes the child's stdin (see [`Spawn::stdin_piped`]).
    pub fn close_stdin(&mut self) {
        drop(self.process.stdin.take());
    }

    /// Closes the child's stdin, waits for it to end, and fails the test unless it ended
    /// with success.
    pub fn finish(mut self) {
        self.close_stdin();
        let status = self.wait();
        assert!(status.success(), "child failed: {status}");
    }

    /// Waits for the child to end.
    pub fn wait(&mut self) -> ExitStatus {
        self.process.wait().expect("wait for the child")
    }

    /// Reads the child's stdout to its end, then waits for the child: its status and what
    /// it printed (nothing if its stdout was thrown away).
    pub fn wait_with_output(mut self) -> (ExitStatus, String) {
        let mut text = String::new();
        if let Some(out) = self.stdout.as_mut() {
            out.read_to_string(&mut text)
                .expect("read the child's stdout");
        }
        (self.wait(), text)
    }

    /// SIGKILL, then waits for the child to end.
    pub fn kill(&mut self) -> ExitStatus {
        self.process.kill().expect("kill the child");
        self.wait()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Both are no-ops on a child already reaped.
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
