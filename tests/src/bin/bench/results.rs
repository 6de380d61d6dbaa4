//! Results: rows, the table, the machine.

use super::*;

pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) backend: String,
    pub(crate) bytes: u64,
    pub(crate) seconds: Option<f64>,
    /// Whether `bytes / seconds` is a throughput.
    pub(crate) rate: bool,
    pub(crate) raw_gib_per_s: Option<f64>,
    pub(crate) extra: Vec<(&'static str, Value)>,
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn new(
        name: &str,
        backend: &str,
        bytes: u64,
        seconds: Option<f64>,
        rate: bool,
    ) -> Row {
        Row {
            name: name.into(),
            backend: backend.into(),
            bytes,
            seconds,
            rate,
            raw_gib_per_s: None,
            extra: Vec::new(),
            note: String::new(),
        }
    }

    pub(crate) fn gib_per_s(&self) -> Option<f64> {
        match (self.rate, self.seconds) {
            (true, Some(s)) if s > 0.0 => Some(self.bytes as f64 / GIB as f64 / s),
            _ => None,
        }
    }

    pub(crate) fn ratio(&self) -> Option<f64> {
        Some(self.gib_per_s()? / self.raw_gib_per_s?)
    }

    pub(crate) fn json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "backend": self.backend,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "gib_per_s": self.gib_per_s(),
        });
        let o = v.as_object_mut().unwrap();
        if self.raw_gib_per_s.is_some() {
            o.insert("raw_gib_per_s".into(), json!(self.raw_gib_per_s));
            o.insert("ratio_to_raw".into(), json!(self.ratio()));
        }
        for (k, x) in &self.extra {
            o.insert((*k).into(), x.clone());
        }
        if !self.note.is_empty() {
            o.insert("note".into(), json!(self.note));
        }
        v
    }
}

pub(crate) fn size_str(b: u64) -> String {
    if b >= GIB && b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else if b >= MIB && b.is_multiple_of(MIB) {
        format!("{} MiB", b / MIB)
    } else {
        format!("{:.1} MiB", b as f64 / MIB as f64)
    }
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

pub(crate) fn secs_str(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.3} s")
    }
}

pub(crate) fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| benchmark | backend | size | time | GiB/s | raw GiB/s | Tide / raw | notes |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let f = |x: Option<f64>, p: usize| x.map_or("".into(), |v| format!("{v:.p$}"));
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.backend,
            if r.bytes > 0 {
                size_str(r.bytes)
            } else {
                String::new()
            },
            r.seconds.map_or(String::new(), secs_str),
            f(r.gib_per_s(), 2),
            f(r.raw_gib_per_s, 2),
            f(r.ratio(), 2),
            r.note
        );
    }
    t
}

/// UTC date and time of `t` (days-to-civil, proleptic Gregorian).
pub(crate) fn utc(t: SystemTime) -> String {
    let s = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (s.div_euclid(86400), s.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub(crate) fn machine() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?", |(_, m)| m.trim());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (emulating)"
    } else {
        "hardware-assisted"
    };
    format!(
        "{} (Linux {}), {cpus} x {model}, {} memory, KVM {kvm}",
        host.trim(),
        kernel.trim(),
        size_str(meminfo_kib("MemTotal:").unwrap_or(0) * 1024 / MIB * MIB)
    )
}
