//! The command line, parsed into a [`VmConfig`].

use std::path::PathBuf;

use clap::Parser;

use ember_vcpu::cpuid::CpuTemplate;

use crate::config::{
    CpuTemplateChoice, DiskConfig, EntryChoice, KernelSource, NetConfig, RateLimit, SerialConfig,
    TokenBucket, VmConfig,
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

    /// Where the guest's serial port (COM1) goes: stdio, file=PATH[,max=SIZE] (at most
    /// SIZE written, 64M unless given) or none. Output that stdout or the file does
    /// not take fast enough is buffered (1 MiB), then dropped and counted: the guest
    /// never waits for it.
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

    /// A virtio-blk disk backed by a raw image (a regular file or a block device),
    /// locked against other writers: `path=FILE[,readonly=on][,serial=ID]` and rate
    /// limits `bw_size=BYTES,bw_refill_time=MS[,bw_one_time_burst=BYTES]` (bandwidth) and
    /// `ops_size=N,ops_refill_time=MS[,ops_one_time_burst=N]` (requests). Repeatable.
    #[arg(
        long,
        value_name = "path=FILE[,readonly=on][,serial=ID][,bw_*=..][,ops_*=..]",
        value_parser = parse_disk
    )]
    pub disk: Vec<DiskConfig>,

    /// A virtio-net card on an existing tap interface: tap=NAME[,mac=MAC], and rate
    /// limits for each direction with the keys of --disk prefixed rx_ (to the guest) or
    /// tx_ (from the guest): rx_bw_size=BYTES,rx_bw_refill_time=MS, tx_ops_size=N, ...
    /// Repeatable.
    #[arg(
        long,
        value_name = "tap=NAME[,mac=MAC][,rx_bw_*=..][,tx_ops_*=..]",
        value_parser = parse_net
    )]
    pub net: Vec<NetConfig>,

    /// A virtio-rng device fed from the host's getrandom; optionally rate-limited with
    /// the keys of --disk: --rng bw_size=BYTES,bw_refill_time=MS[,...].
    #[arg(
        long,
        value_name = "bw_*=..,ops_*=..",
        num_args = 0..=1,
        value_parser = parse_rng
    )]
    pub rng: Option<Option<RateLimit>>,

    /// When the VM ends, print to stderr how many exits of each reason there were and,
    /// per reason, a histogram of the time the VMM spent on each (from KVM_RUN
    /// returning to the next KVM_RUN). Turns exit timing on (one pair of clock reads
    /// per exit).
    #[arg(long)]
    pub exit_stats: bool,

    /// Per-thread seccomp filters: on (the default) or off. A thread that makes a
    /// system call its filter does not allow ends `ember` with status 148 and one line
    /// naming the thread and the call. `off` is a debugging aid (e.g. under strace to
    /// see what a thread needs), not a way to run guests.
    #[arg(
        long,
        value_name = "on|off",
        default_value = "on",
        action = clap::ArgAction::Set,
        value_parser = parse_on_off
    )]
    pub seccomp: bool,

    /// Serve Firecracker's HTTP API (the subset Ember supports) on a Unix socket at PATH:
    /// pause and resume (`PATCH /vm`), snapshots (`PUT /snapshot/create`), and, when no
    /// --kernel or --restore is given, the VM's configuration, `InstanceStart` and
    /// `PUT /snapshot/load` before anything runs. With --kernel the VM boots at once and
    /// the API serves it.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// Restore the snapshot in DIR (its state file `DIR/vmstate` and memory file
    /// `DIR/memory`, as `PUT /snapshot/create` writes them when given those paths) and
    /// run it. The VM's devices and sizes come from the snapshot; --serial, --seccomp,
    /// --exit-stats and --api-sock still apply.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "cpus", "disk", "net", "rng", "entry", "cpu_template"]
    )]
    pub restore: Option<PathBuf>,

    /// Merge the memory file of a diff snapshot (DIFF) onto the memory file of the
    /// snapshot before it (--into BASE), in place, and exit: BASE then restores with
    /// the diff snapshot's state file. No VM runs.
    #[arg(long, value_name = "DIFF", requires = "into")]
    pub merge_diff: Option<PathBuf>,

    /// The memory file --merge-diff writes into.
    #[arg(long, value_name = "BASE", requires = "merge_diff")]
    pub into: Option<PathBuf>,

    /// Log the pages the guest writes from boot on, so that `PUT /snapshot/create` can
    /// take diff snapshots (Firecracker's `track_dirty_pages`).
    #[arg(long)]
    pub track_dirty_pages: bool,

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
            rng: self.rng.is_some(),
            rng_rate_limit: self.rng.flatten(),
            exit_stats: self.exit_stats,
            track_dirty_pages: self.track_dirty_pages,
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

/// Parses `stdio`, `file=PATH[,max=SIZE]` (SIZE as for `--memory`: 64M, 512K, 1G; a
/// bare number is MiB) or `none`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => {
            let (spec, max) = match s.rsplit_once(",max=") {
                Some((spec, size)) => {
                    let max = parse_memory_size(size)
                        .map_err(|e| format!("invalid serial '{s}': max={size}: {e}"))?;
                    (spec, max)
                }
                None => (s, crate::config::DEFAULT_SERIAL_FILE_MAX),
            };
            match spec.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(SerialConfig::File {
                    path: PathBuf::from(path),
                    max_bytes: max,
                }),
                _ => Err(format!(
                    "invalid serial '{s}': expected stdio, file=PATH[,max=SIZE] or none"
                )),
            }
        }
    }
}

/// Splits `key=value,key=value` into pairs, rejecting empty keys and values and a key
/// given twice.
fn key_values<'a>(what: &str, s: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for part in s.split(',') {
        match part.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                if pairs.iter().any(|&(seen, _)| seen == k) {
                    return Err(format!("invalid {what} '{s}': key '{k}' is given twice"));
                }
                pairs.push((k, v));
            }
            _ => return Err(format!("invalid {what} '{s}': '{part}' is not key=value")),
        }
    }
    Ok(pairs)
}

/// The rate-limit keys after their prefix (`bw_size`, or `rx_` + `bw_size` for a net).
const RATE_LIMIT_KEYS: [&str; 6] = [
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
];

/// Rate-limit keys seen so far, before they are checked as a whole.
#[derive(Debug, Default)]
struct RateLimitKeys {
    /// Values of [`RATE_LIMIT_KEYS`], in that order.
    values: [Option<u64>; 6],
}

impl RateLimitKeys {
    /// Takes `key` (already stripped of its `prefix`) if it is a rate-limit key:
    /// `Ok(true)` if taken, `Ok(false)` if it is not such a key, an error for a bad
    /// number.
    fn take(
        &mut self,
        what: &str,
        s: &str,
        prefix: &str,
        key: &str,
        value: &str,
    ) -> Result<bool, String> {
        let Some(i) = RATE_LIMIT_KEYS.iter().position(|&k| k == key) else {
            return Ok(false);
        };
        let n: u64 = value.parse().map_err(|_| {
            format!("invalid {what} '{s}': {prefix}{key}={value} is not a non-negative integer")
        })?;
        if let Some(slot) = self.values.get_mut(i) {
            *slot = Some(n);
        }
        Ok(true)
    }

    /// The limits the keys describe (`None` when no key was given): each bucket needs
    /// both its size (at least 1) and its refill time (at least 1 ms); the one-time
    /// burst is optional and needs the size.
    fn finish(&self, what: &str, s: &str, prefix: &str) -> Result<Option<RateLimit>, String> {
        if self.values.iter().all(Option::is_none) {
            return Ok(None);
        }
        let bucket = |first: usize| -> Result<Option<TokenBucket>, String> {
            let names = &RATE_LIMIT_KEYS[first..first + 3];
            let vals = &self.values[first..first + 3];
            let (size_key, burst_key, refill_key) = (names[0], names[1], names[2]);
            match (vals[0], vals[1], vals[2]) {
                (None, None, None) => Ok(None),
                (Some(size), burst, Some(refill)) => {
                    if size == 0 {
                        return Err(format!("invalid {what} '{s}': {prefix}{size_key}=0, expected at least 1"));
                    }
                    if refill == 0 {
                        return Err(format!("invalid {what} '{s}': {prefix}{refill_key}=0, expected at least 1 (ms)"));
                    }
                    Ok(Some(TokenBucket {
                        size,
                        one_time_burst: burst.unwrap_or(0),
                        refill_time_ms: refill,
                    }))
                }
                (Some(_), _, None) => Err(format!(
                    "invalid {what} '{s}': {prefix}{size_key} needs {prefix}{refill_key}"
                )),
                (None, Some(_), _) => Err(format!(
                    "invalid {what} '{s}': {prefix}{burst_key} needs {prefix}{size_key} and {prefix}{refill_key}"
                )),
                (None, None, Some(_)) => Err(format!(
                    "invalid {what} '{s}': {prefix}{refill_key} needs {prefix}{size_key}"
                )),
            }
        };
        Ok(Some(RateLimit {
            bandwidth: bucket(0)?,
            ops: bucket(3)?,
        }))
    }
}

/// The longest `GET_ID` serial (virtio-blk's `VIRTIO_BLK_ID_BYTES`).
const DISK_SERIAL_MAX: usize = 20;

/// Parses `path=FILE[,readonly=on|off][,serial=ID]` and the rate-limit keys
/// (`bw_size`, `bw_one_time_burst`, `bw_refill_time`, `ops_size`, `ops_one_time_burst`,
/// `ops_refill_time`).
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut read_only = false;
    let mut serial = None;
    let mut limits = RateLimitKeys::default();
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
            ("serial", id) => {
                if id.len() > DISK_SERIAL_MAX || !id.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!(
                        "invalid disk '{s}': serial={id}, expected 1 to {DISK_SERIAL_MAX} \
                         printable ASCII characters without spaces"
                    ));
                }
                serial = Some(id.to_string());
            }
            (other, value) => {
                if !limits.take("disk", s, "", other, value)? {
                    return Err(format!(
                        "invalid disk '{s}': unknown key '{other}' (expected path, readonly, \
                         serial, {})",
                        RATE_LIMIT_KEYS.join(", ")
                    ));
                }
            }
        }
    }
    let path = path.ok_or_else(|| format!("invalid disk '{s}': path=FILE is required"))?;
    Ok(DiskConfig {
        path,
        read_only,
        serial,
        rate_limit: limits.finish("disk", s, "")?,
    })
}

/// Parses `--rng`'s optional value: the rate-limit keys of [`parse_disk`].
pub fn parse_rng(s: &str) -> Result<RateLimit, String> {
    let mut limits = RateLimitKeys::default();
    for (key, value) in key_values("rng", s)? {
        if !limits.take("rng", s, "", key, value)? {
            return Err(format!(
                "invalid rng '{s}': unknown key '{key}' (expected {})",
                RATE_LIMIT_KEYS.join(", ")
            ));
        }
    }
    limits
        .finish("rng", s, "")?
        .ok_or_else(|| format!("invalid rng '{s}': no rate limit given"))
}

/// Parses `tap=NAME[,mac=AA:BB:CC:DD:EE:FF]`.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    let mut rx = RateLimitKeys::default();
    let mut tx = RateLimitKeys::default();
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
                let taken = match (other.strip_prefix("rx_"), other.strip_prefix("tx_")) {
                    (Some(key), _) => rx.take("net", s, "rx_", key, value)?,
                    (_, Some(key)) => tx.take("net", s, "tx_", key, value)?,
                    _ => false,
                };
                if !taken {
                    return Err(format!(
                        "invalid net '{s}': unknown key '{other}' (expected tap, mac, and \
                         rx_ or tx_ followed by one of {})",
                        RATE_LIMIT_KEYS.join(", ")
                    ));
                }
            }
        }
    }
    let tap = tap.ok_or_else(|| format!("invalid net '{s}': tap=NAME is required"))?;
    Ok(NetConfig {
        tap,
        mac,
        rx_rate_limit: rx.finish("net", s, "rx_")?,
        tx_rate_limit: tx.finish("net", s, "tx_")?,
    })
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

/// Parses `on` or `off`.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("invalid value '{other}': expected on or off")),
    }
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
            Ok(SerialConfig::File {
                path: "/tmp/x".into(),
                max_bytes: 64 << 20
            })
        );
        assert_eq!(
            parse_serial("file=/tmp/a,b,max=1K"),
            Ok(SerialConfig::File {
                path: "/tmp/a,b".into(),
                max_bytes: 1024
            })
        );
        assert!(parse_serial("file=/tmp/x,max=lots").is_err());
        assert!(parse_serial("stdio,max=1M").is_err());
        assert!(parse_serial("file=,max=1M").is_err());
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
                read_only: false,
                serial: None,
                rate_limit: None,
            })
        );
        assert_eq!(
            parse_disk("path=d.img,readonly=on"),
            Ok(DiskConfig {
                path: "d.img".into(),
                read_only: true,
                serial: None,
                rate_limit: None,
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
                mac: None,
                rx_rate_limit: None,
                tx_rate_limit: None,
            })
        );
        assert_eq!(
            parse_net("tap=tap0,mac=52:54:00:12:34:56"),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                rx_rate_limit: None,
                tx_rate_limit: None,
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

    fn bucket(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<TokenBucket> {
        Some(TokenBucket {
            size,
            one_time_burst,
            refill_time_ms,
        })
    }

    #[test]
    fn disk_serial_and_rate_limits() {
        let disk = parse_disk(
            "path=d.img,serial=ABC-123,bw_size=1048576,bw_one_time_burst=4096,\
             bw_refill_time=100,ops_size=50,ops_refill_time=1000",
        )
        .unwrap();
        assert_eq!(disk.serial.as_deref(), Some("ABC-123"));
        assert_eq!(
            disk.rate_limit,
            Some(RateLimit {
                bandwidth: bucket(1 << 20, 4096, 100),
                ops: bucket(50, 0, 1000),
            })
        );
        let ops_only = parse_disk("path=d,ops_size=10,ops_refill_time=5").unwrap();
        assert_eq!(
            ops_only.rate_limit,
            Some(RateLimit {
                bandwidth: None,
                ops: bucket(10, 0, 5),
            })
        );
        assert_eq!(
            parse_disk("path=d,serial=12345678901234567890")
                .unwrap()
                .serial
                .as_deref(),
            Some("12345678901234567890")
        );
        for (bad, names) in [
            (
                "path=d,serial=123456789012345678901",
                "serial=123456789012345678901",
            ),
            ("path=d,serial=a\tb", "serial=a\tb"),
            ("path=d,bw_size=100", "bw_size needs bw_refill_time"),
            ("path=d,bw_refill_time=100", "bw_refill_time needs bw_size"),
            (
                "path=d,ops_one_time_burst=5",
                "ops_one_time_burst needs ops_size",
            ),
            ("path=d,ops_size=5,ops_refill_time=0", "ops_refill_time=0"),
            ("path=d,bw_size=0,bw_refill_time=10", "bw_size=0"),
            ("path=d,bw_size=1M,bw_refill_time=10", "bw_size=1M is not"),
            ("path=d,bw_size=-1,bw_refill_time=10", "bw_size=-1 is not"),
            (
                "path=d,bw_size=99999999999999999999,bw_refill_time=1",
                "bw_size=99999999999999999999",
            ),
            ("path=d,bw_sise=10", "unknown key 'bw_sise'"),
            ("path=d,rx_bw_size=10", "unknown key 'rx_bw_size'"),
            ("path=d,path=e", "key 'path' is given twice"),
            (
                "path=d,bw_size=1,bw_size=2,bw_refill_time=1",
                "key 'bw_size' is given twice",
            ),
            (
                "path=d,readonly=on,readonly=off",
                "key 'readonly' is given twice",
            ),
        ] {
            let err = parse_disk(bad).unwrap_err();
            assert!(err.contains(names), "{bad}: {err}");
        }
    }

    #[test]
    fn net_rate_limits() {
        let net = parse_net(
            "tap=t0,rx_bw_size=1000,rx_bw_refill_time=10,tx_ops_size=7,\
             tx_ops_one_time_burst=3,tx_ops_refill_time=20",
        )
        .unwrap();
        assert_eq!(
            net.rx_rate_limit,
            Some(RateLimit {
                bandwidth: bucket(1000, 0, 10),
                ops: None,
            })
        );
        assert_eq!(
            net.tx_rate_limit,
            Some(RateLimit {
                bandwidth: None,
                ops: bucket(7, 3, 20),
            })
        );
        for (bad, names) in [
            ("tap=t,rx_bw_size=10", "rx_bw_size needs rx_bw_refill_time"),
            (
                "tap=t,tx_ops_refill_time=10",
                "tx_ops_refill_time needs tx_ops_size",
            ),
            ("tap=t,bw_size=10", "unknown key 'bw_size'"),
            ("tap=t,rx_foo=1", "unknown key 'rx_foo'"),
            (
                "tap=t,tx_bw_size=x,tx_bw_refill_time=1",
                "tx_bw_size=x is not",
            ),
            ("tap=t,tap=u", "key 'tap' is given twice"),
            (
                "tap=t,rx_ops_size=1,rx_ops_size=1",
                "key 'rx_ops_size' is given twice",
            ),
        ] {
            let err = parse_net(bad).unwrap_err();
            assert!(err.contains(names), "{bad}: {err}");
        }
    }

    #[test]
    fn rng_flag_and_rate_limits() {
        let plain = Cli::parse_from(["ember", "--rng"]).vm_config();
        assert!(plain.rng);
        assert_eq!(plain.rng_rate_limit, None);
        let none = Cli::parse_from(["ember"]).vm_config();
        assert!(!none.rng);
        // A flag followed by another option still works.
        let then = Cli::parse_from(["ember", "--rng", "--memory", "64M"]).vm_config();
        assert!(then.rng && then.rng_rate_limit.is_none());
        assert_eq!(then.memory_bytes, 64 << 20);
        let limited =
            Cli::parse_from(["ember", "--rng", "bw_size=4096,bw_refill_time=1000"]).vm_config();
        assert!(limited.rng);
        assert_eq!(
            limited.rng_rate_limit,
            Some(RateLimit {
                bandwidth: bucket(4096, 0, 1000),
                ops: None,
            })
        );
        let eq = Cli::parse_from(["ember", "--rng=ops_size=2,ops_refill_time=3"]).vm_config();
        assert_eq!(
            eq.rng_rate_limit,
            Some(RateLimit {
                bandwidth: None,
                ops: bucket(2, 0, 3),
            })
        );
        for (bad, names) in [
            ("bw_size=4096", "bw_size needs bw_refill_time"),
            ("path=x", "unknown key 'path'"),
            (
                "bw_size=1,bw_refill_time=1,bw_size=2",
                "key 'bw_size' is given twice",
            ),
        ] {
            let err = Cli::try_parse_from(["ember", "--rng", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains(names), "{bad}: {err}");
        }
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
