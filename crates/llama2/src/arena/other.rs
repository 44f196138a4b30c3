//! Platforms without Linux's transparent huge pages: maps keep the
//! system's page size.

use memmap2::MmapMut;

pub fn advise_huge_pages(_: &MmapMut) {}
