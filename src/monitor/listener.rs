//! kata-monitor's TCP listener: which connections get served, so that idle or slow clients on the
//! node network cannot starve Prometheus.
//!
//! The accept loop never waits. Each connection takes a slot of the [`Admission`] budget, keyed by
//! the client's address (an IPv6 client by its /64): a connection that has not sent its request head
//! within [`LIMITS`]' head deadline is closed, and one address at its cap, or a full server, gives up
//! its oldest connection still waiting for a head. When every slot is being served, the newcomer
//! gets a 503 at once. One request per connection; Prometheus reconnects for each scrape.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::http::{route, Endpoints};
use super::Monitor;
use crate::logging::LogLimiter;
use crate::mgmt::admission::{
    plain_response, turn_away, Admission, HeadArrived, Limits, Lingering, Rejected,
};

/// The connection budget. Prometheus sends its request head at once; 2 s leaves room for a lost
/// segment on a real network. A scrape ends within 8 s, and its answer may then take a while to
/// stream to a slow link: 60 s bounds a client that stops reading.
const LIMITS: Limits = Limits {
    max_open: 512,
    max_per_peer: 32,
    head_deadline: Duration::from_secs(2),
    serve_deadline: Duration::from_secs(60),
};
/// Request header buffer (hyper answers 431 beyond it); Prometheus sends a few short headers.
const MAX_REQUEST_BUFFER: usize = 16 * 1024;
/// At most one log line per client address and interval about turned-away connections.
const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Connections the kernel completes before we accept them. std's 128 overflows within
/// milliseconds when a crowd connects, and a client whose SYN is dropped waits 1 s to send it again.
const LISTEN_BACKLOG: u32 = 1024;

/// What the connections share.
struct Server {
    endpoints: Endpoints,
    admission: Arc<Admission<IpAddr>>,
    lingering: Arc<Lingering>,
    rejections: LogLimiter<IpAddr>,
    accept_errors: LogLimiter<()>,
}

/// Listens on `address` (SO_REUSEADDR, as std does) with room for [`LISTEN_BACKLOG`] connections.
pub(crate) fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves until the listener fails for good (it does not: accept errors are waited out).
pub(crate) async fn serve(listener: TcpListener, monitor: Arc<Monitor>) {
    let server = Arc::new(Server {
        endpoints: Endpoints::new(monitor),
        admission: Admission::new(LIMITS),
        lingering: Arc::new(Lingering::default()),
        rejections: LogLimiter::new(LOG_INTERVAL),
        accept_errors: LogLimiter::new(LOG_INTERVAL),
    });
    loop {
        let (stream, address) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                if let Some(suppressed) = server.accept_errors.admit(()) {
                    tracing::warn!(error = %err, suppressed, "accept failed");
                }
                // Out of descriptors, most likely: a waiting connection gives its one back.
                server.admission.evict_oldest();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = peer_key(address);
        match server.admission.admit(peer, stream.as_raw_fd()) {
            Ok(ticket) => {
                let server = server.clone();
                tokio::spawn(ticket.run(stream, move |stream, head| {
                    serve_connection(stream, server, head)
                }));
            }
            Err(why) => server.turn_away_busy(stream, peer, why),
        }
    }
}

impl Server {
    fn turn_away_busy(&self, stream: TcpStream, peer: IpAddr, why: Rejected) {
        if let Some(suppressed) = self.rejections.admit(peer) {
            tracing::warn!(
                client = %peer,
                ?why,
                suppressed,
                "every connection slot is being served, answered 503 (one line per client a minute)"
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

async fn serve_connection(stream: TcpStream, server: Arc<Server>, head: HeadArrived) {
    let service = service_fn(move |req| {
        head.arrived();
        let server = server.clone();
        async move { Ok::<_, Infallible>(route(req, &server.endpoints).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The admission's head deadline runs from accept; this one, from the first byte, backs it.
        .header_read_timeout(LIMITS.head_deadline)
        // An idle keep-alive connection would hold a slot between scrapes for nothing.
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_BUFFER);
    if let Err(err) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// Whose budget a connection counts against: its IPv4 address, or its IPv6 /64 (one host can
/// have a whole /64 to connect from).
fn peer_key(address: SocketAddr) -> IpAddr {
    match address.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_their_64_and_mapped_ipv4_is_ipv4() {
        let key = |text: &str| peer_key(text.parse().unwrap());
        assert_eq!(
            key("[2001:db8:1:2::5]:80"),
            key("[2001:db8:1:2:ffff::9]:81")
        );
        assert_ne!(key("[2001:db8:1:2::5]:80"), key("[2001:db8:1:3::5]:80"));
        assert_eq!(key("[::ffff:10.0.0.7]:80"), key("10.0.0.7:9"));
        assert_ne!(key("10.0.0.7:80"), key("10.0.0.8:80"));
    }
}
