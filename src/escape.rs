//! Text from the sources, made safe to print on a terminal or in a log line.
//!
//! Consul tags and service names, Marathon labels and app ids, the services file and the
//! error bodies of either source are written by others. Printed raw, an `ESC [2J` in one
//! clears the operator's terminal, and a `\n` followed by a timestamp forges a log line.
//! [`Escaped`] prints any text with every control character (C0, DEL, C1, so `\n`, `\r`,
//! `\t` and ESC too) and every invisible Unicode format control (bidi overrides such as
//! U+202E, zero-width characters, line and paragraph separators) written as an escape, and
//! everything printable as it is.
//!
//! tracing-subscriber's fmt layer (0.3.23) escapes ESC, BEL, BS, FF, DEL and C1 in an event's
//! message only, and never `\n`: a field recorded with `%` is written raw. So source text goes
//! into log fields and CLI lines through [`Escaped`].

use std::borrow::Cow;
use std::fmt::{self, Write};

/// At most `max` bytes of `text`, cut on a character boundary, with `…` when cut: what of a
/// source's text (a name, a reason quoting it) a message keeps.
pub fn clip(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// Displays its text with control and format characters escaped (see the module docs):
/// `Escaped("a\x1b[2Jb\n")` prints `a\u{1b}[2Jb\n` (a backslash and an `n`).
#[derive(Debug, Clone, Copy)]
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter { inner: f }, "{}", self.0)
    }
}

/// Whether `ch` must not reach a terminal or a log as it is.
pub fn is_unsafe(ch: char) -> bool {
    // Cc: C0 (\0-\x1f, \n \r \t and ESC among them), DEL, C1 (\u{80}-\u{9f}, NEL and CSI).
    ch.is_control()
        || matches!(ch,
            // Soft hyphen, Arabic letter mark, Mongolian vowel separator.
            '\u{ad}' | '\u{61c}' | '\u{180e}'
            // Zero-width space, non-joiner, joiner; left-to-right and right-to-left marks.
            | '\u{200b}'..='\u{200f}'
            // Line and paragraph separators (a line break to some viewers), the bidi
            // embeddings and overrides (U+202E, RIGHT-TO-LEFT OVERRIDE, reverses what follows).
            | '\u{2028}'..='\u{202e}'
            // Word joiner, invisible operators, bidi isolates, deprecated format characters.
            | '\u{2060}'..='\u{206f}'
            // Byte order mark (zero-width no-break space), interlinear annotations.
            | '\u{feff}' | '\u{fff9}'..='\u{fffb}'
            // Tag characters (invisible).
            | '\u{e0000}'..='\u{e007f}')
}

/// Passes text through to `inner`, escaping what [`is_unsafe`] names.
struct EscapingWriter<'a, 'b> {
    inner: &'a mut fmt::Formatter<'b>,
}

impl Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut clean = 0;
        for (at, ch) in s.char_indices() {
            if !is_unsafe(ch) {
                continue;
            }
            self.inner.write_str(&s[clean..at])?;
            match ch {
                '\n' => self.inner.write_str("\\n")?,
                '\r' => self.inner.write_str("\\r")?,
                '\t' => self.inner.write_str("\\t")?,
                other => write!(self.inner, "\\u{{{:x}}}", u32::from(other))?,
            }
            clean = at + ch.len_utf8();
        }
        self.inner.write_str(&s[clean..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_on_a_character_boundary() {
        assert_eq!(clip("héllo", 2), "h…");
        assert_eq!(clip("héllo", 3), "hé…");
        assert_eq!(clip("hi", 2), "hi");
    }

    fn escaped(text: &str) -> String {
        Escaped(text).to_string()
    }

    #[test]
    fn printable_text_stays_as_it_is() {
        for text in [
            "",
            "shop.example.com",
            "service \"shop\" tag \"weft.host=x\"",
            "a\\nb \\u{1b}",
            "Grüße, 東京, emoji 🚀, Ελλάδα, עברית",
        ] {
            assert_eq!(escaped(text), text);
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escaped("a\x1b[31mred\x1b[0m"), "a\\u{1b}[31mred\\u{1b}[0m");
        assert_eq!(escaped("\x1b[2J"), "\\u{1b}[2J");
        assert_eq!(
            escaped("bad\n2026-01-01T00:00:00Z  INFO forged"),
            "bad\\n2026-01-01T00:00:00Z  INFO forged"
        );
        assert_eq!(escaped("a\rb\tc"), "a\\rb\\tc");
        assert_eq!(
            escaped("\0\x07\x08\x0c\x7f"),
            "\\u{0}\\u{7}\\u{8}\\u{c}\\u{7f}"
        );
        // C1: CSI (an ESC [ in one byte to some terminals) and NEL (a line break).
        assert_eq!(escaped("\u{9b}2J\u{85}"), "\\u{9b}2J\\u{85}");
    }

    #[test]
    fn unicode_format_controls_are_escaped() {
        assert_eq!(escaped("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(
            escaped("\u{200b}\u{200d}\u{2028}\u{2029}\u{2066}\u{2069}\u{feff}\u{e0041}"),
            "\\u{200b}\\u{200d}\\u{2028}\\u{2029}\\u{2066}\\u{2069}\\u{feff}\\u{e0041}"
        );
    }

    #[test]
    fn wraps_any_display_and_keeps_one_line() {
        let error = std::io::Error::other("body: \"oops\n\x1b]0;title\x07\"");
        let line = format!("{}", Escaped(&error));
        assert_eq!(line, "body: \"oops\\n\\u{1b}]0;title\\u{7}\"");
        assert!(!line.chars().any(is_unsafe));
    }
}
