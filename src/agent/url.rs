//! Agent addresses: `vsock://<cid>:<port>`, `hvsock://<unix path>:<port>`, `unix://<path>`.
//!
//! Parsed once at the edge into [`AgentUrl`], so the rest of the code never handles a raw string.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The agent's port when a URL does not name one (Kata's default).
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// `VMADDR_CID_ANY`: what `vsock://-1:<port>` means when the agent listens.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentUrl {
    /// AF_VSOCK: the guest's context id (or [`VSOCK_CID_ANY`] for a listener) and port.
    Vsock { cid: u32, port: u32 },
    /// Hybrid vsock: a unix socket of the VMM (or vsock daemon) that joins us to a guest port
    /// after a `CONNECT <port>\n` / `OK ...\n` handshake.
    Hvsock { path: PathBuf, port: u32 },
    /// A plain unix socket (host agents and tests). A path starting with `@` is abstract.
    Unix { path: PathBuf },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentUrlError {
    #[error("agent URL {url:?} has no scheme; expected vsock://, hvsock:// or unix://")]
    NoScheme { url: String },
    #[error("agent URL {url:?} has unsupported scheme {scheme:?}; expected vsock, hvsock or unix")]
    UnknownScheme { url: String, scheme: String },
    #[error("agent URL {url:?}: {what}")]
    Invalid { url: String, what: String },
}

impl FromStr for AgentUrl {
    type Err = AgentUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let invalid = |what: &str| AgentUrlError::Invalid {
            url: url.to_string(),
            what: what.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| AgentUrlError::NoScheme {
                url: url.to_string(),
            })?;
        match scheme {
            "vsock" => {
                let (cid, port) = split_port(rest).map_err(|what| invalid(&what))?;
                let cid = match cid {
                    "-1" => VSOCK_CID_ANY,
                    _ => cid
                        .parse::<u32>()
                        .map_err(|_| invalid(&format!("context id {cid:?} is not a number")))?,
                };
                Ok(AgentUrl::Vsock { cid, port })
            }
            "hvsock" => {
                let (path, port) = split_port(rest).map_err(|what| invalid(&what))?;
                if !path.starts_with('/') {
                    return Err(invalid("the unix socket path must be absolute"));
                }
                if path.contains('\0') {
                    return Err(invalid("the unix socket path contains a NUL byte"));
                }
                Ok(AgentUrl::Hvsock {
                    path: PathBuf::from(path),
                    port,
                })
            }
            "unix" => {
                if rest.is_empty() {
                    return Err(invalid("the unix socket path is empty"));
                }
                if !rest.starts_with('/') && !rest.starts_with('@') {
                    return Err(invalid(
                        "the unix socket path must be absolute (or @abstract)",
                    ));
                }
                if rest.contains('\0') {
                    return Err(invalid("the unix socket path contains a NUL byte"));
                }
                Ok(AgentUrl::Unix {
                    path: PathBuf::from(rest),
                })
            }
            _ => Err(AgentUrlError::UnknownScheme {
                url: url.to_string(),
                scheme: scheme.to_string(),
            }),
        }
    }
}

/// Splits `<head>:<port>` at the last colon; the port may be left out (then the default port).
fn split_port(rest: &str) -> Result<(&str, u32), String> {
    let (head, port) = match rest.rsplit_once(':') {
        Some((head, port)) => {
            let port = port
                .parse::<u32>()
                .map_err(|_| format!("port {port:?} is not a number"))?;
            (head, port)
        }
        None => (rest, DEFAULT_AGENT_PORT),
    };
    if head.is_empty() {
        return Err("the address before the port is empty".to_string());
    }
    Ok((head, port))
}

impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentUrl::Vsock { cid, port } if *cid == VSOCK_CID_ANY => {
                write!(f, "vsock://-1:{port}")
            }
            AgentUrl::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentUrl::Hvsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
            AgentUrl::Unix { path } => write!(f, "unix://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme_and_prints_it_back() {
        for text in [
            "vsock://3:1024",
            "vsock://-1:1024",
            "hvsock:///run/vc/vm/abc/kata.hvsock:1024",
            "unix:///tmp/agent.sock",
            "unix://@agent-abstract",
        ] {
            let url: AgentUrl = text.parse().unwrap();
            assert_eq!(url.to_string(), text);
        }
        assert_eq!(
            "vsock://3:1024".parse::<AgentUrl>().unwrap(),
            AgentUrl::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            "hvsock:///a/b.sock".parse::<AgentUrl>().unwrap(),
            AgentUrl::Hvsock {
                path: "/a/b.sock".into(),
                port: DEFAULT_AGENT_PORT
            }
        );
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        let err = |s: &str| s.parse::<AgentUrl>().unwrap_err().to_string();
        assert!(err("/tmp/x").contains("no scheme"));
        assert!(err("tcp://1.2.3.4:5").contains("unsupported scheme \"tcp\""));
        assert!(err("vsock://three:1024").contains("context id \"three\""));
        assert!(err("vsock://3:port").contains("port \"port\""));
        assert!(err("vsock://3:99999999999").contains("is not a number"));
        assert!(err("hvsock://relative.sock:1024").contains("absolute"));
        assert!(err("unix://").contains("empty"));
        assert!(err("vsock://:1024").contains("empty"));
        // Found by the agent_url fuzz target: a NUL could not reach connect(2).
        assert!(err("hvsock:///run/a\0b:1024").contains("NUL"));
        assert!(err("unix:///run/a\0b").contains("NUL"));
    }
}
