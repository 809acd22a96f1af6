//! What a VM is made of, independent of how it was asked for.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelSource {
    /// The demo guest built into the binary.
    Demo,
    /// A kernel image on disk.
    File(PathBuf),
}

/// How large `--serial file=PATH` lets the file grow unless `max=` says otherwise.
pub const DEFAULT_SERIAL_FILE_MAX: u64 = 64 << 20;

/// Where the serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialConfig {
    /// Standard output, and standard input goes to the guest.
    Stdio,
    /// A file, created or truncated, that grows to at most `max_bytes` (then further
    /// output is discarded, with one warning).
    File {
        /// The file.
        path: PathBuf,
        /// Its size limit, [`DEFAULT_SERIAL_FILE_MAX`] unless `max=` says otherwise.
        max_bytes: u64,
    },
    /// Nowhere.
    None,
}

/// Which CPU template to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum CpuTemplateChoice {
    /// Detect the host ([`ember_vcpu::cpuid::CpuTemplate::detect`]).
    Auto,
    /// This one.
    Fixed(ember_vcpu::cpuid::CpuTemplate),
}

impl From<CpuTemplateChoice> for String {
    fn from(choice: CpuTemplateChoice) -> String {
        match choice {
            CpuTemplateChoice::Auto => "auto".to_string(),
            CpuTemplateChoice::Fixed(t) => t.name().to_string(),
        }
    }
}

impl TryFrom<String> for CpuTemplateChoice {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        if name == "auto" {
            return Ok(CpuTemplateChoice::Auto);
        }
        ember_vcpu::cpuid::CpuTemplate::from_name(&name)
            .map(CpuTemplateChoice::Fixed)
            .ok_or_else(|| format!("unknown CPU template {name:?}"))
    }
}

/// How vCPU 0 enters a Linux kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryChoice {
    /// PVH when the kernel has a PVH note, else the 64-bit entry.
    Auto,
    /// The 32-bit PVH entry (ELF kernels with a `XEN_ELFNOTE_PHYS32_ENTRY` note).
    Pvh,
    /// The 64-bit Linux boot protocol entry (ELF `e_entry`, or a bzImage's 64-bit entry).
    Linux64,
}

/// One token bucket of a rate limiter (Firecracker's and Cloud Hypervisor's model):
/// `size` tokens refilled evenly over `refill_time_ms`, plus `one_time_burst` tokens
/// that are spent first and never refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Bucket capacity (bytes or operations); at least 1.
    pub size: u64,
    /// Extra tokens available once, at the start.
    pub one_time_burst: u64,
    /// Milliseconds to refill a whole bucket from empty; at least 1.
    pub refill_time_ms: u64,
}

/// A device's rate limits: bytes and operations, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Data bytes (`bw_*` keys).
    pub bandwidth: Option<TokenBucket>,
    /// Requests or packets (`ops_*` keys).
    pub ops: Option<TokenBucket>,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// The `GET_ID` serial (at most 20 bytes); derived from the path when `None`.
    pub serial: Option<String>,
    /// Rate limits on the disk's requests; none when `None`.
    pub rate_limit: Option<RateLimit>,
}

/// A virtio-net card on a tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The tap interface's name.
    pub tap: String,
    /// The card's MAC; random (locally administered) when `None`.
    pub mac: Option<[u8; 6]>,
    /// Rate limits on what the guest receives; none when `None`.
    pub rx_rate_limit: Option<RateLimit>,
    /// Rate limits on what the guest sends; none when `None`.
    pub tx_rate_limit: Option<RateLimit>,
}

/// A VM to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelSource,
    /// Kernel command line; `None` for the default.
    pub cmdline: Option<String>,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Serial output.
    pub serial: SerialConfig,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// CPU template.
    pub cpu_template: CpuTemplateChoice,
    /// Kernel entry protocol.
    pub entry: EntryChoice,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards.
    pub nets: Vec<NetConfig>,
    /// Whether to add a virtio-rng device.
    pub rng: bool,
    /// Rate limits on the virtio-rng device; none when `None`.
    pub rng_rate_limit: Option<RateLimit>,
    /// Whether to time exits and print the exit profile when the VM ends.
    pub exit_stats: bool,
    /// Whether KVM logs the pages the guest writes from the start, so that snapshots
    /// after the first can be diff snapshots (Firecracker's `track_dirty_pages`).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// The command line a Linux guest gets when none is given: console on COM1, reboot
/// through the keyboard controller so that a guest `reboot` ends the VMM cleanly, and
/// `i8042.dumbkbd` because the keyboard behind the i8042 sends keys (Ctrl+Alt+Del from
/// `SendCtrlAltDel`) but answers no commands (Firecracker's default has it too).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 i8042.dumbkbd";
