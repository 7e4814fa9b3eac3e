//! adpipe on a laptop: a local AWS-compatible endpoint, provisioning, a seeded traffic generator
//! and JSONL replay, a runner that drives the real Lambda handlers the way Lambda's Kinesis
//! event source mapping does, and the lake's queries, Parquet export and CTR chart.
//!
//! The pure parts ([`generator`], [`esm`], [`chart`], parts of [`replay`] and [`runner`]) have
//! unit tests without I/O; the binary `adpipe` puts the pieces together, on the command line of [`cli`].

pub mod athena;
pub mod chart;
pub mod cli;
pub mod endpoint;
pub mod esm;
pub mod events;
pub mod functions;
pub mod generator;
pub mod lake;
pub mod latency;
pub mod pipeline;
pub mod progress;
pub mod provision;
pub mod redrive;
pub mod replay;
pub mod resources;
pub mod runner;
pub mod stack;
pub mod status;
pub mod stream_read;

use aws_smithy_types::error::display::DisplayErrorContext;

/// Everything that can go wrong in the local tooling.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A local file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The local endpoint could not be started or reached.
    #[error("local endpoint: {0}")]
    Endpoint(String),
    /// A request to the local endpoint failed.
    #[error("{operation} failed: {detail}")]
    Aws {
        operation: &'static str,
        detail: String,
    },
    /// A helper program (venv script, `tools/lake_check.py`) failed.
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error(transparent)]
    Traffic(#[from] generator::InvalidTraffic),
    #[error(transparent)]
    Settings(#[from] esm::InvalidSetting),
    #[error(transparent)]
    Config(#[from] adpipe_core::config::ConfigError),
    /// A function could not be set up (its init code failed).
    #[error("function setup: {0}")]
    Function(#[from] adpipe_core::ports::PortError),
    /// Data that should be JSON was not.
    #[error("{context}: {source}")]
    Json {
        context: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Records were sent but some were still refused after every retry.
    #[error("{stream}: {refused} records still refused after {attempts} attempts")]
    NotAccepted {
        stream: String,
        refused: usize,
        attempts: u32,
    },
    /// A shard could not be read or a discarded batch could not be recorded.
    #[error("runner: {0}")]
    Runner(String),
    /// A deployed stack is missing or lacks an output the commands need.
    #[error("stack: {0}")]
    Stack(String),
}

impl LocalError {
    /// An `Io` error with context, for `map_err`.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> LocalError {
        move |source| LocalError::Io { context, source }
    }

    /// A `Json` error with context, for `map_err`.
    pub fn json(context: &'static str) -> impl FnOnce(serde_json::Error) -> LocalError {
        move |source| LocalError::Json { context, source }
    }

    /// An SDK error with its whole cause chain.
    pub fn aws(operation: &'static str, e: impl std::error::Error) -> LocalError {
        LocalError::Aws {
            operation,
            detail: DisplayErrorContext(e).to_string(),
        }
    }

    /// Whether trying again may help (the endpoint was busy or unreachable).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            LocalError::Aws { .. } | LocalError::Endpoint(_) | LocalError::NotAccepted { .. }
        )
    }
}
