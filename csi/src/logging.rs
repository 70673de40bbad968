//! Log setup shared by the binaries: text for people, JSON for log pipelines; level from
//! RUST_LOG (default info). Secrets never reach these logs: requests are logged only through
//! [`crate::redact`].

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log-format: {0:?} is not one of text, json")]
    Format(String),
    #[error("installing the log subscriber: {0}")]
    Init(String),
}

pub fn init(format: &str) -> Result<(), LogError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: in a pod log, a journal or a file they
        // are noise that breaks grep.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        "text" => builder
            .try_init()
            .map_err(|e| LogError::Init(e.to_string())),
        "json" => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
            .map_err(|e| LogError::Init(e.to_string())),
        other => Err(LogError::Format(other.to_string())),
    }
}
