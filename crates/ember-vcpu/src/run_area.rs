//! The vCPU's shared `kvm_run` area, mapped by this crate, and `KVM_RUN` itself.
//!
//! A vCPU file descriptor maps to `KVM_GET_VCPU_MMAP_SIZE` bytes: `kvm_run` on the first
//! page, the port-I/O data page after it (`kvm_run.io.data_offset` points there, past
//! the end of `struct kvm_run`), then the coalesced-MMIO ring. kvm-ioctls maps it too,
//! but hands out only `&mut kvm_run`, a reference whose provenance covers
//! `size_of::<kvm_run>()` bytes: a port-I/O data slice derived from it would reach
//! memory it has no right to. [`RunArea`] keeps the pointer `mmap` returned, which
//! covers the whole mapping, and derives every access from it.
//!
//! The other rule here is about the [kick](crate::kick): its signal handler writes
//! `kvm_run.immediate_exit` on the vCPU thread, interrupting whatever that thread does.
//! A write through a raw pointer while a Rust reference to the same bytes is alive
//! breaks that reference's guarantee, so the kick target is registered only around the
//! `KVM_RUN` ioctl ([`RunArea::run`]), a window in which this crate holds no reference
//! into the area; everything that reads or answers an exit runs outside it.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::ptr::{self, NonNull};
use std::sync::atomic::{compiler_fence, AtomicU8, Ordering};

use kvm_bindings::{kvm_run, KVMIO};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::kick::KickTarget;

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);

/// A vCPU's `kvm_run` area, mapped read-write and shared; unmapped on drop.
pub(crate) struct RunArea {
    /// The address `mmap` returned: its provenance covers all `size` bytes.
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: `RunArea` owns its mapping (nothing else unmaps it) and every access goes
// through `&self`/`&mut self`; moving it to another thread moves that ownership, as
// moving the `VcpuFd` does. It is not `Sync`: the kick's `immediate_exit` write is tied
// to the thread that registered it.
unsafe impl Send for RunArea {}

impl std::fmt::Debug for RunArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunArea")
            .field("base", &self.base)
            .field("size", &self.size)
            .finish()
    }
}

impl RunArea {
    /// Maps the first `size` bytes (`KVM_GET_VCPU_MMAP_SIZE`) of vCPU file descriptor
    /// `fd`.
    pub(crate) fn map(fd: &impl AsRawFd, size: usize) -> io::Result<RunArea> {
        if size < size_of::<kvm_run>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "KVM_GET_VCPU_MMAP_SIZE is {size} bytes, less than struct kvm_run ({})",
                    size_of::<kvm_run>()
                ),
            ));
        }
        // SAFETY: a new mapping at an address the kernel chooses (null hint, no
        // MAP_FIXED), so it replaces nothing; the result is checked below.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap of the vCPU fd returned null"))?;
        Ok(RunArea { base, size })
    }

    fn run_ptr(&self) -> *mut kvm_run {
        self.base.as_ptr().cast()
    }

    /// `kvm_run.immediate_exit`, as a raw pointer derived from the mapping.
    fn immediate_exit_ptr(&self) -> *mut u8 {
        self.base
            .as_ptr()
            .wrapping_add(offset_of!(kvm_run, immediate_exit))
    }

    /// Runs `KVM_RUN` on `fd` (the vCPU this area belongs to) once, unless `stop` says
    /// not to (then `None`): the stop check and the ioctl are the window in which a
    /// kick may set `immediate_exit` (see the [module docs](self)). Returns the ioctl's
    /// result; the exit is then read from the area.
    #[inline]
    pub(crate) fn run(
        &self,
        fd: &impl AsRawFd,
        stop: impl FnOnce() -> bool,
    ) -> Option<Result<(), vmm_sys_util::errno::Error>> {
        let target = KickTarget::register(self.immediate_exit_ptr());
        // The registration is visible to a signal handler on this thread before the
        // stop check; the flag is set before the kick is sent.
        compiler_fence(Ordering::SeqCst);
        if stop() {
            drop(target);
            return None;
        }
        // SAFETY: `fd` is the vCPU fd this area maps, and KVM_RUN takes no argument; it
        // reads and writes only the vCPU's own state and this area, to which no Rust
        // reference exists during the call (this function holds none, and `&self`
        // gives no access to the area's contents).
        let ret = unsafe { ioctl(fd, KVM_RUN()) };
        let result = if ret == 0 {
            Ok(())
        } else {
            Err(vmm_sys_util::errno::Error::last())
        };
        compiler_fence(Ordering::SeqCst);
        drop(target);
        Some(result)
    }

    /// Runs `KVM_RUN` on `fd` once with `immediate_exit` set: KVM completes the exit the
    /// vCPU stopped on (a port or MMIO read's data goes into the guest's registers, the
    /// instruction retires, dirty synchronised registers are applied) and returns
    /// `EINTR` without entering the guest. Returns `Ok(false)` then, and `Ok(true)` if
    /// the completion produced another exit (the next part of a string or split
    /// access), now in the area. `immediate_exit` is clear again afterwards.
    ///
    /// Not a kick window: the kick target is not registered, so a kick changes nothing.
    pub(crate) fn run_immediate_exit(
        &self,
        fd: &impl AsRawFd,
    ) -> Result<bool, vmm_sys_util::errno::Error> {
        // SAFETY: the byte is inside the mapping, which lives as long as `self`; every
        // access to it in this process is atomic, and a u8 is always aligned.
        let immediate_exit = unsafe { AtomicU8::from_ptr(self.immediate_exit_ptr()) };
        immediate_exit.store(1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as in `run`: `fd` is the vCPU fd this area maps, KVM_RUN takes no
        // argument, and no Rust reference into the area exists during the call.
        let ret = unsafe { ioctl(fd, KVM_RUN()) };
        let result = if ret == 0 {
            Ok(true)
        } else {
            let e = vmm_sys_util::errno::Error::last();
            match e.errno() {
                libc::EINTR | libc::EAGAIN => Ok(false),
                _ => Err(e),
            }
        };
        compiler_fence(Ordering::SeqCst);
        immediate_exit.store(0, Ordering::Relaxed);
        result
    }

    /// Clears `immediate_exit`, which a kick sets.
    #[inline]
    pub(crate) fn clear_immediate_exit(&self) {
        // SAFETY: the byte is inside the mapping, which lives as long as `self`; every
        // access to it in this process is atomic (here and in the kick handler; KVM
        // reads it only inside KVM_RUN, on this thread), and a u8 is always aligned.
        unsafe { AtomicU8::from_ptr(self.immediate_exit_ptr()) }.store(0, Ordering::Relaxed);
    }

    /// `kvm_run`, for reading and answering the last exit. `&mut self` makes it the only
    /// reference into the area; and the kick writes nothing into it outside
    /// [`RunArea::run`], which cannot run while this borrow lives.
    #[inline]
    pub(crate) fn get_mut(&mut self) -> &mut kvm_run {
        // SAFETY: the mapping is at least `size_of::<kvm_run>()` bytes (checked in
        // `map`), page-aligned, readable and writable, and lives as long as `self`; KVM
        // writes it only inside KVM_RUN, on this thread, which cannot run while `self`
        // is borrowed; every bit pattern is a valid `kvm_run` (plain integers and
        // unions of them); the kick does not write it outside `RunArea::run` (the
        // target is unregistered then).
        unsafe { &mut *self.run_ptr() }
    }

    /// The `len` port-I/O data bytes at `offset` from the start of the mapping
    /// (`kvm_run.io.data_offset`), or `None` if they are not inside the mapping (the
    /// kernel never does that).
    #[inline]
    pub(crate) fn pio_data(&mut self, offset: usize, len: usize) -> Option<&mut [u8]> {
        let end = offset.checked_add(len)?;
        if end > self.size || offset < size_of::<kvm_run>() {
            return None;
        }
        // SAFETY: `offset..end` is inside the mapping (checked above), which `base`
        // (the pointer mmap returned) has provenance for, and after `struct kvm_run`,
        // so it does not overlap `immediate_exit` or anything `get_mut` hands out;
        // `&mut self` makes the slice the only reference into the area while it lives;
        // KVM writes the bytes only inside KVM_RUN, which cannot run meanwhile; any
        // byte value is a valid u8.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(offset), len) })
    }
}

impl Drop for RunArea {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` are the mapping made in `map`, owned by `self`; no
        // reference into it can outlive `self` (they borrow it).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// A memfd of `size` bytes standing in for a vCPU fd (KVM is not needed to map).
    fn memfd(size: usize) -> OwnedFd {
        // SAFETY: a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"run-area-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is a valid memfd; the result is checked.
        let ret = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(ret, 0, "ftruncate: {}", io::Error::last_os_error());
        fd
    }

    #[test]
    fn pio_data_stays_inside_the_mapping_and_after_kvm_run() {
        let size = 3 * 4096;
        let mut area = RunArea::map(&memfd(size), size).unwrap();
        // Where KVM puts it: the page after kvm_run.
        let data = area.pio_data(4096, 8).unwrap();
        data.copy_from_slice(b"pio data");
        assert_eq!(area.pio_data(4096, 8).unwrap(), b"pio data");
        // The last byte of the mapping, and no further.
        assert!(area.pio_data(size - 1, 1).is_some());
        assert!(area.pio_data(size - 1, 2).is_none());
        assert!(area.pio_data(usize::MAX, 2).is_none());
        // Never over kvm_run itself (immediate_exit is in it).
        assert!(area.pio_data(0, 8).is_none());
        assert!(area.pio_data(size_of::<kvm_run>() - 1, 2).is_none());
    }

    #[test]
    fn immediate_exit_is_the_kvm_run_field() {
        let size = 4096;
        let mut area = RunArea::map(&memfd(size), size).unwrap();
        area.get_mut().immediate_exit = 1;
        area.clear_immediate_exit();
        assert_eq!(area.get_mut().immediate_exit, 0);
        // SAFETY: inside the mapping; no reference into it is alive.
        unsafe { AtomicU8::from_ptr(area.immediate_exit_ptr()) }.store(1, Ordering::Relaxed);
        assert_eq!(area.get_mut().immediate_exit, 1);
    }

    #[test]
    fn a_mapping_smaller_than_kvm_run_is_refused() {
        let err = RunArea::map(&memfd(4096), 64).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
