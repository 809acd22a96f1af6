//! The runtime a no_std, no_main guest needs: the entry point that drops to user mode,
//! the memory functions the compiler calls, a global allocator, the panic handler and
//! the symbols the prebuilt `core` refers to.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::serial;

// The linker script is passed by the builder (`-C link-arg=-Wl,-T,...`), which cargo does
// not track; including it here makes a change to it rebuild (and relink) the guest.
const _: &[u8] = include_bytes!("../link.ld");

/// Size of the user-mode stack.
const USER_STACK_SIZE: usize = 64 * 1024;

/// The user-mode stack, 16-byte aligned (4 KiB aligned, in fact).
#[repr(C, align(4096))]
struct Stack([u8; USER_STACK_SIZE]);

/// Never accessed from Rust: `_start` points `RSP` at its end.
static mut USER_STACK: Stack = Stack([0; USER_STACK_SIZE]);

// The entry point. Ember enters it through the Linux 64-bit boot protocol: 64-bit mode,
// CPL0, the first 4 GiB identity-mapped by user-accessible pages, `RSI` = the zero page,
// interrupts off. Kernel-mode code is emulated one instruction at a time on nested KVM
// (and the emulator has no SSE), so this is a handful of instructions that build an
// `iretq` frame and drop to CPL3, where the Rust code runs natively:
// SS = user data (0x23), RSP = top of the user stack minus 8 (so that at `guest_main`
// RSP = 8 mod 16, as right after a `call`), RFLAGS = 0x3002 (IOPL 3 so `in`/`out` work in
// user mode, IF clear), CS = 64-bit user code (0x2b), RIP = `guest_main`; the zero page
// goes in RDI, `guest_main`'s first argument.
global_asm!(
    ".pushsection .text.start, \"ax\"",
    ".globl _start",
    ".type _start, @function",
    "_start:",
    "    mov rdi, rsi",
    "    lea rax, [rip + {stack} + {stack_top}]",
    "    push {user_data}",
    "    push rax",
    "    push {rflags}",
    "    push {user_code}",
    "    lea rax, [rip + {entry}]",
    "    push rax",
    "    iretq",
    ".size _start, . - _start",
    ".popsection",
    stack = sym USER_STACK,
    stack_top = const USER_STACK_SIZE - 8,
    user_data = const 0x23,
    rflags = const 0x3002,
    user_code = const 0x2b,
    entry = sym crate::guest_main,
);

/// Ends the VM through Ember's debug-exit port (`out 0xf4, al`): the VMM exits with
/// `code`.
pub fn exit(code: u8) -> ! {
    // SAFETY: a port write; the VMM ends the VM on it.
    unsafe { asm!("out 0xf4, al", in("al") code, options(nomem, nostack, preserves_flags)) };
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(loc) => serial::print(format_args!(
            "virtio-guest: panicked at {}:{}: {}\n",
            loc.file(),
            loc.line(),
            info.message()
        )),
        None => serial::print(format_args!("virtio-guest: panicked: {}\n", info.message())),
    }
    exit(101)
}

/// The prebuilt `core` is compiled with unwinding and refers to this; with
/// `panic = "abort"` it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// The prebuilt `alloc` (e.g. `alloc::fmt::format`) has cleanup paths that end in a call
/// to this; with `panic = "abort"` nothing ever unwinds, so it is never called.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    serial::print(format_args!("virtio-guest: _Unwind_Resume called\n"));
    exit(102)
}

// The memory functions the compiler emits calls to. They are written in assembly (or,
// for the comparisons, with volatile reads) so the compiler cannot turn them into calls
// to themselves.

/// `memcpy`: copies `n` bytes forwards with `rep movsb`.
///
/// # Safety
/// The usual `memcpy` contract: valid, non-overlapping ranges.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear (ABI).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// `memmove`: copies `n` bytes, backwards when `dest` overlaps the end of `src`.
///
/// # Safety
/// The usual `memmove` contract: valid ranges, which may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src, or past its end: a forward copy is safe.
        // SAFETY: as for memcpy.
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") n => _,
                inout("rdi") dest => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    } else {
        // dest overlaps the end of src: copy from the last byte down, then clear DF again.
        // SAFETY: the caller's contract; n > 0 here since dest - src < n.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dest
}

/// `memset`: fills `n` bytes with the low byte of `c` with `rep stosb`.
///
/// # Safety
/// The usual `memset` contract: a valid range.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear (ABI).
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// `memcmp`: compares `n` bytes; the difference of the first unequal pair, or 0.
///
/// # Safety
/// The usual `memcmp` contract: valid ranges.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller's contract. Volatile reads keep the loop a loop.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp`: 0 if the `n` bytes are equal, non-zero otherwise.
///
/// # Safety
/// The usual `bcmp` contract: valid ranges.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's contract.
    unsafe { memcmp(a, b, n) }
}

/// Size of the heap.
const HEAP_SIZE: usize = 8 << 20;

#[repr(C, align(4096))]
struct Heap([u8; HEAP_SIZE]);

/// The heap's memory; only [`BumpAllocator`] hands out pieces of it.
static mut HEAP: Heap = Heap([0; HEAP_SIZE]);

/// A bump allocator over [`HEAP`]. Freeing only gives memory back when it is the most
/// recent allocation, which also lets a growing `Vec` grow in place.
struct BumpAllocator {
    /// Offset of the first free byte in the heap.
    next: AtomicUsize,
}

#[global_allocator]
static ALLOCATOR: BumpAllocator = BumpAllocator {
    next: AtomicUsize::new(0),
};

fn heap_base() -> usize {
    core::ptr::addr_of_mut!(HEAP) as usize
}

// SAFETY: allocations come from disjoint ranges of HEAP, aligned as asked; `next` moves
// atomically.
unsafe impl GlobalAlloc for BumpAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = heap_base();
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + next).next_multiple_of(layout.align()) - base;
            let Some(end) = start.checked_add(layout.size()).filter(|&e| e <= HEAP_SIZE) else {
                return core::ptr::null_mut();
            };
            match self
                .next
                .compare_exchange_weak(next, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => next = now,
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Give the memory back if nothing was allocated after it.
        let start = ptr as usize - heap_base();
        let _ = self.next.compare_exchange(
            start + layout.size(),
            start,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Grow (or shrink) in place when this is the most recent allocation.
        let start = ptr as usize - heap_base();
        if start + new_size <= HEAP_SIZE
            && self
                .next
                .compare_exchange(
                    start + layout.size(),
                    start + new_size,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return ptr;
        }
        // SAFETY: the layout is valid (the caller's contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for alloc.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both ranges are valid for the smaller size and do not overlap.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}
