//! Linux: transparent huge pages for the maps weights are copied into.

use memmap2::{Advice, MmapMut};

/// Asks the kernel to back `map` with 2 MiB pages as it is first touched.
/// Only advice: a kernel built without transparent huge pages, or with them
/// set to `never`, refuses it and the map keeps 4 KiB pages, which are
/// slower to stream but otherwise the same.
pub fn advise_huge_pages(map: &MmapMut) {
    let _ = map.advise(Advice::HugePage);
}
