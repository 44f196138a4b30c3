//! The crate's errors: a malformed debug folder, batch, data directory or
//! checkpoint, a file that cannot be read or written, or a model the
//! `llama2` library refused. Every failure is an error value, never a panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A debug folder that is missing a file or whose contents do not fit.
    #[error("{}: {message}", path.display())]
    Folder { path: PathBuf, message: String },
    /// Inputs that do not fit the model (token ids, batch shape).
    #[error("{0}")]
    Invalid(String),
    /// A file or directory that could not be read or written.
    /// (The io error is part of the message, not a `source`, so the CLI's
    /// error chain prints it once.)
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The model file, as the `llama2` library reports it.
    #[error(transparent)]
    Model(#[from] llama2::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    pub fn folder(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Folder {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
