//! Unit tests: every error variant, the checks' order, hostile payloads, files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_sregs};
use serde::{Deserialize, Serialize};

use crate::*;

const V: u32 = 3;

/// A nested state like a VMM's: KVM structures, a vector of devices, options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    regs: kvm_regs,
    sregs: kvm_sregs,
    lapic: kvm_lapic_state,
    devices: Vec<Device>,
    name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Device {
    id: u32,
    registers: Vec<u8>,
    irq: Option<u32>,
}

fn state() -> State {
    let regs = kvm_regs {
        rip: 0xffff_ffff_8100_0000,
        rsp: 0x7000,
        rflags: 0x246,
        ..Default::default()
    };
    let mut sregs = kvm_sregs {
        cr0: 0x8005_0033,
        efer: 0xd01,
        ..Default::default()
    };
    sregs.cs.selector = 0x10;
    let mut lapic = kvm_lapic_state::default();
    lapic.regs[0x20] = 1;
    State {
        regs,
        sregs,
        lapic,
        devices: vec![
            Device {
                id: 1,
                registers: vec![0x03, 0x00, 0xc1],
                irq: Some(4),
            },
            Device {
                id: 2,
                registers: vec![],
                irq: None,
            },
        ],
        name: Some("vm0".into()),
    }
}

/// A small container for exhaustive corruption tests.
fn small() -> Vec<u8> {
    encode(V, &(0x1234u16, String::from("ab"), Some(7u8))).unwrap()
}
type Small = (u16, String, Option<u8>);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ember-snapshot-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn round_trip_of_a_nested_state() {
    let s = state();
    let bytes = encode(V, &s).unwrap();
    assert_eq!(decode::<State>(&bytes, V).unwrap(), s);
    // Deterministic.
    assert_eq!(encode(V, &s).unwrap(), bytes);
}

#[test]
fn layout_is_as_documented() {
    let bytes = encode(0x0102_0304, &vec![9u8, 8]).unwrap();
    assert_eq!(&bytes[..8], b"EMBERSNP");
    assert_eq!(&bytes[8..12], &[4, 3, 2, 1]);
    // Payload: postcard's varint length 2, then the two bytes.
    assert_eq!(&bytes[12..20], &3u64.to_le_bytes());
    assert_eq!(&bytes[20..23], &[2, 9, 8]);
    let crc = checksum(&bytes[..23]);
    assert_eq!(&bytes[23..], &crc.to_le_bytes());
    assert_eq!(bytes.len(), MIN_LEN + 3);
    // The catalogue's check value of CRC-64/ECMA-182.
    assert_eq!(checksum(b"123456789"), 0x6c40_df5f_0b49_7347);
}

#[test]
fn truncated_at_every_offset() {
    let bytes = small();
    for cut in 0..bytes.len() {
        let err = decode::<Small>(&bytes[..cut], V).unwrap_err();
        let needed = if cut < MIN_LEN { MIN_LEN } else { bytes.len() } as u64;
        match err {
            SnapshotError::Truncated { len, needed: n } => {
                assert_eq!((len, n), (cut as u64, needed), "cut at {cut}");
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    assert!(decode::<Small>(&bytes, V).is_ok());
}

#[test]
fn flipped_bit_anywhere_is_caught() {
    let bytes = small();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut corrupt = bytes.clone();
            corrupt[i] ^= 1 << bit;
            let err = decode::<Small>(&corrupt, V).unwrap_err();
            let ok = match i {
                0..8 => matches!(err, SnapshotError::BadMagic { .. }),
                8..12 => matches!(err, SnapshotError::UnsupportedVersion { .. }),
                12..20 => matches!(
                    err,
                    SnapshotError::Truncated { .. } | SnapshotError::LengthMismatch { .. }
                ),
                _ => matches!(err, SnapshotError::Checksum { .. }),
            };
            assert!(ok, "bit {bit} of byte {i}: {err:?}");
        }
    }
}

#[test]
fn bad_magic_names_what_was_found() {
    let mut bytes = small();
    bytes[..8].copy_from_slice(b"ELF\x7fELF!");
    match decode::<Small>(&bytes, V).unwrap_err() {
        SnapshotError::BadMagic { found } => assert_eq!(&found, b"ELF\x7fELF!"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_version() {
    let bytes = encode(V + 1, &1u8).unwrap();
    let err = decode::<u8>(&bytes, V).unwrap_err();
    assert!(
        matches!(err, SnapshotError::UnsupportedVersion { found, supported } if found == V + 1 && supported == V),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("version {}", V + 1)));
}

#[test]
fn trailing_bytes_after_the_declared_length() {
    let mut bytes = small();
    let declared = (bytes.len() - MIN_LEN) as u64;
    bytes.push(0);
    match decode::<Small>(&bytes, V).unwrap_err() {
        SnapshotError::LengthMismatch {
            declared: d,
            actual,
        } => assert_eq!((d, actual), (declared, declared + 1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn checksum_mismatch_reports_both_values() {
    let mut bytes = small();
    let last = bytes.len() - 1;
    bytes[20] ^= 0xff;
    let computed = checksum(&bytes[..last - 7]);
    let stored = u64::from_le_bytes(bytes[last - 7..].try_into().unwrap());
    match decode::<Small>(&bytes, V).unwrap_err() {
        SnapshotError::Checksum {
            stored: s,
            computed: c,
        } => assert_eq!((s, c), (stored, computed)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn checks_run_in_order() {
    // Wrong magic and wrong version and wrong length and wrong checksum: magic first.
    let mut bytes = small();
    bytes[0] = b'X';
    bytes[8] ^= 1;
    bytes.push(1);
    assert!(matches!(
        decode::<Small>(&bytes, V),
        Err(SnapshotError::BadMagic { .. })
    ));
    bytes[0] = b'E';
    assert!(matches!(
        decode::<Small>(&bytes, V),
        Err(SnapshotError::UnsupportedVersion { .. })
    ));
    bytes[8] ^= 1;
    assert!(matches!(
        decode::<Small>(&bytes, V),
        Err(SnapshotError::LengthMismatch { .. })
    ));
    bytes.pop();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    assert!(matches!(
        decode::<Small>(&bytes, V),
        Err(SnapshotError::Checksum { .. })
    ));
}

#[test]
fn wrong_type_is_a_decode_error() {
    // A valid container whose payload is not a `State`.
    let bytes = encode(V, &(1u8, 2u8)).unwrap();
    assert!(matches!(
        decode::<State>(&bytes, V),
        Err(SnapshotError::Decode(_))
    ));
    // A payload with bytes left over after the value.
    let bytes = frame(V, &[5, 6]).unwrap();
    match decode::<u8>(&bytes, V).unwrap_err() {
        SnapshotError::Decode(msg) => assert!(msg.contains("1 bytes left over"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(decode::<(u8, u8)>(&bytes, V).unwrap(), (5, 6));
    // An invalid bool, an invalid UTF-8 string, an invalid Option tag.
    for (payload, what) in [
        (&[2u8][..], "bool"),
        (&[2, 0xff, 0xfe][..], "string"),
        (&[9, 0][..], "option"),
    ] {
        let bytes = frame(V, payload).unwrap();
        let result = match what {
            "bool" => decode::<bool>(&bytes, V).map(drop),
            "string" => decode::<String>(&bytes, V).map(drop),
            _ => decode::<Option<u8>>(&bytes, V).map(drop),
        };
        assert!(
            matches!(result, Err(SnapshotError::Decode(_))),
            "{what}: {result:?}"
        );
    }
}

/// postcard varint of `value`.
fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[test]
fn length_prefix_bombs_fail_fast_without_allocating() {
    let start = Instant::now();
    // A Vec<u64> declaring 2^60 elements, then two of them.
    let mut payload = varint(1 << 60);
    payload.extend_from_slice(&[1, 2]);
    let bytes = frame(V, &payload).unwrap();
    assert!(matches!(
        decode::<Vec<u64>>(&bytes, V),
        Err(SnapshotError::Decode(_))
    ));
    // The same for bytes, strings, nested vectors and the KVM structures (read as
    // byte strings).
    assert!(matches!(
        decode::<Vec<u8>>(&bytes, V),
        Err(SnapshotError::Decode(_))
    ));
    assert!(matches!(
        decode::<String>(&bytes, V),
        Err(SnapshotError::Decode(_))
    ));
    assert!(matches!(
        decode::<Vec<Vec<State>>>(&bytes, V),
        Err(SnapshotError::Decode(_))
    ));
    assert!(matches!(
        decode::<kvm_lapic_state>(&bytes, V),
        Err(SnapshotError::Decode(_))
    ));
    // The largest varint postcard takes for a usize, and one too long.
    for payload in [
        vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        vec![0xff; 11],
    ] {
        let bytes = frame(V, &payload).unwrap();
        assert!(matches!(
            decode::<Vec<Device>>(&bytes, V),
            Err(SnapshotError::Decode(_))
        ));
    }
    // Declared counts never reach the allocator: this would need exabytes.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn too_large_is_refused_both_ways() {
    let huge = vec![0u8; MAX_STATE_FILE_SIZE as usize];
    match encode(V, &huge).unwrap_err() {
        SnapshotError::TooLarge { size, max } => {
            assert_eq!(max, MAX_STATE_FILE_SIZE);
            assert!(size > MAX_STATE_FILE_SIZE);
        }
        other => panic!("{other:?}"),
    }
    let over = vec![0u8; MAX_STATE_FILE_SIZE as usize + 1];
    assert!(matches!(
        decode::<u8>(&over, V),
        Err(SnapshotError::TooLarge { .. })
    ));
}

/// Serializes as a sequence of unknown length, which postcard cannot encode.
struct UnknownLength;
impl Serialize for UnknownLength {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(std::iter::from_fn(|| None::<u8>).filter(|_| true))
    }
}

#[test]
fn unencodable_state_is_an_encode_error() {
    assert!(matches!(
        encode(V, &UnknownLength),
        Err(SnapshotError::Encode(_))
    ));
}

#[test]
fn save_and_load_round_trip() {
    let dir = TempDir::new("round-trip");
    let path = dir.0.join("vm.state");
    save(&path, V, &state()).unwrap();
    assert_eq!(load::<State>(&path, V).unwrap(), state());
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The file is exactly the encoding.
    assert_eq!(fs::read(&path).unwrap(), encode(V, &state()).unwrap());
    // Replacing it leaves no temporary file behind.
    save(&path, V, &1u32).unwrap();
    assert_eq!(load::<u32>(&path, V).unwrap(), 1);
    let names: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["vm.state"]);
}

#[test]
fn save_into_a_bare_file_name_uses_the_current_directory() {
    assert_eq!(file_parent("state"), PathBuf::from("."));
    assert_eq!(file_parent("/a/b"), PathBuf::from("/a"));
}

fn file_parent(p: &str) -> PathBuf {
    // Exercised through `save`'s helper.
    crate::file::tests_parent_dir(std::path::Path::new(p))
}

#[test]
fn failed_save_leaves_the_old_file_and_no_temporary() {
    let dir = TempDir::new("failed-save");
    let path = dir.0.join("vm.state");
    save(&path, V, &5u8).unwrap();
    // An unencodable state: nothing is written at all.
    assert!(save(&path, V, &UnknownLength).is_err());
    // A rename that fails: the target is a non-empty directory.
    let blocked = dir.0.join("blocked");
    fs::create_dir(&blocked).unwrap();
    fs::write(blocked.join("x"), b"x").unwrap();
    match save(&blocked, V, &5u8).unwrap_err() {
        SnapshotError::Io { path, op, .. } => {
            assert_eq!(path, blocked);
            assert!(op.contains("rename"), "{op}");
        }
        other => panic!("{other:?}"),
    }
    let mut names: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["blocked", "vm.state"]);
    assert_eq!(load::<u8>(&path, V).unwrap(), 5);
}

#[test]
fn save_into_a_missing_directory_names_the_temporary_file() {
    let path = PathBuf::from("/nonexistent-ember-dir/vm.state");
    match save(&path, V, &1u8).unwrap_err() {
        SnapshotError::Io { path, .. } => {
            assert!(path.starts_with("/nonexistent-ember-dir"), "{path:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn load_errors() {
    let dir = TempDir::new("load");
    // Missing file.
    let missing = dir.0.join("missing");
    match load::<u8>(&missing, V).unwrap_err() {
        SnapshotError::Io { path, source, .. } => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    // A directory.
    assert!(matches!(
        load::<u8>(&dir.0, V),
        Err(SnapshotError::NotRegularFile { .. })
    ));
    // A FIFO: refused before it is opened (opening it would block).
    let fifo = dir.0.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(matches!(
        load::<u8>(&fifo, V),
        Err(SnapshotError::NotRegularFile { .. })
    ));
    // Too large: refused from its size, without reading (a sparse file).
    let big = dir.0.join("big");
    let f = fs::File::create(&big).unwrap();
    f.set_len(MAX_STATE_FILE_SIZE + 1).unwrap();
    match load::<u8>(&big, V).unwrap_err() {
        SnapshotError::TooLarge { size, max } => {
            assert_eq!((size, max), (MAX_STATE_FILE_SIZE + 1, MAX_STATE_FILE_SIZE))
        }
        other => panic!("{other:?}"),
    }
    // A truncated file.
    let cut = dir.0.join("cut");
    fs::write(&cut, &small()[..10]).unwrap();
    assert!(matches!(
        load::<Small>(&cut, V),
        Err(SnapshotError::Truncated { len: 10, .. })
    ));
}
