//! A container's OCI resources as cgroup v2 limits (memory.max, memory.low, memory.swap.max,
//! cpu.max, cpu.weight, pids.max), applied where its usage is measured: its cgroup in the guest.
//!
//! The values follow OCI (and Kata's messages): 0 means "not set" (the file is left alone), -1
//! means unlimited (`max`). Swap is memory plus swap (cgroup v1's memsw), as kubelet and runc pass
//! it; cgroup v2 limits swap alone, so `memory.swap.max` is the difference, as runc writes it.

use std::path::Path;

use crate::protocols::oci as grpc;

/// cpu.max's period when the spec gives a quota without one (the kernel's default).
const DEFAULT_CPU_PERIOD: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LimitError {
    #[error("{field} {value} is not a valid limit")]
    Invalid { field: &'static str, value: i64 },
    #[error("writing {value:?} to {file}: {source}")]
    Write {
        file: String,
        value: String,
        source: std::io::Error,
    },
}

/// The cgroup files and values that `resources` asks for, in the order they are written
/// (memory.max before memory.swap.max, which the kernel checks against it).
pub(crate) fn cgroup_values(
    resources: &grpc::LinuxResources,
) -> Result<Vec<(&'static str, String)>, LimitError> {
    let mut values = Vec::new();
    if let Some(memory) = resources.Memory.as_ref() {
        let limit = limit_value("memory limit", memory.Limit)?;
        if let Some(limit) = &limit {
            values.push(("memory.max", limit.clone()));
        }
        if let Some(low) = limit_value("memory reservation", memory.Reservation)? {
            values.push(("memory.low", low));
        }
        match (memory.Swap, memory.Limit) {
            (0, _) => {}
            (-1, _) => values.push(("memory.swap.max", "max".to_string())),
            (swap, limit) if limit > 0 && swap >= limit => {
                values.push(("memory.swap.max", (swap - limit).to_string()))
            }
            (swap, _) => {
                return Err(LimitError::Invalid {
                    field: "memory+swap limit (below the memory limit, or without one)",
                    value: swap,
                })
            }
        }
    }
    if let Some(cpu) = resources.CPU.as_ref() {
        if cpu.Shares != 0 {
            values.push(("cpu.weight", cpu_weight(cpu.Shares).to_string()));
        }
        let period = if cpu.Period == 0 {
            DEFAULT_CPU_PERIOD
        } else {
            cpu.Period
        };
        match cpu.Quota {
            0 if cpu.Period != 0 => values.push(("cpu.max", format!("max {period}"))),
            0 => {}
            -1 => values.push(("cpu.max", format!("max {period}"))),
            quota if quota > 0 => values.push(("cpu.max", format!("{quota} {period}"))),
            quota => {
                return Err(LimitError::Invalid {
                    field: "CPU quota",
                    value: quota,
                })
            }
        }
    }
    if let Some(pids) = resources.Pids.as_ref() {
        if let Some(limit) = limit_value("pids limit", pids.Limit)? {
            values.push(("pids.max", limit));
        }
    }
    Ok(values)
}

/// Writes `resources` into the cgroup at `dir`.
pub(crate) fn apply(dir: &Path, resources: &grpc::LinuxResources) -> Result<(), LimitError> {
    for (file, value) in cgroup_values(resources)? {
        let path = dir.join(file);
        std::fs::write(&path, &value).map_err(|source| LimitError::Write {
            file: path.display().to_string(),
            value,
            source,
        })?;
    }
    Ok(())
}

/// `None` for 0 (not set), `max` for -1, the number otherwise.
fn limit_value(field: &'static str, value: i64) -> Result<Option<String>, LimitError> {
    match value {
        0 => Ok(None),
        -1 => Ok(Some("max".to_string())),
        v if v > 0 => Ok(Some(v.to_string())),
        v => Err(LimitError::Invalid { field, value: v }),
    }
}

/// cgroup v1 shares (2..262144) as a v2 weight (1..10000), as runc and the kernel docs map them.
fn cpu_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(
        memory: i64,
        swap: i64,
        shares: u64,
        quota: i64,
        pids: i64,
    ) -> grpc::LinuxResources {
        grpc::LinuxResources {
            Memory: Some(grpc::LinuxMemory {
                Limit: memory,
                Swap: swap,
                ..Default::default()
            })
            .into(),
            CPU: Some(grpc::LinuxCPU {
                Shares: shares,
                Quota: quota,
                Period: 0,
                ..Default::default()
            })
            .into(),
            Pids: Some(grpc::LinuxPids {
                Limit: pids,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn kubelets_limits_become_cgroup_v2_files() {
        // A pod with limits of 64 MiB and half a CPU, requests of 0.25 CPU (256 shares).
        let values = cgroup_values(&resources(64 << 20, 64 << 20, 256, 50_000, 100)).unwrap();
        assert_eq!(
            values,
            vec![
                ("memory.max", "67108864".to_string()),
                ("memory.swap.max", "0".to_string()),
                ("cpu.weight", "10".to_string()),
                ("cpu.max", "50000 100000".to_string()),
                ("pids.max", "100".to_string()),
            ]
        );
    }

    #[test]
    fn unset_and_unlimited_values() {
        assert_eq!(cgroup_values(&resources(0, 0, 0, 0, 0)).unwrap(), vec![]);
        assert_eq!(
            cgroup_values(&resources(-1, -1, 2, -1, -1)).unwrap(),
            vec![
                ("memory.max", "max".to_string()),
                ("memory.swap.max", "max".to_string()),
                ("cpu.weight", "1".to_string()),
                ("cpu.max", "max 100000".to_string()),
                ("pids.max", "max".to_string()),
            ]
        );
        // The default of 1024 shares is weight 39, as runc maps it; the maximum is 10000.
        assert_eq!(cpu_weight(1024), 39);
        assert_eq!(cpu_weight(262_144), 10_000);
    }

    #[test]
    fn nonsense_is_refused_with_the_field() {
        let err = cgroup_values(&resources(-5, 0, 0, 0, 0)).unwrap_err();
        assert_eq!(err.to_string(), "memory limit -5 is not a valid limit");
        let err = cgroup_values(&resources(64, 32, 0, 0, 0)).unwrap_err();
        assert!(err.to_string().contains("memory+swap"), "{err}");
        let err = cgroup_values(&resources(0, 0, 0, -7, 0)).unwrap_err();
        assert_eq!(err.to_string(), "CPU quota -7 is not a valid limit");
    }

    #[test]
    fn apply_writes_the_files_and_names_the_one_that_failed() {
        let dir = tempfile::tempdir().unwrap();
        apply(dir.path(), &resources(32 << 20, 0, 0, 20_000, 0)).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("memory.max"), "33554432");
        assert_eq!(read("cpu.max"), "20000 100000");
        let missing = dir.path().join("gone");
        let err = apply(&missing, &resources(1 << 20, 0, 0, 0, 0)).unwrap_err();
        assert!(err.to_string().contains("gone/memory.max"), "{err}");
    }
}
