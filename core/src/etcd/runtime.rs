//! One small tokio runtime on a thread of the plugin, for the async etcd client. The C
//! calls stay synchronous: they hand a future to the runtime and wait for its result on a
//! channel. A thread of the runtime never waits like that (it would wait for itself).

use crate::error::{Error, ErrorCode, Result};
use std::future::Future;
use std::sync::mpsc;
use std::thread::JoinHandle;
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

pub struct EtcdRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EtcdRuntime {
    pub fn start() -> Result<Self> {
        let (handle_tx, handle_rx) = mpsc::sync_channel(1);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("backup-etcd".into())
            .spawn(move || {
                block_sigpipe();
                let runtime = match Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                // Drives every spawned request until the store is dropped.
                let _ = runtime.block_on(stopped);
            })
            .map_err(|e| start_failed(&e.to_string()))?;
        let handle = handle_rx
            .recv()
            .map_err(|_| start_failed("the thread ended"))?
            .map_err(|e| start_failed(&e))?;
        Ok(EtcdRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `future` on the runtime and waits for its output.
    pub fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        // Another runtime's thread (a Rust host's) may wait here; ours would wait for itself.
        if self.thread.as_ref().map(|t| t.thread().id()) == Some(std::thread::current().id()) {
            return Err(Error::InvalidState(
                "a synchronous etcd store call from the etcd runtime's own thread".to_string(),
            ));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(Error::etcd(
                ErrorCode::ConnectionLost,
                "the etcd client's runtime stopped during the request",
            ))
        })
    }

    /// Starts `future` in the background (a lease revocation nobody waits for).
    pub fn spawn(
        &self,
        future: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::AbortHandle {
        self.handle.spawn(future).abort_handle()
    }
}

fn start_failed(why: &str) -> Error {
    Error::InitFailed(format!(
        "cannot start the etcd client's runtime thread: {why}"
    ))
}

impl Drop for EtcdRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Dropped from the runtime's own thread (the last reference held by a task):
            // joining would wait for ourselves.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// Blocks SIGPIPE on the calling thread and the threads it starts (tokio's blocking pool).
/// A write to a socket whose peer is gone (an etcd member killed mid-request) raises
/// SIGPIPE on the writing thread unless the write asks not to, and vectored writes cannot;
/// a C host such as taosX's stand-ins keeps SIGPIPE's default action, which ends the whole
/// process. Blocked, the write fails with EPIPE and the client fails over.
fn block_sigpipe() {
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset before use; the calls
    // change only this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn calls_from_other_threads_wait_and_the_runtime_s_own_thread_is_refused() {
        let runtime = Arc::new(EtcdRuntime::start().unwrap());
        assert_eq!(runtime.run(async { Ok(7) }).unwrap(), 7);
        // A host's own async runtime may call in (from a blocking-capable thread).
        let host = Builder::new_current_thread().build().unwrap();
        let from_host = host.block_on(async { runtime.run(async { Ok(8) }) });
        assert_eq!(from_host.unwrap(), 8);
        // From the etcd runtime's own thread: refused instead of a deadlock.
        let inner = runtime.clone();
        let refused = runtime
            .run(async move { Ok(inner.run(async { Ok(9) })) })
            .unwrap();
        assert_eq!(refused.unwrap_err().code(), ErrorCode::InvalidState.raw());
    }

    /// Whether SIGPIPE is blocked on the calling thread.
    fn sigpipe_blocked() -> bool {
        // SAFETY: queries this thread's mask into a local, zero-initialised sigset_t.
        unsafe {
            let mut current: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current);
            libc::sigismember(&current, libc::SIGPIPE) == 1
        }
    }

    #[test]
    fn the_runtime_s_threads_never_take_sigpipe() {
        let runtime = EtcdRuntime::start().unwrap();
        assert!(runtime.run(async { Ok(sigpipe_blocked()) }).unwrap());
        // Threads it starts (the blocking pool, used to resolve endpoint names) too.
        let pooled =
            runtime.run(async { Ok(tokio::task::spawn_blocking(sigpipe_blocked).await.unwrap()) });
        assert!(pooled.unwrap());
        // The caller's thread is left as it was.
        assert!(!sigpipe_blocked());
    }
}
