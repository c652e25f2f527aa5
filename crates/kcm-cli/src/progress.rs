//! A one-line progress display on stderr for long runs (tracing, live comparison).
//!
//! Shown only when stderr is a terminal and the user did not ask for `--quiet`;
//! redrawn at most ten times a second and erased when the run ends, so nothing
//! of it reaches a log or a pipe. Colour (a dim label) only when `NO_COLOR` is
//! unset or empty (<https://no-color.org>) and `TERM` is not `dumb`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Whether diagnostics on stderr may use colour: stderr is a terminal, `NO_COLOR`
/// is unset or empty, and `TERM` is not `dumb`.
pub fn stderr_color() -> bool {
    color_allowed(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

fn color_allowed(
    terminal: bool,
    no_color: Option<&std::ffi::OsStr>,
    term: Option<&std::ffi::OsStr>,
) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty()) && term.is_none_or(|t| t != "dumb")
}

/// What the display shows; the caller updates the counters it knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Decode steps finished.
    pub steps: u32,
    /// Tokens decoded so far (prompt and generated).
    pub tokens: u64,
    /// Tokens the run will decode (prompt + -n), 0 when unknown.
    pub tokens_total: u64,
    /// Trace bytes written so far (0: not saving).
    pub bytes_written: u64,
}

pub struct Progress {
    label: &'static str,
    enabled: bool,
    color: bool,
    start: Instant,
    last: Option<Instant>,
    drawn: bool,
}

impl Progress {
    /// `quiet`: never show anything.
    pub fn new(label: &'static str, quiet: bool) -> Progress {
        let enabled = !quiet && std::io::stderr().is_terminal();
        Progress {
            label,
            enabled,
            color: enabled && stderr_color(),
            start: Instant::now(),
            last: None,
            drawn: false,
        }
    }

    /// A display that never draws (tests, benchmarks, library use).
    pub fn hidden() -> Progress {
        Progress::new("", true)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Redraws the line, at most every 100 ms.
    pub fn update(&mut self, c: Counters) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let line = render(c, now.duration_since(self.start));
        let label = if self.color {
            format!("\x1b[2m{}\x1b[0m", self.label)
        } else {
            self.label.to_owned()
        };
        let mut err = std::io::stderr().lock();
        // \r + erase line: the display is one line, rewritten in place.
        let _ = write!(err, "\r\x1b[2K{label}: {line}");
        let _ = err.flush();
        self.drawn = true;
    }

    /// Erases the line so that what follows starts on a clean line.
    pub fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The text of the line, e.g. `step 12 · 45/68 tokens · 3.2 MB written · 1.4 s`.
pub fn render(c: Counters, elapsed: Duration) -> String {
    let mut parts = vec![format!("step {}", c.steps)];
    parts.push(if c.tokens_total > 0 {
        format!("{}/{} tokens", c.tokens, c.tokens_total)
    } else {
        format!("{} tokens", c.tokens)
    });
    if c.bytes_written > 0 {
        parts.push(format!("{:.1} MB written", c.bytes_written as f64 / 1e6));
    }
    parts.push(format!("{:.1} s", elapsed.as_secs_f64()));
    parts.join(" · ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn render_shows_what_is_known() {
        let c = Counters {
            steps: 12,
            tokens: 45,
            tokens_total: 68,
            bytes_written: 3_200_000,
        };
        assert_eq!(
            render(c, Duration::from_millis(1400)),
            "step 12 · 45/68 tokens · 3.2 MB written · 1.4 s"
        );
        let c = Counters {
            steps: 1,
            tokens: 5,
            ..Counters::default()
        };
        assert_eq!(render(c, Duration::ZERO), "step 1 · 5 tokens · 0.0 s");
    }

    #[test]
    fn no_color_and_dumb_terminals_turn_colour_off() {
        assert!(color_allowed(true, None, Some(OsStr::new("xterm"))));
        assert!(color_allowed(true, Some(OsStr::new("")), None));
        assert!(!color_allowed(true, Some(OsStr::new("1")), None));
        assert!(!color_allowed(true, None, Some(OsStr::new("dumb"))));
        assert!(!color_allowed(false, None, None));
    }

    #[test]
    fn quiet_or_not_a_terminal_draws_nothing() {
        // Under `cargo test` stderr is captured (not a terminal), so even a
        // non-quiet display stays off; quiet is always off.
        assert!(!Progress::new("x", true).enabled());
        let mut p = Progress::hidden();
        p.update(Counters::default());
        assert!(!p.drawn);
    }
}
