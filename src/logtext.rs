//! Peer-controlled text in logs and audit records.
//!
//! Owns: [`Clean`], the one way a string that came from a peer (an AE title, a path, a query
//! value, a token claim) is written to a log line: control characters and everything outside
//! printable ASCII are escaped, so no value can start a forged line or hide in terminal escape
//! sequences, and its length is bounded. Must not know where the text came from.

use std::fmt;

/// The most characters of one value written to a log line.
const MAX_CHARS: usize = 256;

/// Displays a peer-controlled string escaped (`\n`, `\u{1b}` ...) and cut to a bounded length.
pub(crate) struct Clean<'a>(pub &'a str);

impl fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_CHARS {
                return f.write_str("...");
            }
            // `"` too: a value is written inside quotes, so it cannot close them and forge
            // the fields after it.
            if (' '..='~').contains(&c) && c != '\\' && c != '"' {
                fmt::Write::write_char(f, c)?;
            } else {
                write!(f, "{}", c.escape_default())?;
            }
        }
        Ok(())
    }
}

/// Whether log lines are JSON objects (`--log-format json`), which quote and escape values
/// themselves.
static JSON_LINES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Log lines are JSON from now on: [`Clean`]'s `Debug` form no longer adds its own quotes.
pub fn set_json_lines(on: bool) {
    JSON_LINES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Quoted in text lines, so that a value with spaces is one field; bare in JSON lines, where
/// the JSON string is the quoting.
impl fmt::Debug for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if JSON_LINES.load(std::sync::atomic::Ordering::Relaxed) {
            write!(f, "{self}")
        } else {
            write!(f, "\"{self}\"")
        }
    }
}

/// [`Clean`] as an owned string, for records built from several values.
pub(crate) fn clean(s: &str) -> String {
    Clean(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_can_break_a_line() {
        assert_eq!(clean("CLIENT"), "CLIENT");
        assert_eq!(
            clean("A\nassoc=1 outcome=allowed"),
            "A\\nassoc=1 outcome=allowed"
        );
        assert_eq!(clean("\u{1b}[31mX\r"), "\\u{1b}[31mX\\r");
        assert_eq!(clean("a\\b"), "a\\\\b");
        assert_eq!(clean("x\" patient=\"B"), "x\\\" patient=\\\"B");
        assert_eq!(clean("é"), "\\u{e9}");
        assert!(clean(&"x".repeat(1000)).len() < 300);
    }
}
