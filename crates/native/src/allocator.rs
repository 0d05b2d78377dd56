//! The module's global allocator: large blocks (a push's staging arenas
//! and the tables' chunks, each up to ~100 MB at 1M credentials) straight
//! from the kernel, the rest from the process's `malloc`.
//!
//! Why: inside Envoy `malloc` is Envoy's tcmalloc (it exports the symbol).
//! tcmalloc keeps freed pages mapped and gives them back only when Envoy
//! asks it to (nothing in the module can), so the staging arenas of a full
//! push, freed at its commit, stayed in Envoy's RSS: ~60 B per credential at
//! 1M (bench/RESULTS.md, "p4-native"). An anonymous mapping is returned to
//! the system by `munmap` at once, and grows by `mremap` without copying.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;

/// Blocks this big or bigger are mapped: far above what a request or a
/// batch allocates (a push body is at most 768 KiB), so only the push's
/// arenas and the tables' chunks of large commits take the syscalls.
const LARGE: usize = 1 << 20;

/// `mmap` hands out page-aligned memory; pages are at least 4 KiB.
const MAP_ALIGN: usize = 4096;

pub struct Allocator;

fn mapped(layout: Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= MAP_ALIGN
}

fn map(size: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        p.cast()
    }
}

// SAFETY: every block is either mapped or from `System`, told apart by its
// layout, which the caller passes unchanged to `dealloc`/`realloc` (the
// GlobalAlloc contract), so each is released the way it was obtained.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            map(layout.size())
        } else {
            System.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            // Anonymous mappings come zeroed.
            map(layout.size())
        } else {
            System.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if mapped(layout) {
            libc::munmap(p.cast(), layout.size());
        } else {
            System.dealloc(p, layout);
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        match (mapped(layout), mapped(new_layout)) {
            (false, false) => System.realloc(p, layout, new_size),
            (true, true) => {
                let q = libc::mremap(p.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE);
                if q == libc::MAP_FAILED {
                    ptr::null_mut()
                } else {
                    q.cast()
                }
            }
            // Crossing the threshold: a new block, the bytes copied over.
            _ => {
                let q = self.alloc(new_layout);
                if !q.is_null() {
                    ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                    self.dealloc(p, layout);
                }
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_keeps_its_bytes_across_the_threshold_both_ways() {
        let mut v: Vec<u8> = (0..LARGE / 2).map(|i| i as u8).collect();
        v.extend((0..LARGE * 2).map(|i| (i * 7) as u8));
        v.reserve(LARGE * 8);
        assert!((0..LARGE / 2).all(|i| v[i] == i as u8));
        assert!((0..LARGE * 2).all(|i| v[LARGE / 2 + i] == (i * 7) as u8));
        v.truncate(100);
        v.shrink_to_fit();
        assert!((0..100).all(|i| v[i] == i as u8));
    }

    #[test]
    fn a_large_zeroed_block_reads_zero() {
        let v = vec![0u64; LARGE];
        assert!(v.iter().all(|&x| x == 0));
    }

    #[test]
    fn a_reserve_of_a_mebibyte_or_more_is_mapped_whole_pages() {
        // glibc's own large blocks sit 16 bytes into their mapping (its
        // header): page alignment shows the block came from `map`.
        let mut v: Vec<u8> = Vec::with_capacity(LARGE);
        assert!(mapped(Layout::array::<u8>(v.capacity()).unwrap()));
        assert_eq!(v.as_ptr() as usize % MAP_ALIGN, 0);
        v.extend((0..LARGE).map(|i| (i % 251) as u8));
        // Grown by `mremap`: still whole pages, bytes kept.
        v.reserve(LARGE * 3);
        assert_eq!(v.as_ptr() as usize % MAP_ALIGN, 0);
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }

    #[test]
    fn a_large_block_aligned_past_a_page_comes_from_system_and_round_trips() {
        let align = MAP_ALIGN * 4;
        let layout = Layout::from_size_align(LARGE * 2, align).unwrap();
        assert!(!mapped(layout), "mmap only promises page alignment");
        // SAFETY: a non-zero layout; the block is written and read within
        // its size and released with the layout it was obtained with.
        unsafe {
            let p = Allocator.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            for i in 0..layout.size() {
                p.add(i).write((i % 253) as u8);
            }
            let bigger = LARGE * 4;
            let q = Allocator.realloc(p, layout, bigger);
            assert!(!q.is_null());
            assert_eq!(q as usize % align, 0, "realloc keeps the alignment");
            assert!((0..layout.size()).all(|i| q.add(i).read() == (i % 253) as u8));
            Allocator.dealloc(q, Layout::from_size_align(bigger, align).unwrap());
        }
    }
}
