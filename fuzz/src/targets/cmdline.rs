//! The command-line builder ([`ember_boot::Cmdline`]): any capacity, any parts
//! (printable, with NULs, control bytes, non-ASCII text, empty), then writing it to
//! guest memory at any address ([`ember_boot::cmdline::load_cmdline`]) and the boot structures
//! that point at it ([`ember_boot::configure_linux_boot`],
//! [`ember_boot::configure_pvh_boot`], with any initrd and RSDP addresses).
//!
//! Checked: the line only ever holds printable ASCII within its capacity; a refused
//! part leaves it unchanged; what is written reads back NUL-terminated; failures write
//! nothing; the zero page and `hvm_start_info` point at the line.

use ember_arch::layout::{CMDLINE_START, ZERO_PAGE_SIZE};
use ember_boot::cmdline::load_cmdline;
use ember_boot::configurator::pvh::HvmStartInfo;
use ember_boot::{configure_linux_boot, configure_pvh_boot, BootParams, Cmdline};
use vm_memory::{Bytes, GuestAddress};

use crate::common::{any_page_written, tracked_memory};
use crate::{decode, input_struct};

/// Guest memory: `(start, len)` regions.
pub const MEMORY: [(u64, u64); 2] = [(0, 2 << 20), (3 << 20, 1 << 20)];

input_struct! {
    /// `capacity_kind % 4`: the default capacity, `capacity`, `capacity % 40`, or
    /// `usize::MAX`. Then the parts, where to write the line (`addr`), and the boot
    /// structures: `boot % 3` none, Linux zero page, PVH; `initrd` (address, size) and
    /// `rsdp` for them.
    pub struct CmdlineInput {
        pub capacity_kind: u8,
        pub capacity: u16,
        pub parts: Vec<Part>,
        pub addr: u32,
        pub boot: u8,
        pub initrd: Option<[u8; 16]>,
        pub rsdp: Option<u64>,
    }
}

input_struct! {
    /// A part: `printable` maps every byte into `0x20..=0x7e`; otherwise the bytes are
    /// taken as (lossy) UTF-8.
    pub struct Part {
        pub printable: bool,
        pub bytes: Vec<u8>,
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<CmdlineInput>(data) else {
        return;
    };
    let mut cmdline = match input.capacity_kind % 4 {
        0 => Cmdline::default(),
        1 => match Cmdline::new(usize::from(input.capacity)) {
            Ok(c) => c,
            Err(_) => {
                assert_eq!(input.capacity, 0);
                return;
            }
        },
        2 => match Cmdline::new(usize::from(input.capacity % 40)) {
            Ok(c) => c,
            Err(_) => return,
        },
        _ => Cmdline::new(usize::MAX).expect("capacity"),
    };
    for part in input.parts.iter().take(64) {
        let s = if part.printable {
            part.bytes
                .iter()
                .map(|b| char::from(0x20 + b % 95))
                .collect()
        } else {
            String::from_utf8_lossy(&part.bytes).into_owned()
        };
        let before = cmdline.clone();
        match cmdline.insert_str(&s) {
            Ok(()) => {
                if !s.is_empty() {
                    assert!(cmdline.as_str().ends_with(&s));
                }
            }
            Err(_) => assert_eq!(cmdline, before, "a refused part changed the line"),
        }
        assert!(cmdline.len() < cmdline.capacity(), "over capacity");
        assert!(cmdline.as_str().bytes().all(|b| (0x20..=0x7e).contains(&b)));
        let c = cmdline.as_cstring_bytes();
        assert_eq!(&c[..c.len() - 1], cmdline.as_str().as_bytes());
        assert_eq!(c.last(), Some(&0));
    }

    let addr = match input.addr % 4 {
        0 => CMDLINE_START,
        1 => u64::from(input.addr) % (MEMORY[1].0 + MEMORY[1].1 + 0x1000),
        2 => u64::MAX - u64::from(input.addr % 0x1000),
        _ => u64::from(input.addr) << 20,
    };
    let mem = tracked_memory(&MEMORY);
    match load_cmdline(&mem, GuestAddress(addr), &cmdline) {
        Ok(()) => {
            let want = cmdline.as_cstring_bytes();
            let mut back = vec![0u8; want.len()];
            mem.read_slice(&mut back, GuestAddress(addr))
                .expect("read back");
            assert_eq!(back, want);
        }
        Err(e) => assert!(
            !any_page_written(&mem),
            "failed load_cmdline ({e}) wrote memory"
        ),
    }

    let mem = tracked_memory(&MEMORY);
    let rsdp = input.rsdp.map(GuestAddress);
    match input.boot % 3 {
        1 => match configure_linux_boot(&mem, &cmdline, rsdp) {
            Ok(zero_page) => {
                let mut page = [0u8; ZERO_PAGE_SIZE];
                mem.read_slice(&mut page, zero_page).expect("zero page");
                let params = BootParams::from_bytes(page);
                assert_eq!(params.cmd_line_ptr(), CMDLINE_START);
                assert_eq!(params.acpi_rsdp_addr(), rsdp.map_or(0, |r| r.0));
            }
            Err(e) => assert!(
                !any_page_written(&mem),
                "failed boot set-up ({e}) wrote memory"
            ),
        },
        2 => {
            let initrd = input.initrd.map(|b| {
                let addr = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
                let size = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
                (GuestAddress(addr), size)
            });
            match configure_pvh_boot(&mem, &cmdline, initrd, rsdp) {
                Ok(start_info) => {
                    let mut raw = [0u8; HvmStartInfo::SIZE];
                    mem.read_slice(&mut raw, start_info).expect("start info");
                    let info = HvmStartInfo::from_bytes(&raw);
                    assert_eq!(info.cmdline_paddr, CMDLINE_START);
                    assert_eq!(info.nr_modules, u32::from(initrd.is_some()));
                    assert_eq!(info.rsdp_paddr, rsdp.map_or(0, |r| r.0));
                }
                Err(e) => {
                    assert!(
                        !any_page_written(&mem),
                        "failed PVH set-up ({e}) wrote memory"
                    )
                }
            }
        }
        _ => {}
    }
}
