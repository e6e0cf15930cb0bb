//! The one error of loading the files users write: cards, rule tables, topic specs, workflows,
//! schema files. It names the file and, when the file is readable, the field and what is allowed.

use std::path::PathBuf;

/// A file that could not be read, or whose content is not valid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file failed to parse or validate.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong: the field and what is allowed.
        message: String,
    },
}

/// Result type of loading files.
pub type Result<T, E = Error> = std::result::Result<T, E>;
