//! What every tool's `main` does around its own work: turn the OS arguments into
//! strings, answer `--help` and `--version`, and map each outcome to one stderr line
//! and a documented exit code. Each tool says what its errors mean through [`Failure`].

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{self, Write};
use std::process::ExitCode;

/// Exit code of a usage error (a bad option, a missing value), the same in every tool.
pub const USAGE: u8 = 2;
/// Exit code of success, the same in every tool.
pub const OK: u8 = 0;

/// What a command line asks for.
#[derive(Debug)]
pub enum Command<O> {
    Run(O),
    Help,
    Version,
}

/// A command-line argument that is not UTF-8 (the monitor and the analyzer pass their
/// arguments to llama.cpp as C strings, and every option they own is text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("argument {position} is not valid UTF-8: {lossy:?}")]
pub struct NotUtf8 {
    /// 1-based, as a user counts arguments after the program name.
    pub position: usize,
    /// The argument with invalid sequences replaced, for the message.
    pub lossy: String,
}

/// The arguments as strings; the first one that is not UTF-8 is an error.
pub fn utf8_args(args: Vec<OsString>) -> Result<Vec<String>, NotUtf8> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            a.into_string().map_err(|a| NotUtf8 {
                position: i + 1,
                lossy: a.to_string_lossy().into_owned(),
            })
        })
        .collect()
}

/// How a tool's error ends the process.
pub trait Failure: Display {
    /// The documented exit code of this error.
    fn exit_code(&self) -> u8;
    /// A usage error: the line ends with "(try --help)".
    fn is_usage(&self) -> bool {
        false
    }
    /// Whether this is the reader closing our stdout (`tool ... | head`): that is how a
    /// reader says "enough", so the process ends quietly with exit 0.
    fn is_closed_pipe(&self) -> bool {
        false
    }
}

/// Whether an I/O error is a closed pipe, by kind.
pub fn is_broken_pipe(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// A tool's name, usage text and version, and the `main` around its work.
#[derive(Clone, Copy, Debug)]
pub struct Tool {
    pub name: &'static str,
    pub usage: &'static str,
    /// The crate version (`env!("CARGO_PKG_VERSION")` of the binary's crate).
    pub version: &'static str,
}

impl Tool {
    /// Parse the arguments, answer help and version, report a usage error, or run.
    pub fn main<O, E: Display>(
        &self,
        args: Vec<OsString>,
        parse: impl FnOnce(Vec<OsString>) -> Result<Command<O>, E>,
        run: impl FnOnce(O) -> ExitCode,
    ) -> ExitCode {
        match parse(args) {
            Ok(Command::Run(o)) => run(o),
            Ok(Command::Help) => print_quietly(self.usage),
            Ok(Command::Version) => print_quietly(&format!(
                "{} {} ({})\n{}\n",
                self.name,
                self.version,
                ggml_trace::llama_version(),
                ggml_trace::tree_summary()
            )),
            Err(e) => self.usage_error(e),
        }
    }

    /// One usage-error line on stderr, exit 2.
    pub fn usage_error(&self, e: impl Display) -> ExitCode {
        eprintln!("{}: {e} (try --help)", self.name);
        ExitCode::from(USAGE)
    }

    /// One error line on stderr, the given exit code.
    pub fn fail(&self, e: impl Display, code: u8) -> ExitCode {
        eprintln!("{}: {e}", self.name);
        ExitCode::from(code)
    }

    /// The exit code of a run: its own code on success, the error's line and code on
    /// failure (a closed pipe ends quietly with 0).
    pub fn exit<E: Failure>(&self, result: Result<u8, E>) -> ExitCode {
        match result {
            Ok(code) => ExitCode::from(code),
            Err(e) if e.is_closed_pipe() => ExitCode::from(OK),
            Err(e) if e.is_usage() => self.usage_error(e),
            Err(e) => self.fail(&e, e.exit_code()),
        }
    }
}

/// Print to stdout, ignoring a closed pipe (`tool --help | head -1`).
fn print_quietly(s: &str) -> ExitCode {
    let _ = io::stdout().write_all(s.as_bytes());
    ExitCode::from(OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn non_utf8_argument_is_an_error_naming_it() {
        use std::os::unix::ffi::OsStringExt;
        let args = vec![
            OsString::from("-m"),
            OsString::from_vec(vec![b'm', 0xff, b'.', b'g']),
        ];
        let e = utf8_args(args).unwrap_err();
        assert_eq!(e.position, 2);
        assert_eq!(e.lossy, "m\u{fffd}.g");
        assert_eq!(
            e.to_string(),
            "argument 2 is not valid UTF-8: \"m\u{fffd}.g\""
        );
        assert_eq!(
            utf8_args(vec!["a".into(), "b".into()]).unwrap(),
            ["a".to_string(), "b".to_string()]
        );
    }

    #[derive(Debug)]
    struct E(u8, bool, bool);
    impl Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "e{}", self.0)
        }
    }
    impl Failure for E {
        fn exit_code(&self) -> u8 {
            self.0
        }
        fn is_usage(&self) -> bool {
            self.1
        }
        fn is_closed_pipe(&self) -> bool {
            self.2
        }
    }

    #[test]
    fn exit_codes_follow_the_error() {
        let t = Tool {
            name: "t",
            usage: "",
            version: "0",
        };
        let code = |r: Result<u8, E>| format!("{:?}", t.exit(r));
        assert_eq!(code(Ok(1)), format!("{:?}", ExitCode::from(1)));
        assert_eq!(
            code(Err(E(1, false, false))),
            format!("{:?}", ExitCode::from(1))
        );
        assert_eq!(
            code(Err(E(1, true, false))),
            format!("{:?}", ExitCode::from(USAGE))
        );
        assert_eq!(
            code(Err(E(1, false, true))),
            format!("{:?}", ExitCode::from(OK))
        );
        assert!(is_broken_pipe(&io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(!is_broken_pipe(&io::Error::other("broken pipe")));
    }
}
