//! FFI plumbing: argument conversions (each failing with an [`ArgError`] naming the
//! argument), and strings in and out. The frame of every export is in `frame`.
//! Every `unsafe` pointer conversion of the crate lives here or right at its use in `ffi`.

use super::frame::ArgError;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Logs a panic caught at the boundary; returns what it said.
pub fn report_panic(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    tracing::error!(panic = %what, "internal panic caught at the C boundary");
    what
}

/// Longest C string argument accepted (paths, keys, task names are far shorter).
const MAX_C_STRING: usize = 64 * 1024;

/// Bytes of a NUL-terminated argument.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string.
pub unsafe fn c_bytes<'a>(ptr: *const c_char, name: &'static str) -> Result<&'a [u8], ArgError> {
    if ptr.is_null() {
        return Err(ArgError::Null(name));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    if bytes.len() > MAX_C_STRING {
        return Err(ArgError::TooLong {
            name,
            len: bytes.len(),
            max: MAX_C_STRING,
        });
    }
    Ok(bytes)
}

/// A UTF-8 string argument.
///
/// # Safety
/// As for [`c_bytes`].
pub unsafe fn c_str<'a>(ptr: *const c_char, name: &'static str) -> Result<&'a str, ArgError> {
    // SAFETY: `ptr` is NULL or NUL-terminated (this function's contract).
    let bytes = unsafe { c_bytes(ptr, name) }?;
    std::str::from_utf8(bytes).map_err(|e| ArgError::NotUtf8 {
        name,
        offset: e.valid_up_to(),
    })
}

/// A file path argument: any bytes but NUL, as on Linux; empty is rejected.
///
/// # Safety
/// As for [`c_bytes`].
pub unsafe fn c_path<'a>(ptr: *const c_char, name: &'static str) -> Result<&'a Path, ArgError> {
    // SAFETY: `ptr` is NULL or NUL-terminated (this function's contract).
    let bytes = unsafe { c_bytes(ptr, name) }?;
    if bytes.is_empty() {
        return Err(ArgError::Empty(name));
    }
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

/// A path argument that must name a file (C_API §3): a path that is empty, ends in `/`, or
/// whose last component is `.` or `..` is the caller's mistake, and like every parameter
/// check it is reported before the plugin's init is looked at (C_API §4).
///
/// # Safety
/// As for [`c_bytes`].
pub unsafe fn c_file_path<'a>(
    ptr: *const c_char,
    name: &'static str,
) -> Result<&'a Path, ArgError> {
    // SAFETY: `ptr` is NULL or NUL-terminated (this function's contract).
    let path = unsafe { c_path(ptr, name) }?;
    backup_coordinator_core::durable::target_file_name(path).map_err(|err| ArgError::Invalid {
        name,
        problem: format!("{:?}: {}", path, err.source),
    })?;
    Ok(path)
}

/// An optional message argument: NULL is `None`, bad UTF-8 is replaced, never rejected
/// (recording an error must not fail because of how the error was spelled).
///
/// # Safety
/// As for [`c_bytes`].
pub unsafe fn c_message<'a>(ptr: *const c_char) -> Option<std::borrow::Cow<'a, str>> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    Some(String::from_utf8_lossy(bytes))
}

/// A (pointer, length) buffer argument; NULL is allowed only with length 0.
///
/// # Safety
/// `ptr` is NULL or valid for `len` bytes.
pub unsafe fn c_slice<'a>(
    ptr: *const u8,
    len: usize,
    name: &'static str,
) -> Result<&'a [u8], ArgError> {
    if ptr.is_null() {
        if len == 0 {
            return Ok(&[]);
        }
        return Err(ArgError::NullWithSize { name, size: len });
    }
    if len > isize::MAX as usize {
        return Err(ArgError::TooLarge { name, size: len });
    }
    // SAFETY: non-NULL, and valid for `len` bytes by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

thread_local! {
    /// The string last handed to this thread; valid until its next call that returns one.
    static RETURNED: RefCell<CString> = RefCell::new(CString::default());
}

/// Hands `text` out as a `const char*` that stays valid until this thread's next call
/// into the library, whatever other threads do.
pub fn return_string(text: &str) -> *const c_char {
    let owned = to_cstring(text);
    RETURNED.with(|slot| {
        let mut slot = slot.borrow_mut();
        *slot = owned;
        slot.as_ptr()
    })
}

fn to_cstring(text: &str) -> CString {
    CString::new(text).unwrap_or_else(|_| {
        CString::new(text.replace('\0', " ")).expect("no NUL left after replacing them")
    })
}

/// A copy of `text` allocated with the C allocator (so that C code may `free` it).
/// NULL when the allocation fails.
pub fn malloc_string(text: &str) -> *mut c_char {
    let owned = to_cstring(text);
    let bytes = owned.as_bytes_with_nul();
    // SAFETY: allocating and filling a fresh buffer of exactly the copied length.
    unsafe {
        let ptr = libc::malloc(bytes.len()) as *mut u8;
        if ptr.is_null() {
            return std::ptr::null_mut();
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len());
        ptr as *mut c_char
    }
}

/// Replaces a library-owned C string field, freeing the previous one.
///
/// # Safety
/// `*slot` is NULL or a string the library allocated with the C allocator.
pub unsafe fn replace_malloc_string(slot: *mut *mut c_char, text: Option<&str>) {
    // SAFETY: `slot` is valid and its string NULL or the library's malloc'd one (this
    // function's contract), freed once, after the new one is in place.
    unsafe {
        let old = *slot;
        *slot = text.map_or(std::ptr::null_mut(), malloc_string);
        if !old.is_null() {
            libc::free(old as *mut libc::c_void);
        }
    }
}

/// Copies `text` into a fixed C buffer, truncated at a character boundary, NUL-terminated.
pub fn copy_to_buffer(text: &str, buffer: &mut [c_char]) {
    if buffer.is_empty() {
        return;
    }
    let mut end = text.len().min(buffer.len() - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    for (dst, src) in buffer.iter_mut().zip(&text.as_bytes()[..end]) {
        *dst = *src as c_char;
    }
    buffer[end] = 0;
}

/// A pointer argument that must not be NULL.
pub fn non_null<T>(ptr: *mut T, name: &'static str) -> Result<*mut T, ArgError> {
    if ptr.is_null() {
        Err(ArgError::Null(name))
    } else {
        Ok(ptr)
    }
}

/// Writes `value` through an optional output pointer (NULL: not wanted).
///
/// # Safety
/// `ptr` is NULL or writable.
pub unsafe fn write_optional<T>(ptr: *mut T, value: T) {
    if !ptr.is_null() {
        // SAFETY: non-NULL and writable (this function's contract).
        unsafe { ptr.write(value) };
    }
}
