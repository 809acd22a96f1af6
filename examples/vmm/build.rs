//! Assembles the embedded demo guest, with the port numbers the VMM's devices use.

use ember_devices::{BOOT_DONE_MAGIC, BOOT_DONE_PORT, COM1_PORT, DEBUG_EXIT_PORT};
use ember_guests::demo::{demo_elf, DemoPorts};

fn main() {
    let ports = DemoPorts {
        serial: COM1_PORT,
        debug_exit: DEBUG_EXIT_PORT,
        boot_done: BOOT_DONE_PORT,
        boot_done_magic: BOOT_DONE_MAGIC,
    };
    let image = demo_elf(&ports).unwrap_or_else(|e| panic!("cannot assemble the demo guest: {e}"));
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("demo-guest.elf"), image).expect("cannot write the demo guest");
    println!("cargo:rerun-if-changed=build.rs");
}
