//! The shim management server (HTTP over unix sockets), its client, and socket paths.
