//! Reading resident memory from `/proc/self/smaps`.

use std::io;

/// Resident bytes (`Rss`, and hugetlb pages, which `Rss` leaves out) of the mappings of this
/// process that overlap `[start, end)`.
pub(crate) fn resident_bytes(start: u64, end: u64) -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(rss_in(&text, start, end))
}

/// [`resident_bytes`] of an smaps text.
fn rss_in(text: &str, start: u64, end: u64) -> u64 {
    let mut inside = false;
    let mut kib = 0u64;
    for line in text.lines() {
        let mut words = line.split_ascii_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some(key) = first.strip_suffix(':') {
            if inside && matches!(key, "Rss" | "Shared_Hugetlb" | "Private_Hugetlb") {
                kib += words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            }
        } else if let Some((s, e)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                inside = s < end && e > start;
            }
        }
    }
    kib * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_overlapping_mappings() {
        let text = "1000-3000 rw-p 00000000 00:00 0\nRss:                   8 kB\n\
                    3000-5000 rw-p 00000000 00:00 0\nRss:                   4 kB\n\
                    Private_Hugetlb:    2048 kB\n";
        assert_eq!(rss_in(text, 0x1000, 0x2000), 8 * 1024);
        assert_eq!(rss_in(text, 0x3000, 0x4000), (4 + 2048) * 1024);
        assert_eq!(rss_in(text, 0x5000, 0x6000), 0);
    }
}
