//! What both ends of the agent protocol share: agent addresses ([`url`]) and the transports that
//! reach them ([`transport`]: vsock, hybrid vsock, unix). The protocol itself is [`crate::protocols`];
//! the host's client is [`crate::agent_client`], the guest's server [`crate::guest`].

// Only the host connects; the guest listens through ttrpc's own vsock listener.
#[cfg(feature = "host")]
pub(crate) mod transport;
pub mod url;

/// The line the agent, as a guest's init, writes to the console once it listens. A host that relays
/// vsock through vhost-device-vsock waits for it before its first CONNECT: that daemon stops
/// relaying for good when a connection arrives while the guest's vsock queues are being set up.
pub const CONSOLE_READY_LINE: &str = "kata-agent: listening for the host";
