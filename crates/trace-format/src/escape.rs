//! Output hygiene: every string taken from a file (a tensor name, a model path, an op
//! name, a metadata string) goes through [`escape`] before it reaches a terminal, so that
//! a newline cannot split a one-line message and an ANSI escape cannot drive the
//! terminal.

use std::borrow::Cow;

/// Whether `c` must be shown escaped: control characters (C0, DEL, C1), the Unicode
/// bidirectional
/// overrides and isolates (which reorder what a terminal shows) and the Unicode line and
/// paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}')
}

/// `s` with control characters shown escaped: `\n`, `\r`, `\t`, and `\u{1b}` style for the
/// others. Borrowed when nothing needs escaping (the usual case). Idempotent (a backslash
/// is left as it is), so a message built from escaped parts can be escaped again whole.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(escape("kqv_out-0"), "kqv_out-0");
        assert!(matches!(escape("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(escape("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(escape("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(escape("x\\n"), "x\\n");
        let once = escape("a\n\u{1b}b").into_owned();
        assert_eq!(escape(&once), once);
        assert_eq!(escape("\u{7f}\u{85}\u{202e}"), "\\u{7f}\\u{85}\\u{202e}");
        assert_eq!(escape("naïve ü"), "naïve ü");
        for s in ["a\nb", "\u{1b}]0;title\u{7}", "x\u{2028}y"] {
            assert!(!escape(s).contains(['\n', '\u{1b}', '\u{7}']), "{s:?}");
        }
    }
}
