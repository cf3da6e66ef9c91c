//! The one frame every export runs in: C_API §4 applied in one place.
//!
//! An export converts its arguments into Rust values (each conversion returns an
//! [`ArgError`] naming the argument) and calls the core, inside the frame of its kind. The
//! frame, and only the frame:
//! - catches a panic, so that none unwinds into C (it fails the call with
//!   BACKUP_ERROR_UNKNOWN, like any other failure);
//! - checks the arguments before looking at the plugin's init (parameter checks come first);
//! - turns the result into what C receives ([`CReturn`]), and a failure into the last error
//!   and the booking its kind calls for:
//!
//! | kind | needs init | a failure becomes |
//! |---|---|---|
//! | [`booked`] (plugin-level operations) | yes | one error counted in `error_count`, and the plugin's last error |
//! | [`unbooked`] (the plugin's other calls) | yes | the plugin's last error, not counted |
//! | [`coordinator`] | no | [`Booking::Counted`]: an error of the coordinator; [`Booking::LastError`]: its last error |
//! | [`pure`] | no | only the value returned |
//!
//! A NULL coordinator fails a [`coordinator`] call with INVALID_PARAM (a no-op for a void
//! export), before anything else.

use super::coordinator::{CoordinatorCall, NULL_COORDINATOR};
use super::guard::{report_panic, return_string};
use super::types::SBackupCoordinator;
use backup_coordinator_core::error::{Error, ErrorCode, Result};
use backup_coordinator_core::plugin::{self, Plugin};
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A bad argument, by the name it has in the header. It becomes the core's
/// `Error::InvalidArgument` ("Invalid parameter: ...").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("`{0}` is NULL")]
    Null(&'static str),
    #[error("`{name}` is NULL with a size of {size}")]
    NullWithSize { name: &'static str, size: usize },
    #[error("`{0}` is empty")]
    Empty(&'static str),
    #[error("`{name}` is {len} bytes long, more than {max}")]
    TooLong {
        name: &'static str,
        len: usize,
        max: usize,
    },
    #[error("size {size} of `{name}` is larger than any buffer")]
    TooLarge { name: &'static str, size: usize },
    #[error("`{name}` is not valid UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { name: &'static str, offset: usize },
    /// Any other rule the argument breaks, said after its name.
    #[error("`{name}` {problem}")]
    Invalid { name: &'static str, problem: String },
}

impl ArgError {
    /// The argument named.
    pub fn name(&self) -> &'static str {
        match self {
            ArgError::Null(name) | ArgError::Empty(name) => name,
            ArgError::NullWithSize { name, .. }
            | ArgError::TooLong { name, .. }
            | ArgError::TooLarge { name, .. }
            | ArgError::NotUtf8 { name, .. }
            | ArgError::Invalid { name, .. } => name,
        }
    }
}

impl From<ArgError> for Error {
    fn from(err: ArgError) -> Self {
        Error::InvalidArgument(err.to_string())
    }
}

/// The one conversion of a core error into what C sees: its `int32_t` code and its message.
pub fn to_c(err: &Error) -> (i32, String) {
    (err.code(), err.to_string())
}

/// The static message of a code, as `backup_error_string` hands it out (C_API §1); any
/// value outside the table reads "Unknown error".
pub fn code_message(code: i32) -> &'static CStr {
    super::types::c_message(ErrorCode::from_raw(code).unwrap_or(ErrorCode::Unknown))
}

/// A required function pointer argument.
pub fn required<T>(f: Option<T>, name: &'static str) -> Result<T, ArgError> {
    f.ok_or(ArgError::Null(name))
}

/// What an export hands back to C when its call fails.
pub trait CReturn {
    fn failed(failure: &Error) -> Self;
}

impl CReturn for i32 {
    fn failed(failure: &Error) -> Self {
        to_c(failure).0
    }
}

/// A void export: a failing call (NULL argument, panic) does nothing.
impl CReturn for () {
    fn failed(_: &Error) -> Self {}
}

impl CReturn for bool {
    fn failed(_: &Error) -> Self {
        false
    }
}

/// A string export: the failure's message, valid until this thread's next call.
impl CReturn for *const c_char {
    fn failed(failure: &Error) -> Self {
        return_string(&to_c(failure).1)
    }
}

/// A string export that returns NULL when it has nothing (or fails).
pub struct Nullable(pub *const c_char);

impl CReturn for Nullable {
    fn failed(_: &Error) -> Self {
        Nullable(std::ptr::null())
    }
}

impl CReturn for *mut SBackupCoordinator {
    fn failed(_: &Error) -> Self {
        std::ptr::null_mut()
    }
}

/// Where a coordinator call's failure goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Booking {
    /// The coordinator's operations: an error of the coordinator (counted, last error,
    /// history, log).
    Counted,
    /// Its accessors: the coordinator's last error only.
    LastError,
}

/// Runs `body`; a panic becomes a failure with BACKUP_ERROR_UNKNOWN.
#[inline(always)]
fn catch<R>(body: impl FnOnce() -> Result<R>) -> Result<R> {
    catch_unwind(AssertUnwindSafe(|| {
        #[cfg(test)]
        fault::hit();
        body()
    }))
    .unwrap_or_else(|payload| {
        let what = report_panic(payload.as_ref());
        Err(Error::Panic(what))
    })
}

/// The last step of every frame: the value C receives. Booking may not unwind either.
#[inline(always)]
fn finish<R: CReturn>(result: Result<R>, book: impl FnOnce(&Error)) -> R {
    match result {
        Ok(value) => value,
        Err(failure) => {
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| book(&failure))) {
                report_panic(payload.as_ref());
            }
            R::failed(&failure)
        }
    }
}

/// A plugin-level operation (C_API §4): `backup_plugin_write_file_with_retry`,
/// `backup_plugin_write_file_fenced`, `backup_plugin_execute_with_retry`,
/// `backup_log_run_command`, `backup_execute_idempotent`. Its failure, whatever it is
/// (argument, no state store, the operation's own), is one error booked into `error_count`
/// with that code, once an instance exists.
pub fn booked<A, R: CReturn>(
    args: impl FnOnce() -> Result<A, ArgError>,
    op: impl FnOnce(&Plugin, A) -> Result<R>,
) -> R {
    on_instance(args, op, |plugin, failure| {
        let (code, message) = to_c(failure);
        plugin.record_error(code, Some(&message));
    })
}

/// A call of the plugin that needs init but is not a plugin-level operation (forget,
/// the retry records, the metrics, the history): its failure becomes the plugin's last
/// error, naming the problem, without being counted.
pub fn unbooked<A, R: CReturn>(
    args: impl FnOnce() -> Result<A, ArgError>,
    op: impl FnOnce(&Plugin, A) -> Result<R>,
) -> R {
    on_instance(args, op, |plugin, failure| {
        plugin.tracker().set_last_error(&to_c(failure).1)
    })
}

/// The frame of every call of the plugin: a failure goes to `book` once an instance
/// exists (before init there is nowhere to put it).
fn on_instance<A, R: CReturn>(
    args: impl FnOnce() -> Result<A, ArgError>,
    op: impl FnOnce(&Plugin, A) -> Result<R>,
    book: impl FnOnce(&Plugin, &Error),
) -> R {
    let instance = plugin::instance().ok();
    let result = catch(|| on_plugin(instance.as_deref(), args, op));
    finish(result, |failure| {
        if let Some(plugin) = &instance {
            book(plugin, failure);
        }
    })
}

/// Arguments first, then init, then the operation.
fn on_plugin<A, R>(
    instance: Option<&Plugin>,
    args: impl FnOnce() -> Result<A, ArgError>,
    op: impl FnOnce(&Plugin, A) -> Result<R>,
) -> Result<R> {
    let args = args()?;
    let plugin = instance.ok_or_else(plugin::not_initialized)?;
    op(plugin, args)
}

/// A call on a coordinator (C_API §3). NULL coordinator: INVALID_PARAM, before the other
/// arguments. The coordinator's fields are brought up to date after every counted call and
/// after every failure.
pub fn coordinator<A, R: CReturn>(
    c: *mut SBackupCoordinator,
    booking: Booking,
    args: impl FnOnce() -> Result<A, ArgError>,
    op: impl FnOnce(&CoordinatorCall, A) -> Result<R>,
) -> R {
    if c.is_null() {
        return R::failed(&ArgError::Null(NULL_COORDINATOR).into());
    }
    let mut call = None;
    let result = catch(|| {
        // SAFETY: non-NULL; the caller hands over a filled coordinator (C_API §3).
        let state = call.insert(unsafe { CoordinatorCall::enter(c) });
        let args = args()?;
        op(state, args)
    });
    let Some(call) = call else {
        return finish(result, |_| {});
    };
    let changed = booking == Booking::Counted || result.is_err();
    let value = finish(result, |failure| {
        let (code, message) = to_c(failure);
        match booking {
            Booking::Counted => call.record_error(code, Some(&message)),
            Booking::LastError => call.set_last_error(&message),
        }
    });
    if changed {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| call.mirror())) {
            report_panic(payload.as_ref());
        }
    }
    value
}

/// A function that needs no init and touches no plugin state: its failure is only the
/// value returned.
#[inline(always)]
pub fn pure<R: CReturn>(body: impl FnOnce() -> Result<R>) -> R {
    finish(catch(body), |_| {})
}

/// A [`pure`] call whose work cannot fail once its arguments are checked (the retry
/// context's hot path): the work's value goes to C as it is, never through a `Result`
/// that the compiler may spill and reload on the way (a stall of a few ns per call).
#[inline(always)]
pub fn pure_checked<A, R: CReturn>(
    args: impl FnOnce() -> Result<A, ArgError>,
    body: impl FnOnce(A) -> R,
) -> R {
    // Checking a pointer or an option cannot panic: no catch is needed around it.
    let args = match args() {
        Ok(args) => args,
        Err(arg) => return R::failed(&arg.into()),
    };
    catch_unwind(AssertUnwindSafe(|| {
        #[cfg(test)]
        fault::hit();
        body(args)
    }))
    .unwrap_or_else(|payload| R::failed(&Error::Panic(report_panic(payload.as_ref()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_c_messages_are_the_core_messages() {
        for code in ErrorCode::ALL {
            assert_eq!(code_message(code.raw()).to_str().unwrap(), code.message());
        }
        assert_eq!(code_message(-1234), c"Unknown error");
    }
}

#[cfg(test)]
pub(crate) mod fault {
    //! A panic on demand inside the frame, for the test that proves no export lets one
    //! unwind into C (C callbacks cannot panic, and the core has no panic to trigger).
    use std::sync::atomic::{AtomicBool, Ordering};

    static PANIC_NEXT: AtomicBool = AtomicBool::new(false);

    pub fn panic_in_next_call() {
        PANIC_NEXT.store(true, Ordering::SeqCst);
    }

    /// A fault asked for and not yet hit (the call made since did not run in a frame).
    pub fn pending() -> bool {
        PANIC_NEXT.load(Ordering::SeqCst)
    }

    pub(super) fn hit() {
        if PANIC_NEXT.swap(false, Ordering::SeqCst) {
            panic!("injected fault");
        }
    }
}
