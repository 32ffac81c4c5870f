//! The shim management server: HTTP/1.1 on the sandbox's file socket and abstract socket.
//!
//! Both listeners serve one router: `GET /metrics`, `GET /metrics/cadvisor`, `GET /agent-url` and
//! `GET /pod-labels`, one
//! request per connection. The abstract socket checks each peer right after accept ([`PeerPolicy`]);
//! a refused peer gets its 403 at once, holding no slot and no request buffer, never a silent drop.
//! Both listeners share one budget of connections ([`Admission`]): idle clients are closed after the
//! head deadline or pushed out by newer ones, so they cannot starve real scrapes.

use std::convert::Infallible;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::admission::{
    plain_response, turn_away, Admission, HeadArrived, Limits, Lingering, Rejected,
};
use super::paths::{self, SocketAddress};
use super::peer::{PeerPolicy, PeerRefused};
use super::pod::PodIdentity;
use crate::logging::LogLimiter;

/// Prometheus text format 0.0.4.
pub(crate) const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The connection budget of one server (both sockets). Clients on the same host send their request
/// head at once, so 1 s from accept to a complete head is plenty. Per-uid caps would add nothing:
/// every peer that gets this far is root or the shim's own uid.
const LIMITS: Limits = Limits {
    max_open: 256,
    max_per_peer: 256,
    head_deadline: Duration::from_secs(1),
    // Rendering is bounded by the agent deadline; this bounds a client that does not read.
    serve_deadline: Duration::from_secs(30),
};
/// Scrapes rendered at once; more wait for a turn.
const MAX_RENDERS: usize = 64;
/// Request header buffer (hyper answers 431 beyond it); our requests are one short line.
const MAX_REQUEST_BUFFER: usize = 16 * 1024;
/// At most one log line per peer uid and interval about refused or turned-away connections.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What `GET /metrics` serves: the whole body of one scrape. It must answer within its own
/// deadlines and never fail (the shim's scrape reports a missing agent inside the body).
#[async_trait::async_trait]
pub(crate) trait MetricsSource: Send + Sync {
    async fn render(&self) -> String;
}

/// What the server answers with.
pub(crate) struct MgmtState {
    pub(crate) metrics: Box<dyn MetricsSource>,
    pub(crate) agent_url: String,
    /// The pod this sandbox belongs to (served on `/pod-labels`), when the shim knows it.
    pub(crate) pod: Option<PodIdentity>,
    /// The containers' cAdvisor series (`/metrics/cadvisor`), when the shim serves them.
    pub(crate) cadvisor: Option<Box<dyn MetricsSource>>,
}

/// Where the server listens.
#[derive(Debug, Clone)]
pub(crate) struct MgmtConfig {
    pub(crate) sandbox_id: String,
    pub(crate) namespace: String,
    pub(crate) run_dir: PathBuf,
    /// Serve the Kata 2.0 abstract address as well (on by default).
    pub(crate) abstract_socket: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    #[error(transparent)]
    Id(#[from] paths::IdError),
    #[error("invalid containerd namespace {namespace:?}: {why}")]
    Namespace {
        namespace: String,
        why: &'static str,
    },
    #[error("creating the sandbox directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listening on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("reading this process's credentials for the peer check: {0}")]
    Policy(std::io::Error),
}

/// A running management server. Its sockets and sandbox directory go away on [`MgmtServer::shutdown`]
/// or when it is dropped.
pub struct MgmtServer {
    sandbox_dir: PathBuf,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl MgmtServer {
    pub(crate) async fn start(
        config: MgmtConfig,
        state: Arc<MgmtState>,
    ) -> Result<MgmtServer, MgmtError> {
        paths::validate_id(&config.sandbox_id)?;
        validate_namespace(&config.namespace)?;

        let sandbox_dir = paths::sandbox_dir(&config.run_dir, &config.sandbox_id);
        let file_socket = paths::file_socket_path(&config.run_dir, &config.sandbox_id);
        create_private_dir(&config.run_dir)?;
        create_private_dir(&sandbox_dir)?;
        // A socket left by a crashed shim of the same id would make bind fail.
        let _ = std::fs::remove_file(&file_socket);

        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            state,
            admission: Admission::new(LIMITS),
            renders: Semaphore::new(MAX_RENDERS),
            lingering: Arc::new(Lingering::default()),
            refusals: LogLimiter::new(LOG_INTERVAL),
            rejections: LogLimiter::new(LOG_INTERVAL),
            accept_errors: LogLimiter::new(LOG_INTERVAL),
        });
        let mut server = MgmtServer {
            sandbox_dir,
            stop,
            tasks: Vec::new(),
        };

        let listener = bind(&SocketAddress::File(file_socket.clone()))?;
        std::fs::set_permissions(&file_socket, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| MgmtError::Listen {
                address: file_socket.display().to_string(),
                source,
            },
        )?;
        server.tasks.push(tokio::spawn(accept_loop(
            listener,
            None,
            shared.clone(),
            stopped.clone(),
        )));

        if config.abstract_socket {
            let address = SocketAddress::Abstract(paths::abstract_socket_name(
                &config.namespace,
                &config.sandbox_id,
            ));
            let listener = bind(&address)?;
            let policy = PeerPolicy::for_this_process().map_err(MgmtError::Policy)?;
            server.tasks.push(tokio::spawn(accept_loop(
                listener,
                Some(policy),
                shared,
                stopped,
            )));
        }
        Ok(server)
    }

    /// Stops accepting, and removes the sockets and the sandbox directory.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.remove_files();
    }

    fn remove_files(&self) {
        remove_sandbox_files_at(&self.sandbox_dir);
    }
}

impl Drop for MgmtServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
        self.remove_files();
    }
}

/// Removes what a management server of `id` leaves under `run_dir` (used by `delete` after a crash).
pub(crate) fn remove_sandbox_files(run_dir: &Path, id: &str) -> Result<(), paths::IdError> {
    paths::validate_id(id)?;
    remove_sandbox_files_at(&paths::sandbox_dir(run_dir, id));
    Ok(())
}

fn remove_sandbox_files_at(sandbox_dir: &Path) {
    let _ = std::fs::remove_file(sandbox_dir.join(paths::SOCKET_NAME));
    // Only if empty: something else of the sandbox may still live there.
    let _ = std::fs::remove_dir(sandbox_dir);
}

fn validate_namespace(namespace: &str) -> Result<(), MgmtError> {
    let bad = |why| MgmtError::Namespace {
        namespace: namespace.to_string(),
        why,
    };
    if namespace.is_empty() {
        return Err(bad("it is empty"));
    }
    // containerd namespaces: letters, digits, '.', '_', '-'; never a path.
    if !namespace
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        || namespace.contains("..")
    {
        return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<(), MgmtError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| MgmtError::Dir {
            path: path.to_path_buf(),
            source,
        })
}

fn bind(address: &SocketAddress) -> Result<UnixListener, MgmtError> {
    UnixListener::bind(address.to_socket_path()).map_err(|source| MgmtError::Listen {
        address: address.to_string(),
        source,
    })
}

/// What the connections of one server share.
struct Shared {
    state: Arc<MgmtState>,
    /// Keyed by the peer's uid.
    admission: Arc<Admission<u32>>,
    renders: Semaphore,
    lingering: Arc<Lingering>,
    refusals: LogLimiter<Option<u32>>,
    rejections: LogLimiter<u32>,
    accept_errors: LogLimiter<()>,
}

async fn accept_loop(
    listener: UnixListener,
    policy: Option<PeerPolicy>,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    if let Some(suppressed) = shared.accept_errors.admit(()) {
                        tracing::warn!(error = %err, suppressed, "management server accept failed");
                    }
                    // Out of descriptors, most likely: a waiting connection gives its one back.
                    shared.admission.evict_oldest();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The peer check reads nothing from the connection, so a refused peer holds nothing.
        let uid = match &policy {
            Some(policy) => match policy.check(&stream) {
                Ok(uid) => uid,
                Err(why) => {
                    shared.refuse(stream, why);
                    continue;
                }
            },
            None => stream.peer_cred().map_or(u32::MAX, |cred| cred.uid()),
        };
        match shared.admission.admit(uid, stream.as_raw_fd()) {
            Ok(ticket) => {
                let shared = shared.clone();
                tokio::spawn(ticket.run(stream, move |stream, head| {
                    serve_connection(stream, shared, head)
                }));
            }
            Err(rejected) => shared.turn_away_busy(stream, uid, rejected),
        }
    }
}

impl Shared {
    fn refuse(&self, stream: UnixStream, why: PeerRefused) {
        if let Some(suppressed) = self.refusals.admit(why.uid()) {
            let uid = why
                .uid()
                .map_or_else(|| "unknown".to_string(), |uid| uid.to_string());
            tracing::warn!(
                %uid,
                reason = %why,
                suppressed,
                "management request refused (one line per uid a minute; suppressed: refusals since the last)"
            );
        }
        let answer = plain_response("403 Forbidden", "", &format!("forbidden: {why}\n"));
        tokio::spawn(turn_away(stream, answer, self.lingering.clone()));
    }

    fn turn_away_busy(&self, stream: UnixStream, uid: u32, why: Rejected) {
        if let Some(suppressed) = self.rejections.admit(uid) {
            tracing::warn!(
                uid,
                ?why,
                suppressed,
                "management server busy: every connection slot is being served, answered 503"
            );
        }
        let answer = plain_response(
            "503 Service Unavailable",
            "retry-after: 1\r\n",
            "too many requests in progress; try again\n",
        );
        tokio::spawn(turn_away(stream, answer, self.lingering.clone()));
    }
}

fn http_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The admission's head deadline runs from accept; this one, from the first byte, backs it.
        .header_read_timeout(LIMITS.head_deadline)
        // One request per connection: an idle keep-alive connection would hold a slot for nothing.
        .keep_alive(false)
        // A client that sends its request and shuts down its write side still gets the answer.
        .half_close(true)
        .max_buf_size(MAX_REQUEST_BUFFER);
    builder
}

async fn serve_connection(stream: UnixStream, shared: Arc<Shared>, head: HeadArrived) {
    let service = service_fn(move |req| {
        head.arrived();
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(req, &shared).await) }
    });
    if let Err(err) = http_builder()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %err, "management connection ended with an error");
    }
}

async fn route(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let state = &shared.state;
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/metrics" | "/metrics/cadvisor" | "/agent-url" | "/pod-labels" if !readable => {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed; use GET\n".to_string(),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
        "/metrics" => {
            // The semaphore is never closed, so this always waits for and holds a permit.
            let _turn = shared.renders.acquire().await.ok();
            let body = state.metrics.render().await;
            metrics_response(body, accepts_gzip(&req))
        }
        "/metrics/cadvisor" => match &state.cadvisor {
            Some(source) => {
                let _turn = shared.renders.acquire().await.ok();
                let body = source.render().await;
                metrics_response(body, accepts_gzip(&req))
            }
            None => text(
                StatusCode::NOT_FOUND,
                "this sandbox serves no cAdvisor series\n".to_string(),
            ),
        },
        "/agent-url" => text(StatusCode::OK, state.agent_url.clone()),
        "/pod-labels" => match &state.pod {
            Some(pod) => text(StatusCode::OK, pod.to_text()),
            None => text(
                StatusCode::NOT_FOUND,
                "this sandbox has no pod identity\n".to_string(),
            ),
        },
        path => text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}\n")),
    }
}

fn metrics_response(body: String, gzip: bool) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
    headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
    let body = if gzip {
        match gzip_bytes(body.as_bytes()) {
            Ok(compressed) => {
                headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                compressed
            }
            Err(err) => {
                tracing::warn!(error = %err, "gzip failed; sending plain text");
                body.into_bytes()
            }
        }
    } else {
        body.into_bytes()
    };
    *response.body_mut() = Full::new(Bytes::from(body));
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// True when the client lists gzip in Accept-Encoding without refusing it (`q=0`).
pub(crate) fn accepts_gzip<B>(req: &Request<B>) -> bool {
    accepts_gzip_in(
        req.headers()
            .get_all(ACCEPT_ENCODING)
            .iter()
            .filter_map(|value| value.to_str().ok()),
    )
}

/// Whether these `Accept-Encoding` values allow gzip (or `*`) with a quality above 0.
pub(crate) fn accepts_gzip_in<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    values.flat_map(|value| value.split(',')).any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or_default();
        let quality = parts
            .find_map(|param| param.strip_prefix("q="))
            .map_or(1.0, |q| q.trim().parse::<f32>().unwrap_or(0.0));
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && quality > 0.0
    })
}

pub(crate) fn gzip_bytes(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(data)?;
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req_with(accept: &str) -> Request<()> {
        Request::builder()
            .header(ACCEPT_ENCODING, accept)
            .body(())
            .unwrap()
    }

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip(&req_with("gzip")));
        assert!(accepts_gzip(&req_with("deflate, gzip;q=1.0, *;q=0.5")));
        assert!(accepts_gzip(&req_with("GZIP")));
        assert!(!accepts_gzip(&req_with("gzip;q=0")));
        assert!(!accepts_gzip(&req_with("identity")));
        assert!(!accepts_gzip(&Request::new(())));
    }

    #[test]
    fn namespaces_are_checked() {
        assert!(validate_namespace("k8s.io").is_ok());
        assert!(validate_namespace("default").is_ok());
        assert!(validate_namespace("a/b").is_err());
        assert!(validate_namespace("..").is_err());
        assert!(validate_namespace("").is_err());
    }
}
