//! What creating a container in the pod's VM takes: the VM (forked now if
//! the pod has none), sized as the pod asks, in the pod's host cgroup; the
//! container's image (the template's, or a disk slot's); its volumes.

use std::path::Path;
use std::sync::Arc;

use containerd_shim_protos::api;

use super::super::bundle;
use super::super::cgroup::PodCgroup;
use super::super::config::ShimConfig;
use super::super::pod::{IMAGE_ROOT, PodVm, WiredNetwork};
use super::super::spec;
use super::super::volumes::{Copied, Placed};
use super::errors::TaskError;
use super::{TaskService, blocking, rootfs};

impl TaskService {
    /// The pod's VM (made now if the pod has none: two first creates at
    /// once make one), with container `id` prepared in it; its volumes
    /// copied from the host, watched from then on.
    pub(super) async fn create_in_vm(
        &self,
        id: &str,
        config: ShimConfig,
        bundle: &Path,
        rootfs_mounts: &[api::Mount],
        oci: &serde_json::Value,
    ) -> Result<Vec<Copied>, TaskError> {
        let making = self.making_pod.lock().await;
        let existing = self.state().pod.clone();
        let (service, bundle, mounts, id2) = (
            self.clone(),
            bundle.to_path_buf(),
            rootfs_mounts.to_vec(),
            id.to_string(),
        );
        let asked_cpus = if spec::is_cri(oci) {
            self.state().pod_cpus
        } else {
            spec::cpus(oci)
        };
        let cpus = config.pod_cpus(asked_cpus);
        let asked_memory = if spec::is_cri(oci) {
            self.state().pod_memory
        } else {
            spec::memory(oci)
        };
        let memory = config
            .pod_memory(asked_memory)
            .map_err(TaskError::Precondition)?
            // Without an ask, the template's cap stands (set at its build).
            // A lone container's own limit is its cgroup's already: only one
            // above what the VM boots with needs the VM to grow.
            .filter(|_| {
                asked_memory.is_some_and(|m| {
                    spec::is_cri(oci) || (config.memory_sized() && m > config.memory_mib << 20)
                })
            });
        if asked_cpus.is_some_and(|a| a > u32::from(cpus)) {
            tracing::warn!(
                "{id}: the pod asks for {} CPUs; its VM gets {cpus} (max_vcpus)",
                asked_cpus.unwrap_or(0)
            );
        }
        let (hostname, netns, wired) = if spec::is_cri(oci) {
            // The pod's, from its pause container (an application
            // container's spec names neither); its network wired then (or
            // again, if a VM's create failed and dropped it).
            let mut state = self.state();
            let hostname = state.pod_hostname.clone();
            (
                hostname.unwrap_or_else(|| spec::hostname(oci, id)),
                state.pod_netns.clone(),
                if existing.is_none() {
                    state.pod_network.take()
                } else {
                    None
                },
            )
        } else {
            (spec::hostname(oci, id), spec::network_namespace(oci), None)
        };
        let netns = netns
            // The host's own namespace is host networking: nothing to wire.
            .filter(|ns| !crate::net::is_own_namespace(ns));
        let (guest, placed) = spec::for_guest(oci)?;
        for n in &placed.notes {
            tracing::info!("{id}: {n}");
        }
        let Placed {
            volumes,
            copied,
            hosted,
            ..
        } = placed;
        let spec_json = serde_json::to_vec(&guest).expect("a JSON value serializes");
        let upper = config.upper_size_mib;
        let chain_id = self.image_chain_id(id).await;
        let (pod, new_pod, root) = blocking(move || {
            let image = rootfs::image_of(&config, &bundle, &mounts, chain_id.as_deref())?;
            match existing {
                Some(p) if p.image == image.path => Ok((p, false, IMAGE_ROOT.to_string())),
                // Another image: a disk slot of the running VM.
                Some(p) => {
                    let root = p.attach_image(&id2, &image.path)?;
                    Ok((p, false, root))
                }
                None => {
                    let network = match (wired, netns) {
                        (Some(wired), _) => Some(wired),
                        (None, Some(ns)) => Some(WiredNetwork::attach(&ns)?),
                        (None, None) => None,
                    };
                    let pod = Arc::new(PodVm::create(
                        &config, &image, &hostname, network, cpus, memory,
                    )?);
                    if let Err(e) = bundle::record_run_dir(&bundle, pod.run_dir()) {
                        tracing::warn!("{id2}: cannot record the VM's run dir in the bundle: {e}");
                    }
                    if let Some(ns) = pod.netns() {
                        if let Err(e) = bundle::record_netns(&bundle, ns) {
                            tracing::warn!(
                                "{id2}: cannot record the pod's netns in the bundle: {e}"
                            );
                        }
                    }
                    service.state().pod = Some(pod.clone());
                    Ok((pod, true, IMAGE_ROOT.to_string()))
                }
            }
        })
        .await?;
        drop(making);
        let (service, id) = (self.clone(), id.to_string());
        blocking(move || {
            let created = pod
                .share_dirs(&hosted)
                .and_then(|()| pod.create_container(&id, spec_json, &root, upper, volumes));
            if let Err(e) = created {
                if let Err(d) = pod.detach_image(&id) {
                    tracing::warn!("{id}: {d}");
                }
                return Err(e.into());
            }
            // The OOM and monitor connections start after the container is
            // created: on PVM, agent threads busy at the same time can
            // corrupt each other's data (docs/guest-kernel.md).
            if new_pod {
                service.watch_ooms(&pod);
                service.monitor(&pod);
            }
            service.watch_volumes(&pod, &id, &copied);
            Ok(copied)
        })
        .await
    }

    /// Moves this shim (the pod's VM, before it is made) into the cgroup
    /// the pod's spec names, once; a cgroup that cannot be joined fails the
    /// create, as under runc.
    pub(super) fn join_pod_cgroup(
        &self,
        id: &str,
        oci: &serde_json::Value,
        bundle: &Path,
    ) -> Result<(), TaskError> {
        let Some(path) = oci["linux"]["cgroupsPath"]
            .as_str()
            .filter(|p| !p.is_empty())
        else {
            return Ok(());
        };
        let mut state = self.state();
        if state.pod_cgroup.is_some() {
            return Ok(());
        }
        let joined = PodCgroup::join(path).map_err(|e| {
            TaskError::Precondition(format!("cannot put the pod's VM in cgroup {path}: {e}"))
        })?;
        tracing::info!(
            "{id}: the pod's VM is charged to cgroup {}",
            joined.path().display()
        );
        state.pod_cgroup = Some(joined);
        state.pod_cgroup_owner = Some(bundle.to_path_buf());
        Ok(())
    }

    /// The chain ID of container `id`'s image, from containerd; None (the
    /// image is then keyed by its snapshot) when containerd cannot say.
    async fn image_chain_id(&self, id: &str) -> Option<String> {
        let api = self.containerd.as_ref()?;
        match api.image_chain_id(id).await {
            Ok(chain) => Some(chain),
            Err(e) => {
                tracing::warn!("{id}: image keyed by its snapshot: {e}");
                None
            }
        }
    }
}
