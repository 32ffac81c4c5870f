//! Connecting to the agent: one connected stream per [`AgentUrl`], ready for ttrpc.
//!
//! Hybrid vsock needs a text handshake before ttrpc may start; it is read byte by byte so nothing of
//! the ttrpc stream is consumed. Every step runs under the caller's deadline, since neither connect
//! nor the handshake has a timeout of its own.
//!
//! A hybrid vsock connection whose `CONNECT` is unanswered is not closed by us when the caller
//! gives up: vhost-device-vsock 0.3 writes the guest's late answer to our side without checking,
//! and a closed socket panics its vring thread, which ends the agent channel for good (a paused or
//! slow guest did that). The handshake runs in a task of its own that keeps the socket until the
//! answer came, or for [`PENDING_CONNECT_HOLD`] (a daemon that stopped relaying never answers);
//! at most [`MAX_PENDING_CONNECTS`] such tasks wait at once, after which a connect fails at once.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::asynchronous::transport::Socket;

use super::url::AgentUrl;

/// The longest handshake reply line we accept (`OK <port>\n` is a few bytes).
const MAX_HANDSHAKE_LINE: usize = 128;

/// Hybrid vsock handshakes that may wait for the guest at once (in this process).
pub(crate) const MAX_PENDING_CONNECTS: usize = 8;
static PENDING_CONNECTS: AtomicUsize = AtomicUsize::new(0);
/// How long an unanswered CONNECT is kept open: far beyond any answer of a running guest (a
/// guest paused longer than this and then answering is the one case left to the daemon's bug).
pub(crate) const PENDING_CONNECT_HOLD: Duration = Duration::from_secs(120);

/// One of [`MAX_PENDING_CONNECTS`], given back on drop.
struct PendingConnect;

impl PendingConnect {
    fn acquire() -> Option<PendingConnect> {
        PENDING_CONNECTS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_PENDING_CONNECTS).then_some(n + 1)
            })
            .ok()
            .map(|_| PendingConnect)
    }
}

impl Drop for PendingConnect {
    fn drop(&mut self) {
        PENDING_CONNECTS.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connecting to the agent at {url}: {source}")]
    Connect { url: String, source: io::Error },
    #[error("hybrid vsock handshake with {url}: {what}")]
    Handshake { url: String, what: String },
    #[error("connecting to the agent at {url}: no connection within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// Opens one stream to the agent, including the hybrid vsock handshake, within `timeout`.
pub(crate) async fn connect(url: &AgentUrl, timeout: Duration) -> Result<Socket, TransportError> {
    match tokio::time::timeout(timeout, connect_unbounded(url)).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Timeout {
            url: url.to_string(),
            timeout,
        }),
    }
}

async fn connect_unbounded(url: &AgentUrl) -> Result<Socket, TransportError> {
    let connect_err = |source| TransportError::Connect {
        url: url.to_string(),
        source,
    };
    match url {
        AgentUrl::Unix { path } => {
            let stream = UnixStream::connect(unix_socket_name(path))
                .await
                .map_err(connect_err)?;
            Ok(Socket::new(stream))
        }
        AgentUrl::Hvsock { path, port } => {
            let handshake_err = |what| TransportError::Handshake {
                url: url.to_string(),
                what,
            };
            let pending = PendingConnect::acquire().ok_or_else(|| {
                handshake_err(format!(
                    "{MAX_PENDING_CONNECTS} earlier connections still wait for the guest's answer"
                ))
            })?;
            let stream = UnixStream::connect(path).await.map_err(connect_err)?;
            let (answer, answered) = tokio::sync::oneshot::channel();
            let port = *port;
            tokio::spawn(async move {
                let mut stream = stream;
                let result = match tokio::time::timeout(
                    PENDING_CONNECT_HOLD,
                    hybrid_vsock_handshake(&mut stream, port),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(format!(
                        "no answer to CONNECT {port} within {PENDING_CONNECT_HOLD:?}"
                    )),
                };
                drop(pending);
                // A caller that gave up drops the receiver: the stream closes here, answered.
                let _ = answer.send(result.map(|()| stream));
            });
            match answered.await {
                Ok(Ok(stream)) => Ok(Socket::new(stream)),
                Ok(Err(what)) => Err(handshake_err(what)),
                Err(_) => Err(handshake_err("the handshake task ended".to_string())),
            }
        }
        AgentUrl::Vsock { cid, port } => {
            let addr = tokio_vsock::VsockAddr::new(*cid, *port);
            let stream = tokio_vsock::VsockStream::connect(addr)
                .await
                .map_err(connect_err)?;
            Ok(Socket::new(stream))
        }
    }
}

/// `@name` is our spelling of an abstract socket; tokio wants a leading NUL instead.
pub(crate) fn unix_socket_name(path: &Path) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            let mut with_nul = vec![0u8];
            with_nul.extend_from_slice(name);
            std::ffi::OsStr::from_bytes(&with_nul).into()
        }
        None => path.to_path_buf(),
    }
}

/// A peer that closes with our bytes unread resets the connection (or breaks the pipe) instead of
/// ending it: to the caller all of these mean "closed".
fn is_closed(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

fn closed_before_answer(port: u32, line: &[u8]) -> String {
    format!(
        "the peer closed the connection before answering CONNECT {port} (got {:?}); is the guest listening on port {port}?",
        String::from_utf8_lossy(line)
    )
}

/// Writes `CONNECT <port>\n` and expects the line `OK <number>` (vhost-device-vsock answers
/// `OK <guest port>`, Firecracker `OK <host port>`: the number is not checked).
pub(crate) async fn hybrid_vsock_handshake<S>(stream: &mut S, port: u32) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
    {
        Ok(()) => {}
        Err(e) if is_closed(&e) => return Err(closed_before_answer(port, &[])),
        Err(e) => return Err(format!("sending CONNECT {port}: {e}")),
    }
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = match stream.read(&mut byte).await {
            Ok(n) => n,
            Err(e) if is_closed(&e) => 0,
            Err(e) => return Err(format!("reading the reply to CONNECT {port}: {e}")),
        };
        if n == 0 {
            return Err(closed_before_answer(port, &line));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(format!(
                "the reply to CONNECT {port} is longer than {MAX_HANDSHAKE_LINE} bytes without a newline"
            ));
        }
    }
    if is_ok_reply(&line) {
        Ok(())
    } else {
        Err(format!(
            "expected a reply \"OK <port>\" to CONNECT {port}, got {:?}",
            String::from_utf8_lossy(&line)
        ))
    }
}

/// `OK <port>`: what vhost-device-vsock (the guest port), Firecracker and Cloud Hypervisor (the
/// host side's port) answer. Anything else, `OK` alone included, is not a VMM's acceptance.
fn is_ok_reply(line: &[u8]) -> bool {
    let Some(number) = line.strip_prefix(b"OK ") else {
        return false;
    };
    (1..=10).contains(&number.len())
        && number.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(number).is_ok_and(|n| n.parse::<u32>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pending-connect slots are per process: the tests that use them take turns.
    static SLOTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn handshake_accepts_ok_and_leaves_the_rest_unread() {
        let (mut ours, mut theirs) = tokio::io::duplex(256);
        let peer = tokio::spawn(async move {
            let mut buf = [0u8; 13];
            theirs.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            theirs.write_all(b"OK 1024\nttrpc-bytes").await.unwrap();
            theirs
        });
        hybrid_vsock_handshake(&mut ours, 1024).await.unwrap();
        let mut rest = [0u8; 11];
        ours.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"ttrpc-bytes");
        drop(peer.await.unwrap());
    }

    #[tokio::test]
    async fn handshake_rejects_garbage_and_early_close() {
        let (mut ours, mut theirs) = tokio::io::duplex(256);
        theirs.write_all(b"FAILURE\n").await.unwrap();
        let err = hybrid_vsock_handshake(&mut ours, 1024).await.unwrap_err();
        assert!(err.contains("expected a reply \"OK <port>\""), "{err}");

        // Only `OK <number>` is an acceptance (these were taken as one before the fuzzer's check).
        for reply in [
            &b"OK\n"[..],
            b"OKAY 1024\n",
            b"OK 1024x\n",
            b"OK \n",
            b"OK 99999999999\n",
        ] {
            let (mut ours, mut theirs) = tokio::io::duplex(256);
            theirs.write_all(reply).await.unwrap();
            let err = hybrid_vsock_handshake(&mut ours, 1024).await.unwrap_err();
            assert!(err.contains("expected a reply"), "{reply:?}: {err}");
        }
        for reply in [&b"OK 1024\n"[..], b"OK 0\n", b"OK 4294967295\n"] {
            let (mut ours, mut theirs) = tokio::io::duplex(256);
            theirs.write_all(reply).await.unwrap();
            assert_eq!(hybrid_vsock_handshake(&mut ours, 1024).await, Ok(()));
        }

        let (mut ours, theirs) = tokio::io::duplex(256);
        drop(theirs);
        let err = hybrid_vsock_handshake(&mut ours, 1024).await.unwrap_err();
        assert!(err.contains("closed") || err.contains("sending"), "{err}");
    }

    /// A caller that gives up on a CONNECT nobody answers within 100 ms times out.
    async fn gives_up_on(url: AgentUrl) {
        let err = connect(&url, Duration::from_millis(100))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    }

    /// The peer answers CONNECT only after the caller's deadline: the answer must still find the
    /// connection open (vhost-device-vsock panics otherwise), and it is closed after that.
    #[tokio::test]
    async fn an_unanswered_connect_stays_open_after_the_caller_gives_up() {
        let _slots = SLOTS.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            stream.read_exact(&mut buf).await.unwrap();
            released.await.unwrap();
            // Written to a closed socket, this would fail with EPIPE or ECONNRESET.
            let answered = stream.write_all(b"OK 1024\n").await;
            let mut rest = Vec::new();
            let closed_after = stream.read_to_end(&mut rest).await;
            (answered, closed_after.map(|_| rest))
        });
        gives_up_on(AgentUrl::Hvsock { path, port: 1024 }).await;
        release.send(()).unwrap();
        let (answered, closed_after) = peer.await.unwrap();
        answered.expect("the late answer found the connection open");
        assert_eq!(closed_after.expect("closed cleanly by us"), b"");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_never_answered_is_closed_after_the_hold_and_gives_its_slot_back() {
        let _slots = SLOTS.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut rest = Vec::new();
            // Never answers; returns once our side closes.
            stream.read_to_end(&mut rest).await.map(|_| rest)
        });
        gives_up_on(AgentUrl::Hvsock { path, port: 1024 }).await;
        assert_eq!(PENDING_CONNECTS.load(Ordering::Acquire), 1);
        // Paused time jumps ahead while everything waits.
        tokio::time::sleep(PENDING_CONNECT_HOLD + Duration::from_secs(1)).await;
        let sent = peer.await.unwrap().expect("closed cleanly by us");
        assert_eq!(sent, b"CONNECT 1024\n");
        assert_eq!(PENDING_CONNECTS.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn waiting_connects_are_bounded() {
        let _slots = SLOTS.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        // A peer that accepts (the kernel's backlog) and never answers.
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        let url = AgentUrl::Hvsock { path, port: 1024 };
        for _ in 0..MAX_PENDING_CONNECTS {
            let err = connect(&url, Duration::from_millis(20))
                .await
                .err()
                .unwrap();
            assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
        }
        let err = connect(&url, Duration::from_secs(5)).await.err().unwrap();
        assert!(
            err.to_string()
                .contains("still wait for the guest's answer"),
            "{err}"
        );
        // Once the peer is gone, the waiting connections end and give their slots back.
        drop(_listener);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while PENDING_CONNECTS.load(Ordering::Acquire) > 0 {
            assert!(std::time::Instant::now() < deadline, "slots still taken");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn abstract_names_get_a_leading_nul() {
        use std::os::unix::ffi::OsStrExt;
        let name = unix_socket_name(Path::new("@foo"));
        assert_eq!(name.as_os_str().as_bytes(), b"\0foo");
        assert_eq!(unix_socket_name(Path::new("/a/b")), Path::new("/a/b"));
    }
}
