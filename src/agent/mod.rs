//! What both ends of the agent protocol share: agent addresses ([`url`]) and the transports that
//! reach them ([`transport`]: vsock, hybrid vsock, unix). The protocol itself is [`crate::protocols`];
//! the host's client is [`crate::agent_client`], the guest's server [`crate::guest`].

pub mod transport;
pub mod url;
