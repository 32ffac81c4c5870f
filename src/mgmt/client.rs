//! A small HTTP/1.1 client for management sockets (used by `kata-runtime` and kata-monitor).
//!
//! One request per connection, the whole exchange under one deadline, the body size capped.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::paths::SocketAddress;

/// Largest body we read from a shim (a busy sandbox's metrics are well under 1 MiB).
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {address}: {source}")]
    Http {
        address: String,
        source: hyper::Error,
    },
    #[error("HTTP exchange with {address}: building the request for {path:?}: {source}")]
    Request {
        address: String,
        path: String,
        source: hyper::http::Error,
    },
    #[error("HTTP exchange with {address}: {source}")]
    Body {
        address: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("HTTP exchange with {address}: invalid gzip body: {source}")]
    Gzip {
        address: String,
        source: std::io::Error,
    },
    #[error("no complete answer from {address} within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("the answer from {address} is larger than {limit} bytes")]
    TooLarge { address: String, limit: usize },
}

impl ClientError {
    /// True when nothing listens at the address (no such sandbox, or a stale socket file).
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct GetOptions {
    pub timeout: Duration,
    pub max_body: usize,
    /// Ask for gzip (and decompress it).
    pub gzip: bool,
}

impl Default for GetOptions {
    fn default() -> Self {
        GetOptions {
            timeout: Duration::from_secs(10),
            max_body: DEFAULT_MAX_BODY,
            gzip: false,
        }
    }
}

/// `GET path_and_query` on a management socket.
pub async fn get(
    address: &SocketAddress,
    path_and_query: &str,
    options: &GetOptions,
) -> Result<HttpResponse, ClientError> {
    match tokio::time::timeout(
        options.timeout,
        get_unbounded(address, path_and_query, options),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout {
            address: address.to_string(),
            timeout: options.timeout,
        }),
    }
}

async fn get_unbounded(
    address: &SocketAddress,
    path_and_query: &str,
    options: &GetOptions,
) -> Result<HttpResponse, ClientError> {
    let http_err = |source| ClientError::Http {
        address: address.to_string(),
        source,
    };
    let stream = UnixStream::connect(address.to_socket_path())
        .await
        .map_err(|source| ClientError::Connect {
            address: address.to_string(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    let driver = tokio::spawn(connection);

    let mut request = Request::get(path_and_query)
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request {
            address: address.to_string(),
            path: path_and_query.to_string(),
            source,
        })?;
    request
        .headers_mut()
        .insert(HOST, HeaderValue::from_static("localhost"));
    if options.gzip {
        request
            .headers_mut()
            .insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let response = sender.send_request(request).await.map_err(http_err)?;
    let status = response.status();
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let gzipped = header(CONTENT_ENCODING).is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let body = Limited::new(response.into_body(), options.max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ClientError::TooLarge {
                    address: address.to_string(),
                    limit: options.max_body,
                }
            } else {
                ClientError::Body {
                    address: address.to_string(),
                    source: e,
                }
            }
        })?
        .to_bytes();
    driver.abort();
    let body = if gzipped {
        gunzip(&body, options.max_body).map_err(|what| match what {
            GunzipError::TooLarge => ClientError::TooLarge {
                address: address.to_string(),
                limit: options.max_body,
            },
            GunzipError::Invalid(source) => ClientError::Gzip {
                address: address.to_string(),
                source,
            },
        })?
    } else {
        body
    };
    Ok(HttpResponse { status, body })
}

enum GunzipError {
    TooLarge,
    Invalid(std::io::Error),
}

fn gunzip(data: &[u8], limit: usize) -> Result<Bytes, GunzipError> {
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(data);
    // One byte over the limit tells "too large" apart from "exactly at the limit".
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(GunzipError::Invalid)?;
    if out.len() > limit {
        return Err(GunzipError::TooLarge);
    }
    Ok(Bytes::from(out))
}
