//! Hex text of arbitrary bytes: keys and task names are stored this way, so that any byte
//! content is safe in a line-oriented record.

use std::fmt::Write as _;

pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `None` unless `text` is an even number of hex digits.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        assert_eq!(hex(b"\x00\xffA"), "00ff41");
        assert_eq!(unhex("00ff41").unwrap(), b"\x00\xffA");
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
