//! Writes the seed corpus, `fuzz/corpus/<target>/seed-<name>`, from
//! `ember_fuzz::seeds` (run after changing a harness's input format or the seeds):
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example write-seeds
//! ```

use std::fs;
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for seed in ember_fuzz::seeds::all() {
        let dir = root.join(seed.target);
        fs::create_dir_all(&dir).expect("create the corpus directory");
        let path = dir.join(format!("seed-{}", seed.name));
        fs::write(&path, &seed.data).expect("write the seed");
        println!("{} ({} bytes)", path.display(), seed.data.len());
    }
}
