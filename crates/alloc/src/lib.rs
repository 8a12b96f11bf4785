//! The process's memory allocator, chosen once per process from the environment:
//! mimalloc for the processes that hold a fleet (`verge hub`, `verge sim`), the
//! system's (glibc's) for everything else (the edge agent, the CLI).
//!
//! Why two: at 20,000 simulated edges the hub spent about 12% less CPU and the
//! simulator about 19% less with mimalloc (means of three runs against two), which
//! is what a hub on two cores runs out of first, for about 7% more memory per edge.
//! An idle edge agent on mimalloc holds 19 MiB instead of 12.5 (13.7 with its eager
//! commits off), so it keeps the system's. Linking mimalloc still costs every
//! process about 1 MiB: its start-up code runs in each (a constructor) and the pages
//! around it are mapped (`verge --version`: 4.9 to 5.9 MiB of RSS; the agent in
//! `verge bench idle`: 12.5 to 13.6 MiB; docs/BENCHMARKS.md).
//!
//! The choice is made at the first allocation, before any thread but the main one
//! exists, from [`ENV`], and never changes: every block is freed by the allocator
//! that made it. `verge hub` and `verge sim` start themselves again with it set
//! (`restart_with_fleet_allocator` in the `verge` binary), unless the operator set it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// The variable that picks the allocator: `mimalloc`, or anything else (or unset)
/// for the system's.
pub const ENV: &str = "VERGE_ALLOCATOR";

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const MIMALLOC: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// The allocator [`ENV`] names (see the module docs).
pub struct Chosen;

impl Chosen {
    #[inline]
    fn mimalloc() -> bool {
        match CHOICE.load(Ordering::Relaxed) {
            UNDECIDED => {
                let choice = decide();
                CHOICE.store(choice, Ordering::Relaxed);
                choice == MIMALLOC
            }
            c => c == MIMALLOC,
        }
    }
}

/// Read [`ENV`] without allocating (`getenv` does not; `std::env::var` would).
/// Deciding twice, from two threads, decides the same: nothing in this process
/// changes its environment.
fn decide() -> u8 {
    // SAFETY: a NUL-terminated name; the pointer returned is read at once.
    let value = unsafe { libc::getenv(c"VERGE_ALLOCATOR".as_ptr()) };
    if value.is_null() {
        return SYSTEM;
    }
    // SAFETY: getenv returns a NUL-terminated string that lives in the environment.
    let value = unsafe { std::ffi::CStr::from_ptr(value) };
    if value == c"mimalloc" {
        MIMALLOC
    } else {
        SYSTEM
    }
}

/// Call `$method` on the chosen allocator.
macro_rules! either {
    ($method:ident($($arg:expr),*)) => {
        if Chosen::mimalloc() {
            MiMalloc.$method($($arg),*)
        } else {
            System.$method($($arg),*)
        }
    };
}

// Not inlined: every allocation site in the binary would carry both allocators' paths
// (measured: 29.4 MB of code instead of 24.4, the idle agent 15.5 MiB instead of
// 13.7); a call costs little beside an allocation.
//
// SAFETY: every call goes to one of two allocators that uphold `GlobalAlloc`'s
// contract, and always to the same one in a process (the choice never changes after
// the first allocation), so a block is always freed or resized by the allocator that
// made it.
unsafe impl GlobalAlloc for Chosen {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { either!(alloc(layout)) }
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { either!(alloc_zeroed(layout)) }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on; `ptr` came from the same one.
        unsafe { either!(dealloc(ptr, layout)) }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on; `ptr` came from the same one.
        unsafe { either!(realloc(ptr, layout, new_size)) }
    }
}

/// Which allocator this process uses (for reports).
pub fn name() -> &'static str {
    if Chosen::mimalloc() {
        "mimalloc"
    } else {
        "system"
    }
}
