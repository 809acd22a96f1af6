#![no_main]
// The logic lives in ember_fuzz::targets::boot_bzimage, where `cargo test` replays the corpus.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::targets::boot_bzimage::run(data));
