//! Prometheus text exposition: parse, validate, relabel, merge and encode (no I/O).
