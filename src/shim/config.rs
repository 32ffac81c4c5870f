//! The runtime's `configuration.toml`: where it is found, what it may contain, and its defaults.
//!
//! Key names follow Kata's where Kata has them (`[hypervisor.qemu]`, `[agent.kata]`, `[runtime]`),
//! so an operator's habits carry over. Unknown keys are errors rather than silently ignored: a typo
//! in a timeout should not quietly leave the default in force.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Environment variable naming the configuration file (containerd passes its environment on).
pub(crate) const CONF_FILE_ENV: &str = "KATA_CONF_FILE";
/// The system-wide configuration file, used when the variable is unset.
pub(crate) const SYSTEM_CONF_FILE: &str = "/etc/kata-containers/configuration.toml";
/// Where `make install` puts the guest kernel and initramfs.
pub(crate) const DEFAULT_SHARE_DIR: &str = "/usr/local/share/kata-shim-metrics";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("reading configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// toml's message names the key and shows the line; it is kept on one line for logs.
    #[error("configuration file {path}: {}", one_line(source))]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("configuration file {path}: key {key}: {why}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        why: String,
    },
}

fn one_line(err: &toml::de::Error) -> String {
    err.to_string().trim().replace('\n', " | ")
}

/// How QEMU accelerates the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Accel {
    /// KVM when `/dev/kvm` can boot the guest, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// A duration written as seconds (integer or fraction), as Kata writes its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecondsVisitor;
        impl Visitor<'_> for SecondsVisitor {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive number of seconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                self.visit_f64(v as f64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                // Also bounds the value so Duration::from_secs_f64 cannot panic.
                if v.is_finite() && v > 0.0 && v <= 86_400.0 {
                    Ok(Seconds(Duration::from_secs_f64(v)))
                } else {
                    Err(E::custom(format!(
                        "{v} is not a number of seconds between 0 (exclusive) and 86400"
                    )))
                }
            }
        }
        deserializer.deserialize_any(SecondsVisitor)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct QemuConfig {
    /// The QEMU binary.
    pub(crate) path: PathBuf,
    /// Guest kernel (uncompressed or bzImage).
    pub(crate) kernel: PathBuf,
    /// Guest initramfs with the agent as `/init`.
    pub(crate) initrd: PathBuf,
    /// Guest memory in MiB.
    pub(crate) default_memory: u32,
    pub(crate) default_vcpus: u32,
    pub(crate) accel: Accel,
    /// How long the VM may take until its agent answers a health check.
    pub(crate) boot_timeout: Seconds,
    /// Extra kernel command line parameters.
    pub(crate) kernel_params: String,
    /// The vhost-user vsock daemon, used when `/dev/vhost-vsock` is absent.
    pub(crate) vsock_daemon: PathBuf,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            kernel: Path::new(DEFAULT_SHARE_DIR).join("vmlinux"),
            initrd: Path::new(DEFAULT_SHARE_DIR).join("initrd.img"),
            default_memory: 512,
            default_vcpus: 1,
            accel: Accel::Auto,
            boot_timeout: Seconds(Duration::from_secs(60)),
            kernel_params: String::new(),
            vsock_daemon: PathBuf::from("vhost-device-vsock"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HypervisorSection {
    pub(crate) qemu: QemuConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AgentConfig {
    /// Connecting to the agent (and the hybrid vsock handshake).
    pub(crate) dial_timeout: Seconds,
    /// One GetMetrics call: a scrape never waits longer for the guest.
    pub(crate) metrics_timeout: Seconds,
    /// Any other agent call.
    pub(crate) request_timeout: Seconds,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            dial_timeout: Seconds(Duration::from_secs(1)),
            metrics_timeout: Seconds(Duration::from_secs(1)),
            request_timeout: Seconds(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AgentSection {
    pub(crate) kata: AgentConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RuntimeConfig {
    /// Where sandbox directories and management sockets live (`KATA_SANDBOX_RUN_DIR` overrides).
    pub(crate) sandbox_run_dir: Option<PathBuf>,
    /// Also serve metrics on the abstract socket `@/containerd-shim/<ns>/<id>/shim-monitor.sock`.
    pub(crate) abstract_socket: bool,
    /// Largest agent metrics text accepted, in bytes.
    pub(crate) max_agent_text: usize,
    /// Most samples accepted from the agent in one scrape.
    pub(crate) max_agent_samples: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let limits = crate::metrics::exposition::Limits::default();
        RuntimeConfig {
            sandbox_run_dir: None,
            abstract_socket: true,
            max_agent_text: limits.max_bytes,
            max_agent_samples: limits.max_samples,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    pub(crate) hypervisor: HypervisorSection,
    pub(crate) agent: AgentSection,
    pub(crate) runtime: RuntimeConfig,
    /// The file this came from; `None` for the built-in defaults.
    #[serde(skip)]
    pub(crate) source: Option<PathBuf>,
}

impl Config {
    /// Finds and reads the configuration: `$KATA_CONF_FILE`, then the system file, then defaults.
    pub(crate) fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(CONF_FILE_ENV) {
            // An explicitly named file must exist: falling back would hide the mistake.
            Some(path) if !path.is_empty() => Config::from_file(Path::new(&path)),
            _ if Path::new(SYSTEM_CONF_FILE).exists() => {
                Config::from_file(Path::new(SYSTEM_CONF_FILE))
            }
            _ => Ok(Config::default()),
        }
    }

    pub(crate) fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses `text` (read from `path`, which error messages name) and checks the values.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.source = Some(path.to_path_buf());
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let path = self.source.clone().unwrap_or_default();
        let invalid = |key, why: &str| ConfigError::Invalid {
            path: path.clone(),
            key,
            why: why.to_string(),
        };
        let qemu = &self.hypervisor.qemu;
        if !(64..=1 << 20).contains(&qemu.default_memory) {
            return Err(invalid(
                "hypervisor.qemu.default_memory",
                "must be between 64 and 1048576 MiB",
            ));
        }
        if !(1..=256).contains(&qemu.default_vcpus) {
            return Err(invalid(
                "hypervisor.qemu.default_vcpus",
                "must be between 1 and 256",
            ));
        }
        for (key, value) in [
            ("hypervisor.qemu.path", &qemu.path),
            ("hypervisor.qemu.kernel", &qemu.kernel),
            ("hypervisor.qemu.initrd", &qemu.initrd),
        ] {
            if value.as_os_str().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if let Some(dir) = &self.runtime.sandbox_run_dir {
            if !dir.is_absolute() {
                return Err(invalid(
                    "runtime.sandbox_run_dir",
                    "must be an absolute path",
                ));
            }
        }
        if self.runtime.max_agent_text < 1024 {
            return Err(invalid(
                "runtime.max_agent_text",
                "must be at least 1024 bytes",
            ));
        }
        Ok(())
    }

    /// Where this sandbox's directories live (the environment variable wins, as for clients).
    pub(crate) fn run_dir(&self) -> PathBuf {
        crate::mgmt::paths::run_dir(self.runtime.sandbox_run_dir.as_deref())
    }

    /// The agent client's deadlines.
    pub(crate) fn agent_timeouts(&self) -> crate::agent_client::AgentTimeouts {
        let kata = &self.agent.kata;
        crate::agent_client::AgentTimeouts {
            connect: kata.dial_timeout.0,
            metrics: kata.metrics_timeout.0,
            request: kata.request_timeout.0,
        }
    }

    /// Bounds on the agent's metrics text.
    pub(crate) fn agent_text_limits(&self) -> crate::metrics::exposition::Limits {
        crate::metrics::exposition::Limits {
            max_bytes: self.runtime.max_agent_text,
            max_samples: self.runtime.max_agent_samples,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/test.toml"))
    }

    #[test]
    fn the_example_file_parses_to_the_defaults_it_documents() {
        let example = include_str!("../../config/configuration.toml");
        let config = parse(example).expect("example config");
        assert_eq!(config.hypervisor.qemu.default_memory, 512);
        assert_eq!(config.hypervisor.qemu.accel, Accel::Auto);
        assert_eq!(
            config.agent.kata.metrics_timeout,
            Seconds(Duration::from_secs(1))
        );
    }

    #[test]
    fn an_empty_file_means_defaults() {
        let config = parse("").expect("empty config");
        assert_eq!(config.hypervisor, HypervisorSection::default());
        assert_eq!(config.agent, AgentSection::default());
    }

    #[test]
    fn kata_names_and_fractional_seconds() {
        let config = parse(
            "[hypervisor.qemu]\ndefault_memory = 256\naccel = \"tcg\"\nboot_timeout = 90\n\
             [agent.kata]\nmetrics_timeout = 0.5\n[runtime]\nsandbox_run_dir = \"/tmp/x\"\n",
        )
        .expect("config");
        assert_eq!(config.hypervisor.qemu.default_memory, 256);
        assert_eq!(config.hypervisor.qemu.accel, Accel::Tcg);
        assert_eq!(
            config.hypervisor.qemu.boot_timeout.0,
            Duration::from_secs(90)
        );
        assert_eq!(
            config.agent.kata.metrics_timeout.0,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn a_typo_is_an_error_naming_file_and_key() {
        let err = parse("[hypervisor.qemu]\ndefault_memroy = 256\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/test.toml"), "{err}");
        assert!(err.contains("default_memroy"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        let err = parse("[hypervisor.qemu]\naccel = \"xen\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/test.toml") && err.contains("accel"),
            "{err}"
        );
        let err = parse("[agent.kata]\nrequest_timeout = -3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("request_timeout"), "{err}");
        let err = parse("[hypervisor.qemu]\ndefault_memory = 16\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hypervisor.qemu.default_memory"), "{err}");
        let err = parse("[hypervisor.qemu]\ndefault_vcpus = \"two\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("default_vcpus"), "{err}");
    }

    #[test]
    fn a_named_file_that_is_missing_is_an_error() {
        let err = Config::from_file(Path::new("/nonexistent/k.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/k.toml"), "{err}");
    }
}
