//! Task events to containerd, in the order they were raised and not lost
//! when containerd's event socket is briefly away (containerd restarting):
//! one forwarder sends them one at a time and retries each until it is
//! taken (the containerd-shim crate's publisher requeues a failed event
//! behind later ones and drops it after five tries).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::ttrpc;
use tokio::sync::{Notify, mpsc};

/// How long one event is retried before it is given up (and said).
const GIVE_UP: Duration = Duration::from_secs(300);
/// One forward's deadline.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Now, as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp_ns(now_ns())
}

/// Now, ns since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `ns` since the epoch as a protobuf timestamp.
pub fn timestamp_ns(ns: u64) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = (ns / 1_000_000_000) as i64;
    t.nanos = (ns % 1_000_000_000) as i32;
    t
}

/// Events not yet taken by containerd.
#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    drained: Notify,
}

/// The shim's event queue to containerd's ttrpc address.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<Envelope>,
    namespace: String,
    pending: Arc<Pending>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("namespace", &self.namespace)
            .field("pending", &self.pending.count.load(Ordering::Relaxed))
            .finish()
    }
}

impl Events {
    /// Starts the forwarder to containerd at `address` (`TTRPC_ADDRESS`;
    /// need not answer yet), for events of `namespace`.
    pub fn start(address: &str, namespace: &str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Pending::default());
        let address = if address.contains("://") {
            address.to_string()
        } else {
            format!("unix://{address}")
        };
        tokio::spawn(forward_in_order(address, rx, pending.clone()));
        Events {
            tx,
            namespace: namespace.into(),
            pending,
        }
    }

    /// The containerd namespace of the events.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Queues `event` under `topic` (never blocks).
    pub fn publish(&self, topic: &str, event: &dyn MessageDyn) {
        let mut any = Any::new();
        any.type_url = event.descriptor_dyn().full_name().to_string();
        if let Err(e) = event.write_to_vec_dyn(&mut any.value) {
            tracing::error!("event {topic} cannot be encoded: {e}");
            return;
        }
        let mut envelope = Envelope::new();
        envelope.set_topic(topic.into());
        envelope.set_namespace(self.namespace.clone());
        envelope.set_timestamp(now());
        envelope.set_event(any);
        self.pending.count.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(envelope).is_err() {
            self.pending.count.fetch_sub(1, Ordering::SeqCst);
            tracing::error!("event {topic} lost: the forwarder has stopped");
        }
    }

    /// TaskOOM for container `id` (the CRI then reports it `OOMKilled`).
    pub fn publish_oom(&self, id: &str) {
        let event = containerd_shim_protos::events::task::TaskOOM {
            container_id: id.into(),
            ..Default::default()
        };
        self.publish(containerd_shim_protos::topics::TASK_OOM_EVENT_TOPIC, &event);
    }

    /// Waits until every queued event was taken by containerd (or given
    /// up), at most `limit`: the shim calls it before it exits.
    pub async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.count.load(Ordering::SeqCst) > 0 {
            let drained = self.pending.drained.notified();
            if self.pending.count.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                tracing::warn!(
                    "{} events not taken by containerd when the shim exits",
                    self.pending.count.load(Ordering::SeqCst)
                );
                return;
            }
        }
    }
}

/// Sends each event until containerd takes it, then the next one.
async fn forward_in_order(
    address: String,
    mut rx: mpsc::UnboundedReceiver<Envelope>,
    pending: Arc<Pending>,
) {
    let mut client: Option<EventsClient> = None;
    while let Some(envelope) = rx.recv().await {
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut said = false;
        let mut request = ForwardRequest::new();
        request.set_envelope(envelope);
        loop {
            if client.is_none() {
                client = Client::connect(&address).await.ok().map(EventsClient::new);
            }
            let error = match &client {
                Some(c) => {
                    let ctx = ttrpc::context::with_timeout(FORWARD_TIMEOUT.as_nanos() as i64);
                    match c.forward(ctx, &request).await {
                        Ok(_) => break,
                        Err(e) => e.to_string(),
                    }
                }
                None => format!("cannot connect to {address}"),
            };
            client = None;
            if started.elapsed() > GIVE_UP {
                tracing::error!(
                    "event {} lost: containerd did not take it for {GIVE_UP:?}: {error}",
                    request.envelope().topic()
                );
                break;
            }
            if !said {
                tracing::warn!(
                    "event {}: {error}; retrying in order until containerd takes it",
                    request.envelope().topic()
                );
                said = true;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        if pending.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            pending.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::events::task::{TaskExit, TaskStart};
    use containerd_shim_protos::protobuf::Message;
    use containerd_shim_protos::shim_async::{Events as EventsService, create_events};
    use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext};
    use std::sync::Mutex;

    /// containerd's side: records the topics and container ids it gets.
    struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

    #[async_trait::async_trait]
    impl EventsService for Recorder {
        async fn forward(
            &self,
            _ctx: &TtrpcContext,
            req: ForwardRequest,
        ) -> ttrpc::Result<containerd_shim_protos::api::Empty> {
            let env = req.envelope();
            // containerd's type URLs are the bare proto names, as sent.
            let any = env.event();
            let id = match any.type_url.as_str() {
                "containerd.events.TaskStart" => TaskStart::parse_from_bytes(&any.value)
                    .ok()
                    .map(|e| e.container_id),
                "containerd.events.TaskExit" => TaskExit::parse_from_bytes(&any.value)
                    .ok()
                    .map(|e| e.container_id),
                other => Some(format!("unexpected type {other}")),
            };
            self.0
                .lock()
                .unwrap()
                .push((env.topic().to_string(), id.unwrap_or_default()));
            Ok(Default::default())
        }
    }

    /// Events published while containerd's socket is absent arrive, in
    /// order, once it listens; flush waits for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_wait_for_containerd_and_keep_their_order() {
        let dir = std::env::temp_dir().join(format!("zygote-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("containerd.sock.ttrpc");
        let _ = std::fs::remove_file(&sock);
        let events = Events::start(&sock.to_string_lossy(), "ns");
        for i in 0..3 {
            let start = TaskStart {
                container_id: format!("c{i}"),
                ..Default::default()
            };
            events.publish("/tasks/start", &start);
            let exit = TaskExit {
                container_id: format!("c{i}"),
                ..Default::default()
            };
            events.publish("/tasks/exit", &exit);
        }
        // containerd comes back after a while.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut server = Server::new()
            .bind(&format!("unix://{}", sock.display()))
            .unwrap()
            .register_service(create_events(Arc::new(Recorder(got.clone()))));
        server.start().await.unwrap();
        events.flush(Duration::from_secs(20)).await;
        let got = got.lock().unwrap().clone();
        let want: Vec<(String, String)> = (0..3)
            .flat_map(|i| {
                [
                    ("/tasks/start".to_string(), format!("c{i}")),
                    ("/tasks/exit".to_string(), format!("c{i}")),
                ]
            })
            .collect();
        assert_eq!(got, want);
        server.shutdown().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
