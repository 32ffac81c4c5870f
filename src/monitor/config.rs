//! kata-monitor's command line (Kata-compatible flags plus ours) and the settings derived from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::mgmt::paths::{DEFAULT_RUN_DIR, KATA_RUN_DIR};

/// Prometheus' default scrape timeout is 10 s; a whole scrape must end before it.
pub(crate) const MAX_SCRAPE_DEADLINE: Duration = Duration::from_secs(8);

#[derive(Debug, Clone, Parser)]
#[command(
    name = "kata-monitor",
    about = "One Prometheus target for every Kata sandbox on this node"
)]
pub struct Args {
    /// Address the HTTP server listens on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub(crate) listen_address: SocketAddr,
    /// CRI socket. Accepted for compatibility: pod labels come from the shims (`/pod-labels`), and
    /// this monitor does not query CRI.
    #[arg(long)]
    pub(crate) runtime_endpoint: Option<String>,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// A directory holding `<sandbox id>/shim-monitor.sock` (repeatable). Default: /run/vc/sbs and
    /// /run/kata. A directory that does not exist yet is picked up when it appears.
    #[arg(long = "run-dir")]
    pub(crate) run_dirs: Vec<PathBuf>,
    /// Deadline for one shim's answer.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) scrape_timeout: Duration,
    /// Shims scraped at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) concurrency: u32,
}

/// What the monitor runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) listen_address: SocketAddr,
    pub(crate) runtime_endpoint: Option<String>,
    pub(crate) run_dirs: Vec<PathBuf>,
    pub(crate) scrape_timeout: Duration,
    pub(crate) concurrency: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--scrape-timeout must be more than zero and at most {max:?}, not {given:?}")]
    ScrapeTimeout { given: Duration, max: Duration },
    #[error("--run-dir {0:?} must be an absolute path")]
    RunDir(PathBuf),
}

impl Args {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        if self.scrape_timeout.is_zero() || self.scrape_timeout > MAX_SCRAPE_DEADLINE {
            return Err(ConfigError::ScrapeTimeout {
                given: self.scrape_timeout,
                max: MAX_SCRAPE_DEADLINE,
            });
        }
        let mut run_dirs = if self.run_dirs.is_empty() {
            vec![PathBuf::from(DEFAULT_RUN_DIR), PathBuf::from(KATA_RUN_DIR)]
        } else {
            self.run_dirs
        };
        if let Some(relative) = run_dirs.iter().find(|dir| !dir.is_absolute()) {
            return Err(ConfigError::RunDir(relative.clone()));
        }
        run_dirs.dedup();
        Ok(Config {
            listen_address: self.listen_address,
            runtime_endpoint: self.runtime_endpoint,
            run_dirs,
            scrape_timeout: self.scrape_timeout,
            concurrency: self.concurrency as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args =
            Args::try_parse_from(std::iter::once("kata-monitor").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        args.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_kata() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen_address.to_string(), "127.0.0.1:8090");
        assert_eq!(
            config.run_dirs,
            vec![PathBuf::from("/run/vc/sbs"), PathBuf::from("/run/kata")]
        );
        assert_eq!(config.scrape_timeout, Duration::from_secs(3));
    }

    #[test]
    fn flags_are_checked() {
        let config = parse(&["--run-dir", "/a", "--run-dir", "/b", "--concurrency", "4"]).unwrap();
        assert_eq!(
            config.run_dirs,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(config.concurrency, 4);
        assert!(parse(&["--run-dir", "rel"])
            .unwrap_err()
            .contains("absolute"));
        assert!(parse(&["--scrape-timeout", "20s"]).is_err());
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--listen-address", "nowhere"]).is_err());
    }
}
