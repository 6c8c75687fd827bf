//! Text from outside (task fields, URLs, policy output, server answers) made
//! safe to show: control characters never reach a terminal or a log raw,
//! where an ESC could rewrite the screen or a newline forge a log line.
//! Every message a user or a log sees goes through [`Printable`], at the
//! places that print them: the binary's error printer, [`crate::error_chain`]
//! and the one-line form of policy output.

use std::borrow::Cow;
use std::fmt;

/// Displays a string with each control character (C0, DEL, C1) escaped as
/// `\n`, `\t`, `\u{1b}`..., everything else as it is.
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(char::is_control) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("a char at a found index");
            for e in c.escape_default() {
                fmt::Write::write_char(f, e)?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// `text` with its control characters escaped; borrowed when it has none.
pub fn printable(text: &str) -> Cow<'_, str> {
    if text.contains(char::is_control) {
        Cow::Owned(Printable(text).to_string())
    } else {
        Cow::Borrowed(text)
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            printable("http://h/x\u{1b}[2J\u{7}\nHost: evil\t\u{7f}\u{9b}é"),
            "http://h/x\\u{1b}[2J\\u{7}\\nHost: evil\\t\\u{7f}\\u{9b}é"
        );
        assert!(matches!(printable("plain é"), Cow::Borrowed("plain é")));
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
