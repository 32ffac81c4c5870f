//! kata-monitor's HTTP endpoints: `/metrics`, `/metrics/cadvisor`, `/sandboxes`, `/agent-url`, `/`
//! (hyper, HTTP/1.1).
//! Which connections get to ask is `listener.rs`'s business.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::render::{FamilyFilter, Format};
use super::scrape::Endpoint;
use super::{Monitor, ScrapeRequest};
use crate::mgmt::client::{self, GetOptions};
use crate::mgmt::paths;
use crate::mgmt::server::accepts_gzip;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// `/metrics` answers in progress at once (each scrapes every sandbox and streams its answer).
const MAX_SCRAPES: usize = 64;

/// What the endpoints answer from.
pub(crate) struct Endpoints {
    pub(crate) monitor: Arc<Monitor>,
    /// Held by a `/metrics` answer until its last byte is sent or the client left.
    scrapes: Arc<Semaphore>,
}

impl Endpoints {
    pub(crate) fn new(monitor: Arc<Monitor>) -> Self {
        Endpoints {
            monitor,
            scrapes: Arc::new(Semaphore::new(MAX_SCRAPES)),
        }
    }
}

pub(crate) async fn route(req: Request<Incoming>, server: &Endpoints) -> Response<Body> {
    let monitor = &server.monitor;
    let path = req.uri().path().to_string();
    let known = matches!(
        path.as_str(),
        "/" | "/metrics" | "/metrics/cadvisor" | "/sandboxes" | "/agent-url"
    );
    if !known {
        return text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}\n"));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use GET\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let query = Query::parse(req.uri().query().unwrap_or_default());
    match path.as_str() {
        "/metrics" => metrics(&req, &query, server, Endpoint::Metrics).await,
        "/metrics/cadvisor" => metrics(&req, &query, server, Endpoint::Cadvisor).await,
        "/sandboxes" => sandboxes(&req, monitor),
        "/agent-url" => agent_url(&query, monitor).await,
        _ => text(StatusCode::OK, INDEX.to_string()),
    }
}

const INDEX: &str = "kata-monitor: one Prometheus target for every Kata sandbox on this node\n\n\
/metrics                    every sandbox's metrics, labelled (?filter_family=prefix,...  ?sandbox=<id>)\n\
/metrics/cadvisor           cAdvisor's container_* series for every container of every VM pod, as kubelet labels them\n\
/sandboxes                  the sandboxes found, one id per line\n\
/agent-url?sandbox=<id>     the agent URL of a sandbox\n";

async fn metrics(
    req: &Request<Incoming>,
    query: &Query,
    server: &Endpoints,
    endpoint: Endpoint,
) -> Response<Body> {
    let monitor = &server.monitor;
    let format = Format::from_accept(header(req, ACCEPT));
    let gzip = accepts_gzip(req);
    let filter = FamilyFilter::new(query.get("filter_family").unwrap_or_default());
    let only = match query.get("sandbox") {
        Some(id) => match monitor.sandboxes.get(id) {
            Some(sandbox) => Some(sandbox),
            None => return unknown_sandbox(id),
        },
        None => None,
    };
    let budget = prometheus_timeout(req);
    // Held until the answer's last byte: a client that reads slowly holds its render with it.
    let turn = server.scrapes.clone().acquire_owned().await.ok();
    let (tx, rx) = mpsc::channel(4);
    monitor
        .scrape_into(
            ScrapeRequest {
                only,
                budget,
                format,
                filter,
                gzip,
                endpoint,
            },
            tx,
        )
        .await;
    let mut response = Response::new(ChannelBody { rx, _turn: turn }.boxed());
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// Prometheus says how long it waits (`X-Prometheus-Scrape-Timeout-Seconds`): finish before that.
fn prometheus_timeout(req: &Request<Incoming>) -> Option<Duration> {
    scrape_budget(header(req, "x-prometheus-scrape-timeout-seconds"))
}

/// The time to finish in, from the `X-Prometheus-Scrape-Timeout-Seconds` value: half a second less
/// (the answer still has to travel), at least half a second, at most an hour.
pub(crate) fn scrape_budget(timeout_header: Option<&str>) -> Option<Duration> {
    let seconds: f64 = timeout_header?.trim().parse().ok()?;
    (seconds.is_finite() && seconds > 0.0)
        .then(|| Duration::from_secs_f64((seconds - 0.5).clamp(0.5, 3600.0)))
}

fn sandboxes(req: &Request<Incoming>, monitor: &Monitor) -> Response<Body> {
    let ids = monitor.sandboxes.ids();
    let wants_html = header(req, ACCEPT).is_some_and(|accept| accept.contains("text/html"));
    if !wants_html {
        let body: String = ids.iter().map(|id| format!("{id}\n")).collect();
        return text(StatusCode::OK, body);
    }
    // Ids hold only [A-Za-z0-9._-] (checked at discovery), so they need no HTML escaping.
    let items: String = ids
        .iter()
        .map(|id| format!("<li><a href=\"/agent-url?sandbox={id}\">{id}</a></li>\n"))
        .collect();
    let body = format!(
        "<!DOCTYPE html>\n<html><head><title>kata-monitor sandboxes</title></head><body>\n\
         <h1>Sandboxes ({})</h1>\n<ul>\n{items}</ul>\n</body></html>\n",
        ids.len()
    );
    let mut response = text(StatusCode::OK, body);
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

async fn agent_url(query: &Query, monitor: &Monitor) -> Response<Body> {
    let Some(id) = query.get("sandbox") else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing ?sandbox=<sandbox id>\n".into(),
        );
    };
    if let Err(err) = paths::validate_id(id) {
        return text(StatusCode::BAD_REQUEST, format!("{err}\n"));
    }
    let Some(sandbox) = monitor.sandboxes.get(id) else {
        return unknown_sandbox(id);
    };
    let options = GetOptions {
        timeout: monitor.scraper.timeout,
        max_body: 4096,
        gzip: false,
    };
    match client::get(&sandbox.socket, "/agent-url", &options).await {
        Ok(answer) if answer.status == StatusCode::OK => text(
            StatusCode::OK,
            String::from_utf8_lossy(&answer.body).into_owned(),
        ),
        Ok(answer) => text(
            StatusCode::BAD_GATEWAY,
            format!("the shim of sandbox {id} answered {}\n", answer.status),
        ),
        Err(err) => text(
            StatusCode::BAD_GATEWAY,
            format!("asking the shim of sandbox {id}: {err}\n"),
        ),
    }
}

fn unknown_sandbox(id: &str) -> Response<Body> {
    // The id is echoed only when it is a plain id.
    let shown = if paths::validate_id(id).is_ok() {
        id
    } else {
        "(invalid id)"
    };
    text(
        StatusCode::NOT_FOUND,
        format!("no sandbox {shown} on this node\n"),
    )
}

fn header<B>(req: &Request<B>, name: impl hyper::header::AsHeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A response body fed by a channel (the renderer's chunks).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    _turn: Option<OwnedSemaphorePermit>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// The decoded `?a=b&c=d` pairs (first value of a name wins).
pub(crate) struct Query(pub(crate) Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(query: &str) -> Query {
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded() {
        let q = Query::parse("filter_family=kata_guest_%2Ckata_shim_&sandbox=ab-1&x&bad=%zz%4");
        assert_eq!(q.get("filter_family"), Some("kata_guest_,kata_shim_"));
        assert_eq!(q.get("sandbox"), Some("ab-1"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(q.get("bad"), Some("%zz%4"));
        assert_eq!(q.get("none"), None);
    }
}
