#![no_main]
//! `warren_broker::fuzzing::link_uri`: see its documentation for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| warren_broker::fuzzing::link_uri(data));
