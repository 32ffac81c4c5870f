//! Who gets a connection slot on our HTTP servers (the shim's management sockets, kata-monitor), so
//! that idle or slow clients cannot starve real ones and memory stays bounded.
//!
//! - The accept loop never waits: a connection is admitted, or answered and closed ([`turn_away`]),
//!   holding no slot and no request buffer while it goes.
//! - An admitted connection that has not sent a complete request head is *waiting*. Until its first
//!   byte it holds its socket and nothing else (no request buffer); it is closed when its head is not
//!   complete by the head deadline, or when a newer connection needs its slot: a peer at its own cap
//!   loses its own oldest waiting connection, and a full server its oldest waiting one. Connections
//!   that have sent nothing go first (the kernel is asked, so a head that has just arrived counts
//!   even before its task has run).
//! - Once its head is in, a connection is *served* under the serve deadline and cannot be pushed out.
//!
//! Real clients (Prometheus, kata-monitor, kata-runtime) send their head at once, so they leave the
//! waiting room within a round trip, and a crowd of idle connections only pushes out its own members.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::Hash;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// How many connections a server holds, and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections open at once, waiting and served.
    pub(crate) max_open: usize,
    /// Connections open at once from one peer.
    pub(crate) max_per_peer: usize,
    /// From accept to a complete request head.
    pub(crate) head_deadline: Duration,
    /// From a complete request head to the end of the answer.
    pub(crate) serve_deadline: Duration,
}

/// Why a connection got no slot (every slot is served, none waiting to give way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// The peer has its cap of connections, all being served.
    PeerFull,
    /// The server has its cap of connections, all being served.
    Full,
}

/// The slots of one server (all its listeners).
pub(crate) struct Admission<K> {
    limits: Limits,
    room: Mutex<Room<K>>,
}

struct Room<K> {
    next_id: u64,
    /// Waiting connections by admission order (oldest first), with the sender that pushes them out.
    waiting: BTreeMap<u64, Waiting<K>>,
    open: usize,
    per_peer: HashMap<K, usize>,
}

struct Waiting<K> {
    peer: K,
    /// The connection's socket, only ever peeked at (see [`has_sent_nothing`]).
    fd: RawFd,
    evict: oneshot::Sender<()>,
}

/// Waiting connections looked at for one that has sent nothing, before the oldest goes regardless.
const SILENT_SCAN: usize = 64;

impl<K: Eq + Hash + Copy> Room<K> {
    fn release(&mut self, peer: K) {
        self.open = self.open.saturating_sub(1);
        if let Some(count) = self.per_peer.get_mut(&peer) {
            *count -= 1;
            if *count == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    fn take(&mut self, peer: K) {
        self.open += 1;
        *self.per_peer.entry(peer).or_default() += 1;
    }

    /// Pushes out a waiting connection (of `peer` only, when given): the oldest that has sent
    /// nothing, else the oldest. False if none waits.
    fn evict_oldest(&mut self, peer: Option<K>) -> bool {
        let mut candidates = self
            .waiting
            .iter()
            .filter(|(_, waiting)| peer.map_or(true, |peer| waiting.peer == peer))
            .take(SILENT_SCAN)
            .peekable();
        let oldest = candidates.peek().map(|(id, _)| **id);
        let id = candidates
            .find(|(_, waiting)| has_sent_nothing(waiting.fd))
            .map(|(id, _)| *id)
            .or(oldest);
        let Some(waiting) = id.and_then(|id| self.waiting.remove(&id)) else {
            return false;
        };
        // Its slot is free from now on; the connection closes when its task next runs.
        self.release(waiting.peer);
        let _ = waiting.evict.send(());
        true
    }
}

/// True unless the socket has bytes waiting to be read: a client that connected and has sent
/// nothing (or has gone). A peek reads nothing. Should `fd` have been closed and reused meanwhile (a
/// ticket frees its room entry just after its socket), the answer only makes a worse choice of
/// whom to push out.
fn has_sent_nothing(fd: RawFd) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    !matches!(
        recv(fd, &mut [0u8; 1], MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
        Ok(n) if n > 0
    )
}

impl<K: Eq + Hash + Copy> Admission<K> {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            room: Mutex::new(Room {
                next_id: 0,
                waiting: BTreeMap::new(),
                open: 0,
                per_peer: HashMap::new(),
            }),
        })
    }

    fn room(&self) -> MutexGuard<'_, Room<K>> {
        self.room
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for a new connection from `peer` on socket `fd`, pushing out a waiting one if that is
    /// what it takes. `fd` is only ever peeked at while the connection waits (see
    /// [`has_sent_nothing`] for a socket closed before its ticket is dropped).
    pub(crate) fn admit(self: &Arc<Self>, peer: K, fd: RawFd) -> Result<Ticket<K>, Rejected> {
        let mut room = self.room();
        let of_peer = room.per_peer.get(&peer).copied().unwrap_or(0);
        if of_peer >= self.limits.max_per_peer && !room.evict_oldest(Some(peer)) {
            return Err(Rejected::PeerFull);
        }
        if room.open >= self.limits.max_open && !room.evict_oldest(None) {
            return Err(Rejected::Full);
        }
        room.take(peer);
        let id = room.next_id;
        room.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        room.waiting.insert(id, Waiting { peer, fd, evict });
        Ok(Ticket {
            admission: self.clone(),
            id,
            peer,
            evicted: Some(evicted),
            admitted: Instant::now(),
            served: false,
        })
    }

    /// Pushes out the oldest waiting connection; for when accept fails for want of descriptors.
    pub(crate) fn evict_oldest(&self) -> bool {
        self.room().evict_oldest(None)
    }

    #[cfg(test)]
    fn counts(&self, peer: K) -> (usize, usize, usize) {
        let room = self.room();
        (
            room.open,
            room.waiting.len(),
            room.per_peer.get(&peer).copied().unwrap_or(0),
        )
    }
}

/// Tells a connection's task that the server called its service: the request head is complete.
#[derive(Clone)]
pub(crate) struct HeadArrived(Arc<Notify>);

impl HeadArrived {
    pub(crate) fn arrived(&self) {
        self.0.notify_one();
    }
}

/// A socket that can be waited on for its first byte without reading it.
pub(crate) trait Socket {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Reads what is there without waiting (`WouldBlock` if nothing is).
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl Socket for tokio::net::UnixStream {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        tokio::net::UnixStream::readable(self)
    }

    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        tokio::net::UnixStream::try_read(self, buf)
    }
}

impl Socket for tokio::net::TcpStream {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        tokio::net::TcpStream::readable(self)
    }

    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        tokio::net::TcpStream::try_read(self, buf)
    }
}

/// One admitted connection's slot; dropping it frees the slot.
pub(crate) struct Ticket<K: Eq + Hash + Copy> {
    admission: Arc<Admission<K>>,
    id: u64,
    peer: K,
    evicted: Option<oneshot::Receiver<()>>,
    admitted: Instant,
    served: bool,
}

impl<K: Eq + Hash + Copy> Ticket<K> {
    /// Runs the connection: waits for its first byte, lets `serve` (the HTTP connection, which calls
    /// [`HeadArrived::arrived`] from its service) read the head, then serves it to the end. Returns
    /// when the connection is done, was pushed out, or missed a deadline (dropping `serve` closes it).
    pub(crate) async fn run<S, F, Fut>(mut self, stream: S, serve: F)
    where
        S: Socket,
        F: FnOnce(S, HeadArrived) -> Fut,
        Fut: Future<Output = ()>,
    {
        let limits = self.admission.limits;
        let head_deadline = self.admitted + limits.head_deadline;
        let first_byte = tokio::select! {
            biased;
            () = self.wait_evicted() => false,
            ready = tokio::time::timeout_at(head_deadline, stream.readable()) => {
                matches!(ready, Ok(Ok(())))
            }
        };
        if !first_byte {
            return;
        }
        let notify = Arc::new(Notify::new());
        // Boxed: the HTTP connection's state is allocated only once its first byte is in, and the
        // task of an idle connection stays small.
        let mut served = Box::pin(serve(stream, HeadArrived(notify.clone())));
        let head_complete = tokio::select! {
            biased;
            () = &mut served => return,
            () = notify.notified() => true,
            () = self.wait_evicted() => false,
            () = tokio::time::sleep_until(head_deadline) => false,
        };
        if !head_complete {
            return;
        }
        self.leave_waiting_room();
        let _ = tokio::time::timeout(limits.serve_deadline, served).await;
    }

    /// Resolves when the connection is pushed out; never if it is not.
    async fn wait_evicted(&mut self) {
        if let Some(evicted) = &mut self.evicted {
            if evicted.await.is_ok() {
                return;
            }
            self.evicted = None;
        }
        std::future::pending::<()>().await
    }

    fn leave_waiting_room(&mut self) {
        let mut room = self.admission.room();
        if room.waiting.remove(&self.id).is_none() {
            // Pushed out just as its head arrived: it is served all the same, and counted again.
            room.take(self.peer);
        }
        self.served = true;
        self.evicted = None;
    }
}

impl<K: Eq + Hash + Copy> Drop for Ticket<K> {
    fn drop(&mut self) {
        let mut room = self.admission.room();
        // A connection that was pushed out has had its slot released already.
        if self.served || room.waiting.remove(&self.id).is_some() {
            room.release(self.peer);
        }
    }
}

/// How long a turned-away connection is given to send its request, and then to read the answer,
/// before it is closed. Its request is read into a small scratch array and dropped.
const LINGER: Duration = Duration::from_millis(500);
/// Turned-away connections waited for at once; beyond, they are answered and closed at once.
const MAX_LINGERING: usize = 256;
/// What a turned-away client may send before its answer: a request head is at most 16 KiB.
const MAX_DRAINED: usize = 64 * 1024;

/// Counts the turned-away connections being waited for.
#[derive(Default)]
pub(crate) struct Lingering(AtomicUsize);

/// Answers `response` (a whole HTTP response with `Connection: close`) and closes, holding no slot
/// and no request buffer. The answer goes out once the client has sent something (HTTP clients drop
/// an answer that comes before their request) or after [`LINGER`]; whatever the client sends is
/// read into a small scratch array and dropped, so that closing sends no reset that could destroy
/// the answer before the client reads it.
pub(crate) async fn turn_away<S>(mut stream: S, response: Vec<u8>, lingering: Arc<Lingering>)
where
    S: Socket + AsyncRead + AsyncWrite + Unpin,
{
    let linger = lingering.0.fetch_add(1, Ordering::AcqRel) < MAX_LINGERING;
    let mut scratch = [0u8; 512];
    if linger {
        drain_request(&stream, &mut scratch, Instant::now() + LINGER).await;
    }
    // A fresh socket's send buffer takes a short answer at once; a stuck one gets no more time.
    let written = tokio::time::timeout(LINGER, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await;
    if linger && matches!(written, Ok(Ok(()))) {
        let _ = tokio::time::timeout(LINGER, async {
            while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
    }
    lingering.0.fetch_sub(1, Ordering::AcqRel);
}

/// Reads and drops what the client has sent, waiting until it has sent something (or `deadline`).
async fn drain_request<S: Socket>(stream: &S, scratch: &mut [u8], deadline: Instant) {
    let mut drained = 0;
    loop {
        match stream.try_read(scratch) {
            // The client has shut down its side: nothing more will come.
            Ok(0) => return,
            Ok(n) => {
                drained += n;
                if drained >= MAX_DRAINED {
                    return;
                }
            }
            // Readiness can be reported before there is data: only a byte read counts.
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock && drained == 0 => {
                if tokio::time::timeout_at(deadline, stream.readable())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// A short plain-text HTTP/1.1 response that closes the connection.
pub(crate) fn plain_response(status: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn limits(max_open: usize, max_per_peer: usize) -> Limits {
        Limits {
            max_open,
            max_per_peer,
            head_deadline: Duration::from_secs(1),
            serve_deadline: Duration::from_secs(10),
        }
    }

    /// A connected socket pair: (server side, client side).
    fn connection() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    fn admit(admission: &Arc<Admission<u32>>, peer: u32) -> (Ticket<u32>, UnixStream, UnixStream) {
        let (server, client) = connection();
        let ticket = admission.admit(peer, server.as_raw_fd()).unwrap();
        (ticket, server, client)
    }

    fn pushed_out(ticket: &mut Ticket<u32>) -> bool {
        matches!(
            ticket.evicted.as_mut().map(|rx| rx.try_recv()),
            Some(Ok(()))
        )
    }

    #[test]
    fn a_full_server_pushes_out_its_oldest_waiting_connection() {
        let admission = Admission::new(limits(3, 3));
        let mut idle: Vec<_> = (0..3).map(|_| admit(&admission, 7)).collect();
        let newcomer = admit(&admission, 8);
        assert!(pushed_out(&mut idle[0].0));
        assert!(!pushed_out(&mut idle[1].0) && !pushed_out(&mut idle[2].0));
        assert_eq!(admission.counts(7), (3, 3, 2));
        // The pushed-out ticket's slot was released already; dropping it frees nothing twice.
        drop(idle.remove(0));
        assert_eq!(admission.counts(7), (3, 3, 2));
        drop(newcomer);
        drop(idle);
        assert_eq!(admission.counts(7), (0, 0, 0));
        assert_eq!(admission.counts(8), (0, 0, 0));
    }

    #[test]
    fn a_peer_at_its_cap_pushes_out_only_its_own() {
        let admission = Admission::new(limits(10, 2));
        let mut other = admit(&admission, 1);
        let mut first = admit(&admission, 2);
        let _second = admit(&admission, 2);
        let _third = admit(&admission, 2);
        assert!(pushed_out(&mut first.0));
        assert!(!pushed_out(&mut other.0));
        assert_eq!(admission.counts(2), (3, 3, 2));
    }

    #[test]
    fn a_connection_whose_request_has_arrived_is_passed_over_for_a_silent_one() {
        let admission = Admission::new(limits(10, 3));
        let (mut early, _server, mut client) = admit(&admission, 5);
        // Its head is in the kernel's buffer, though its task has not looked yet.
        client.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        let mut silent = admit(&admission, 5);
        // The client hung up: nothing to serve either.
        let mut gone = admit(&admission, 5);
        drop(gone.2);
        let _newcomer = admit(&admission, 5);
        assert!(!pushed_out(&mut early));
        assert!(pushed_out(&mut silent.0));
        assert!(!pushed_out(&mut gone.0));
        let _another = admit(&admission, 5);
        assert!(pushed_out(&mut gone.0));
        assert!(!pushed_out(&mut early));
    }

    #[test]
    fn among_talkers_the_oldest_goes() {
        let admission = Admission::new(limits(2, 2));
        let mut talkers: Vec<_> = (0..2).map(|_| admit(&admission, 5)).collect();
        for (_, _, client) in &mut talkers {
            client.write_all(b"G").unwrap();
        }
        let _newcomer = admit(&admission, 5);
        assert!(pushed_out(&mut talkers[0].0));
        assert!(!pushed_out(&mut talkers[1].0));
    }

    #[test]
    fn served_connections_are_never_pushed_out() {
        let admission = Admission::new(limits(2, 2));
        let mut served: Vec<_> = (0..2).map(|_| admit(&admission, 0)).collect();
        for (ticket, _, _) in &mut served {
            ticket.leave_waiting_room();
        }
        let (spare, _) = connection();
        let fd = spare.as_raw_fd();
        assert_eq!(admission.admit(0, fd).err(), Some(Rejected::PeerFull));
        assert_eq!(admission.admit(1, fd).err(), Some(Rejected::Full));
        assert_eq!(admission.counts(0), (2, 0, 2));
        drop(served);
        assert_eq!(admission.counts(0), (0, 0, 0));
        assert!(admission.admit(1, fd).is_ok());
    }

    #[test]
    fn a_connection_pushed_out_as_its_head_arrives_is_served_and_counted() {
        let admission = Admission::new(limits(1, 1));
        let mut first = admit(&admission, 0);
        let second = admit(&admission, 0);
        assert!(pushed_out(&mut first.0));
        first.0.leave_waiting_room();
        assert_eq!(admission.counts(0), (2, 1, 2));
        drop(first);
        drop(second);
        assert_eq!(admission.counts(0), (0, 0, 0));
    }
}
