//! Where a sandbox's management socket lives, and how clients find it.
//!
//! - file socket `<run dir>/<sandbox id>/shim-monitor.sock`, run dir `/run/vc/sbs` by default
//!   (`KATA_SANDBOX_RUN_DIR` or the config file move it), with `/run/kata/<id>/` as a second place;
//! - abstract socket `\0/containerd-shim/<namespace>/<sandbox id>/shim-monitor.sock` (Kata 2.0),
//!   listed in `/proc/net/unix` as `@/containerd-shim/<ns>/<id>/shim-monitor.sock`.

use std::fmt;
use std::path::{Path, PathBuf};

use procfs::net::UnixNetEntry;

/// The default run directory that Kata tooling looks in.
pub(crate) const DEFAULT_RUN_DIR: &str = "/run/vc/sbs";
/// The second place clients look for a sandbox's file socket.
pub(crate) const KATA_RUN_DIR: &str = "/run/kata";
/// Environment variable that moves the run directory (tests, side-by-side installs).
pub(crate) const RUN_DIR_ENV: &str = "KATA_SANDBOX_RUN_DIR";
/// The socket's file name, inside the sandbox's directory.
pub(crate) const SOCKET_NAME: &str = "shim-monitor.sock";

/// Longest sandbox id we accept (containerd allows 76 characters).
const MAX_ID_LEN: usize = 76;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid sandbox id {id:?}: {why}")]
    Invalid { id: String, why: &'static str },
}

/// Checks an id the way containerd does (letters, digits, and `.`, `_`, `-` between them), so it is
/// safe as one path component and inside a socket name.
pub(crate) fn validate_id(id: &str) -> Result<(), IdError> {
    let invalid = |why| IdError::Invalid {
        id: id.to_string(),
        why,
    };
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid("it is longer than 76 characters"));
    }
    let bytes = id.as_bytes();
    let is_alnum = |b: u8| b.is_ascii_alphanumeric();
    let is_sep = |b: u8| matches!(b, b'.' | b'_' | b'-');
    if !bytes.iter().all(|&b| is_alnum(b) || is_sep(b)) {
        return Err(invalid(
            "only letters, digits, '.', '_' and '-' are allowed (no '/', no spaces)",
        ));
    }
    let first_last_ok =
        bytes.first().copied().is_some_and(is_alnum) && bytes.last().copied().is_some_and(is_alnum);
    let no_double_sep = bytes.windows(2).all(|w| !(is_sep(w[0]) && is_sep(w[1])));
    if !first_last_ok || !no_double_sep {
        return Err(invalid(
            "it must start and end with a letter or digit, with no two separators in a row (no '..')",
        ));
    }
    Ok(())
}

/// The run directory: `$KATA_SANDBOX_RUN_DIR` when set, else `configured`, else `/run/vc/sbs`.
pub fn run_dir(configured: Option<&Path>) -> PathBuf {
    match std::env::var_os(RUN_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => configured
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
    }
}

/// The sandbox's own directory under the run directory.
pub(crate) fn sandbox_dir(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join(id)
}

/// The file socket of a sandbox.
pub(crate) fn file_socket_path(run_dir: &Path, id: &str) -> PathBuf {
    sandbox_dir(run_dir, id).join(SOCKET_NAME)
}

/// The abstract socket name of a sandbox, without the leading NUL.
pub(crate) fn abstract_socket_name(namespace: &str, id: &str) -> String {
    format!("/containerd-shim/{namespace}/{id}/{SOCKET_NAME}")
}

/// An address a management server listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    File(PathBuf),
    /// An abstract name, without the leading NUL.
    Abstract(String),
}

impl SocketAddress {
    /// The form tokio's unix sockets take (a leading NUL for abstract names).
    pub(crate) fn to_socket_path(&self) -> PathBuf {
        match self {
            SocketAddress::File(path) => path.clone(),
            SocketAddress::Abstract(name) => PathBuf::from(format!("\0{name}")),
        }
    }
}

impl fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddress::File(path) => write!(f, "{}", path.display()),
            SocketAddress::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

/// Every address where a client may find the sandbox `id`, in the order to try them: file sockets
/// that exist in the run directories, then the abstract socket (its namespace given, or looked up
/// in `/proc/net/unix`).
pub(crate) fn candidate_sockets(
    id: &str,
    run_dirs: &[PathBuf],
    namespace: Option<&str>,
) -> Vec<SocketAddress> {
    let mut found: Vec<SocketAddress> = run_dirs
        .iter()
        .map(|dir| file_socket_path(dir, id))
        .filter(|path| path.exists())
        .map(SocketAddress::File)
        .collect();
    match namespace {
        Some(ns) => found.push(SocketAddress::Abstract(abstract_socket_name(ns, id))),
        None => {
            // Unreadable: no abstract candidates; the caller then reports the sandbox missing.
            let listed = procfs::net::unix().unwrap_or_default();
            found.extend(
                abstract_sockets_of(&listed, id)
                    .into_iter()
                    .map(SocketAddress::Abstract),
            );
        }
    }
    found
}

/// The run directories a client searches by default: the configured one, then `/run/kata`.
pub(crate) fn default_client_run_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![run_dir(None)];
    if dirs[0] != Path::new(KATA_RUN_DIR) {
        dirs.push(PathBuf::from(KATA_RUN_DIR));
    }
    dirs
}

/// Abstract management sockets of sandbox `id` among the `/proc/net/unix` entries (any namespace).
fn abstract_sockets_of(listed: &[UnixNetEntry], id: &str) -> Vec<String> {
    let suffix = format!("/{id}/{SOCKET_NAME}");
    let mut names: Vec<String> = listed
        .iter()
        .filter_map(abstract_name)
        .filter(|name| name.ends_with(&suffix))
        .filter(|name| {
            // Exactly /containerd-shim/<ns>/<id>/shim-monitor.sock, with a plain namespace.
            name.strip_prefix("/containerd-shim/")
                .and_then(|rest| rest.strip_suffix(&suffix))
                .is_some_and(|ns| !ns.is_empty() && !ns.contains('/'))
        })
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The name of an abstract socket (its `/proc/net/unix` path starts with `@`), without the `@`.
fn abstract_name(entry: &UnixNetEntry) -> Option<&str> {
    entry.path.as_deref()?.to_str()?.strip_prefix('@')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_like_containerd_accepts_them() {
        for good in ["abc", "a.b-c_d", "0123456789abcdef", &"a".repeat(76)] {
            assert_eq!(validate_id(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "../etc",
            "a/b",
            "..",
            "a..b",
            ".a",
            "a-",
            "a b",
            "a\0b",
            &"a".repeat(77),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?} should be refused");
        }
        let err = validate_id("a/b").unwrap_err().to_string();
        assert!(err.contains("invalid sandbox id \"a/b\""), "{err}");
    }

    #[test]
    fn finds_abstract_sockets_in_proc_net_unix() {
        use procfs::FromBufRead;
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 25911 @/containerd-shim/k8s.io/sb1/shim-monitor.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 25912 @/containerd-shim/default/sb1/shim-monitor.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 25913 @/containerd-shim/default/sb10/shim-monitor.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 25914 /run/containerd/containerd.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 25915\n";
        let listed = procfs::net::UnixNetEntries::from_buf_read(text.as_bytes())
            .expect("a /proc/net/unix text")
            .0;
        assert_eq!(
            abstract_sockets_of(&listed, "sb1"),
            vec![
                "/containerd-shim/default/sb1/shim-monitor.sock".to_string(),
                "/containerd-shim/k8s.io/sb1/shim-monitor.sock".to_string()
            ]
        );
        assert!(abstract_sockets_of(&listed, "sb2").is_empty());
    }

    #[test]
    fn socket_paths() {
        assert_eq!(
            file_socket_path(Path::new("/run/vc/sbs"), "abc"),
            Path::new("/run/vc/sbs/abc/shim-monitor.sock")
        );
        assert_eq!(
            abstract_socket_name("k8s.io", "abc"),
            "/containerd-shim/k8s.io/abc/shim-monitor.sock"
        );
        assert_eq!(SocketAddress::Abstract("/x".into()).to_string(), "@/x");
    }
}
