//! One record as one line: `[<unix ms>] Error <code>: <message>\n`, the message on one line
//! and bounded.

use std::borrow::Cow;

/// One message never takes more than this in a line, the "..." of a cut included.
pub(crate) const MAX_MESSAGE_BYTES: usize = 4096;
const CUT_MARK: &str = "...";

thread_local! {
    static LINE_BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `[<unix ms>] Error <code>: <message>\n`; control characters become spaces so that one
/// record is always one line, and an oversized message is cut.
pub fn format_line(unix_ms: u64, code: i32, message: &str) -> String {
    let mut line = String::with_capacity(32 + message.len().min(MAX_MESSAGE_BYTES));
    write_line(&mut line, unix_ms, code, message);
    line
}

/// Calls `f` with the line of a record, built in a per-thread buffer: no allocation on the
/// hot path of [`super::ErrorLog::append`].
pub(super) fn with_line<R>(
    unix_ms: u64,
    code: i32,
    message: &str,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    LINE_BUFFER.with(|buffer| {
        let mut line = buffer.borrow_mut();
        line.clear();
        write_line(&mut line, unix_ms, code, message);
        f(line.as_bytes())
    })
}

fn write_line(line: &mut String, unix_ms: u64, code: i32, message: &str) {
    use std::fmt::Write as _;
    let _ = write!(line, "[{unix_ms}] Error {code}: ");
    line.push_str(&sanitize_message(message));
    line.push('\n');
}

/// One line of text of at most `MAX_MESSAGE_BYTES`: control characters become spaces, the
/// end is cut (with "..."). Applying it twice changes nothing. Borrows when the message is
/// already clean (the common case). Secrets must be redacted *before* this, on the raw text.
pub fn sanitize_message(message: &str) -> Cow<'_, str> {
    if message.len() <= MAX_MESSAGE_BYTES
        && !message.bytes().any(|b| b.is_ascii_control() || b >= 0x80)
    {
        return Cow::Borrowed(message);
    }
    let fits = message.len() <= MAX_MESSAGE_BYTES;
    if fits && !message.chars().any(char::is_control) {
        return Cow::Borrowed(message);
    }
    let budget = if fits {
        MAX_MESSAGE_BYTES
    } else {
        MAX_MESSAGE_BYTES - CUT_MARK.len()
    };
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE_BYTES));
    for ch in message.chars() {
        if out.len() + ch.len_utf8() > budget {
            break;
        }
        out.push(if ch.is_control() { ' ' } else { ch });
    }
    if !fits {
        out.push_str(CUT_MARK);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_contract_format() {
        assert_eq!(
            format_line(17, -6, "Network error"),
            "[17] Error -6: Network error\n"
        );
        assert_eq!(format_line(1, -1, "a\nb\rc"), "[1] Error -1: a b c\n");
        let long = "x".repeat(10_000);
        let line = format_line(1, -1, &long);
        assert!(line.len() < 4200 && line.ends_with("...\n"));
    }

    #[test]
    fn sanitizing_bounds_the_message_and_is_idempotent() {
        for len in [4095, 4096, 4097, 10_000] {
            let text = format!("{}\t{}", "é".repeat(len / 2), "x".repeat(len / 2));
            let once = sanitize_message(&text).into_owned();
            assert!(once.len() <= MAX_MESSAGE_BYTES, "{len}: {}", once.len());
            assert!(!once.contains('\t'));
            assert_eq!(sanitize_message(&once), once);
        }
    }
}
