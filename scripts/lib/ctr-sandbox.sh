# Shared step of the scripts that run a sandbox with `ctr run -d` (demo.sh, bench-sandbox.sh).
# Source it.

# Kills sandbox <id> of the private containerd in <dir> (through <containerd-env.sh>), waits for
# it to stop, and deletes its task and container; quiet, and a no-op for what is already gone.
remove_ctr_sandbox() {
    local env_sh=$1 dir=$2 id=$3
    "$env_sh" ctr "$dir" task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    for _ in $(seq 50); do
        "$env_sh" ctr "$dir" task ls 2>/dev/null | grep -q "^$id .*RUNNING" || break
        sleep 0.2
    done
    "$env_sh" ctr "$dir" task delete "$id" >/dev/null 2>&1 || true
    "$env_sh" ctr "$dir" container delete "$id" >/dev/null 2>&1 || true
}
