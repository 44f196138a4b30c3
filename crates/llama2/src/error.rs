//! The library's error type. Every failure a user can cause (a bad file, a bad
//! flag value, a prompt that does not fit) is a variant here with a message
//! that says what was expected, what was found, and what to do; the library
//! never panics on input.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The OS cause is the error's source, not part of its text: printing
    // the chain (as the CLI does) shows it once.
    #[error("cannot open {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file that is not one we can read: a directory, a FIFO, too large.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },

    #[error("{path}: not a valid checkpoint: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("{path}: not a valid tokenizer for this model: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("invalid model configuration: {0}")]
    Config(String),

    #[error(
        "the prompt is {tokens} tokens long but the model's context holds {context}: shorten it"
    )]
    PromptTooLong { tokens: usize, context: usize },

    #[error("{0}")]
    Invalid(String),

    /// An allocation the input asks for that this machine cannot make.
    #[error("not enough memory: {0}")]
    Memory(String),

    /// NaN or infinity where the model must have finite numbers.
    #[error("{0}")]
    NonFinite(String),

    /// Writing generated text failed (a closed pipe, a full disk).
    #[error("cannot write output")]
    Output(#[from] std::io::Error),

    #[error("backend error: {0}")]
    Backend(String),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A checkpoint problem found while reading `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The same error, said of the weight `name` (for values a weight
    /// cannot hold; other errors are returned as they are).
    pub fn in_weight(self, name: &str) -> Self {
        match self {
            Error::NonFinite(msg) => Error::NonFinite(format!("weight {name}: {msg}")),
            other => other,
        }
    }

    /// A tokenizer problem found while reading `path`.
    pub fn tokenizer(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Tokenizer {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
