//! containerd-shim-kata-v2: the containerd shim v2 for runtime `io.containerd.kata.v2`.

use containerd_shim::Config;
use kata_shim_metrics::shim::service::Service;

#[tokio::main]
async fn main() {
    if std::env::args()
        .skip(1)
        .any(|a| a == "--version" || a == "-version" || a == "-v")
    {
        println!("containerd-shim-kata-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let config = Config {
        // QEMU is our child: its exit must reach tokio's wait(), not the crate's reaper, and
        // orphans go to init rather than piling up as our zombies.
        no_reaper: true,
        no_sub_reaper: true,
        // The serving process logs through tracing into containerd's log FIFO itself.
        no_setup_logger: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<Service>("io.containerd.kata.v2", Some(config)).await;
}
