//! The command line, parsed into a [`VmConfig`].

use std::path::PathBuf;

use clap::Parser;

use ember_vcpu::cpuid::CpuTemplate;

use crate::config::{
    CpuTemplateChoice, DiskConfig, EntryChoice, KernelSource, NetConfig, SerialConfig, VmConfig,
};

/// Ember's example VMM: boots a Linux kernel (or, with no kernel, its embedded demo
/// guest) on KVM.
#[derive(Debug, Parser)]
#[command(name = "ember", version, about)]
pub struct Cli {
    /// Kernel to boot: an uncompressed 64-bit ELF vmlinux. Without it, the embedded
    /// demo guest runs.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Kernel command line (replaces the default).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Guest memory: a bare number is MiB; K, M and G suffixes are accepted (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory_size)]
    pub memory: u64,

    /// Number of vCPUs.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub cpus: u32,

    /// Where the guest's serial port (COM1) goes: stdio, file=PATH or none.
    ///
    /// With stdio and a terminal on stdin, the terminal is in raw mode while the guest
    /// runs (keys such as Ctrl-C go to the guest) and escapes start with Ctrl-A:
    /// Ctrl-A x quits (exit status 0), Ctrl-A Ctrl-A sends Ctrl-A, Ctrl-A h lists them.
    #[arg(long, value_name = "SPEC", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialConfig,

    /// Initial ramdisk to hand to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// CPU template: auto (detect the host), host (KVM's CPUID as is) or nested-compat
    /// (for hosts whose KVM emulates guest kernel code: hides CMPXCHG16B, and Linux
    /// guests get `noxsave`).
    #[arg(long, value_name = "NAME", default_value = "auto", value_parser = parse_cpu_template)]
    pub cpu_template: CpuTemplateChoice,

    /// How to enter a Linux kernel: auto (PVH when the kernel has a PVH note, else the
    /// 64-bit entry), pvh, or 64bit.
    #[arg(long, value_name = "PROTOCOL", default_value = "auto", value_parser = parse_entry)]
    pub entry: EntryChoice,

    /// A virtio-blk disk backed by a raw image: path=FILE[,readonly=on]. Repeatable.
    #[arg(long, value_name = "path=FILE[,readonly=on]", value_parser = parse_disk)]
    pub disk: Vec<DiskConfig>,

    /// A virtio-net card on an existing tap interface: tap=NAME[,mac=MAC]. Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub net: Vec<NetConfig>,

    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,

    /// When the VM ends, print to stderr how many exits of each reason there were and,
    /// per reason, a histogram of the time the VMM spent on each (from KVM_RUN
    /// returning to the next KVM_RUN). Turns exit timing on (one pair of clock reads
    /// per exit).
    #[arg(long)]
    pub exit_stats: bool,

    /// Log more (repeat for debug output). Logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Cli {
    /// The VM this command line asks for.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: match &self.kernel {
                Some(path) => KernelSource::File(path.clone()),
                None => KernelSource::Demo,
            },
            cmdline: self.cmdline.clone(),
            memory_bytes: self.memory,
            vcpus: self.cpus,
            serial: self.serial.clone(),
            initrd: self.initrd.clone(),
            cpu_template: self.cpu_template,
            entry: self.entry,
            disks: self.disk.clone(),
            nets: self.net.clone(),
            rng: self.rng,
            exit_stats: self.exit_stats,
        }
    }
}

/// Parses a memory size: a bare number is MiB; `K`, `M`, `G` (optionally followed by
/// `iB` or `B`, any case) scale by 1024s.
pub fn parse_memory_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("invalid memory size '{s}': expected a number of MiB, or a number with a K, M or G suffix")
    };
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let value: u64 = number.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("memory size '{s}' is too large"))
}

/// Parses `stdio`, `file=PATH` or `none`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => match s.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
            _ => Err(format!(
                "invalid serial '{s}': expected stdio, file=PATH or none"
            )),
        },
    }
}

/// Splits `key=value,key=value` into pairs, rejecting empty keys and values.
fn key_values<'a>(what: &str, s: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    s.split(',')
        .map(|part| match part.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
            _ => Err(format!("invalid {what} '{s}': '{part}' is not key=value")),
        })
        .collect()
}

/// Parses `path=FILE[,readonly=on|off]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut read_only = false;
    for (key, value) in key_values("disk", s)? {
        match (key, value) {
            ("path", p) => path = Some(PathBuf::from(p)),
            ("readonly", "on") => read_only = true,
            ("readonly", "off") => read_only = false,
            ("readonly", other) => {
                return Err(format!(
                    "invalid disk '{s}': readonly={other}, expected on or off"
                ))
            }
            (other, _) => {
                return Err(format!(
                    "invalid disk '{s}': unknown key '{other}' (expected path, readonly)"
                ))
            }
        }
    }
    let path = path.ok_or_else(|| format!("invalid disk '{s}': path=FILE is required"))?;
    Ok(DiskConfig { path, read_only })
}

/// Parses `tap=NAME[,mac=AA:BB:CC:DD:EE:FF]`.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for (key, value) in key_values("net", s)? {
        match key {
            // Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
            "tap" if value.len() <= 15 && !value.contains('/') => tap = Some(value.to_string()),
            "tap" => {
                return Err(format!(
                    "invalid net '{s}': tap name '{value}' is not a valid interface name"
                ))
            }
            "mac" => {
                mac = Some(
                    parse_mac(value)
                        .ok_or_else(|| format!("invalid net '{s}': bad MAC '{value}'"))?,
                )
            }
            other => {
                return Err(format!(
                    "invalid net '{s}': unknown key '{other}' (expected tap, mac)"
                ))
            }
        }
    }
    let tap = tap.ok_or_else(|| format!("invalid net '{s}': tap=NAME is required"))?;
    Ok(NetConfig { tap, mac })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    // A multicast address cannot be a card's own.
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// Parses `auto`, `pvh` or `64bit`.
pub fn parse_entry(s: &str) -> Result<EntryChoice, String> {
    match s {
        "auto" => Ok(EntryChoice::Auto),
        "pvh" => Ok(EntryChoice::Pvh),
        "64bit" => Ok(EntryChoice::Linux64),
        _ => Err(format!("invalid entry '{s}': expected auto, pvh or 64bit")),
    }
}

/// Parses `auto` or a template name.
pub fn parse_cpu_template(s: &str) -> Result<CpuTemplateChoice, String> {
    if s == "auto" {
        return Ok(CpuTemplateChoice::Auto);
    }
    CpuTemplate::from_name(s)
        .map(CpuTemplateChoice::Fixed)
        .ok_or_else(|| format!("invalid CPU template '{s}': expected auto, host or nested-compat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("512"), Ok(512 << 20));
        assert_eq!(parse_memory_size("512M"), Ok(512 << 20));
        assert_eq!(parse_memory_size("2G"), Ok(2 << 30));
        assert_eq!(parse_memory_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_memory_size("65536K"), Ok(64 << 20));
        for bad in ["", "M", "12X", "-1", "1.5G", "0x100", "1 G B"] {
            assert!(parse_memory_size(bad).is_err(), "{bad}");
        }
        assert!(parse_memory_size("99999999999999999999G")
            .unwrap_err()
            .contains("invalid"));
        assert!(parse_memory_size("9999999999999G")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn serial_specs() {
        assert_eq!(parse_serial("stdio"), Ok(SerialConfig::Stdio));
        assert_eq!(parse_serial("none"), Ok(SerialConfig::None));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp").is_err());
    }

    #[test]
    fn defaults_run_the_demo() {
        let cli = Cli::parse_from(["ember"]);
        let config = cli.vm_config();
        assert_eq!(config.kernel, KernelSource::Demo);
        assert_eq!((config.vcpus, config.memory_bytes), (1, 256 << 20));
        assert_eq!(config.serial, SerialConfig::Stdio);
        assert_eq!(config.cpu_template, CpuTemplateChoice::Auto);
        assert!(!config.exit_stats);
        assert!(
            Cli::parse_from(["ember", "--exit-stats"])
                .vm_config()
                .exit_stats
        );
    }

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("path=/tmp/d.img"),
            Ok(DiskConfig {
                path: "/tmp/d.img".into(),
                read_only: false
            })
        );
        assert_eq!(
            parse_disk("path=d.img,readonly=on"),
            Ok(DiskConfig {
                path: "d.img".into(),
                read_only: true
            })
        );
        assert!(parse_disk("readonly=on")
            .unwrap_err()
            .contains("path=FILE is required"));
        assert!(parse_disk("path=x,readonly=yes")
            .unwrap_err()
            .contains("readonly=yes"));
        assert!(parse_disk("path=x,cache=none")
            .unwrap_err()
            .contains("unknown key 'cache'"));
        assert!(parse_disk("d.img").unwrap_err().contains("not key=value"));
        assert!(parse_disk("path=").is_err());
    }

    #[test]
    fn nets() {
        assert_eq!(
            parse_net("tap=tap0"),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: None
            })
        );
        assert_eq!(
            parse_net("tap=tap0,mac=52:54:00:12:34:56"),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
            })
        );
        assert!(parse_net("tap=0123456789abcdef")
            .unwrap_err()
            .contains("not a valid interface name"));
        assert!(parse_net("tap=t,mac=52:54:00:12:34")
            .unwrap_err()
            .contains("bad MAC"));
        assert!(parse_net("tap=t,mac=01:00:00:00:00:00")
            .unwrap_err()
            .contains("bad MAC"));
        assert!(parse_net("tap=t,mac=zz:00:00:00:00:00").is_err());
        assert!(parse_net("mac=52:54:00:12:34:56")
            .unwrap_err()
            .contains("tap=NAME is required"));
        let cli = Cli::parse_from([
            "ember",
            "--disk",
            "path=a",
            "--disk",
            "path=b,readonly=on",
            "--rng",
        ]);
        let config = cli.vm_config();
        assert_eq!(config.disks.len(), 2);
        assert!(config.disks[1].read_only && config.rng);
    }

    #[test]
    fn entries() {
        assert_eq!(parse_entry("auto"), Ok(EntryChoice::Auto));
        assert_eq!(parse_entry("pvh"), Ok(EntryChoice::Pvh));
        assert_eq!(parse_entry("64bit"), Ok(EntryChoice::Linux64));
        assert!(parse_entry("efi")
            .unwrap_err()
            .contains("invalid entry 'efi'"));
    }

    #[test]
    fn cpu_templates() {
        assert_eq!(parse_cpu_template("auto"), Ok(CpuTemplateChoice::Auto));
        assert_eq!(
            parse_cpu_template("nested-compat"),
            Ok(CpuTemplateChoice::Fixed(CpuTemplate::NestedCompat))
        );
        assert_eq!(
            parse_cpu_template("host"),
            Ok(CpuTemplateChoice::Fixed(CpuTemplate::Host))
        );
        assert!(parse_cpu_template("T2")
            .unwrap_err()
            .contains("invalid CPU template 'T2'"));
    }
}
