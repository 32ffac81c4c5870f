//! Who may use the abstract management socket.
//!
//! Abstract sockets have no file permissions and are reachable from any process in the host's
//! network namespace, including a container that shares it (the CVE-2020-15257 pattern). So the
//! server checks the peer's credentials: root or the shim's own uid, and the shim's mount namespace.

use std::path::PathBuf;

use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerRefused {
    #[error("peer credentials unavailable: {0}")]
    NoCredentials(#[source] std::io::Error),
    #[error("peer credentials unavailable: no peer pid")]
    NoPeerPid { uid: u32 },
    #[error("peer uid {uid} is neither root nor the shim's uid {own}")]
    Uid { uid: u32, own: u32 },
    #[error("peer pid {pid} is in another mount namespace ({theirs}, ours {ours})")]
    MountNamespace {
        uid: u32,
        pid: i32,
        theirs: String,
        ours: String,
    },
    #[error("peer pid {pid}: cannot read its mount namespace: {source}")]
    UnknownNamespace {
        uid: u32,
        pid: i32,
        source: std::io::Error,
    },
}

impl PeerRefused {
    /// The refused peer's uid, when the kernel told it.
    pub(crate) fn uid(&self) -> Option<u32> {
        match self {
            PeerRefused::NoCredentials(_) => None,
            PeerRefused::NoPeerPid { uid }
            | PeerRefused::Uid { uid, .. }
            | PeerRefused::MountNamespace { uid, .. }
            | PeerRefused::UnknownNamespace { uid, .. } => Some(*uid),
        }
    }
}

/// The rule: which uid and mount namespace a peer must have.
#[derive(Debug, Clone)]
pub(crate) struct PeerPolicy {
    own_uid: u32,
    own_mount_ns: String,
}

impl PeerPolicy {
    /// The policy for this process: its effective uid and its mount namespace.
    pub(crate) fn for_this_process() -> std::io::Result<Self> {
        Ok(PeerPolicy {
            own_uid: nix::unistd::geteuid().as_raw(),
            own_mount_ns: mount_namespace("self")?,
        })
    }

    /// Checks the process at the other end of `stream` (right after accept: it reads nothing from
    /// the connection); returns the peer's uid.
    pub(crate) fn check(&self, stream: &UnixStream) -> Result<u32, PeerRefused> {
        let cred = stream.peer_cred().map_err(PeerRefused::NoCredentials)?;
        let uid = cred.uid();
        if uid != 0 && uid != self.own_uid {
            return Err(PeerRefused::Uid {
                uid,
                own: self.own_uid,
            });
        }
        let pid = cred.pid().ok_or(PeerRefused::NoPeerPid { uid })?;
        let theirs = mount_namespace(&pid.to_string())
            .map_err(|source| PeerRefused::UnknownNamespace { uid, pid, source })?;
        if theirs != self.own_mount_ns {
            return Err(PeerRefused::MountNamespace {
                uid,
                pid,
                theirs,
                ours: self.own_mount_ns.clone(),
            });
        }
        Ok(uid)
    }
}

/// The mount namespace of `/proc/<pid>`, as the kernel names it (`mnt:[4026531841]`).
fn mount_namespace(pid: &str) -> std::io::Result<String> {
    let link = std::fs::read_link(PathBuf::from(format!("/proc/{pid}/ns/mnt")))?;
    Ok(link.to_string_lossy().into_owned())
}
