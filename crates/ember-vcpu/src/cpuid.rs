//! CPUID for each vCPU: KVM's supported list, marked as running under a hypervisor,
//! with APIC IDs and a topology of `count` single-threaded cores in one socket.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID.1:ECX bit 31: "running under a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.0x80000001:ECX bit 1 (AMD): core multi-processing legacy mode.
const ECX_CMP_LEGACY: u32 = 1 << 1;

/// CPUID.1:ECX bit 13: CMPXCHG16B.
const ECX_CX16: u32 = 1 << 13;
/// CPUID.1:ECX bit 26: XSAVE/XRSTOR.
const ECX_XSAVE: u32 = 1 << 26;
/// CPUID.1:ECX bit 28: AVX.
const ECX_AVX: u32 = 1 << 28;
/// CPUID.(7,0):ECX bit 16: 57-bit linear addresses (5-level paging).
const ECX_LA57: u32 = 1 << 16;

/// Where the kernel exposes that KVM runs nested on the PVM hypervisor, which emulates
/// guest kernel-mode code instruction by instruction.
const NESTED_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// The `clearcpuid=` list of [`CpuTemplate::NestedCompat`] (see its table): 20 names,
/// about as many as Linux applies from one list.
const NESTED_CLEARCPUID: &str = "clearcpuid=popcnt,smap,smep,pku,fsgsbase,invpcid,pcid,rdpid,\
umip,rdseed,rdrand,clflushopt,clwb,sse4_1,sse4_2,ssse3,aes,pclmulqdq,avx,avx2";

/// Keeps glibc in [`CpuTemplate::NestedCompat`] guests off AVX and AVX-512 (see its
/// table): Linux passes an unknown `NAME=value` parameter to init as an environment
/// variable, which its children inherit.
const NESTED_GLIBC: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,\
-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load";

/// Level types of leaves 0xB/0x1F.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The CPU vendor, from CPUID leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" (or "HygonGenuine").
    Amd,
    /// Anything else.
    Other,
}

/// Reads the vendor from leaf 0 of a CPUID list.
///
/// ```
/// use kvm_bindings::{kvm_cpuid_entry2, CpuId};
/// let mut cpuid = CpuId::new(0).unwrap();
/// cpuid.push(kvm_cpuid_entry2 {
///     function: 0, ebx: 0x6874_7541, edx: 0x6974_6e65, ecx: 0x444d_4163, ..Default::default()
/// }).unwrap();
/// assert_eq!(ember_vcpu::cpuid::vendor(&cpuid), ember_vcpu::cpuid::CpuVendor::Amd);
/// ```
pub fn vendor(cpuid: &CpuId) -> CpuVendor {
    let Some(leaf0) = cpuid.as_slice().iter().find(|e| e.function == 0) else {
        return CpuVendor::Other;
    };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Other,
    }
}

/// What the guest's CPUID hides on top of KVM's supported list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuTemplate {
    /// KVM's supported CPUID as it is: right on hardware KVM.
    Host,
    /// For hosts whose KVM emulates guest kernel code (nested PVM), where some
    /// instructions cannot run in guest kernel mode. Each measure, and the failure that
    /// showed it is needed (Debian's 6.1 cloud kernel under `ember`, an emulation
    /// failure on the instruction named):
    ///
    /// | measure | why |
    /// |---|---|
    /// | CPUID: CMPXCHG16B hidden (honoured by this host) | `cmpxchg16b` in SLUB's fast path; hidden, SLUB takes its fallback |
    /// | CPUID: XSAVE and AVX cleared (not honoured by this host), kernel parameter `noxsave` | the `xsave`/`xrstor` family |
    /// | `clearcpuid=popcnt` | `popcnt` (`f3 48 0f b8`); clearing POPCNT in CPUID did not stop the kernel from using it, the parameter did |
    /// | `clearcpuid=smap` | `clac` in the user-access helpers |
    /// | `clearcpuid=` smep, pku, fsgsbase, invpcid, pcid, rdpid, umip, rdseed, rdrand, clflushopt, clwb, sse4_1, sse4_2, ssse3, aes, pclmulqdq, avx, avx2 | features whose instructions the emulator lacks or very likely lacks (SSE4/AVX/AES-NI were seen to fail as a class: `xorps` failed at CPL0); with this list, the run that went furthest brought both vCPUs up. Not each one was seen failing alone |
    /// | [instruction fallback](crate::fallback) on | `int3` (Linux's alternatives self-test, run-time text patching) and `fwait` (x87 is baseline, cannot be hidden) |
    /// | [syscall trap](crate::syscall_trap) on | `syscall` from user mode stays at CPL3 on this host: init's first system call faults at `entry_SYSCALL_64` (`segfault at ffffffff81c00080 ... error 15`) and the kernel panics |
    /// | CPUID: LA57 hidden, kernel parameter `nopti` | what the syscall trap needs: 4-level paging (its PML4 slot) and one PML4 for user and kernel mode |
    /// | `GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,...` (passed to init's environment) | user mode runs natively and sees the host's XCR0 (0xe7) and AVX in CPUID, but the `noxsave` kernel saves only x87/SSE state (FXSAVE): glibc's AVX `memcpy` lost the upper YMM halves across context switches and busybox crashed at start-up (`segfault at 0` in `__ctype_init`, about 3 in 200 concurrent execs; 0 in 200 with the tunable). Setting XCR0 = 0x3 with `KVM_SET_XCRS` did not change what guest user mode reads here. Programs that pick AVX without glibc's dispatch are not covered |
    ///
    /// Linux applies about 20 names from one `clearcpuid=` list, which is why the list
    /// stops at 20.
    NestedCompat,
}

impl CpuTemplate {
    /// Picks the template for this host, and says why.
    ///
    /// ```
    /// let (template, why) = ember_vcpu::cpuid::CpuTemplate::detect();
    /// assert!(!why.is_empty());
    /// # let _ = template;
    /// ```
    pub fn detect() -> (CpuTemplate, &'static str) {
        if std::path::Path::new(NESTED_PVM_MODULE).exists() {
            (
                CpuTemplate::NestedCompat,
                "the kvm_pvm module is loaded: KVM emulates guest kernel code",
            )
        } else {
            (
                CpuTemplate::Host,
                "no nested-emulation module found: hardware KVM",
            )
        }
    }

    /// The template's name as the example VMM's CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::NestedCompat => "nested-compat",
        }
    }

    /// Parses [`CpuTemplate::name`].
    pub fn from_name(name: &str) -> Option<CpuTemplate> {
        match name {
            "host" => Some(CpuTemplate::Host),
            "nested-compat" => Some(CpuTemplate::NestedCompat),
            _ => None,
        }
    }

    /// Kernel parameters a Linux guest needs with this template.
    ///
    /// ```
    /// use ember_vcpu::cpuid::CpuTemplate;
    /// assert!(CpuTemplate::Host.kernel_params().is_empty());
    /// assert!(CpuTemplate::NestedCompat.kernel_params().contains(&"noxsave"));
    /// ```
    pub fn kernel_params(self) -> &'static [&'static str] {
        match self {
            CpuTemplate::Host => &[],
            CpuTemplate::NestedCompat => &["noxsave", NESTED_CLEARCPUID, "nopti", NESTED_GLIBC],
        }
    }

    /// Whether the run loop should complete the instructions this host's KVM cannot
    /// emulate ([`Vcpu::set_instruction_fallback`](crate::Vcpu::set_instruction_fallback)):
    /// on for [`CpuTemplate::NestedCompat`], off on hardware KVM, which runs them.
    ///
    /// ```
    /// use ember_vcpu::cpuid::CpuTemplate;
    /// assert!(CpuTemplate::NestedCompat.instruction_fallback());
    /// assert!(!CpuTemplate::Host.instruction_fallback());
    /// ```
    pub fn instruction_fallback(self) -> bool {
        self == CpuTemplate::NestedCompat
    }

    /// Whether the VMM should turn on the [syscall trap](crate::syscall_trap)
    /// ([`SyscallTrap::new`](crate::syscall_trap::SyscallTrap::new),
    /// [`Vcpu::set_syscall_trap`](crate::Vcpu::set_syscall_trap)): on for
    /// [`CpuTemplate::NestedCompat`], whose hosts run a user-mode `syscall` without the
    /// switch to CPL0 (a Linux guest's first system call faults at its entry point, so
    /// init dies and the kernel panics); off on hardware KVM, where `syscall` works.
    ///
    /// ```
    /// use ember_vcpu::cpuid::CpuTemplate;
    /// assert!(CpuTemplate::NestedCompat.syscall_trap());
    /// assert!(!CpuTemplate::Host.syscall_trap());
    /// ```
    pub fn syscall_trap(self) -> bool {
        self == CpuTemplate::NestedCompat
    }

    /// Applies the template to a CPUID list (KVM's supported list, before
    /// [`vcpu_cpuid`]).
    ///
    /// ```
    /// use kvm_bindings::{kvm_cpuid_entry2, CpuId};
    /// use ember_vcpu::cpuid::CpuTemplate;
    /// let mut cpuid = CpuId::new(0).unwrap();
    /// cpuid.push(kvm_cpuid_entry2 { function: 1, ecx: u32::MAX, ..Default::default() }).unwrap();
    /// CpuTemplate::NestedCompat.apply(&mut cpuid);
    /// assert_eq!(cpuid.as_slice()[0].ecx & (1 << 13), 0); // CX16 hidden
    /// ```
    pub fn apply(self, cpuid: &mut CpuId) {
        if self == CpuTemplate::Host {
            return;
        }
        for e in cpuid.as_mut_slice() {
            if e.function == 1 {
                e.ecx &= !(ECX_CX16 | ECX_XSAVE | ECX_AVX);
            }
            if e.function == 7 && e.index == 0 {
                e.ecx &= !ECX_LA57;
            }
        }
    }
}

/// Bits needed to hold an ID in `0..count` (the APIC-ID shift of a topology level).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

/// Returns `supported` patched for vCPU `index` of `count`.
///
/// The APIC ID of vCPU `i` is `i`. Leaves 1, 4, 0xB, 0x1F, 0x80000001, 0x80000008 and
/// 0x8000001E describe `count` cores of one thread each in one package, so a guest
/// finds every vCPU and its own ID.
///
/// ```
/// use kvm_bindings::{kvm_cpuid_entry2, CpuId};
/// let mut supported = CpuId::new(0).unwrap();
/// supported.push(kvm_cpuid_entry2 { function: 1, ..Default::default() }).unwrap();
/// let cpuid = ember_vcpu::cpuid::vcpu_cpuid(&supported, 3, 4);
/// let leaf1 = cpuid.as_slice()[0];
/// assert_eq!(leaf1.ebx >> 24, 3); // APIC ID
/// assert_eq!((leaf1.ebx >> 16) & 0xff, 4); // logical processors
/// assert_ne!(leaf1.ecx & (1 << 31), 0); // hypervisor bit
/// ```
pub fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let vendor = vendor(&cpuid);
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let core_bits = id_bits(count);
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, vendor, apic_id, count, core_bits);
    }
    cpuid
}

fn patch_entry(
    e: &mut kvm_cpuid_entry2,
    vendor: CpuVendor,
    apic_id: u32,
    count: u32,
    core_bits: u32,
) {
    match e.function {
        1 => {
            e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        // Deterministic cache parameters: cores per package in EAX[31:26]; every cache
        // is private to its (single-threaded) core.
        4 if vendor == CpuVendor::Intel => {
            e.eax = (e.eax & 0x0000_3fff) | ((count - 1) << 26);
        }
        0xb | 0x1f => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = count;
                    e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        0x8000_0001 if vendor == CpuVendor::Amd => {
            if count > 1 {
                e.ecx |= ECX_CMP_LEGACY;
            } else {
                e.ecx &= !ECX_CMP_LEGACY;
            }
        }
        0x8000_0008 if vendor == CpuVendor::Amd => {
            e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
        }
        0x8000_001e if vendor == CpuVendor::Amd => {
            e.eax = apic_id;
            // Core ID = APIC ID, one thread per core, node 0.
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported(vendor: &[u8; 12]) -> CpuId {
        let word =
            |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
        let mut cpuid = CpuId::new(0).unwrap();
        let mut push = |function, index| {
            cpuid
                .push(kvm_cpuid_entry2 {
                    function,
                    index,
                    ..Default::default()
                })
                .unwrap()
        };
        for (f, i) in [
            (1, 0),
            (4, 0),
            (0xb, 0),
            (0xb, 1),
            (0xb, 2),
            (0x8000_0001, 0),
            (0x8000_0008, 0),
            (0x8000_001e, 0),
        ] {
            push(f, i);
        }
        cpuid
            .push(kvm_cpuid_entry2 {
                function: 0,
                ebx: word(0),
                edx: word(4),
                ecx: word(8),
                ..Default::default()
            })
            .unwrap();
        cpuid
    }

    fn leaf(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn vendors_are_recognised() {
        assert_eq!(vendor(&supported(b"GenuineIntel")), CpuVendor::Intel);
        assert_eq!(vendor(&supported(b"AuthenticAMD")), CpuVendor::Amd);
        assert_eq!(vendor(&supported(b"SomethingElz")), CpuVendor::Other);
        assert_eq!(vendor(&CpuId::new(0).unwrap()), CpuVendor::Other);
    }

    #[test]
    fn topology_on_intel() {
        let cpuid = vcpu_cpuid(&supported(b"GenuineIntel"), 5, 6);
        let l1 = leaf(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 5);
        assert_eq!((l1.ebx >> 16) & 0xff, 6);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf(&cpuid, 4, 0).eax >> 26, 5);
        let smt = leaf(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = leaf(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = leaf(&cpuid, 0xb, 2);
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
    }

    #[test]
    fn topology_on_amd() {
        let cpuid = vcpu_cpuid(&supported(b"AuthenticAMD"), 1, 2);
        assert_eq!(leaf(&cpuid, 0x8000_0008, 0).ecx & 0xf0ff, (1 << 12) | 1);
        assert_ne!(leaf(&cpuid, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(leaf(&cpuid, 0x8000_001e, 0).eax, 1);
        // Intel-only leaf untouched.
        assert_eq!(leaf(&cpuid, 4, 0).eax, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut base = supported(b"GenuineIntel");
        for e in base.as_mut_slice() {
            e.edx |= EDX_HTT;
        }
        let cpuid = vcpu_cpuid(&base, 0, 1);
        assert_eq!(leaf(&cpuid, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(leaf(&cpuid, 0xb, 1).eax, 0);
    }

    #[test]
    fn templates() {
        let mut cpuid = supported(b"GenuineIntel");
        for e in cpuid.as_mut_slice() {
            e.ecx = u32::MAX;
        }
        let before = cpuid.clone();
        CpuTemplate::Host.apply(&mut cpuid);
        assert_eq!(cpuid, before);
        CpuTemplate::NestedCompat.apply(&mut cpuid);
        let l1 = leaf(&cpuid, 1, 0);
        assert_eq!(l1.ecx & (ECX_CX16 | ECX_XSAVE | ECX_AVX), 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf(&cpuid, 0xb, 0).ecx, u32::MAX, "other leaves untouched");
        for t in [CpuTemplate::Host, CpuTemplate::NestedCompat] {
            assert_eq!(CpuTemplate::from_name(t.name()), Some(t));
        }
        assert_eq!(CpuTemplate::from_name("t2"), None);
        let params = CpuTemplate::NestedCompat.kernel_params();
        assert_eq!(params[0], "noxsave");
        let list = params[1].strip_prefix("clearcpuid=").unwrap();
        let names: Vec<&str> = list.split(',').collect();
        assert_eq!(
            names.len(),
            20,
            "Linux applies about 20 names from one list"
        );
        for needed in ["popcnt", "smap"] {
            assert!(names.contains(&needed), "{needed}");
        }
        assert!(names.iter().all(|n| !n.is_empty() && !n.contains(' ')));
        let glibc = params
            .iter()
            .find_map(|p| p.strip_prefix("GLIBC_TUNABLES=glibc.cpu.hwcaps="))
            .expect("the glibc tunable");
        for off in ["-AVX", "-AVX2", "-AVX512F", "-AVX512VL"] {
            assert!(glibc.split(',').any(|h| h == off), "{off}");
        }
        assert!(params.iter().all(|p| !p.is_empty() && !p.contains(' ')));
        let (_, why) = CpuTemplate::detect();
        assert!(!why.is_empty());
    }

    #[test]
    fn nested_compat_prepares_for_the_syscall_trap() {
        let mut cpuid = CpuId::new(0).unwrap();
        for index in [0, 1] {
            cpuid
                .push(kvm_cpuid_entry2 {
                    function: 7,
                    index,
                    ecx: u32::MAX,
                    ..Default::default()
                })
                .unwrap();
        }
        CpuTemplate::NestedCompat.apply(&mut cpuid);
        assert_eq!(leaf(&cpuid, 7, 0).ecx, !ECX_LA57, "LA57 hidden");
        assert_eq!(
            leaf(&cpuid, 7, 1).ecx,
            u32::MAX,
            "other subleaves untouched"
        );
        assert!(CpuTemplate::NestedCompat.kernel_params().contains(&"nopti"));
        assert!(CpuTemplate::NestedCompat.syscall_trap());
        assert!(!CpuTemplate::Host.syscall_trap());
    }

    #[test]
    fn id_bits_matches_log2_ceiling() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 254].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }
}
