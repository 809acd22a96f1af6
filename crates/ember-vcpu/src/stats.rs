//! Per-vCPU counters of exit reasons.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why `KVM_RUN` returned, as counted by [`ExitStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum ExitKind {
    /// `in` from an I/O port.
    IoIn,
    /// `out` to an I/O port.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// `hlt` (only without the in-kernel irqchip).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// PSCI/ACPI-style system event.
    SystemEvent,
    /// `KVM_RUN` interrupted by a signal (`EINTR`), e.g. a stop request.
    Interrupted,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry,
    /// Anything else.
    Other,
}

impl ExitKind {
    /// Every kind, in counter order.
    pub const ALL: [ExitKind; 11] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::Interrupted,
        ExitKind::InternalError,
        ExitKind::FailEntry,
        ExitKind::Other,
    ];

    /// A short lower-case name, e.g. `io-out`.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io-in",
            ExitKind::IoOut => "io-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system-event",
            ExitKind::Interrupted => "interrupted",
            ExitKind::InternalError => "internal-error",
            ExitKind::FailEntry => "fail-entry",
            ExitKind::Other => "other",
        }
    }
}

/// Exit counters of one vCPU.
///
/// Written only by the vCPU's own thread (a plain load and store, no locked
/// read-modify-write on the exit path); readable from any thread at any time.
#[derive(Debug, Default)]
pub struct ExitStats {
    counts: [AtomicU64; ExitKind::ALL.len()],
}

impl ExitStats {
    /// Counts one exit. Call only from the thread running the vCPU.
    #[inline]
    pub(crate) fn record(&self, kind: ExitKind) {
        let counter = &self.counts[kind as usize];
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// The number of exits of `kind` so far.
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }

    /// All exits so far.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Non-zero counters, in [`ExitKind::ALL`] order.
    pub fn snapshot(&self) -> Vec<(ExitKind, u64)> {
        ExitKind::ALL
            .iter()
            .map(|&k| (k, self.get(k)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_kind() {
        let stats = ExitStats::default();
        stats.record(ExitKind::IoOut);
        stats.record(ExitKind::IoOut);
        stats.record(ExitKind::Other);
        assert_eq!(stats.get(ExitKind::IoOut), 2);
        assert_eq!(stats.get(ExitKind::IoIn), 0);
        assert_eq!(stats.total(), 3);
        assert_eq!(
            stats.snapshot(),
            vec![(ExitKind::IoOut, 2), (ExitKind::Other, 1)]
        );
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }
}
