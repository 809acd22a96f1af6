//! `ember` running the test guests written in Rust (`guests/`), which run their Rust
//! code in user mode (CPL3), where nested KVM runs it natively.

use std::process::Command;
use std::time::Instant;

use ember_guests::rust_guest::build_guest;
use ember_guests::testing::kvm_available;

#[test]
fn virtio_guest_runs_rust_in_user_mode() {
    if !kvm_available("virtio_guest_runs_rust_in_user_mode") {
        return;
    }
    let started = Instant::now();
    let elf = build_guest("virtio-guest").unwrap_or_else(|e| panic!("{e}"));
    eprintln!("built {} in {:?}", elf.display(), started.elapsed());

    let cmdline = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5";
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--kernel")
        .arg(&elf)
        .args(["--cmdline", cmdline])
        .output()
        .expect("cannot start ember");
    eprintln!("ran in {:?}", started.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(!stderr.contains("panicked"), "{context}");

    for expected in [
        "virtio-guest: running at CPL3\n",
        "CPL: 3\n",
        // ember may append parameters (noxsave) to the command line.
        &format!("virtio-guest: cmdline: {cmdline}"),
        "virtio-guest: virtio-mmio device: 0xd0000000, size 4096, irq 5\n",
        "virtio-guest: vec of 100000 u64: sum 4999950000, mean 49999.500, half sum 2.5e9\n",
        "virtio-guest: done\n",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?}\n{context}");
    }
    // Whatever the VMM answers at an address with no device, the probe reports it
    // rather than failing.
    assert!(
        stdout.contains("virtio-guest: device at 0xd0000000: "),
        "{context}"
    );
}
