//! The backends measured, as `tide` options and raw mappings.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Anon4k,
    AnonThp,
    Memfd,
    Hugetlb,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Anon4k => "anon-4k",
            Kind::AnonThp => "anon-thp",
            Kind::Memfd => "memfd",
            Kind::Hugetlb => "hugetlb",
        }
    }

    pub(crate) fn tide_args(self) -> &'static [&'static str] {
        match self {
            Kind::Anon4k => &["--backend", "anon", "--no-thp"],
            Kind::AnonThp => &["--backend", "anon"],
            Kind::Memfd => &["--backend", "memfd"],
            Kind::Hugetlb => &["--backend", "hugetlb"],
        }
    }

    pub(crate) fn discard_name(self) -> &'static str {
        match self {
            Kind::Anon4k | Kind::AnonThp => "MADV_DONTNEED",
            Kind::Memfd | Kind::Hugetlb => "fallocate(PUNCH_HOLE)",
        }
    }
}

pub(crate) fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}
