//! What can go wrong in UpdateInterface and UpdateRoutes, and the ttrpc status each failure becomes.

use ttrpc::Code;

#[derive(Debug, thiserror::Error)]
pub(crate) enum NetworkError {
    /// A request field the agent cannot act on; nothing was changed.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// Kata's field name with its place in the request (`interface.IPAddresses[1].mask`).
        field: String,
        value: String,
        reason: String,
    },
    #[error("no interface has the MAC address {mac}")]
    NoSuchMac { mac: String },
    #[error("no interface is named {name:?} (routes[{route}].device)")]
    NoSuchDevice { name: String, route: usize },
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    /// A netlink request the kernel refused or that failed on the way.
    #[error("{what}: {}", reason(source))]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The kernel's errno as text ("Network is unreachable (os error 101)"), else rtnetlink's words.
fn reason(err: &rtnetlink::Error) -> String {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.to_io().to_string(),
        other => other.to_string(),
    }
}

impl NetworkError {
    pub(crate) fn invalid(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        NetworkError::Invalid {
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The kernel's errno, if the kernel refused a request.
    pub(crate) fn errno(&self) -> Option<i32> {
        match self {
            NetworkError::Netlink {
                source: rtnetlink::Error::NetlinkError(message),
                ..
            } => Some(message.raw_code().abs()),
            _ => None,
        }
    }

    pub(crate) fn code(&self) -> Code {
        match self {
            NetworkError::Invalid { .. } => Code::INVALID_ARGUMENT,
            NetworkError::NoSuchMac { .. } | NetworkError::NoSuchDevice { .. } => Code::NOT_FOUND,
            NetworkError::Connect(_) => Code::INTERNAL,
            NetworkError::Netlink { .. } => match self.errno() {
                Some(libc::EEXIST) => Code::ALREADY_EXISTS,
                // The kernel's word on a value we passed on (an MTU out of the device's range, a
                // name it refuses).
                Some(libc::EINVAL | libc::ERANGE) => Code::INVALID_ARGUMENT,
                Some(libc::ENODEV | libc::ENOENT | libc::ESRCH) => Code::NOT_FOUND,
                // A gateway no route of the interface reaches.
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => Code::FAILED_PRECONDITION,
                Some(libc::EPERM | libc::EACCES) => Code::PERMISSION_DENIED,
                _ => Code::INTERNAL,
            },
        }
    }
}

impl From<NetworkError> for ttrpc::Error {
    fn from(err: NetworkError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), err.to_string()))
    }
}
