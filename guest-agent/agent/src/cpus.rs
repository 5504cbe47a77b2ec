//! The guest's online CPUs. A template boots with the node's largest vCPU
//! count and keeps only CPU 0 online (offline vCPUs halt: they cost the host
//! nothing); each pod's VM brings online as many as the pod asks for.

use std::path::Path;

/// Why the CPUs could not be set.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// Fewer than one, or more than the VM has.
    #[error("{asked} CPUs asked; this VM has 1 to {present}")]
    Count {
        /// Asked.
        asked: u32,
        /// CPUs the VM has.
        present: u32,
    },
    /// The kernel refused.
    #[error("cpu{cpu}: {source}")]
    Os {
        /// Which.
        cpu: u32,
        /// Cause.
        source: std::io::Error,
    },
}

/// The number of CPUs in `/sys/devices/system/cpu/present`'s form (`0-3`, `0`).
fn count(range: &str) -> u32 {
    range
        .trim()
        .split(',')
        .filter_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            Some(b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1)
        })
        .sum()
}

/// Brings CPUs 0..`online` online and the rest offline, under `sys`
/// (`/sys/devices/system/cpu`).
pub fn set_online(sys: &Path, online: u32) -> Result<(), CpuError> {
    let present = count(&std::fs::read_to_string(sys.join("present")).unwrap_or_default()).max(1);
    if online == 0 || online > present {
        return Err(CpuError::Count {
            asked: online,
            present,
        });
    }
    // Up first (a pod that grows), then down.
    let order = (1..online).chain(online..present);
    for cpu in order {
        let file = sys.join(format!("cpu{cpu}/online"));
        let want = if cpu < online { "1" } else { "0" };
        if std::fs::read_to_string(&file).is_ok_and(|s| s.trim() == want) {
            continue;
        }
        std::fs::write(&file, want).map_err(|source| CpuError::Os { cpu, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_come_online_in_order_and_go_offline_above_the_count() {
        let sys = std::env::temp_dir().join(format!("zygote-cpus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sys);
        for cpu in 1..4 {
            std::fs::create_dir_all(sys.join(format!("cpu{cpu}"))).unwrap();
            std::fs::write(sys.join(format!("cpu{cpu}/online")), "1\n").unwrap();
        }
        std::fs::write(sys.join("present"), "0-3\n").unwrap();
        let online =
            |cpu: u32| std::fs::read_to_string(sys.join(format!("cpu{cpu}/online"))).unwrap();
        set_online(&sys, 2).unwrap();
        assert_eq!(
            (online(1).trim(), online(2).trim(), online(3).trim()),
            ("1", "0", "0")
        );
        set_online(&sys, 1).unwrap();
        assert_eq!(online(1).trim(), "0");
        assert!(matches!(set_online(&sys, 0), Err(CpuError::Count { .. })));
        assert!(matches!(
            set_online(&sys, 5),
            Err(CpuError::Count { present: 4, .. })
        ));
        assert_eq!(count("0"), 1);
        assert_eq!(count("0-1,4-5"), 4);
        std::fs::remove_dir_all(&sys).unwrap();
    }
}
