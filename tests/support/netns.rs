//! A network namespace a test creates (`ip netns add`) and always deletes, with `ip` run inside it:
//! the independent view tests check network changes against.

use std::path::PathBuf;
use std::process::Command;

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A new, empty namespace (only `lo`, down) named after `tag`, unique on the machine.
    pub fn new(tag: &str) -> NetNs {
        let name = super::unique_id(tag);
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add (install iproute2)");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NetNs { name }
    }

    /// What `nsenter --net=` takes.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`: stdout, or stderr as the error.
    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args)
            .unwrap_or_else(|err| panic!("ip -n {} {}: {err}", self.name, args.join(" ")))
    }

    /// `ip -j -n <ns> <args>`, parsed.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let text = self.ip(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j {args:?} gave {text:?}: {e}"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Links inside go with the namespace once no process holds it.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}
