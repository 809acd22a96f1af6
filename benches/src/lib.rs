//! Benchmarks of Ember's exit path.
//!
//! * `benches/bus_dispatch.rs` (criterion): lookup and dispatch of one access on an
//!   [`ember_bus::Bus`] with 1, 8 and 64 devices, and the unclaimed-address path.
//! * `src/bin/exit_rate.rs` (`cargo run --release -p ember-benches --bin exit-rate`): a
//!   guest that loops on `out dx, al` or an MMIO store (one PVH ELF image, see
//!   [`guest`]) run by a bare `KVM_RUN` loop (the floor), by [`ember_vcpu::Vcpu::run`]
//!   with exit timing off and on, by the `ember` binary and by QEMU `-M microvm`, with
//!   wall and CPU time per exit side by side; then start-up time and memory footprint
//!   of `ember` and QEMU on a guest whose first I/O is the boot-done write.
//! * `src/bin/snapshot.rs` (`cargo run --release -p ember-benches --bin snapshot`):
//!   `ember`'s restore, full snapshot and diff snapshot of a 2-vCPU, 256 MiB VM against
//!   floors, with the parts in [`snapshot`].
//! * `src/bin/signal_exit.rs` (`cargo run --release -p ember-benches --bin
//!   signal-exit`): SIGTERM and SIGINT to `ember` while its guest floods COM1 or its
//!   log and nobody reads its stdout or stderr, timed to the exit, against an idle
//!   guest (the floor) and a process with no VM; goal 100 ms.
//!
//! This library holds what both share and what is worth unit-testing: the trivial
//! device ([`device`]), the guests ([`guest`]), the VM set-up ([`vm`]), the in-process
//! run loops ([`measure`]), whole VMM processes ([`process`]), the summaries and
//! Markdown tables ([`report`]) and the command line ([`args`]).

#![deny(missing_docs)]

pub mod args;
pub mod device;
mod error;
pub mod guest;
pub mod measure;
pub mod process;
pub mod report;
pub mod snapshot;
pub mod vm;

pub use error::Error;

/// The target directory the running bench binary was built into (`target` for
/// `target/release/snapshot`), or `./target`: where `ember` is looked for.
pub fn target_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let mut dir = exe.parent()?.to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir = dir.parent()?.to_path_buf();
            }
            Some(dir.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| std::path::PathBuf::from("target"))
}

/// The end of a bench binary's `main`, once its arguments are parsed: checks that
/// `/dev/kvm` can be opened (saying loudly that the bench did not run if not), runs
/// `run`, and turns its result into the exit status, errors printed as
/// `<name>: error: ...`.
pub fn run_with_kvm(
    name: &str,
    run: impl FnOnce() -> Result<(), Box<dyn std::error::Error>>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = kvm {
        eprintln!("!!! KVM UNAVAILABLE: {name} cannot run: cannot open /dev/kvm: {e}");
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            ExitCode::FAILURE
        }
    }
}
