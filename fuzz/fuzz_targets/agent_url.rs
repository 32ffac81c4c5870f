#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kata_shim_metrics::fuzzing::agent_url(data));
