//! Agent side and shim side of the agent protocol.
