//! Agent addresses (`AgentUrl`'s parse and display) and the hybrid vsock handshake's reply.

use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::agent::transport::hybrid_vsock_handshake;
use crate::agent::url::AgentUrl;

/// An agent URL (configuration, command line): an accepted one prints as text that parses back to
/// the same value and names a usable socket path.
pub fn agent_url(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(url) = text.parse::<AgentUrl>() else {
        return;
    };
    let shown = url.to_string();
    match shown.parse::<AgentUrl>() {
        Ok(back) => assert_eq!(back, url, "{text:?} shows as {shown:?}"),
        Err(err) => panic!("{text:?} shows as {shown:?}, which does not parse: {err}"),
    }
    assert_eq!(
        shown.parse::<AgentUrl>().map(|u| u.to_string()).as_deref(),
        Ok(shown.as_str())
    );
    match &url {
        AgentUrl::Hvsock { path, .. } | AgentUrl::Unix { path } => {
            let bytes = path.as_os_str().as_encoded_bytes();
            assert!(!bytes.is_empty() && !bytes.contains(&0), "{text:?}");
        }
        AgentUrl::Vsock { .. } => {}
    }
}

/// One runtime for every input: building one per input would cost more than the handshake.
static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(
        || match tokio::runtime::Builder::new_current_thread().build() {
            Ok(runtime) => runtime,
            Err(err) => panic!("building the fuzz runtime: {err}"),
        },
    );

/// The port asked for in every handshake.
const PORT: u32 = 1024;

/// The VMM's (or vsock daemon's) reply to `CONNECT <port>\n`: accepted exactly when its first line
/// is `OK <number>`, and then nothing after that line is consumed.
pub fn hvsock_reply(data: &[u8]) {
    let mut peer = Peer {
        reply: data,
        read: 0,
        written: Vec::new(),
    };
    let result = RUNTIME.block_on(hybrid_vsock_handshake(&mut peer, PORT));
    assert_eq!(peer.written, format!("CONNECT {PORT}\n").as_bytes());
    let first_line = data
        .iter()
        .position(|&b| b == b'\n')
        .map(|end| &data[..end]);
    let valid = first_line.is_some_and(|line| {
        line.strip_prefix(b"OK ").is_some_and(|number| {
            (1..=10).contains(&number.len())
                && number.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(number).is_ok_and(|n| n.parse::<u32>().is_ok())
        })
    });
    match (result, first_line) {
        (Ok(()), Some(line)) => {
            assert!(valid, "accepted {:?}", String::from_utf8_lossy(line));
            assert_eq!(peer.read, line.len() + 1, "read past the reply line");
        }
        (Ok(()), None) => panic!("accepted a reply without a newline"),
        (Err(why), _) => {
            assert!(!valid, "refused a valid reply: {why}");
            assert!(why.contains(&format!("CONNECT {PORT}")), "{why}");
        }
    }
}

/// The far end of the socket: answers with `reply` (then end of stream) and keeps what it is sent.
struct Peer<'a> {
    reply: &'a [u8],
    read: usize,
    written: Vec<u8>,
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = self.reply.get(self.read..).unwrap_or_default();
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.read += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
