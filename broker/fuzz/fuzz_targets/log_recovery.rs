#![no_main]
//! `warren_broker::fuzzing::log_recovery`: see its documentation for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| warren_broker::fuzzing::log_recovery(data));
