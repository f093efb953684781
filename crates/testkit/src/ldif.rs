//! Writing LDIF for the directories the test kit configures and seeds.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// One LDIF attribute line, base64-encoded when the value is not a SAFE-STRING (RFC 2849).
pub(crate) fn line(name: &str, value: &str) -> String {
    let safe = value
        .bytes()
        .all(|b| b.is_ascii() && b != b'\0' && b != b'\n' && b != b'\r')
        && !value.starts_with([' ', ':', '<'])
        && !value.ends_with(' ');
    if safe {
        format!("{name}: {value}\n")
    } else {
        format!("{name}:: {}\n", STANDARD.encode(value.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::line;

    #[test]
    fn values_are_encoded_when_unsafe() {
        assert_eq!(line("a", "plain value"), "a: plain value\n");
        assert_eq!(line("a", " x"), "a:: IHg=\n");
        assert_eq!(line("a", "é"), "a:: w6k=\n");
        assert_eq!(line("a", "foob "), "a:: Zm9vYiA=\n");
    }
}
