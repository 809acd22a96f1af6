//! Writes the demo guest ELF, with the ports of Ember's legacy devices, to a file:
//! `cargo run -p ember-guests --example write-demo-guest -- OUT.elf`. For booting it
//! from the command line, as `.ci/run` does with `ember-minimal`.

use std::process::ExitCode;

use ember_devices::{BOOT_DONE_MAGIC, BOOT_DONE_PORT, COM1_PORT, DEBUG_EXIT_PORT};
use ember_guests::demo::{demo_elf, DemoPorts};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: write-demo-guest OUT.elf");
        return ExitCode::from(2);
    };
    let ports = DemoPorts {
        serial: COM1_PORT,
        debug_exit: DEBUG_EXIT_PORT,
        boot_done: BOOT_DONE_PORT,
        boot_done_magic: BOOT_DONE_MAGIC,
    };
    let written = demo_elf(&ports)
        .map_err(|e| e.to_string())
        .and_then(|image| std::fs::write(&out, image).map_err(|e| e.to_string()));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "write-demo-guest: cannot write {}: {e}",
                out.to_string_lossy()
            );
            ExitCode::FAILURE
        }
    }
}
