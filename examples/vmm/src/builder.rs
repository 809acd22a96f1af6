//! Assembles a VM from a [`VmConfig`]: the whole machine, in one place.
//!
//! Order matters to KVM: the irqchip and the TSS address must exist before vCPUs, and
//! the LAPIC can only be programmed once the irqchip exists.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use ember_boot::{
    configure_linux_boot, load_elf, BootError, Cmdline, CMDLINE_MAX_SIZE, HIMEM_START,
};
use ember_bus::{Bus, BusError, BusKind};
use ember_devices::{
    BootDone, DebugExit, DeviceError, ExitSignal, IrqLine, Serial, SerialOutput, BOOT_DONE_PORT,
    BOOT_DONE_PORT_SIZE, COM1_GSI, COM1_PORT, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE, I8042,
    I8042_PORT, I8042_PORT_SIZE, SERIAL_PORT_SIZE,
};
use ember_memory::{
    create_guest_memory, register_memory_slots, HugePages, MemoryError, MemoryLayout,
};
use ember_vcpu::{regs, BootRegs, Vcpu, VcpuError};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use ember_vcpu::cpuid::CpuTemplate;

use crate::config::{CpuTemplateChoice, KernelSource, SerialConfig, VmConfig, DEFAULT_CMDLINE};

/// The demo guest, assembled by `build.rs` (see `ember_guests::demo`).
pub const DEMO_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo-guest.elf"));

/// Why a VM could not be built. Each message names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
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
    /// The kernel image or boot parameters were rejected.
    #[error("kernel {kernel}: {source}")]
    Boot {
        /// Which kernel.
        kernel: String,
        /// What was wrong.
        source: BootError,
    },
    /// The command line was rejected.
    #[error("kernel command line: {0}")]
    Cmdline(BootError),
    /// Memory size or set-up.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// vCPU count or set-up.
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    /// A device could not be created.
    #[error("{0}")]
    Device(#[from] DeviceError),
    /// A device could not be placed on a bus.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
}

/// A VM ready to run: everything created, nothing running yet.
pub struct Vm {
    /// `/dev/kvm`, the VM and its RAM: held for as long as the VM runs.
    pub _kvm: Kvm,
    /// The VM file descriptor.
    pub _vm: VmFd,
    /// Guest RAM.
    pub _memory: GuestMemoryMmap,
    /// vCPUs, configured and not yet started.
    pub vcpus: Vec<Vcpu>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Set by devices that end the VM (debug exit, i8042 reset).
    pub exit: Arc<ExitSignal>,
    /// COM1, for feeding it input.
    pub serial: Arc<Serial>,
    /// Whether serial input comes from stdin.
    pub serial_stdin: bool,
    /// Records when the guest said it finished booting.
    pub boot_done: Arc<BootDone>,
}

/// Builds the VM described by `config`. `start` is when the VMM started, for the
/// boot-done device.
pub fn build_vm(config: &VmConfig, start: Instant) -> Result<Vm, BuildError> {
    // Check what the user gave before touching KVM, so a typo fails fast.
    let layout = MemoryLayout::new(config.memory_bytes)?;
    let (kernel_name, kernel_image) = match &config.kernel {
        KernelSource::Demo => (
            "the embedded demo guest".to_string(),
            Cow::Borrowed(DEMO_GUEST),
        ),
        KernelSource::File(path) => {
            let image = std::fs::read(path).map_err(|source| BuildError::ReadKernel {
                path: path.display().to_string(),
                source,
            })?;
            (path.display().to_string(), Cow::Owned(image))
        }
    };
    let initrd = match &config.initrd {
        Some(path) => Some(
            std::fs::read(path).map_err(|source| BuildError::ReadInitrd {
                path: path.display().to_string(),
                source,
            })?,
        ),
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
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    cmdline
        .insert_str(config.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE))
        .map_err(BuildError::Cmdline)?;
    if config.kernel != KernelSource::Demo {
        for param in template.kernel_params() {
            if !cmdline.as_str().split(' ').any(|p| p == *param) {
                log::info!(
                    "adding {param} to the kernel command line for CPU template {}",
                    template.name()
                );
                cmdline.insert_str(param).map_err(BuildError::Cmdline)?;
            }
        }
    }

    let kvm = Kvm::new().map_err(BuildError::OpenKvm)?;
    ember_vcpu::vm::check_vcpu_count(&kvm, config.vcpus)?;
    let vm = kvm
        .create_vm()
        .map_err(|e| BuildError::Kvm("KVM_CREATE_VM", e))?;
    ember_vcpu::vm::setup_vm(&vm)?;
    ember_devices::create_irqchip_and_pit(&vm)?;

    // Memory.
    let memory = create_guest_memory(&layout, HugePages::None)?;
    register_memory_slots(&vm, &memory, 0)?;
    log::info!(
        "guest memory: {:#x} bytes in {:x?}",
        layout.ram_size(),
        layout.ram_regions()
    );

    // Legacy devices.
    let pio = Arc::new(Bus::new(BusKind::Pio));
    let mmio = Arc::new(Bus::new(BusKind::Mmio));
    let exit = Arc::new(ExitSignal::new()?);
    let serial_irq = IrqLine::new()?;
    vm.register_irqfd(serial_irq.event_fd(), COM1_GSI)
        .map_err(|e| BuildError::Kvm("KVM_IRQFD for COM1", e))?;
    let serial_output = match &config.serial {
        SerialConfig::Stdio => SerialOutput::Stdout,
        SerialConfig::File(path) => SerialOutput::File(path.clone()),
        SerialConfig::None => SerialOutput::Sink,
    };
    let serial = Arc::new(Serial::new(serial_output, serial_irq)?);
    pio.insert(COM1_PORT.into(), SERIAL_PORT_SIZE, serial.clone())?;
    pio.insert(
        I8042_PORT.into(),
        I8042_PORT_SIZE,
        Arc::new(I8042::new(exit.clone())?),
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

    // Kernel, command line, zero page, boot page tables.
    let boot_error = |source| BuildError::Boot {
        kernel: kernel_name.clone(),
        source,
    };
    let kernel = load_elf(&memory, &kernel_image, GuestAddress(HIMEM_START)).map_err(boot_error)?;
    log::info!(
        "loaded {kernel_name}: {:#x}..{:#x}, entry {:#x}",
        kernel.start.0,
        kernel.end.0,
        kernel.entry.0
    );
    let zero_page = configure_linux_boot(&memory, &cmdline).map_err(boot_error)?;
    if let Some(initrd) = &initrd {
        let placed =
            ember_boot::load_initrd(&memory, zero_page, initrd, kernel.end).map_err(boot_error)?;
        log::info!("initrd: {:#x} bytes at {:#x}", initrd.len(), placed.0);
    }
    regs::write_boot_tables(&memory)?;

    // vCPUs. A Linux kernel starts on vCPU 0 and wakes the others itself (INIT/SIPI);
    // the demo guest starts every vCPU at its entry point.
    let start_all = config.kernel == KernelSource::Demo;
    let mut supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    template.apply(&mut supported);
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, index, pio.clone(), mmio.clone(), memory.clone())?;
        vcpu.set_cpuid(&supported, config.vcpus)?;
        vcpu.set_boot_msrs()?;
        vcpu.set_fpu()?;
        vcpu.set_lapic()?;
        if index == 0 || start_all {
            vcpu.set_long_mode_entry(&BootRegs {
                entry: kernel.entry,
                stack: GuestAddress(regs::BOOT_STACK_POINTER),
                rsi: zero_page.0,
                rdi: u64::from(index),
            })?;
        }
        if index > 0 && start_all {
            vcpu.set_runnable()?;
        }
        vcpus.push(vcpu);
    }

    Ok(Vm {
        _kvm: kvm,
        _vm: vm,
        _memory: memory,
        vcpus,
        pio,
        mmio,
        exit,
        serial,
        serial_stdin: config.serial == SerialConfig::Stdio,
        boot_done,
    })
}
