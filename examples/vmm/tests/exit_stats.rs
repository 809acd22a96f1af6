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
