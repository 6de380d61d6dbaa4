//! One bit per block, with range operations a 64-bit word at a time.
//!
//! Hand-written rather than a crate (bitvec, fixedbitset): the region needs word-wise range
//! counts, transitions and runs in one small type, which those crates do not offer together.

/// One bit per block: set = plugged. Range operations work a 64-bit word at a time, so that
/// their cost follows the length of the range, not the size of the region.
pub(crate) struct Bitmap {
    words: Vec<u64>,
    len: usize,
}

/// The bits `[a, b)` of one word (`a < b <= 64`).
fn word_mask(a: usize, b: usize) -> u64 {
    let high = if b == 64 { u64::MAX } else { (1u64 << b) - 1 };
    high & !((1u64 << a) - 1)
}

impl Bitmap {
    /// Number of bits.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn new(len: usize) -> Self {
        Bitmap {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    pub(crate) fn get(&self, i: usize) -> bool {
        self.words[i / 64] & (1 << (i % 64)) != 0
    }

    pub(crate) fn set(&mut self, i: usize, v: bool) {
        if v {
            self.words[i / 64] |= 1 << (i % 64);
        } else {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Calls `f(word index, mask)` for the words covering bits `[a, b)`.
    fn for_words(a: usize, b: usize, mut f: impl FnMut(usize, u64)) {
        let mut i = a;
        while i < b {
            let w = i / 64;
            let end = b.min((w + 1) * 64);
            f(w, word_mask(i % 64, end - w * 64));
            i = end;
        }
    }

    pub(crate) fn set_range(&mut self, a: usize, b: usize, v: bool) {
        let words = &mut self.words;
        Self::for_words(a, b, |w, m| {
            if v {
                words[w] |= m;
            } else {
                words[w] &= !m;
            }
        });
    }

    pub(crate) fn count(&self, a: usize, b: usize) -> usize {
        let mut n = 0;
        Self::for_words(a, b, |w, m| n += (self.words[w] & m).count_ones() as usize);
        n
    }

    /// Number of adjacent pairs `(i, i + 1)` with different bits, for `i` in `[a - 1, b)`.
    pub(crate) fn window_transitions(&self, a: usize, b: usize) -> u64 {
        let lo = a.saturating_sub(1);
        let hi = b.min(self.len - 1);
        (lo..hi).filter(|&i| self.get(i) != self.get(i + 1)).count() as u64
    }

    /// Same as [`Bitmap::window_transitions`], as if `[a, b)` were all set to `v`.
    pub(crate) fn window_transitions_if(&self, a: usize, b: usize, v: bool) -> u64 {
        let left = a > 0 && self.get(a - 1) != v;
        let right = b < self.len && self.get(b) != v;
        u64::from(left) + u64::from(right)
    }

    /// The first index in `[i, end)` whose bit is `v`, or `end`.
    pub(crate) fn find(&self, mut i: usize, end: usize, v: bool) -> usize {
        while i < end {
            if i & 63 == 0 && i + 64 <= end {
                let w = self.words[i / 64];
                if (v && w == 0) || (!v && w == u64::MAX) {
                    i += 64;
                    continue;
                }
            }
            if self.get(i) == v {
                return i;
            }
            i += 1;
        }
        end
    }

    /// Maximal runs `[start, end)` of blocks whose bit is `v`.
    pub(crate) fn runs(&self, v: bool) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.len {
            // Skip whole words that cannot start a run.
            if i & 63 == 0 {
                let w = self.words[i / 64];
                if (v && w == 0) || (!v && w == u64::MAX) {
                    i += 64;
                    continue;
                }
            }
            if self.get(i) == v {
                let start = i;
                while i < self.len && self.get(i) == v {
                    i += 1;
                }
                out.push((start, i));
            } else {
                i += 1;
            }
        }
        out
    }
}

/// How many of the boundaries of blocks `[a, b)` are not split yet (`splits` has one bit per
/// block boundary; the outer edges never count).
pub(crate) fn new_splits(splits: &Bitmap, a: usize, b: usize) -> u64 {
    [a, b]
        .into_iter()
        .filter(|&i| i > 0 && i < splits.len - 1 && !splits.get(i))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs_and_transitions() {
        let mut b = Bitmap::new(130);
        assert_eq!(b.runs(false), vec![(0, 130)]);
        assert!(b.runs(true).is_empty());
        assert_eq!(b.window_transitions_if(3, 5, true), 2);
        b.set_range(3, 5, true);
        assert_eq!(b.window_transitions(0, 130), 2);
        b.set_range(64, 130, true);
        assert_eq!(b.runs(true), vec![(3, 5), (64, 130)]);
        assert_eq!(b.runs(false), vec![(0, 3), (5, 64)]);
        assert_eq!(b.window_transitions_if(0, 3, true), 0);
        assert_eq!(b.window_transitions(0, 130), 3);
        assert_eq!(b.count(0, 130), 68);
    }

    /// The word-wise range operations agree with bit-by-bit ones on every range edge case.
    #[test]
    fn bitmap_word_ops_match_bit_by_bit() {
        let n = 200;
        let mut b = Bitmap::new(n);
        let mut naive = vec![false; n];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let a = (seed % n as u64) as usize;
            let e = a + ((seed >> 20) % (n - a) as u64) as usize + 1;
            let v = seed >> 40 & 1 == 1;
            b.set_range(a, e, v);
            naive[a..e].fill(v);
            let (x, y) = ((seed >> 8) as usize % n, (seed >> 30) as usize % n);
            let (x, y) = (x.min(y), x.max(y) + 1);
            assert_eq!(b.count(x, y), naive[x..y].iter().filter(|&&p| p).count());
        }
        assert!((0..n).all(|i| b.get(i) == naive[i]));
        assert_eq!(word_mask(0, 64), u64::MAX);
        assert_eq!(word_mask(63, 64), 1 << 63);
        assert_eq!(word_mask(3, 5), 0b11000);
    }
}
