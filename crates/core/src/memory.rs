//! Handing the heap's freed pages back to the system (issue #21).
//!
//! glibc's allocator raises its mmap threshold after a large block is freed (up to 32 MiB), so
//! later tensors of a few MiB come from the heap, and when they are freed their pages stay
//! resident until something asks for them back. A block-by-block search allocates and frees one
//! block's activations many times over; without a trim the process's peak RSS carries what
//! earlier blocks freed (measured in the README's "Scale" section: cdm on s2 held 348–387 MiB
//! beyond the memory formula's tensors, 255 with a trim before each block, for 4 % more time;
//! cdm on s4 peaked 0.78 GiB lower with it).

#![allow(unsafe_code)]

/// Returns the heap's free pages to the system: glibc's `malloc_trim(0)`, which releases the
/// top of every arena and `madvise(MADV_DONTNEED)`s the whole free pages inside them
/// (<https://sourceware.org/glibc/wiki/MallocInternals>). `Ok(true)` if memory was released,
/// `Ok(false)` if there was none to release. On a C library without `malloc_trim` (musl,
/// macOS) it is [`TrimUnsupported`]: the caller decides whether that matters.
pub fn release_freed_heap() -> Result<bool, TrimUnsupported> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers; it locks each arena while it walks it.
        Ok(unsafe { libc::malloc_trim(0) } != 0)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        Err(TrimUnsupported)
    }
}

/// This C library has no `malloc_trim` (only glibc does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimUnsupported;

impl std::fmt::Display for TrimUnsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this C library has no malloc_trim (glibc only)")
    }
}

impl std::error::Error for TrimUnsupported {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn freed_heap_memory_is_released() {
        // 48 MiB in 64 KiB blocks (below glibc's mmap threshold, so from the heap), touched,
        // then freed behind a block that stays allocated: only a trim can release them.
        // (The RSS drop is measured on the whole search, README "Scale"; in this test thread's
        // arena VmRSS did not move measurably, so only malloc_trim's own answer is asserted.)
        const BLOCK: usize = 64 << 10;
        let mut blocks: Vec<Vec<u8>> = (0..768).map(|i| vec![i as u8 | 1; BLOCK]).collect();
        let keep = vec![7u8; BLOCK];
        blocks.clear();
        assert_eq!(release_freed_heap(), Ok(true), "48 MiB were free inside the heap");
        assert_eq!(keep[BLOCK - 1], 7);
    }
}
