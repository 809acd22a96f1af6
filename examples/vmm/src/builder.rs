//! Assembles a VM from a [`VmConfig`]: the whole machine, in one place, in named stages
//! (see [`build_vm`]).
//!
//! Order matters to KVM: the irqchip and the TSS address must exist before vCPUs, and
//! the LAPIC can only be programmed once the irqchip exists.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use ember_arch::layout;
use ember_boot::initrd::{copy_initrd, load_initrd_below, DEFAULT_INITRD_ADDR_MAX};
use ember_boot::{
    configure_bzimage_boot, configure_linux_boot, configure_pvh_boot, load_bzimage, load_elf,
    parse_bzimage, BzImageError, Cmdline, CmdlineError, ElfError,
};
use ember_bus::{Bus, BusError, BusKind};
use ember_devices::{
    AcpiShutdown, BootDone, DebugExit, DeviceError, ExitSignal, IrqLine, Serial, SerialOutput,
    ACPI_RESET_VALUE, ACPI_SHUTDOWN_PORT, ACPI_SHUTDOWN_PORT_SIZE, BOOT_DONE_PORT,
    BOOT_DONE_PORT_SIZE, COM1_GSI, COM1_PORT, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE, I8042,
    I8042_KEYBOARD_GSI, I8042_PORT, I8042_PORT_SIZE, S5_SLEEP_TYPE, SERIAL_PORT_SIZE,
};
use ember_firmware::acpi::{setup_acpi, AcpiConfig, AcpiShutdown as AcpiShutdownRegister};
use ember_firmware::aml::Aml;
use ember_firmware::devices::{I8042Keyboard, Serial16550, VirtioMmio};
use ember_firmware::mptable::setup_mptable;
use ember_memory::{create_guest_memory_with_bitmap, HugePages, MemoryError, MemoryLayout};
use ember_memory::{AddressAllocator, GsiAllocator};
use ember_vcpu::{regs, BootRegs, Vcpu, VcpuError};
use ember_virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use ember_virtio::{ActivateDevice, ThreadSpawner, TransportError};
use ember_virtio_devices::{Block, BlockOptions, Disk, Net, Rng, VirtioDeviceError};
use ember_vm::VmError;
use kvm_ioctls::IoEventAddress;
use kvm_ioctls::Kvm;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use ember_vcpu::cpuid::CpuTemplate;
use ember_vcpu::syscall_trap::{SyscallTrap, RESERVED_PAGES};

use crate::config::{
    CpuTemplateChoice, EntryChoice, KernelSource, RateLimit, SerialConfig, TokenBucket, VmConfig,
    DEFAULT_CMDLINE,
};
use ember_rate_limiter::{RateLimiterConfig, TokenBucketConfig};

use crate::spawner::Spawner;

/// The demo guest, assembled by `build.rs` (see `ember_guests::demo`).
pub const DEMO_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo-guest.elf"));

/// Where the [syscall trap](ember_vcpu::syscall_trap) keeps its code page and page
/// tables: the start of the range the boot layout leaves to the VMM, which the e820 map
/// (and the PVH memory map) reports as reserved, so the guest never uses it.
const SYSCALL_TRAP_PAGES: u64 = layout::VMM_RESERVED_START;
const _: () = assert!(RESERVED_PAGES * layout::PAGE_SIZE <= layout::VMM_RESERVED_SIZE);
/// The guest-physical page behind the syscall trap's data page, whose stores must exit:
/// the start of the 32-bit MMIO hole, below the device window, where nothing lives.
const SYSCALL_TRAP_MMIO: u64 = layout::SYSCALL_TRAP_MMIO_START;

/// Guest RAM, with vm-memory's dirty bitmap: the pages the VMM itself writes (virtio
/// buffers and rings, boot structures) are recorded there, the guest's own writes in
/// KVM's dirty log; a diff snapshot writes the pages either one marks.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// How devices hold guest memory: shared.
pub type GuestMemory = Arc<GuestRam>;

/// The KVM VM, on [`GuestRam`].
pub type KvmVm = ember_vm::Vm<AtomicBitmap>;

/// A vCPU of a [`KvmVm`].
pub type VmVcpu = Vcpu<AtomicBitmap>;

/// The virtio-mmio transport of a device, as the VMM keeps it for pause and snapshots.
pub type Transport = MmioTransport<GuestMemory>;

/// A virtio device to attach, with a name for messages.
type NamedVirtioDevice = (String, Box<dyn ActivateDevice<GuestMemory>>);

/// The vCPU a Linux kernel starts on; it wakes the others itself.
const BOOT_VCPU: u32 = 0;

/// Why a VM could not be built. Each message names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The thread that creates device workers could not start.
    #[error("cannot start the device thread spawner: {0}")]
    Spawner(std::io::Error),
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    /// A VM-level KVM call failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initrd file could not be read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel or initrd path is not a regular file (a directory, `/dev/zero`, a
    /// FIFO...), so it is not read.
    #[error("{what} {path} is a {kind}, not a regular file")]
    NotAFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// The kernel or initrd file is larger than it may be; it is not read.
    #[error("{what} {path} is {size} bytes ({}), more than the {max} bytes ({}) {why}", mib(*size), mib(*max))]
    TooLarge {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: String,
        /// The file's size.
        size: u64,
        /// The limit.
        max: u64,
        /// Where the limit comes from.
        why: &'static str,
    },
    /// The kernel image or boot parameters were rejected.
    #[error("kernel {kernel}: {source}")]
    Boot {
        /// Which kernel.
        kernel: String,
        /// What was wrong.
        source: ember_boot::Error,
    },
    /// The command line was rejected.
    #[error("kernel command line: {0}")]
    Cmdline(CmdlineError),
    /// The kernel is neither a 64-bit ELF nor a bzImage.
    #[error("kernel {kernel}: not a 64-bit ELF vmlinux ({elf}) nor a bzImage ({bzimage})")]
    UnknownKernelFormat {
        /// Which kernel.
        kernel: String,
        /// Why it is not an ELF.
        elf: ElfError,
        /// Why it is not a bzImage.
        bzimage: BzImageError,
    },
    /// PVH was asked for, but the kernel has no PVH entry.
    #[error(
        "kernel {0}: --entry pvh, but the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
    )]
    NoPvhEntry(String),
    /// A virtio transport could not be created.
    #[error("virtio device {0}: {1}")]
    Transport(String, TransportError),
    /// An eventfd for a device could not be created.
    #[error("cannot create an eventfd for {0}: {1}")]
    EventFd(String, std::io::Error),
    /// The MP or ACPI tables could not be written.
    #[error("firmware tables: {0}")]
    Firmware(ember_firmware::Error),
    /// Memory size or set-up.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// vCPU count or set-up.
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    /// A device could not be created.
    #[error("{0}")]
    Device(#[from] DeviceError),
    /// A virtio device could not be created.
    #[error("{0}")]
    VirtioDevice(#[from] VirtioDeviceError),
    /// A VM-level KVM call failed.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// A snapshot does not fit the VM it describes, or a state could not be restored.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A device could not be placed on a bus.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
}

/// `bytes` in MiB, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// The largest kernel image `ember` reads: 512 MiB, far above any real kernel (Debian's
/// vmlinux is about 60 MiB), so that a wrong path cannot make the VMM read gigabytes.
pub const MAX_KERNEL_SIZE: u64 = 512 << 20;

/// The room an initrd can have in a VM with `layout`: RAM from 1 MiB (where kernels
/// load) up to the end of low RAM or the boot protocol's initrd limit, whichever is
/// lower. The loaders check the exact fit (after the kernel) later; this bound only keeps
/// a file that can never fit from being read.
fn initrd_room(layout: &MemoryLayout) -> u64 {
    layout
        .low_ram_end()
        .min(DEFAULT_INITRD_ADDR_MAX + 1)
        .saturating_sub(layout::HIMEM_START)
}

/// What kind of file `t` is, for [`BuildError::NotAFile`].
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "directory"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Reads the kernel or initrd at `path` (`what` says which) if it is a regular file of
/// at most `max` bytes (`why` says where the limit comes from): the size and type are
/// checked with `stat(2)` before the file is opened (so a FIFO or a device is never
/// read, and a huge file never allocated for), checked again on the open file, and the
/// read stops at `max + 1` bytes should the file grow meanwhile.
fn read_boot_file(
    what: &'static str,
    path: &std::path::Path,
    max: u64,
    why: &'static str,
) -> Result<Vec<u8>, BuildError> {
    use std::io::Read;
    let name = path.display().to_string();
    let io_error = |source| match what {
        "kernel" => BuildError::ReadKernel {
            path: name.clone(),
            source,
        },
        _ => BuildError::ReadInitrd {
            path: name.clone(),
            source,
        },
    };
    let check = |meta: &std::fs::Metadata| {
        if !meta.is_file() {
            return Err(BuildError::NotAFile {
                what,
                path: name.clone(),
                kind: file_kind(meta.file_type()),
            });
        }
        if meta.len() > max {
            return Err(BuildError::TooLarge {
                what,
                path: name.clone(),
                size: meta.len(),
                max,
                why,
            });
        }
        Ok(meta.len())
    };
    check(&std::fs::metadata(path).map_err(io_error)?)?;
    let file = std::fs::File::open(path).map_err(io_error)?;
    let size = check(&file.metadata().map_err(io_error)?)?;
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(io_error)?;
    let read = data.len() as u64;
    if read > max {
        return Err(BuildError::TooLarge {
            what,
            path: name.clone(),
            size: read,
            max,
            why,
        });
    }
    Ok(data)
}

/// A VM ready to run: everything created, nothing running yet.
pub struct Vm {
    /// What it was built from (for `GET /vm/config` and snapshots).
    pub config: VmConfig,
    /// The CPU template in force (`auto` resolved).
    pub template: CpuTemplate,
    /// The KVM VM and its guest RAM (each vCPU holds it too).
    pub vm: KvmVm,
    /// Whether the syscall trap is on (it is re-created on restore).
    pub syscall_trap: bool,
    /// vCPUs, configured and not yet started.
    pub vcpus: Vec<VmVcpu>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Set by devices that end the VM (debug exit, i8042 reset, ACPI power-off).
    pub exit: Arc<ExitSignal>,
    /// COM1, for feeding it input.
    pub serial: Arc<Serial>,
    /// The keyboard controller (Ctrl-Alt-Del, snapshots).
    pub i8042: Arc<I8042>,
    /// The virtio devices' transports, in attach order (pause, snapshots).
    pub transports: Vec<Arc<Transport>>,
    /// Whether serial input comes from stdin.
    pub serial_stdin: bool,
    /// Records when the guest said it finished booting.
    pub boot_done: Arc<BootDone>,
}

/// How vCPU 0 enters the kernel.
#[derive(Debug, Clone, Copy)]
enum Entry {
    /// 64-bit mode at `entry`, `RSI` = the zero page.
    Linux64 {
        entry: GuestAddress,
        zero_page: GuestAddress,
    },
    /// 32-bit protected mode at `entry`, `EBX` = the `hvm_start_info`.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
}

/// Stage 5: loads the kernel (and initrd), writes the boot structures its entry protocol
/// needs, and says how to enter it.
///
/// PVH is preferred for an ELF kernel that has the note: the kernel starts in 32-bit
/// mode with paging off and builds its own page tables and GDT, so it depends on less
/// loader-made state than the 64-bit entry, and it receives its memory map and initrd
/// through one versioned structure (`hvm_start_info`) instead of the x86-only zero page.
fn load_kernel(
    memory: &GuestRam,
    name: &str,
    image: &[u8],
    cmdline: &Cmdline,
    initrd: Option<&[u8]>,
    choice: EntryChoice,
    rsdp: GuestAddress,
) -> Result<Entry, BuildError> {
    // Any loader or boot-protocol error, with the kernel's name.
    let boot_error = |source: ember_boot::Error| BuildError::Boot {
        kernel: name.to_string(),
        source,
    };
    if !image.starts_with(b"\x7fELF") {
        let bz = match parse_bzimage(image) {
            Ok(bz) => bz,
            Err(bzimage) => {
                let elf = match image.first_chunk::<4>() {
                    Some(magic) => ElfError::BadMagic { magic: *magic },
                    None => ElfError::TruncatedHeader { len: image.len() },
                };
                return Err(BuildError::UnknownKernelFormat {
                    kernel: name.to_string(),
                    elf,
                    bzimage,
                });
            }
        };
        if choice == EntryChoice::Pvh {
            return Err(BuildError::NoPvhEntry(name.to_string()));
        }
        let loaded = load_bzimage(memory, &bz, image).map_err(|e| boot_error(e.into()))?;
        let [major, minor] = bz.version().to_be_bytes();
        log::info!(
            "loaded bzImage {name} (boot protocol {major}.{minor:02}) at {:#x}..{:#x}; 64-bit entry {:#x}",
            loaded.start.0,
            loaded.end.0,
            loaded.entry.0
        );
        let zero_page = configure_bzimage_boot(memory, &bz, cmdline, Some(rsdp))
            .map_err(|e| boot_error(e.into()))?;
        if let Some(initrd) = initrd {
            let at = load_initrd_below(memory, zero_page, initrd, loaded.end, bz.initrd_addr_max())
                .map_err(|e| boot_error(e.into()))?;
            log::info!("initrd: {:#x} bytes at {:#x}", initrd.len(), at.0);
        }
        return Ok(Entry::Linux64 {
            entry: loaded.entry,
            zero_page,
        });
    }

    let kernel = load_elf(memory, image, GuestAddress(layout::HIMEM_START))
        .map_err(|e| boot_error(e.into()))?;
    log::info!(
        "loaded ELF {name}: {:#x}..{:#x}, entry {:#x}",
        kernel.start.0,
        kernel.end.0,
        kernel.entry.0
    );
    let pvh_entry = match (choice, kernel.pvh_entry) {
        (EntryChoice::Linux64, _) | (EntryChoice::Auto, None) => None,
        (_, Some(entry)) => Some(entry),
        (EntryChoice::Pvh, None) => return Err(BuildError::NoPvhEntry(name.to_string())),
    };
    if let Some(entry) = pvh_entry {
        let initrd = match initrd {
            Some(initrd) => {
                let at = copy_initrd(memory, initrd, kernel.end, DEFAULT_INITRD_ADDR_MAX)
                    .map_err(|e| boot_error(e.into()))?;
                log::info!("initrd: {:#x} bytes at {:#x}", initrd.len(), at.0);
                Some((at, initrd.len() as u64))
            }
            None => None,
        };
        let start_info = configure_pvh_boot(memory, cmdline, initrd, Some(rsdp))
            .map_err(|e| boot_error(e.into()))?;
        log::info!(
            "entering through PVH at {:#x}, start info at {:#x}",
            entry.0,
            start_info.0
        );
        return Ok(Entry::Pvh { entry, start_info });
    }
    let zero_page =
        configure_linux_boot(memory, cmdline, Some(rsdp)).map_err(|e| boot_error(e.into()))?;
    if let Some(initrd) = initrd {
        let at = load_initrd_below(
            memory,
            zero_page,
            initrd,
            kernel.end,
            DEFAULT_INITRD_ADDR_MAX,
        )
        .map_err(|e| boot_error(e.into()))?;
        log::info!("initrd: {:#x} bytes at {:#x}", initrd.len(), at.0);
    }
    log::info!("entering through the 64-bit entry at {:#x}", kernel.entry.0);
    Ok(Entry::Linux64 {
        entry: kernel.entry,
        zero_page,
    })
}

/// Builds the VM described by `config`, in the order KVM needs. `start` is when the VMM
/// started, for the boot-done device.
///
/// Each stage is a function of its own: [`read_boot_inputs`] (everything the user gave,
/// checked before KVM is touched), [`create_vm`], [`attach_legacy_devices`],
/// [`attach_virtio_device`] (once per disk, tap and rng; both through
/// [`attach_devices`]), [`write_firmware_tables`], [`load_kernel`], [`create_vcpus`]
/// and [`finish_vm`].
pub fn build_vm(config: &VmConfig, start: Instant) -> Result<Vm, BuildError> {
    let mut inputs = read_boot_inputs(config)?;
    let kvm = Kvm::new().map_err(BuildError::OpenKvm)?;
    let memory = create_guest_memory_with_bitmap::<AtomicBitmap>(&inputs.layout, HugePages::None)?;
    let vm = create_vm(&kvm, config, &inputs.layout, memory)?;
    let devices = attach_devices(&vm, config, &inputs.layout, &mut inputs.cmdline, start)?;

    let rsdp = write_firmware_tables(vm.memory(), config.vcpus, &devices.virtio_descriptions)?;
    let entry = load_kernel(
        vm.memory(),
        &inputs.kernel_name,
        &inputs.kernel_image,
        &inputs.cmdline,
        inputs.initrd.as_deref(),
        config.entry,
        rsdp,
    )?;
    regs::write_boot_tables(vm.memory())?;
    let syscall_trap = create_syscall_trap(&vm, config, inputs.template);
    let vcpus = create_vcpus(
        &kvm,
        &vm,
        config,
        inputs.template,
        &devices.buses,
        syscall_trap.clone(),
        entry,
    )?;
    finish_vm(
        config,
        inputs.template,
        vm,
        syscall_trap.is_some(),
        vcpus,
        devices,
    )
}

/// Rebuilds the VM a snapshot describes, in a new process: `config` is the snapshot's
/// (with this process's console and exit-statistics choices), guest RAM is `memory`
/// mapped privately (nothing is read until the guest touches it), and every vCPU,
/// the irqchip, the PIT, the clock and every device get their saved state. The same
/// stages as [`build_vm`] create the devices, in the same order, so each lands at the
/// address and interrupt line its saved state expects; the kernel and firmware stages
/// are skipped (RAM already holds them).
pub fn restore_vm(
    config: &VmConfig,
    state: &crate::snapshot::MicrovmState,
    memory: &std::fs::File,
    start: Instant,
) -> Result<Vm, BuildError> {
    let layout = MemoryLayout::new(config.memory_bytes)?;
    let template = CpuTemplate::from_name(&state.cpu_template).ok_or_else(|| {
        BuildError::Snapshot(format!(
            "unknown CPU template {:?} in the snapshot",
            state.cpu_template
        ))
    })?;
    if state.vcpus.len() != config.vcpus as usize {
        return Err(BuildError::Snapshot(format!(
            "the snapshot has {} vCPU states for {} vCPUs",
            state.vcpus.len(),
            config.vcpus
        )));
    }
    let kvm = Kvm::new().map_err(BuildError::OpenKvm)?;
    let ram = ember_memory::map_guest_memory_file::<AtomicBitmap>(&layout, memory)?;
    let vm = create_vm(&kvm, config, &layout, ram)?;
    // The command line is not used: the guest booted long ago.
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    let devices = attach_devices(&vm, config, &layout, &mut cmdline, start)?;
    if devices.transports.len() != state.virtio.len() {
        return Err(BuildError::Snapshot(format!(
            "the snapshot has {} virtio device states for {} devices",
            state.virtio.len(),
            devices.transports.len()
        )));
    }
    devices.legacy.serial.restore_state(&state.serial)?;
    devices.legacy.i8042.restore_state(&state.i8042)?;

    let syscall_trap = if state.syscall_trap {
        Some(
            SyscallTrap::new(
                &vm,
                GuestAddress(SYSCALL_TRAP_PAGES),
                GuestAddress(SYSCALL_TRAP_MMIO),
            )
            .map_err(|e| BuildError::Snapshot(format!("cannot re-create the syscall trap: {e}")))?,
        )
    } else {
        None
    };
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in (0..).zip(&state.vcpus) {
        let mut vcpu = new_vcpu(
            &vm,
            index,
            config,
            template,
            &devices.buses,
            syscall_trap.clone(),
        )?;
        vcpu.restore_state(saved)?;
        vcpus.push(vcpu);
    }
    // After the vCPUs (their LAPICs), before the devices, whose restored workers may
    // raise interrupts at once.
    vm.restore_state(&state.vm)?;
    for (transport, saved) in devices.transports.iter().zip(&state.virtio) {
        transport
            .restore_state(saved)
            .map_err(|e| BuildError::Snapshot(format!("virtio device: {e}")))?;
    }
    finish_vm(config, template, vm, syscall_trap.is_some(), vcpus, devices)
}

/// The last stage, booted or restored: KVM's dirty-page log on if diff snapshots are
/// wanted, and the parts put together.
fn finish_vm(
    config: &VmConfig,
    template: CpuTemplate,
    vm: KvmVm,
    syscall_trap: bool,
    vcpus: Vec<VmVcpu>,
    devices: Devices,
) -> Result<Vm, BuildError> {
    if config.track_dirty_pages {
        vm.set_dirty_log(true)?;
    }
    Ok(Vm {
        config: config.clone(),
        template,
        vm,
        syscall_trap,
        vcpus,
        pio: devices.buses.pio,
        mmio: devices.buses.mmio,
        exit: devices.legacy.exit,
        serial: devices.legacy.serial,
        i8042: devices.legacy.i8042,
        transports: devices.transports,
        serial_stdin: config.serial == SerialConfig::Stdio,
        boot_done: devices.legacy.boot_done,
    })
}

/// The devices of a VM, attached: buses, legacy devices, virtio transports.
struct Devices {
    buses: Buses,
    legacy: LegacyDevices,
    transports: Vec<Arc<Transport>>,
    virtio_descriptions: Vec<VirtioMmio>,
}

/// Stages 2 and 3: the buses, the legacy devices and every virtio device of `config`,
/// in a fixed order (so that a restored VM gets the same addresses and GSIs).
fn attach_devices(
    vm: &KvmVm,
    config: &VmConfig,
    layout: &MemoryLayout,
    cmdline: &mut Cmdline,
    start: Instant,
) -> Result<Devices, BuildError> {
    let buses = Buses {
        pio: Arc::new(Bus::new(BusKind::Pio)),
        mmio: Arc::new(Bus::new(BusKind::Mmio)),
    };
    let legacy = attach_legacy_devices(vm, &buses.pio, &config.serial, start)?;

    let mut resources = DeviceResources::new(layout)?;
    // The devices share one handle on guest memory.
    let virtio_memory: GuestMemory = Arc::new(vm.memory().clone());
    let mut virtio_descriptions = Vec::new();
    let mut transports = Vec::new();
    let devices = virtio_devices(config)?;
    // Device workers are created by a thread of their own, not by the vCPU thread that
    // activates them (see `spawner`).
    let spawner: Option<Arc<dyn ThreadSpawner>> = if devices.is_empty() {
        None
    } else {
        Some(Spawner::start(crate::seccomp::spawner_hook()).map_err(BuildError::Spawner)?)
    };
    for (uid, (name, device)) in (0..).zip(devices) {
        let (transport, description) = attach_virtio_device(
            uid,
            vm,
            &buses.mmio,
            &mut resources,
            cmdline,
            &virtio_memory,
            &name,
            device,
            spawner.clone(),
        )?;
        transports.push(transport);
        virtio_descriptions.push(description);
    }
    Ok(Devices {
        buses,
        legacy,
        transports,
        virtio_descriptions,
    })
}

/// Everything the guest is made from that the user gave: read and checked before KVM is
/// touched, so a typo fails fast.
struct BootInputs {
    layout: MemoryLayout,
    kernel_name: String,
    kernel_image: Cow<'static, [u8]>,
    initrd: Option<Vec<u8>>,
    template: CpuTemplate,
    cmdline: Cmdline,
}

/// The two buses every vCPU dispatches its exits to.
struct Buses {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

/// The legacy devices the rest of the VMM talks to.
struct LegacyDevices {
    exit: Arc<ExitSignal>,
    serial: Arc<Serial>,
    i8042: Arc<I8042>,
    boot_done: Arc<BootDone>,
}

/// Where devices get their MMIO windows and interrupt lines.
struct DeviceResources {
    mmio: AddressAllocator,
    gsis: GsiAllocator,
}

impl DeviceResources {
    fn new(layout: &MemoryLayout) -> Result<Self, BuildError> {
        let (window, window_size) = layout.device_mmio_window();
        Ok(DeviceResources {
            mmio: AddressAllocator::new(window, window_size)?,
            gsis: GsiAllocator::new(layout::DEVICE_GSI_START, layout::DEVICE_GSI_END)?,
        })
    }
}

/// Stage 0: reads the kernel and initrd, picks the CPU template and builds the command
/// line (the user's, plus the template's parameters for a real kernel).
fn read_boot_inputs(config: &VmConfig) -> Result<BootInputs, BuildError> {
    let layout = MemoryLayout::new(config.memory_bytes)?;
    let (kernel_name, kernel_image) = match &config.kernel {
        KernelSource::Demo => (
            "the embedded demo guest".to_string(),
            Cow::Borrowed(DEMO_GUEST),
        ),
        KernelSource::File(path) => {
            let image = read_boot_file("kernel", path, MAX_KERNEL_SIZE, "a kernel may have")?;
            (path.display().to_string(), Cow::Owned(image))
        }
    };
    let initrd = match &config.initrd {
        Some(path) => Some(read_boot_file(
            "initrd",
            path,
            initrd_room(&layout),
            "of guest RAM an initrd can use (from 1 MiB up to the end of low RAM or 0x38000000)",
        )?),
        None => None,
    };
    let template = match config.cpu_template {
        CpuTemplateChoice::Fixed(t) => {
            log::info!("CPU template {} (from the command line)", t.name());
            t
        }
        CpuTemplateChoice::Auto => {
            let (t, why) = CpuTemplate::detect();
            log::info!("CPU template {}: {why}", t.name());
            t
        }
    };
    if template.instruction_fallback() {
        log::info!(
            "instruction fallback on: the run loop completes int3 and fwait when this \
             host's KVM cannot emulate them"
        );
    }
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    cmdline
        .insert_str(config.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE))
        .map_err(BuildError::Cmdline)?;
    if config.kernel != KernelSource::Demo {
        for param in template.kernel_params() {
            // A parameter the user gave (by its name, for `name=value`) is left to them.
            let name = param.split('=').next().unwrap_or(param);
            let given = cmdline
                .as_str()
                .split(' ')
                .any(|p| p == *param || p.split('=').next() == Some(name));
            if !given {
                log::info!(
                    "adding {param} to the kernel command line for CPU template {}",
                    template.name()
                );
                cmdline.insert_str(param).map_err(BuildError::Cmdline)?;
            }
        }
    }
    Ok(BootInputs {
        layout,
        kernel_name,
        kernel_image,
        initrd,
        template,
        cmdline,
    })
}

/// Stage 1: the KVM VM with its guest RAM, the in-kernel irqchip and PIT.
///
/// The memory slot goes in before the irqchip and the PIT. Each of these calls waits in
/// the kernel for SRCU grace periods (workqueue round trips), which dominate start-up on
/// a busy host, and they wait less this way round: on the nested development host (load
/// 3.6, 20 interleaved runs of each order) the three calls took 5.7 ms (median; mean 5.4)
/// with the memory slot first, 9.6 ms (mean 11.8) with it last.
fn create_vm(
    kvm: &Kvm,
    config: &VmConfig,
    layout: &MemoryLayout,
    memory: GuestRam,
) -> Result<KvmVm, BuildError> {
    ember_vm::check_vcpu_count(kvm, config.vcpus)?;
    let vm = ember_vm::Vm::new(kvm, memory)?;
    log::info!(
        "guest memory: {:#x} bytes in {:x?}",
        layout.ram_size(),
        layout.ram_regions()
    );
    vm.create_irqchip_and_pit()?;
    Ok(vm)
}

/// Stage 2: COM1, the i8042, the ACPI shutdown register, the debug-exit and boot-done
/// ports, on the PIO bus at their [`layout`] ports; COM1 interrupts through an irqfd.
fn attach_legacy_devices(
    vm: &KvmVm,
    pio: &Bus,
    serial_config: &SerialConfig,
    start: Instant,
) -> Result<LegacyDevices, BuildError> {
    let exit = Arc::new(ExitSignal::new()?);
    let serial_irq = IrqLine::new()?;
    vm.register_irqfd(serial_irq.event_fd(), COM1_GSI)?;
    let serial_output = match serial_config {
        SerialConfig::Stdio => SerialOutput::Stdout,
        SerialConfig::File { path, max_bytes } => SerialOutput::File {
            path: path.clone(),
            max_bytes: Some(*max_bytes),
        },
        SerialConfig::None => SerialOutput::Sink,
    };
    // The output's writer thread installs its seccomp filter first.
    let serial = Arc::new(Serial::with_thread_hook(
        serial_output,
        serial_irq,
        ember_devices::DEFAULT_OUTPUT_BUFFER,
        crate::seccomp::console_hook(),
    )?);
    pio.insert(COM1_PORT.into(), SERIAL_PORT_SIZE, serial.clone())?;
    // IRQ 1 for the keys `SendCtrlAltDel` queues.
    let keyboard_irq = IrqLine::new()?;
    vm.register_irqfd(keyboard_irq.event_fd(), I8042_KEYBOARD_GSI)?;
    let i8042 = Arc::new(I8042::with_keyboard_irq(exit.clone(), keyboard_irq)?);
    pio.insert(I8042_PORT.into(), I8042_PORT_SIZE, i8042.clone())?;
    // The FADT's sleep control, sleep status and reset register (see
    // `write_firmware_tables`).
    pio.insert(
        ACPI_SHUTDOWN_PORT.into(),
        ACPI_SHUTDOWN_PORT_SIZE,
        Arc::new(AcpiShutdown::new(exit.clone())),
    )?;
    pio.insert(
        DEBUG_EXIT_PORT.into(),
        DEBUG_EXIT_PORT_SIZE,
        Arc::new(DebugExit::new(exit.clone())),
    )?;
    let boot_done = Arc::new(BootDone::new(start));
    pio.insert(
        BOOT_DONE_PORT.into(),
        BOOT_DONE_PORT_SIZE,
        boot_done.clone(),
    )?;
    Ok(LegacyDevices {
        exit,
        serial,
        i8042,
        boot_done,
    })
}

/// The rate limiter settings of `limit` (the command line's `bw_*` and `ops_*` keys).
fn rate_limiter_config(limit: &RateLimit) -> RateLimiterConfig {
    let bucket = |b: &TokenBucket| TokenBucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time_ms: b.refill_time_ms,
    };
    RateLimiterConfig {
        bandwidth: limit.bandwidth.as_ref().map(bucket),
        ops: limit.ops.as_ref().map(bucket),
    }
}

/// The virtio devices the configuration asks for, each with a name for messages: disks,
/// then taps, then the entropy device.
fn virtio_devices(config: &VmConfig) -> Result<Vec<NamedVirtioDevice>, BuildError> {
    let mut devices: Vec<NamedVirtioDevice> = Vec::new();
    for disk in &config.disks {
        let mut image = Disk::open(
            &disk.path,
            BlockOptions {
                read_only: disk.read_only,
            },
        )?;
        if let Some(serial) = &disk.serial {
            image = image.with_serial(serial)?;
        }
        let mut block = Block::from_disk(image);
        if let Some(limit) = &disk.rate_limit {
            block = block.with_rate_limiter(rate_limiter_config(limit))?;
        }
        devices.push((format!("disk {}", disk.path.display()), Box::new(block)));
    }
    let limits =
        |limit: &Option<RateLimit>| limit.as_ref().map(rate_limiter_config).unwrap_or_default();
    for net in &config.nets {
        let mut card = Net::new(&net.tap, net.mac)?;
        if net.rx_rate_limit.is_some() || net.tx_rate_limit.is_some() {
            card.set_rate_limiters(limits(&net.rx_rate_limit), limits(&net.tx_rate_limit))?;
        }
        devices.push((format!("net tap={}", net.tap), Box::new(card)));
    }
    if config.rng {
        let mut rng = Rng::new();
        if config.rng_rate_limit.is_some() {
            rng = rng.with_rate_limiter(limits(&config.rng_rate_limit))?;
        }
        devices.push(("rng".to_string(), Box::new(rng)));
    }
    Ok(devices)
}

/// Stage 3, once per device: a virtio-mmio transport in an MMIO window of its own with a
/// GSI of its own, both from `resources`. Queue notifications reach the device's worker
/// through ioeventfds and its interrupts reach the guest through an irqfd, so the vCPU
/// only ever touches the transport's registers. Kernels learn of the device from the
/// DSDT (the returned description) or, when built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES,
/// from the `virtio_mmio.device=` parameter added to `cmdline`. `uid` tells the devices'
/// DSDT entries apart (`V000`, `V001`, ...).
#[allow(clippy::too_many_arguments)]
fn attach_virtio_device(
    uid: u16,
    vm: &KvmVm,
    mmio: &Bus,
    resources: &mut DeviceResources,
    cmdline: &mut Cmdline,
    memory: &GuestMemory,
    name: &str,
    device: Box<dyn ActivateDevice<GuestMemory>>,
    spawner: Option<Arc<dyn ThreadSpawner>>,
) -> Result<(Arc<Transport>, VirtioMmio), BuildError> {
    let addr = resources
        .mmio
        .allocate(MMIO_WINDOW_SIZE, MMIO_WINDOW_SIZE)?;
    let gsi = resources.gsis.allocate()?;
    let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| BuildError::EventFd(name.into(), e))?;
    vm.register_irqfd(&irq, gsi)?;
    let mut transport = MmioTransport::new(device, memory.clone(), irq)
        .map_err(|e| BuildError::Transport(name.into(), e))?;
    // The worker thread comes from the spawner thread and installs its seccomp filter
    // first.
    transport.set_thread_hook(crate::seccomp::worker_hook());
    transport.set_thread_spawner(spawner);
    for (queue, notify) in transport.queue_notify_events() {
        let at = IoEventAddress::Mmio(addr.0 + QUEUE_NOTIFY_OFFSET);
        vm.register_ioeventfd(&notify, at, u32::from(queue))?;
    }
    let transport = Arc::new(transport);
    mmio.insert(addr.0, MMIO_WINDOW_SIZE, transport.clone())?;
    cmdline
        .insert_str(&format!(
            "virtio_mmio.device={}K@{:#x}:{gsi}",
            MMIO_WINDOW_SIZE / layout::KIB,
            addr.0
        ))
        .map_err(BuildError::Cmdline)?;
    log::info!("{name}: virtio-mmio at {:#x}, GSI {gsi}", addr.0);
    let description = VirtioMmio::new(uid, addr.0, MMIO_WINDOW_SIZE, gsi)
        .map_err(|e| BuildError::Firmware(e.into()))?;
    Ok((transport, description))
}

/// Stage 4: an MP table for kernels that read it, and ACPI for those that only read the
/// MADT (Debian's). The FADT says hardware-reduced ACPI, so Linux wires no legacy IRQs by
/// itself: every device with an interrupt is in the DSDT. Returns the RSDP's address.
fn write_firmware_tables(
    memory: &GuestRam,
    vcpus: u32,
    virtio: &[VirtioMmio],
) -> Result<GuestAddress, BuildError> {
    // `check_vcpu_count` already held the count below the 8-bit APIC ID limit.
    let num_cpus = u8::try_from(vcpus).unwrap_or(u8::MAX);
    setup_mptable(memory, num_cpus).map_err(|e| BuildError::Firmware(e.into()))?;
    let mut devices: Vec<&dyn Aml> = vec![&Serial16550::COM1, &I8042Keyboard::EMBER];
    devices.extend(virtio.iter().map(|d| d as &dyn Aml));
    setup_acpi(
        memory,
        &AcpiConfig {
            num_cpus,
            devices: &devices,
            // Power-off (S5) and reset through the `AcpiShutdown` device.
            shutdown: Some(AcpiShutdownRegister {
                port: ACPI_SHUTDOWN_PORT,
                s5_sleep_type: S5_SLEEP_TYPE,
                reset_value: ACPI_RESET_VALUE,
            }),
        },
    )
    .map_err(|e| BuildError::Firmware(e.into()))
}

/// Stage 6: the vCPUs, with CPUID from the template, boot MSRs, FPU and LAPIC, and the
/// entry registers. A Linux kernel starts on the boot vCPU and wakes the others itself
/// (INIT/SIPI); the demo guest starts every vCPU at its entry point.
fn create_vcpus(
    kvm: &Kvm,
    vm: &KvmVm,
    config: &VmConfig,
    template: CpuTemplate,
    buses: &Buses,
    syscall_trap: Option<Arc<SyscallTrap>>,
    entry: Entry,
) -> Result<Vec<VmVcpu>, BuildError> {
    let start_all = config.kernel == KernelSource::Demo;
    let mut supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    template.apply(&mut supported);
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = new_vcpu(vm, index, config, template, buses, syscall_trap.clone())?;
        vcpu.set_cpuid(&supported, config.vcpus)?;
        vcpu.set_boot_msrs()?;
        vcpu.set_fpu()?;
        vcpu.set_lapic()?;
        let boot_vcpu = index == BOOT_VCPU;
        if boot_vcpu || start_all {
            match entry {
                Entry::Linux64 { entry, zero_page } => vcpu.set_long_mode_entry(&BootRegs {
                    entry,
                    stack: GuestAddress(layout::BOOT_STACK_POINTER),
                    rsi: zero_page.0,
                    rdi: u64::from(index),
                })?,
                Entry::Pvh { entry, start_info } => vcpu.set_pvh_entry(entry, start_info)?,
            }
        }
        if !boot_vcpu && start_all {
            vcpu.set_runnable()?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// A vCPU with the run-loop settings `config` and `template` ask for, before any
/// architectural state (boot set-up or a snapshot's) is given to it.
fn new_vcpu(
    vm: &KvmVm,
    index: u32,
    config: &VmConfig,
    template: CpuTemplate,
    buses: &Buses,
    syscall_trap: Option<Arc<SyscallTrap>>,
) -> Result<VmVcpu, BuildError> {
    let mut vcpu = Vcpu::new(vm, index, buses.pio.clone(), buses.mmio.clone())?;
    if config.exit_stats {
        vcpu.enable_exit_timing();
    }
    vcpu.set_instruction_fallback(template.instruction_fallback());
    vcpu.set_syscall_trap(syscall_trap);
    // The vCPU thread installs its seccomp filter before the guest runs.
    vcpu.set_thread_hook(crate::seccomp::vcpu_hook());
    Ok(vcpu)
}

/// The syscall trap, where the host needs it: the VM's MSR filter, and the trap's code
/// page in reserved memory. Without it, a Linux guest's first system call faults.
/// Setting the MSR filter waits for an SRCU grace period (12-21 ms measured here, most of
/// start-up), so the embedded demo guest, which never leaves kernel mode, skips it.
fn create_syscall_trap(
    vm: &KvmVm,
    config: &VmConfig,
    template: CpuTemplate,
) -> Option<Arc<SyscallTrap>> {
    if !template.syscall_trap() || config.kernel == KernelSource::Demo {
        return None;
    }
    match SyscallTrap::new(
        vm,
        GuestAddress(SYSCALL_TRAP_PAGES),
        GuestAddress(SYSCALL_TRAP_MMIO),
    ) {
        Ok(trap) => {
            log::info!(
                "syscall trap on: the run loop completes user-mode syscalls this host's \
                 KVM leaves at CPL3 (pages at {SYSCALL_TRAP_PAGES:#x}, MMIO page \
                 {SYSCALL_TRAP_MMIO:#x})"
            );
            Some(trap)
        }
        Err(e) => {
            log::warn!(
                "syscall trap unavailable ({e}): system calls from guest user mode will \
                 fault on this host"
            );
            None
        }
    }
}
