//! The exit-rate benchmark's command line.

use std::path::PathBuf;

/// Default number of writes per run, for each workload.
pub const DEFAULT_ITERATIONS: u32 = 500_000;
/// Default number of runs per side.
pub const DEFAULT_REPEAT: usize = 5;
/// Default number of timed start-up runs per VMM.
pub const DEFAULT_STARTUP_RUNS: usize = 21;

/// The usage text.
pub const USAGE: &str = "\
usage: exit-rate [--iterations N] [--repeat R] [--startup-runs S]
                 [--ember PATH] [--no-static] [--qemu PATH | --no-qemu]

1. Exit round trip. A guest that makes N port writes, then one that makes N MMIO
   writes (32-bit code with a PVH note: the same image everywhere), run R times each,
   interleaved, by: a bare KVM_RUN loop (the floor); Ember's Vcpu::run with exit timing
   off and on; the `ember` binary; QEMU -M microvm. Whole processes are measured as
   (t(N) - t(0)) / N.
2. Start-up and footprint. A guest whose first I/O is the boot-done write, run S times
   by `ember` and by QEMU: time to that exit and memory at exit.
Prints Markdown tables on stdout and progress on stderr.

  --iterations N    writes per run, 1..=4294967295 (default 500000)
  --repeat R        runs per way of running and workload, at least 1 (default 5)
  --startup-runs S  start-up runs per VMM, at least 1 (default 21)
  --ember PATH      an `ember` binary to run; repeat to compare builds (e.g. a
                    static-pie one). Default: the one next to this binary, built
                    first with `cargo build --release -p ember-vmm` when run by cargo
  --no-static       when run by cargo without --ember, do not also build and measure
                    a static-pie `ember` (RUSTFLAGS=-C target-feature=+crt-static,
                    --target x86_64-unknown-linux-gnu, in <target-dir>/static-pie)
  --qemu PATH       QEMU (default: qemu-system-x86_64 in PATH)
  --no-qemu         leave QEMU out
  -h, --help        this text";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Writes per run.
    pub iterations: u32,
    /// Runs per side and workload.
    pub repeat: usize,
    /// Start-up runs per VMM.
    pub startup_runs: usize,
    /// The `ember` binaries given, if any.
    pub ember: Vec<PathBuf>,
    /// QEMU, if given.
    pub qemu: Option<PathBuf>,
    /// Whether to leave QEMU out.
    pub no_qemu: bool,
    /// Whether to leave the static-pie `ember` build out.
    pub no_static: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            iterations: DEFAULT_ITERATIONS,
            repeat: DEFAULT_REPEAT,
            startup_runs: DEFAULT_STARTUP_RUNS,
            ember: Vec::new(),
            qemu: None,
            no_qemu: false,
            no_static: false,
        }
    }
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the benchmark.
    Run(Options),
    /// Print [`USAGE`].
    Help,
}

fn number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    let value = value.replace('_', "");
    value
        .parse()
        .map_err(|_| format!("{flag}: `{value}` is not a valid number"))
}

/// Parses the arguments after the program name. Accepts `--flag value` and
/// `--flag=value`, and `_` as a digit separator.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
            None => (arg, None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--iterations" => {
                options.iterations = number(&flag, inline.or_else(|| args.next()))?;
                if options.iterations == 0 {
                    return Err("--iterations must be at least 1".into());
                }
            }
            "--repeat" => {
                options.repeat = number(&flag, inline.or_else(|| args.next()))?;
                if options.repeat == 0 {
                    return Err("--repeat must be at least 1".into());
                }
            }
            "--startup-runs" => {
                options.startup_runs = number(&flag, inline.or_else(|| args.next()))?;
                if options.startup_runs == 0 {
                    return Err("--startup-runs must be at least 1".into());
                }
            }
            "--ember" | "--qemu" => {
                let path = inline
                    .or_else(|| args.next())
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| format!("{flag} needs a path"))?;
                if flag == "--ember" {
                    options.ember.push(path.into());
                } else {
                    options.qemu = Some(path.into());
                }
            }
            "--no-qemu" => options.no_qemu = true,
            "--no-static" => options.no_static = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Command::Run(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(p(&[]), Ok(Command::Run(Options::default())));
        assert_eq!(
            p(&["--iterations", "1000", "--repeat=5"]),
            Ok(Command::Run(Options {
                iterations: 1000,
                repeat: 5,
                ..Options::default()
            }))
        );
        assert_eq!(
            p(&["--iterations=1_000_000"]),
            Ok(Command::Run(Options {
                iterations: 1_000_000,
                ..Options::default()
            }))
        );
        assert_eq!(
            p(&[
                "--startup-runs",
                "4",
                "--ember=/x/ember",
                "--qemu",
                "/q",
                "--no-qemu",
                "--ember",
                "/y/ember",
                "--no-static"
            ]),
            Ok(Command::Run(Options {
                startup_runs: 4,
                ember: vec!["/x/ember".into(), "/y/ember".into()],
                qemu: Some("/q".into()),
                no_qemu: true,
                no_static: true,
                ..Options::default()
            }))
        );
        assert_eq!(p(&["--repeat", "1", "-h"]), Ok(Command::Help));
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(p(&["--iterations"]).unwrap_err().contains("needs a value"));
        assert!(p(&["--iterations", "0"]).is_err());
        assert!(p(&["--iterations", "5000000000"]).is_err());
        assert!(p(&["--repeat", "-1"]).is_err());
        assert!(p(&["--repeat", "0"]).is_err());
        assert!(p(&["--frobnicate"]).unwrap_err().contains("unknown"));
        assert!(p(&["--startup-runs", "0"]).is_err());
        assert!(p(&["--ember"]).unwrap_err().contains("needs a path"));
        assert!(p(&["--qemu="]).unwrap_err().contains("needs a path"));
    }
}
