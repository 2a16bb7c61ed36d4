//! Why a node could not start, and whose fault it is (the exit code follows it).

use crate::ops::config::NodeConfig;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The operator's input is at fault (exit 2): config file, key and problem.
    #[error("config {file}: key `{key}`: {problem}")]
    Input {
        /// The config file.
        file: String,
        /// The key at fault.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// The system failed (exit 1): a socket, the store, Raft.
    #[error("{0}")]
    System(String),
}

impl StartError {
    pub(super) fn input(cfg: &NodeConfig, key: &str, problem: impl std::fmt::Display) -> Self {
        StartError::Input {
            file: cfg.source.display().to_string(),
            key: key.to_string(),
            problem: problem.to_string(),
        }
    }
    pub(super) fn system(problem: impl std::fmt::Display) -> Self {
        StartError::System(problem.to_string())
    }
    /// Whether the operator's input is at fault (exit 2) rather than the system (exit 1).
    pub fn bad_input(&self) -> bool {
        matches!(self, StartError::Input { .. })
    }
}
