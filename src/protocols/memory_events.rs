//! Where StatsContainer's reply carries a cgroup's memory.events: Kata's messages have a field
//! only for its `max` count (`MemoryData.failcnt`), so every count containerd's `MemoryEvents`
//! holds also travels in `MemoryStats.stats` as `memory.events.<key>`. memory.stat's own keys
//! never hold a dot, so the two cannot collide, and a Kata shim reading the map ignores them.

/// The memory.events keys the agent sends: those of containerd's cgroups v2 `MemoryEvents`.
pub(crate) const KEYS: [&str; 6] = ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"];

const PREFIX: &str = "memory.events.";

/// The `MemoryStats.stats` key of memory.events' `key`.
pub(crate) fn stats_key(key: &str) -> String {
    format!("{PREFIX}{key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_keys_are_named_after_their_file() {
        assert_eq!(stats_key("oom_kill"), "memory.events.oom_kill");
    }
}
