//! Memory for the arrays every decoded token streams: the CPU backend's
//! weights. They are copied one after another into a few large anonymous
//! maps that ask Linux for transparent huge pages, so a pass over the
//! weights misses the TLB once per 2 MiB instead of once per 4 KiB. One map
//! per matrix would not do: most matrices are smaller than a huge page (a
//! stories110M layer's largest is 1.5 MiB), and a map smaller than one gets
//! none.
//!
//! The arena writes each region once, through `fill`, before anything can
//! read it; after that the region is only read, through its `Region`.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as platform;

#[cfg(not(target_os = "linux"))]
mod other;
#[cfg(not(target_os = "linux"))]
use other as platform;

use std::sync::Arc;

use bytemuck::Pod;
use memmap2::MmapMut;

use crate::tensor::Storage;

/// Bytes of one huge page on x86-64 and (with 4 KiB base pages) aarch64.
const HUGE_PAGE: usize = 2 << 20;
/// Bytes a chunk holds unless one array needs more: 32 huge pages.
const CHUNK_BYTES: usize = 64 << 20;
/// Arrays start on cache lines, the widest SIMD load.
const ALIGN: usize = 64;

/// One anonymous map, written region by region by its arena and read
/// through `Region`s.
pub struct Chunk {
    /// The map's first byte. Every access goes through this pointer, one
    /// region at a time; the map itself is kept only to be unmapped.
    base: *mut u8,
    len: usize,
    _map: MmapMut,
}

// SAFETY: a chunk is plain memory. Each region is written once, by the
// arena call that hands it out, before its `Region` exists; from then on
// it is only read, so sharing the chunk between threads is sound.
unsafe impl Send for Chunk {}
// SAFETY: as for `Send`: after its one write a region is immutable.
unsafe impl Sync for Chunk {}

/// A filled region of a chunk: the only way to read one. Made by the arena
/// alone, after the region's one write.
#[derive(Clone)]
pub struct Region {
    chunk: Arc<Chunk>,
    offset: usize,
    bytes: usize,
}

impl Region {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the arena made this region in bounds of its chunk; every
        // byte is initialised (a fresh anonymous map is zeroed, then
        // `fill` wrote it); and the region was written before this value
        // existed and is never written again, so no `&mut` to it exists.
        unsafe { std::slice::from_raw_parts(self.chunk.base.add(self.offset), self.bytes) }
    }
}

/// Hands out regions of huge-page chunks, within a budget of bytes for the
/// copies a caller could do without (`copy`).
pub struct Arena {
    /// The chunk being filled and how many of its bytes are used.
    current: Option<(Arc<Chunk>, usize)>,
    /// Bytes of all regions handed out.
    used: usize,
    /// The most bytes `copy` may bring `used` to.
    budget: usize,
}

impl Arena {
    /// An arena whose optional copies stop at `budget` bytes.
    pub fn with_budget(budget: usize) -> Self {
        Arena {
            current: None,
            used: 0,
            budget,
        }
    }

    /// Bytes of all regions handed out so far.
    pub fn used(&self) -> usize {
        self.used
    }

    /// `len` values, zeroed and then written by `fill`, in the arena; in a
    /// vector when no map can be made. Not limited by the budget: for data
    /// that has to be made anyway (a repacked matrix).
    pub fn alloc<T: Pod>(&mut self, len: usize, fill: impl FnOnce(&mut [T])) -> Storage<T> {
        let bytes = len.checked_mul(std::mem::size_of::<T>());
        let Some((chunk, offset)) = bytes.and_then(|bytes| self.region(bytes)) else {
            let mut data = vec![T::zeroed(); len];
            fill(&mut data);
            return Storage::owned(data);
        };
        assert!(std::mem::align_of::<T>() <= ALIGN);
        // SAFETY: `region` hands out each byte range once, to this call, so
        // nothing else refers to it; it is in bounds, aligned to `ALIGN`
        // (asserted enough for `T`) and zeroed, and its `Region`, the only
        // way to read it, is made below, after `fill`.
        let values =
            unsafe { std::slice::from_raw_parts_mut(chunk.base.add(offset).cast::<T>(), len) };
        fill(values);
        Storage::Resident(Region {
            chunk,
            offset,
            bytes: std::mem::size_of_val(values),
        })
    }

    /// A copy of `data` in the arena, or `None` when it would take the
    /// arena past its budget (the caller keeps reading `data` where it is).
    pub fn copy<T: Pod>(&mut self, data: &[T]) -> Option<Storage<T>> {
        let bytes = std::mem::size_of_val(data);
        (self.used + bytes <= self.budget)
            .then(|| self.alloc(data.len(), |to| to.copy_from_slice(data)))
    }

    /// A byte range of `bytes` in the current chunk, or at the start of a
    /// new one; `None` when the system refuses a map.
    fn region(&mut self, bytes: usize) -> Option<(Arc<Chunk>, usize)> {
        if bytes == 0 {
            return None;
        }
        if let Some((chunk, used)) = &mut self.current {
            // `at` stays within the chunk: its length is a multiple of `ALIGN`.
            let at = used.next_multiple_of(ALIGN);
            if bytes <= chunk.len - at {
                *used = at + bytes;
                self.used += bytes;
                return Some((chunk.clone(), at));
            }
        }
        let len = bytes.max(CHUNK_BYTES).checked_next_multiple_of(HUGE_PAGE)?;
        let mut map = MmapMut::map_anon(len).ok()?;
        platform::advise_huge_pages(&map);
        let chunk = Arc::new(Chunk {
            base: map.as_mut_ptr(),
            len,
            _map: map,
        });
        self.current = Some((chunk.clone(), bytes));
        self.used += bytes;
        Some((chunk, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_keep_their_values_and_share_chunks() {
        let mut arena = Arena::with_budget(0);
        let arrays: Vec<Storage<f32>> = (0..40)
            .map(|i| {
                arena.alloc(100_000 + i, |v: &mut [f32]| {
                    assert!(v.iter().all(|&x| x == 0.0), "a region starts zeroed");
                    for (k, x) in v.iter_mut().enumerate() {
                        *x = (i * 1_000_003 + k) as f32;
                    }
                })
            })
            .collect();
        for (i, a) in arrays.iter().enumerate() {
            assert!(a.is_resident());
            assert_eq!(a.len(), 100_000 + i);
            let wrong = a
                .iter()
                .enumerate()
                .find(|&(k, &x)| x != (i * 1_000_003 + k) as f32);
            assert_eq!(wrong, None, "array {i} changed");
            assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        }
        let chunks = |a: &Storage<f32>| match a {
            Storage::Resident(region) => Arc::as_ptr(&region.chunk),
            _ => unreachable!(),
        };
        assert_eq!(
            chunks(&arrays[0]),
            chunks(&arrays[1]),
            "small arrays share a chunk"
        );
        assert!(arena.used() >= 40 * 400_000);
    }

    #[test]
    fn an_array_larger_than_a_chunk_gets_its_own() {
        let mut arena = Arena::with_budget(usize::MAX);
        let small = arena.alloc(10, |v: &mut [u8]| v.fill(7));
        let large = arena.copy(&vec![3u8; CHUNK_BYTES + 1]).unwrap();
        let after = arena.alloc(10, |v: &mut [u8]| v.fill(9));
        assert!(small.iter().all(|&x| x == 7) && after.iter().all(|&x| x == 9));
        assert_eq!(large.len(), CHUNK_BYTES + 1);
        assert!(large.iter().all(|&x| x == 3));
    }

    #[test]
    fn copies_stop_at_the_budget_and_empty_arrays_need_no_map() {
        let mut arena = Arena::with_budget(1000);
        assert!(arena.copy(&[1f32; 250]).is_some());
        assert!(arena.copy(&[1f32; 1]).is_none(), "past the budget");
        let packed = arena.alloc(1000, |v: &mut [f32]| v.fill(2.0));
        assert!(packed.is_resident(), "alloc is not limited by the budget");
        let empty = arena.alloc(0, |_: &mut [f32]| {});
        assert!(empty.is_empty() && !empty.is_resident());
    }

    #[test]
    fn regions_are_read_from_many_threads() {
        let mut arena = Arena::with_budget(usize::MAX);
        let a = arena
            .copy(&(0..1 << 20).map(|i| i as f32).collect::<Vec<_>>())
            .unwrap();
        let sums: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| a.iter().map(|&x| x as f64).sum()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = ((1u64 << 20) * ((1 << 20) - 1) / 2) as f64;
        assert!(sums.iter().all(|&s| s == want));
    }
}
