//! One process collector for any pid and metric prefix (shim, hypervisor, agent).
