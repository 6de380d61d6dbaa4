//! Sizes on the command line: parsing (the one parser, [`memory::parse_size`]) and formatting.

/// Parses a size with the same parser as `tide run` ([`memory::parse_size`]).
pub fn parse_size(s: &str) -> Result<u64, String> {
    memory::parse_size(s).map_err(|e| e.to_string())
}

/// Formats bytes with a binary unit: `512 MiB`, `1.5 GiB`, `100 B`.
pub fn fmt_bytes(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        let u = 1u64 << shift;
        if n >= u {
            return if n.is_multiple_of(u) {
                format!("{} {unit}", n / u)
            } else {
                format!("{:.1} {unit}", n as f64 / u as f64)
            };
        }
    }
    format!("{n} B")
}
