//! The pod wiring against real namespaces: a "pod" namespace with a veth `eth0` whose peer sits in
//! an "outside" namespace (what CNI's bridge would be), both made and removed by the test. The
//! test plays the guest on the tap's descriptor: an ARP request written into the tap must reach
//! the peer through `eth0`, and the peer's answer must come back out of the tap.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

const POD_IP: [u8; 4] = [10, 231, 7, 5];
const PEER_IP: [u8; 4] = [10, 231, 7, 1];
/// `struct virtio_net_hdr` ahead of every frame on a tap opened with IFF_VNET_HDR.
const VNET_HDR: usize = 10;

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("ksm-{tag}-{}", std::process::id());
        // A namespace of a killed earlier run of this test (same pid) would be in the way.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tc(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("tc")
        .args(["-n", &ns.0])
        .args(args)
        .output()
        .expect("run tc");
    assert!(out.status.success(), "tc {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The MAC of `dev` in `ns`, as `ip` reports it.
fn mac_of(ns: &Netns, dev: &str) -> String {
    let text = ip(&["-n", &ns.0, "-o", "link", "show", dev]);
    let after = text.split("link/ether ").nth(1).expect("an ether link");
    after.split_whitespace().next().expect("a MAC").to_string()
}

fn mac_bytes(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// What CNI would have done: `eth0` in the pod with an address and a default route, its peer
/// outside with the gateway's address.
fn cni_like_pod() -> (Netns, Netns) {
    let pod = Netns::new("pod");
    let outside = Netns::new("out");
    ip(&[
        "-n", &pod.0, "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name",
        "peer0", "netns", &outside.0,
    ]);
    ip(&["-n", &pod.0, "addr", "add", "10.231.7.5/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &outside.0,
        "addr",
        "add",
        "10.231.7.1/24",
        "dev",
        "peer0",
    ]);
    for (ns, dev) in [(&pod, "eth0"), (&pod, "lo"), (&outside, "peer0")] {
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    ip(&["-n", &pod.0, "route", "add", "default", "via", "10.231.7.1"]);
    (pod, outside)
}

fn arp(op: u16, sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR];
    frame.extend([0xff; 6]);
    frame.extend(sender_mac);
    frame.extend([0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4]);
    frame.extend(op.to_be_bytes());
    frame.extend(sender_mac);
    frame.extend(sender_ip);
    frame.extend([0u8; 6]);
    frame.extend(target_ip);
    frame
}

/// Reads frames from the tap until an ARP reply from `peer_mac` comes, or the deadline passes.
fn read_arp_reply(tap: &OwnedFd, peer_mac: [u8; 6]) -> Option<Vec<u8>> {
    // SAFETY: F_SETFL with O_NONBLOCK on a descriptor we own.
    unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut file = std::fs::File::from(tap.try_clone().expect("dup the tap"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        match file.read(&mut buf) {
            Ok(n) if n >= VNET_HDR + 42 => {
                let frame = &buf[VNET_HDR..n];
                let is_arp_reply = frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2];
                if is_arp_reply && frame[22..28] == peer_mac {
                    return Some(frame.to_vec());
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
    None
}

#[tokio::test]
async fn a_pod_interface_is_wired_to_a_tap_both_ways() {
    let (pod, outside) = cni_like_pod();
    let eth0_mac = mac_of(&pod, "eth0");
    let peer_mac = mac_bytes(&mac_of(&outside, "peer0"));

    let (network, nics) = prepare(&pod.path()).await.expect("prepare the pod network");

    // What the guest will be told matches what `ip` says about the pod.
    assert_eq!(network.interfaces.len(), 1, "{network:?}");
    let eth0 = &network.interfaces[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(inspect::mac_text(&eth0.mac), eth0_mac);
    assert_eq!(eth0.mtu, 1400);
    assert_eq!(eth0.addresses, vec![("10.231.7.5".parse().unwrap(), 24)]);
    let default = network
        .routes
        .iter()
        .find(|r| r.destination.is_none())
        .expect("the default route");
    assert_eq!(default.gateway, Some("10.231.7.1".parse().unwrap()));
    assert_eq!(default.device, "eth0");
    assert!(network
        .routes
        .iter()
        .any(|r| r.destination == Some(("10.231.7.0".parse().unwrap(), 24))));
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].mac, eth0_mac);

    // The tap exists, is up with eth0's MTU, and both ingresses redirect to the other.
    let tap = ip(&["-n", &pod.0, "-o", "link", "show", "tap0_kata"]);
    assert!(tap.contains("mtu 1400") && tap.contains(",UP"), "{tap}");
    let filters = tc(&pod, &["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("mirred (Egress Redirect to device tap0_kata)"),
        "{filters}"
    );
    assert!(filters.contains("protocol all"), "{filters}");
    let filters = tc(&pod, &["filter", "show", "dev", "tap0_kata", "ingress"]);
    assert!(
        filters.contains("mirred (Egress Redirect to device eth0)"),
        "{filters}"
    );

    // The guest's side: an ARP request for the gateway goes out through eth0, the answer comes back.
    let request = arp(1, mac_bytes(&eth0_mac), POD_IP, PEER_IP);
    let mut tap = std::fs::File::from(nics[0].tap.try_clone().expect("dup the tap"));
    tap.write_all(&request).expect("write into the tap");
    let Some(reply) = read_arp_reply(&nics[0].tap, peer_mac) else {
        panic!(
            "no ARP reply came out of the tap\npod:\n{}\noutside:\n{}\ntap ingress:\n{}",
            ip(&["-n", &pod.0, "-s", "link"]),
            ip(&["-n", &outside.0, "-s", "link"]),
            tc(
                &pod,
                &["-s", "filter", "show", "dev", "tap0_kata", "ingress"]
            )
        );
    };
    assert_eq!(
        &reply[0..6],
        &mac_bytes(&eth0_mac),
        "addressed to the pod's MAC"
    );
    assert_eq!(
        &reply[28..32],
        &PEER_IP,
        "the peer answers for the gateway address"
    );

    // The tap lives as long as its descriptors.
    drop(tap);
    drop(nics);
    let links = ip(&["-n", &pod.0, "-o", "link", "show"]);
    assert!(!links.contains("tap0_kata"), "{links}");
}

#[tokio::test]
async fn a_namespace_that_does_not_exist_is_named_in_the_error() {
    let err = prepare(Path::new("/run/netns/ksm-no-such-namespace"))
        .await
        .expect_err("no such namespace");
    let text = err.to_string();
    assert!(text.contains("/run/netns/ksm-no-such-namespace"), "{text}");
}
