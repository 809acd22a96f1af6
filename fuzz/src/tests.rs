//! Replays the committed corpus and regressions through every harness, and keeps the
//! seed corpus in step with [`crate::seeds`].

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::{seeds, TARGETS};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The regular files of `dir`, sorted (none if it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let mut failures = Vec::new();
    let mut count = 0;
    for &(target, run) in TARGETS {
        for file in files(&fuzz_dir().join(kind).join(target)) {
            let data = fs::read(&file).expect("read corpus file");
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
    count
}

#[test]
fn corpus_replays_cleanly() {
    let n = replay("corpus");
    assert!(n >= TARGETS.len(), "only {n} corpus files");
}

#[test]
fn regressions_replay_cleanly() {
    replay("regressions");
}

#[test]
fn seeds_are_committed_as_generated() {
    let mut stale = Vec::new();
    for seed in seeds::all() {
        let path = fuzz_dir()
            .join("corpus")
            .join(seed.target)
            .join(format!("seed-{}", seed.name));
        if fs::read(&path).ok().as_deref() != Some(&seed.data[..]) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "seed files missing or stale (run `cargo run --manifest-path fuzz/Cargo.toml --example write-seeds`): {stale:#?}"
    );
}

#[test]
fn every_target_has_seeds_and_a_fuzz_target() {
    let seeds = seeds::all();
    for &(target, _) in TARGETS {
        assert!(
            seeds.iter().any(|s| s.target == target),
            "no seed for {target}"
        );
        let bin = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        assert!(bin.is_file(), "missing {}", bin.display());
    }
    let bins = files(&fuzz_dir().join("fuzz_targets"));
    assert_eq!(
        bins.len(),
        TARGETS.len(),
        "fuzz_targets/ and TARGETS differ"
    );
}

#[test]
fn committed_corpus_stays_small() {
    let total: u64 = ["corpus", "regressions"]
        .iter()
        .flat_map(|kind| {
            TARGETS
                .iter()
                .map(move |(t, _)| fuzz_dir().join(kind).join(t))
        })
        .flat_map(|dir| files(&dir))
        .filter_map(|f| fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    assert!(total < 1 << 20, "corpus and regressions hold {total} bytes");
}
