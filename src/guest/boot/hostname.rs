//! The guest's hostname: /etc/hostname's, or a fixed default.

use std::ffi::CString;

use super::SetupReport;

/// The hostname when `/etc/hostname` gives none.
const DEFAULT_HOSTNAME: &str = "kata-guest";

pub(crate) fn set_hostname(report: &mut SetupReport) {
    let name = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|name| !name.is_empty() && name.len() <= 64 && CString::new(name.as_str()).is_ok())
        .unwrap_or_else(|| DEFAULT_HOSTNAME.to_string());
    if let Err(err) = nix::unistd::sethostname(&name) {
        report.warn(format!("cannot set the hostname to {name:?}: {err}"));
    }
}
