//! Why a capture stopped the run: the typed error of the capture → sink seam.

use trace_format::{LayoutError, Role};

/// An error of the capture or of its sink; the first one stops the run and reaches the
/// caller of `session::run` as `SessionError::Capture`.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The sink refused the run or failed to take a capture (its own error, shown as is).
    #[error("{0}")]
    Sink(Box<dyn std::error::Error + Send + Sync>),
    /// The sink could not write its output (`what`: e.g. "writing statistics"). A closed
    /// pipe is [`std::io::ErrorKind::BrokenPipe`] here; sinks usually go quiet instead.
    #[error("{what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A tensor's layout has no valid span (named by its ggml name).
    #[error("{tensor}: {source}")]
    Layout {
        tensor: String,
        #[source]
        source: LayoutError,
    },
    /// Gathering a tensor's bytes into logical order failed.
    #[error("{0}")]
    Gather(#[from] LayoutError),
    /// A node to read has no data (not allocated, or in no buffer).
    #[error("{tensor}: tensor has no data")]
    NoData { tensor: String },
    /// The mixed attention node lacks one of its six sources.
    #[error("mixed attention node (layer {layer}): source {index} ({role}) is missing")]
    MissingSource {
        layer: i32,
        index: usize,
        role: Role,
    },
    /// `kqv_out-<layer>` ran but no traced attention op feeds it.
    #[error("kqv_out-{layer} (step {step}): no traced attention op feeds it (is this architecture's attention supported?)")]
    Unbound { layer: i32, step: u32 },
    /// A callback's Rust code (the capture's or the sink's) panicked; the panic was
    /// caught at the C boundary and the run stopped.
    #[error("a callback panicked: {0}")]
    Panicked(String),
}

impl CaptureError {
    /// A sink's own error.
    pub fn sink(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CaptureError {
        CaptureError::Sink(e.into())
    }

    /// The I/O error underneath, if any (to tell a closed pipe by its kind).
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            CaptureError::Write { source, .. } => Some(source),
            CaptureError::Sink(e) => e.downcast_ref::<std::io::Error>(),
            _ => None,
        }
    }

    /// The reader of the sink's output went away (`| head`).
    pub fn is_broken_pipe(&self) -> bool {
        self.io_error()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The message of a caught panic's payload.
    pub fn from_panic(payload: Box<dyn std::any::Any + Send>) -> CaptureError {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        CaptureError::Panicked(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_the_seams_old_strings() {
        let e = CaptureError::MissingSource {
            layer: 3,
            index: 4,
            role: Role::VQuant,
        };
        assert_eq!(
            e.to_string(),
            format!(
                "mixed attention node (layer 3): source 4 ({}) is missing",
                Role::VQuant
            )
        );
        let e = CaptureError::Unbound { layer: 2, step: 7 };
        assert_eq!(
            e.to_string(),
            "kqv_out-2 (step 7): no traced attention op feeds it (is this architecture's attention supported?)"
        );
        let e = CaptureError::NoData { tensor: "q".into() };
        assert_eq!(e.to_string(), "q: tensor has no data");
        assert_eq!(CaptureError::sink("refused").to_string(), "refused");
    }

    #[test]
    fn broken_pipes_are_told_by_kind() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let e = CaptureError::Write {
            what: "writing statistics",
            source: pipe(),
        };
        assert!(e.is_broken_pipe());
        assert!(e.to_string().starts_with("writing statistics: "));
        assert!(CaptureError::sink(pipe()).is_broken_pipe());
        // The text alone does not make a broken pipe.
        assert!(!CaptureError::sink("Broken pipe (os error 32)").is_broken_pipe());
        let other = CaptureError::Write {
            what: "writing statistics",
            source: std::io::Error::other("disk full"),
        };
        assert!(!other.is_broken_pipe());
    }

    #[test]
    fn panic_payloads() {
        let e = CaptureError::from_panic(Box::new("boom"));
        assert_eq!(e.to_string(), "a callback panicked: boom");
        let e = CaptureError::from_panic(Box::new(String::from("at step 1")));
        assert!(matches!(e, CaptureError::Panicked(ref m) if m == "at step 1"));
        let e = CaptureError::from_panic(Box::new(42));
        assert!(matches!(e, CaptureError::Panicked(_)));
    }
}
