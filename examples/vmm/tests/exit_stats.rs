//! `ember --exit-stats`: the exit profile printed when the VM ends, for guests with a
//! known number of exits. No timing is asserted, only counts and the table's shape.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use ember_guests::asm::assemble;
use ember_guests::elf::{flat_elf, GUEST_LOAD_ADDR};
use ember_guests::testing::kvm_available;
use iced_x86::code_asm::*;

/// Port writes the guest makes in its loop, before its debug-exit write.
const WRITES: u32 = 1000;

fn ember(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot start ember");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "ember panicked: {stderr}");
    out
}

/// `WRITES` writes to port 0x80 (no device there), then 0 to the debug-exit port.
fn port_writer(dir: &tempfile::TempDir) -> PathBuf {
    let code = assemble(GUEST_LOAD_ADDR, |a| {
        let mut top = a.create_label();
        a.mov(ecx, WRITES)?;
        a.set_label(&mut top)?;
        a.out(0x80, al)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.xor(eax, eax)?;
        a.out(0xf4, al)?;
        a.hlt()
    })
    .unwrap();
    let path = dir.path().join("port-writer");
    std::fs::write(&path, flat_elf(GUEST_LOAD_ADDR, &code, 0)).unwrap();
    path
}

/// The whitespace-separated fields of the table row for `reason`.
fn row<'a>(table: &'a str, reason: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&reason))
}

#[test]
fn exit_stats_counts_every_port_write_and_times_it() {
    if !kvm_available("exit_stats_counts_every_port_write_and_times_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = port_writer(&dir);
    let out = ember(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial",
        "none",
        "--exit-stats",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");

    let table = &err[err.find("ember: exit profile: ").expect(&err)..];
    assert!(table.contains("exits on 1 vCPU\n"), "{table}");
    let header = row(table, "reason").expect(table);
    assert_eq!(
        header[..8],
        ["reason", "exits", "timed", "mean", "p50", "p99", "max", "|"],
        "{table}"
    );
    let buckets = &header[8..];
    assert!(!buckets.is_empty(), "{table}");
    assert!(
        buckets
            .iter()
            .all(|b| b.starts_with('<') || b.starts_with(">=")),
        "{table}"
    );

    // Every loop write and the debug-exit write are port writes; each one was
    // followed by another KVM_RUN, so each was timed.
    let io = row(table, "io-out").expect(table);
    let expected = (WRITES + 1).to_string();
    assert_eq!(io[1], expected, "{table}");
    assert_eq!(io[2], expected, "{table}");
    assert_eq!(io[7], "|", "{table}");
    let histogram: u64 = io[8..].iter().map(|n| n.parse::<u64>().unwrap()).sum();
    assert_eq!(histogram, u64::from(WRITES + 1), "{table}");
    assert_eq!(io[8..].len(), buckets.len(), "{table}");

    // Nothing else but, at most, the kick that stops the vCPU and the summary row.
    for line in table.lines().skip(3) {
        let reason = line.split_whitespace().next().unwrap_or("");
        assert!(
            ["io-out", "interrupted", "all", "(exits"].contains(&reason),
            "unexpected row {line:?} in {table}"
        );
    }
}

#[test]
fn exit_stats_merges_every_vcpu_and_is_off_by_default() {
    if !kvm_available("exit_stats_merges_every_vcpu_and_is_off_by_default") {
        return;
    }
    // The demo guest runs on both vCPUs and writes to the serial port.
    let out = ember(&["--cpus", "2", "--serial", "none", "--exit-stats"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("exits on 2 vCPUs\n"), "{err}");
    let io = row(&err, "io-out").expect(&err);
    assert!(io[1].parse::<u64>().unwrap() > 100, "{err}");

    let out = ember(&["--serial", "none"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("exit profile"), "{err}");
}

/// A guest that loads an IDT whose #BP handler just returns, runs `int3` `count` times,
/// then writes 0 to the debug-exit port. Layout from `GUEST_LOAD_ADDR`: code, the
/// handler at +0x100, the IDT at +0x200, the IDT register image at +0x300.
fn int3_runner(dir: &tempfile::TempDir, count: usize) -> PathBuf {
    const HANDLER: u64 = GUEST_LOAD_ADDR + 0x100;
    const IDT: u64 = GUEST_LOAD_ADDR + 0x200;
    const IDTR: u64 = GUEST_LOAD_ADDR + 0x300;
    let mut image = assemble(GUEST_LOAD_ADDR, |a| {
        a.lidt(ptr(IDTR))?;
        for _ in 0..count {
            a.int3()?;
        }
        a.xor(eax, eax)?;
        a.out(0xf4, al)?;
        a.hlt()
    })
    .unwrap();
    assert!(image.len() <= 0x100);
    image.resize(0x100, 0x90);
    image.extend(assemble(HANDLER, |a| a.iretq()).unwrap());
    image.resize(0x200 + 3 * 16, 0);
    // Vector 3: a 64-bit interrupt gate (present, DPL 0) in the boot GDT's kernel code
    // segment (0x10).
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
    image.extend(gate);
    image.resize(0x300, 0);
    image.extend((4 * 16 - 1u16).to_le_bytes());
    image.extend(IDT.to_le_bytes());
    let path = dir.path().join("int3-runner");
    std::fs::write(&path, flat_elf(GUEST_LOAD_ADDR, &image, 0)).unwrap();
    path
}

#[test]
fn exit_stats_counts_instructions_the_fallback_completed() {
    if !kvm_available("exit_stats_counts_instructions_the_fallback_completed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = int3_runner(&dir, 3);
    let kernel = kernel.to_str().unwrap();
    let emulated = std::path::Path::new("/sys/module/kvm_pvm").exists();
    // The template auto-detection turns the fallback on exactly where it is needed.
    let out = ember(&["--kernel", kernel, "--serial", "none", "--exit-stats"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    match row(&err, "fallback-int3") {
        Some(fields) => {
            assert!(emulated, "hardware KVM runs int3 itself: {err}");
            assert_eq!(fields[1], "3", "{err}");
        }
        None => assert!(!emulated, "no fallback-int3 row: {err}"),
    }
    // With the fallback off (the host template), this host stops on the first int3.
    if emulated {
        let out = ember(&[
            "--kernel",
            kernel,
            "--serial",
            "none",
            "--cpu-template",
            "host",
        ]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("int3"), "{err}");
    }
}
