//! The guest agent (`kata-agent`): its ttrpc service, the containers it runs, what it serves on
//! GetMetrics, the guest's PID 1 setup and the reaper. Built static for the guest, without the
//! host-only crates (`--no-default-features`).
//!
//! - [`service`]: `grpc.AgentService` and `grpc.Health`, and the server that listens for them;
//! - [`container`]: the container runtime (namespaces, rootfs, processes, stdio, cgroups, stats);
//! - [`metrics`]: the GetMetrics answer (guest OS and agent process families);
//! - [`network`]: UpdateInterface and UpdateRoutes (the pod's NIC and routes, over netlink);
//! - [`boot`]: what the agent does as PID 1 before serving (mounts, console, modules, network);
//! - [`reaper`]: the one owner of `waitpid`.

pub mod boot;
pub mod container;
pub(crate) mod metrics;
pub(crate) mod network;
pub mod reaper;
pub mod service;
