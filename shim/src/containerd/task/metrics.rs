//! The agent's cgroup counters of a container as containerd's cgroups v2
//! `Metrics` (what `ctr task metrics` and the CRI's stats read).

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use zygote_agent_api::ContainerStats;

use super::errors::TaskError;

/// `stats` packed as containerd expects: an `Any` named by the proto type.
pub fn to_metrics(stats: &ContainerStats) -> Result<Any, TaskError> {
    // The guest's "no limit" is containerd's 0.
    let limit = |v: u64| if v == u64::MAX { 0 } else { v };
    let metrics = Metrics {
        pids: MessageField::some(PidsStat {
            current: stats.pids_current,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: stats.cpu_usage_usec,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: stats.memory_current,
            usage_limit: limit(stats.memory_max),
            ..Default::default()
        }),
        memory_events: MessageField::some(MemoryEvents {
            oom_kill: stats.oom_kills,
            ..Default::default()
        }),
        ..Default::default()
    };
    let packed = Any::pack(&metrics).map_err(TaskError::Encode)?;
    // containerd looks the type up by its proto name.
    Ok(Any {
        type_url: "io.containerd.cgroups.v2.Metrics".into(),
        value: packed.value,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::Message;

    #[test]
    fn counters_round_trip_and_no_limit_is_zero() {
        let any = to_metrics(&ContainerStats {
            cpu_usage_usec: 7,
            memory_current: 4096,
            memory_max: u64::MAX,
            pids_current: 2,
            oom_kills: 1,
        })
        .unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 0);
        assert_eq!(m.cpu.usage_usec, 7);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.memory_events.oom_kill, 1);
    }
}
