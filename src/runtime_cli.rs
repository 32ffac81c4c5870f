//! `kata-runtime` subcommands.

use std::path::PathBuf;
use std::time::Duration;

use hyper::StatusCode;

use crate::mgmt::client::{self, ClientError, GetOptions};
use crate::mgmt::paths::{self, SocketAddress};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Kata's wording, which scripts look for.
    #[error("Container ID ({0}) does not exist")]
    NoSuchSandbox(String),
    #[error(transparent)]
    InvalidId(#[from] paths::IdError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the shim at {address} answered {status}: {body}")]
    Status {
        address: String,
        status: StatusCode,
        body: String,
    },
}

/// Where `metrics` looks for the sandbox.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub run_dirs: Vec<PathBuf>,
    /// The containerd namespace of the abstract socket; looked up in /proc/net/unix when absent.
    pub namespace: Option<String>,
}

impl Default for Lookup {
    fn default() -> Self {
        Lookup {
            run_dirs: paths::default_client_run_dirs(),
            namespace: None,
        }
    }
}

/// `kata-runtime metrics <id>`: the shim's `/metrics` body.
pub async fn metrics(id: &str, lookup: &Lookup, timeout: Duration) -> Result<Vec<u8>, CliError> {
    let response = get_from_sandbox(id, lookup, "/metrics", timeout).await?;
    Ok(response.to_vec())
}

/// GETs `path` from the first of the sandbox's sockets that answers.
pub(crate) async fn get_from_sandbox(
    id: &str,
    lookup: &Lookup,
    path: &str,
    timeout: Duration,
) -> Result<bytes::Bytes, CliError> {
    paths::validate_id(id)?;
    let options = GetOptions {
        timeout,
        ..GetOptions::default()
    };
    for address in paths::candidate_sockets(id, &lookup.run_dirs, lookup.namespace.as_deref()) {
        match client::get(&address, path, &options).await {
            Ok(response) if response.status == StatusCode::OK => return Ok(response.body),
            Ok(response) => return Err(status_error(&address, response)),
            // A stale socket file (its shim is gone): the sandbox may still answer elsewhere.
            Err(err) if err.is_not_found() => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(CliError::NoSuchSandbox(id.to_string()))
}

fn status_error(address: &SocketAddress, response: client::HttpResponse) -> CliError {
    CliError::Status {
        address: address.to_string(),
        status: response.status,
        body: String::from_utf8_lossy(&response.body)
            .trim_end()
            .to_string(),
    }
}
