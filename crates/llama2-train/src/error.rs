//! The crate's errors: a malformed debug folder or batch, or a model the
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
    /// The model file, as the `llama2` library reports it.
    #[error(transparent)]
    Model(#[from] llama2::Error),
}

impl Error {
    pub fn folder(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Folder {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
