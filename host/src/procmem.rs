//! A process's memory as the kernel accounts it (`/proc/PID/smaps_rollup`).

use serde::Serialize;

/// Resident and proportional set sizes, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemUsage {
    /// Resident set.
    pub rss_kib: u64,
    /// Proportional set: shared pages divided among the processes mapping them.
    pub pss_kib: u64,
    /// Of which anonymous (heap, stacks, a fork's private copies of guest pages).
    pub pss_anon_kib: u64,
    /// Of which file-backed (binaries, the template's memory file in the page cache).
    pub pss_file_kib: u64,
    /// Of which shared memory (memfd guest RAM of booted VMs).
    pub pss_shmem_kib: u64,
}

impl MemUsage {
    /// Parses the text of an `smaps_rollup` file.
    pub fn parse(text: &str) -> MemUsage {
        let mut m = MemUsage::default();
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(kib) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "Rss:" => m.rss_kib = kib,
                "Pss:" => m.pss_kib = kib,
                "Pss_Anon:" => m.pss_anon_kib = kib,
                "Pss_File:" => m.pss_file_kib = kib,
                "Pss_Shmem:" => m.pss_shmem_kib = kib,
                _ => {}
            }
        }
        m
    }

    /// Reads process `pid`'s usage (`None`: this process).
    pub fn of(pid: Option<u32>) -> std::io::Result<MemUsage> {
        let path = match pid {
            Some(pid) => format!("/proc/{pid}/smaps_rollup"),
            None => "/proc/self/smaps_rollup".into(),
        };
        Ok(MemUsage::parse(&std::fs::read_to_string(path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rollup_and_reads_self() {
        let text = "55d0-7ffc ---p 00000000 00:00 0   [rollup]\nRss:  2048 kB\nPss:  1024 kB\n\
                    Pss_Anon: 512 kB\nPss_File: 500 kB\nPss_Shmem: 12 kB\nShared_Clean: 1 kB\n";
        assert_eq!(
            MemUsage::parse(text),
            MemUsage {
                rss_kib: 2048,
                pss_kib: 1024,
                pss_anon_kib: 512,
                pss_file_kib: 500,
                pss_shmem_kib: 12
            }
        );
        let me = MemUsage::of(None).unwrap();
        assert!(me.rss_kib > 0 && me.pss_kib > 0 && me.pss_kib <= me.rss_kib);
    }
}
