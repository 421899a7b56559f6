#![no_main]
//! `warren_broker::fuzzing::metadata`: see its documentation for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| warren_broker::fuzzing::metadata(data));
