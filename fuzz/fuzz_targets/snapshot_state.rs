#![no_main]
// The logic lives in ember_fuzz::targets::snapshot_state, where `cargo test` replays the corpus.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::targets::snapshot_state::run(data));
