//! The exit-rate benchmark's command line.

/// Default number of writes per run, for each workload.
pub const DEFAULT_ITERATIONS: u32 = 200_000;
/// Default number of runs per side.
pub const DEFAULT_REPEAT: usize = 3;

/// The usage text.
pub const USAGE: &str = "\
usage: exit-rate [--iterations N] [--repeat R]

Runs a guest that makes N PIO writes, then one that makes N MMIO writes, each through a
bare KVM_RUN loop (the floor) and through Ember's Vcpu::run, R times each, interleaved,
and prints the medians as a Markdown table.

  --iterations N   writes per run, 1..=4294967295 (default 200000)
  --repeat R       runs per side and workload, at least 1 (default 3)
  -h, --help       this text";

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Writes per run.
    pub iterations: u32,
    /// Runs per side and workload.
    pub repeat: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            iterations: DEFAULT_ITERATIONS,
            repeat: DEFAULT_REPEAT,
        }
    }
}

/// The parsed command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
                repeat: 5
            }))
        );
        assert_eq!(
            p(&["--iterations=1_000_000"]),
            Ok(Command::Run(Options {
                iterations: 1_000_000,
                repeat: DEFAULT_REPEAT
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
    }
}
