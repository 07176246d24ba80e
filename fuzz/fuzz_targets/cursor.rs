#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chargegate::fuzzing::cursor(data));
