//! [`DirtyBitmap`]: which 4 KiB pages of guest RAM changed, for diff snapshots.

use std::ops::Deref;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{MemoryError, PAGE_SIZE};

/// Bits in one bitmap word.
const WORD_BITS: u64 = u64::BITS as u64;

/// One bit per 4 KiB page of every guest RAM region: the pages a diff snapshot writes.
///
/// Bit `p` of region `r` is bit `p % 64` of word `p / 64` of `r`'s words, the layout of
/// KVM's dirty log (`KVM_GET_DIRTY_LOG`) and of vm-memory's `AtomicBitmap`, so either
/// merges in word by word: the guest's own writes from KVM with
/// [`DirtyBitmap::or_region_words`], the VMM's (device emulation, loaders) from the
/// memory's `AtomicBitmap` with [`DirtyBitmap::merge_from_vm_memory_bitmap`].
///
/// ```
/// use ember_memory::{create_guest_memory, DirtyBitmap, HugePages, MemoryLayout, MIB};
///
/// let mem = create_guest_memory(&MemoryLayout::new(16 * MIB)?, HugePages::None)?;
/// let mut dirty = DirtyBitmap::new(&mem);
/// dirty.set(0, 3)?;
/// // Pages 64 and 65 of region 0, as KVM's dirty log would report them (16 MiB is 4096
/// // pages, 64 words).
/// let mut log = vec![0u64; 64];
/// log[1] = 0b11;
/// dirty.or_region_words(0, &log)?;
/// assert!(dirty.is_set(0, 3) && dirty.is_set(0, 65) && !dirty.is_set(0, 4));
/// assert_eq!(dirty.count(), 3);
/// # Ok::<(), ember_memory::MemoryError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Per region: its words, `ceil(pages / 64)` of them.
    words: Vec<Vec<u64>>,
    /// Per region: how many pages it has (bits past that in the last word stay clear).
    pages: Vec<u64>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for the regions of `mem`, in their order (which is address
    /// order for vm-memory's `GuestMemoryMmap`).
    ///
    /// ```
    /// use ember_memory::{create_guest_memory, DirtyBitmap, HugePages, MemoryLayout, GIB};
    ///
    /// let mem = create_guest_memory(&MemoryLayout::new(4 * GIB)?, HugePages::None)?;
    /// let dirty = DirtyBitmap::new(&mem);
    /// assert_eq!(dirty.regions(), 2);
    /// assert_eq!(dirty.region_pages(0), Some(3 * GIB / 4096));
    /// assert_eq!(dirty.count(), 0);
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn new<M: GuestMemoryBackend>(mem: &M) -> Self {
        let sizes: Vec<u64> = mem.iter().map(|region| region.len()).collect();
        Self::from_region_sizes(&sizes)
    }

    /// An all-clean bitmap for regions of the given sizes in bytes (a partial last page
    /// counts as a page).
    ///
    /// ```
    /// let dirty = ember_memory::DirtyBitmap::from_region_sizes(&[0x10_0000, 0x1800]);
    /// assert_eq!(dirty.region_pages(0), Some(256));
    /// assert_eq!(dirty.region_pages(1), Some(2));
    /// assert_eq!(dirty.region_words(1), Some(&[0u64][..]));
    /// ```
    pub fn from_region_sizes(sizes: &[u64]) -> Self {
        let pages: Vec<u64> = sizes.iter().map(|size| size.div_ceil(PAGE_SIZE)).collect();
        let words = pages
            .iter()
            .map(|&pages| vec![0; word_count(pages)])
            .collect();
        DirtyBitmap { words, pages }
    }

    /// How many regions the bitmap covers.
    ///
    /// ```
    /// assert_eq!(ember_memory::DirtyBitmap::from_region_sizes(&[4096; 3]).regions(), 3);
    /// ```
    pub fn regions(&self) -> usize {
        self.pages.len()
    }

    /// How many pages region `region` has, or `None` if there is no such region.
    ///
    /// ```
    /// let dirty = ember_memory::DirtyBitmap::from_region_sizes(&[8192]);
    /// assert_eq!(dirty.region_pages(0), Some(2));
    /// assert_eq!(dirty.region_pages(1), None);
    /// ```
    pub fn region_pages(&self, region: usize) -> Option<u64> {
        self.pages.get(region).copied()
    }

    /// The words of region `region` (bit `p % 64` of word `p / 64` is page `p`), or
    /// `None` if there is no such region.
    ///
    /// ```
    /// let mut dirty = ember_memory::DirtyBitmap::from_region_sizes(&[1 << 20]);
    /// dirty.set(0, 65)?;
    /// assert_eq!(dirty.region_words(0).unwrap()[..2], [0, 0b10]);
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn region_words(&self, region: usize) -> Option<&[u64]> {
        self.words.get(region).map(Vec::as_slice)
    }

    /// Marks page `page` of region `region` dirty.
    ///
    /// Fails with [`MemoryError::DirtyPageOutOfRange`] if the region or page does not
    /// exist.
    ///
    /// ```
    /// let mut dirty = ember_memory::DirtyBitmap::from_region_sizes(&[8192]);
    /// dirty.set(0, 1)?;
    /// assert!(dirty.is_set(0, 1));
    /// assert!(dirty.set(0, 2).is_err());
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn set(&mut self, region: usize, page: u64) -> Result<(), MemoryError> {
        let pages = self.pages.get(region).copied();
        let word = match pages {
            Some(pages) if page < pages => self
                .words
                .get_mut(region)
                .and_then(|words| words.get_mut((page / WORD_BITS) as usize)),
            _ => None,
        };
        let Some(word) = word else {
            return Err(MemoryError::DirtyPageOutOfRange {
                region,
                page,
                regions: self.pages.len(),
                pages: pages.unwrap_or(0),
            });
        };
        *word |= 1 << (page % WORD_BITS);
        Ok(())
    }

    /// Whether page `page` of region `region` is dirty; `false` for a page or region
    /// that does not exist.
    ///
    /// ```
    /// let dirty = ember_memory::DirtyBitmap::from_region_sizes(&[8192]);
    /// assert!(!dirty.is_set(0, 0));
    /// assert!(!dirty.is_set(7, 0));
    /// ```
    pub fn is_set(&self, region: usize, page: u64) -> bool {
        self.words
            .get(region)
            .and_then(|words| words.get((page / WORD_BITS) as usize))
            .is_some_and(|word| word & (1 << (page % WORD_BITS)) != 0)
    }

    /// How many pages are dirty, over all regions.
    ///
    /// ```
    /// let mut dirty = ember_memory::DirtyBitmap::from_region_sizes(&[8192, 8192]);
    /// dirty.set(0, 0)?;
    /// dirty.set(1, 1)?;
    /// assert_eq!(dirty.count(), 2);
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .flatten()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    /// Whether no page is dirty.
    ///
    /// ```
    /// assert!(ember_memory::DirtyBitmap::from_region_sizes(&[8192]).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.words.iter().flatten().all(|&word| word == 0)
    }

    /// Marks every page clean again.
    ///
    /// ```
    /// let mut dirty = ember_memory::DirtyBitmap::from_region_sizes(&[8192]);
    /// dirty.set(0, 1)?;
    /// dirty.clear();
    /// assert!(dirty.is_empty());
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn clear(&mut self) {
        self.words.iter_mut().flatten().for_each(|word| *word = 0);
    }

    /// ORs `words` (one bit per page, KVM's dirty-log layout) into region `region`: how
    /// a VMM merges `KVM_GET_DIRTY_LOG` for the region's memory slot.
    ///
    /// `words` must have exactly the region's word count, `ceil(pages / 64)`, which is
    /// what KVM returns for a slot of the region's size; otherwise nothing is merged and
    /// [`MemoryError::DirtyBitmapMismatch`] names both counts. Bits past the region's
    /// last page are ignored.
    ///
    /// ```
    /// let mut dirty = ember_memory::DirtyBitmap::from_region_sizes(&[1 << 20]); // 256 pages
    /// dirty.or_region_words(0, &[1, 0, 0, 1 << 63])?;
    /// assert!(dirty.is_set(0, 0) && dirty.is_set(0, 255));
    /// assert!(dirty.or_region_words(0, &[1]).is_err());
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn or_region_words(&mut self, region: usize, words: &[u64]) -> Result<(), MemoryError> {
        let regions = self.pages.len();
        let (Some(own), Some(&pages)) = (self.words.get_mut(region), self.pages.get(region)) else {
            return Err(MemoryError::DirtyPageOutOfRange {
                region,
                page: 0,
                regions,
                pages: 0,
            });
        };
        if own.len() != words.len() {
            return Err(MemoryError::DirtyBitmapMismatch {
                region,
                expected: own.len(),
                found: words.len(),
            });
        }
        for (own, &new) in own.iter_mut().zip(words) {
            *own |= new;
        }
        mask_tail(own, pages);
        Ok(())
    }

    /// Merges the pages the VMM wrote through vm-memory (the `AtomicBitmap` of every
    /// region of `mem`: device emulation, virtio devices, loaders) into this bitmap, and
    /// clears them there, so the next merge only brings what was written since.
    ///
    /// `mem` must have the regions this bitmap was made for; otherwise
    /// [`MemoryError::DirtyBitmapLayout`] or [`MemoryError::DirtyBitmapMismatch`], and
    /// nothing is merged or cleared. Each word is read and cleared atomically, so a page
    /// written while this runs is either merged now or stays set for the next time.
    ///
    /// ```
    /// use ember_memory::vm_memory::bitmap::AtomicBitmap;
    /// use ember_memory::vm_memory::{Bytes, GuestAddress};
    /// use ember_memory::{create_guest_memory_with_bitmap, DirtyBitmap, HugePages};
    /// use ember_memory::{MemoryLayout, MIB};
    ///
    /// let layout = MemoryLayout::new(16 * MIB)?;
    /// let mem = create_guest_memory_with_bitmap::<AtomicBitmap>(&layout, HugePages::None)?;
    /// mem.write_obj(1u32, GuestAddress(0x5000))?;
    ///
    /// let mut dirty = DirtyBitmap::new(&mem);
    /// dirty.merge_from_vm_memory_bitmap(&mem)?;
    /// assert!(dirty.is_set(0, 5));
    /// assert_eq!(dirty.count(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn merge_from_vm_memory_bitmap(
        &mut self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Result<(), MemoryError> {
        self.check_layout(mem)?;
        // Checked first for every region, so a mismatch clears nothing.
        for (index, region) in mem.iter().enumerate() {
            let bitmap: &AtomicBitmap = region.deref().bitmap();
            let expected = self.pages.get(index).copied().unwrap_or(0);
            if bitmap.len() as u64 != expected {
                // Only when the host page size is not 4 KiB.
                return Err(MemoryError::DirtyBitmapMismatch {
                    region: index,
                    expected: word_count(expected),
                    found: bitmap.len().div_ceil(WORD_BITS as usize),
                });
            }
        }
        for (index, region) in mem.iter().enumerate() {
            let words = region.deref().bitmap().get_and_reset();
            self.or_region_words(index, &words)?;
        }
        Ok(())
    }

    /// Fails unless `mem` has exactly this bitmap's regions, with the same page counts.
    pub(crate) fn check_layout<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), MemoryError> {
        let mut regions = 0;
        for (index, region) in mem.iter().enumerate() {
            let pages = region.len().div_ceil(PAGE_SIZE);
            if self.pages.get(index) != Some(&pages) {
                return Err(MemoryError::DirtyBitmapLayout {
                    region: index,
                    bitmap_pages: self.pages.get(index).copied(),
                    memory_pages: pages,
                });
            }
            regions += 1;
        }
        if regions != self.pages.len() {
            return Err(MemoryError::DirtyBitmapRegions {
                bitmap: self.pages.len(),
                memory: regions,
            });
        }
        Ok(())
    }

    /// The runs of consecutive dirty pages of region `region`, as `(first page, count)`.
    pub(crate) fn runs(&self, region: usize) -> Runs<'_> {
        Runs {
            words: self.words.get(region).map(Vec::as_slice).unwrap_or(&[]),
            pages: self.pages.get(region).copied().unwrap_or(0),
            next: 0,
        }
    }
}

/// Words needed for `pages` bits.
fn word_count(pages: u64) -> usize {
    // Guest RAM is at most 1 TiB: 2^22 words, far below usize::MAX.
    pages.div_ceil(WORD_BITS) as usize
}

/// Clears the bits past page `pages` in the last word.
fn mask_tail(words: &mut [u64], pages: u64) {
    let used = pages % WORD_BITS;
    if used != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << used) - 1;
        }
    }
}

/// Iterator over the runs of set bits of one region, `(first page, count)`, in order.
pub(crate) struct Runs<'a> {
    words: &'a [u64],
    pages: u64,
    /// First page not looked at yet.
    next: u64,
}

impl Runs<'_> {
    /// Whether page `page` is set (pages past the end are not).
    fn bit(&self, page: u64) -> bool {
        page < self.pages
            && self
                .words
                .get((page / WORD_BITS) as usize)
                .is_some_and(|word| word & (1 << (page % WORD_BITS)) != 0)
    }

    /// The first set page at or after `from`, skipping clear words whole.
    fn next_set(&self, from: u64) -> Option<u64> {
        let mut page = from;
        while page < self.pages {
            let index = (page / WORD_BITS) as usize;
            let word = self.words.get(index)? & (u64::MAX << (page % WORD_BITS));
            if word != 0 {
                let found = index as u64 * WORD_BITS + u64::from(word.trailing_zeros());
                return (found < self.pages).then_some(found);
            }
            page = (index as u64 + 1) * WORD_BITS;
        }
        None
    }

    /// The first clear page at or after `from` (or the page count), skipping full words.
    fn next_clear(&self, from: u64) -> u64 {
        let mut page = from;
        while page < self.pages {
            let index = (page / WORD_BITS) as usize;
            let Some(&word) = self.words.get(index) else {
                return self.pages;
            };
            let clear = !word & (u64::MAX << (page % WORD_BITS));
            if clear != 0 {
                let found = index as u64 * WORD_BITS + u64::from(clear.trailing_zeros());
                return found.min(self.pages);
            }
            page = (index as u64 + 1) * WORD_BITS;
        }
        self.pages
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.next_set(self.next)?;
        debug_assert!(self.bit(start));
        let end = self.next_clear(start);
        self.next = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(dirty: &DirtyBitmap, region: usize) -> Vec<(u64, u64)> {
        dirty.runs(region).collect()
    }

    #[test]
    fn runs_coalesce_across_words() {
        // 300 pages: 5 words, the last one partly used.
        let mut dirty = DirtyBitmap::from_region_sizes(&[300 * PAGE_SIZE]);
        assert_eq!(runs(&dirty, 0), []);
        for page in [0, 1, 2, 63, 64, 65, 127, 128, 200, 299] {
            dirty.set(0, page).unwrap();
        }
        assert_eq!(
            runs(&dirty, 0),
            [(0, 3), (63, 3), (127, 2), (200, 1), (299, 1)]
        );
        dirty.or_region_words(0, &[u64::MAX; 5]).unwrap();
        assert_eq!(runs(&dirty, 0), [(0, 300)]);
        assert_eq!(dirty.count(), 300, "bits past the last page are masked");
        assert_eq!(runs(&dirty, 1), [], "a missing region has no runs");
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let mut dirty = DirtyBitmap::from_region_sizes(&[2 * PAGE_SIZE]);
        let err = dirty.set(0, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "dirty page 2 of region 0 is out of range: the bitmap has 1 region(s), \
             this one with 2 page(s)"
        );
        assert!(dirty.set(1, 0).is_err());
        assert!(!dirty.is_set(0, u64::MAX));
        let err = dirty.or_region_words(0, &[1, 2]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "dirty bitmap for region 0 has 2 word(s), expected 1"
        );
        assert!(dirty.or_region_words(3, &[1]).is_err());
        assert!(dirty.is_empty());
    }

    #[test]
    fn layout_must_match_the_memory() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x4000)]).unwrap();
        assert!(DirtyBitmap::new(&mem).check_layout(&mem).is_ok());
        let err = DirtyBitmap::from_region_sizes(&[0x8000])
            .check_layout(&mem)
            .unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::DirtyBitmapLayout {
                    region: 0,
                    bitmap_pages: Some(8),
                    memory_pages: 4
                }
            ),
            "{err}"
        );
        let err = DirtyBitmap::from_region_sizes(&[0x4000, 0x1000])
            .check_layout(&mem)
            .unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::DirtyBitmapRegions {
                    bitmap: 2,
                    memory: 1
                }
            ),
            "{err}"
        );
    }
}
