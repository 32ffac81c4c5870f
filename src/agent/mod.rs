//! What both ends of the agent protocol share: agent addresses ([`url`]) and the transports that
//! reach them ([`transport`]: vsock, hybrid vsock, unix). The protocol itself is [`crate::protocols`];
//! the host's client is [`crate::agent_client`], the guest's server [`crate::guest`].

// Only the host connects; the guest listens through ttrpc's own vsock listener.
#[cfg(feature = "host")]
pub(crate) mod transport;
pub mod url;
