//! Events on claims and volumes (what `kubectl describe` shows), as core/v1 Events with
//! client-go's aggregation: the same reason and message on the same object within ten minutes
//! bumps the count of the existing event instead of creating a new one, so a retry loop with
//! backoff cannot flood the API server.
//!
//! As with client-go's broadcaster, publishing only queues: one task writes the events (a
//! few at a time), so a sync never waits for an event write, and when the queue is full (an API server
//! that cannot keep up) events are dropped, not the work they report on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::{Mutex, mpsc};

use crate::binder::Note;

const AGGREGATE_FOR: Duration = Duration::from_secs(600);
const MAX_CACHED: usize = 4096;
/// Events waiting to be written (client-go's broadcaster queues 1000).
const QUEUE: usize = 1000;
/// Event writes in flight: one at a time cannot keep up with a burst of claims when each
/// write takes tens of milliseconds on a busy API server.
const WRITERS: usize = 8;

struct Seen {
    name: String,
    namespace: String,
    count: i32,
    at: tokio::time::Instant,
}

/// Aggregation key: object, warning?, reason, message.
type Key = (String, bool, &'static str, String);

pub struct Recorder {
    queue: mpsc::Sender<(ObjectReference, Note)>,
    dropped: Arc<AtomicU64>,
}

/// Writes the queued events (one at a time, in order).
struct Sink {
    client: Client,
    component: String,
    host: String,
    seen: Mutex<HashMap<Key, Seen>>,
}

impl Recorder {
    /// Starts the writer task (needs a tokio runtime); it ends when the recorder is dropped.
    pub fn new(client: Client, component: impl Into<String>, host: impl Into<String>) -> Self {
        let sink = Sink {
            client,
            component: component.into(),
            host: host.into(),
            seen: Mutex::new(HashMap::new()),
        };
        let (queue, rx) = mpsc::channel::<(ObjectReference, Note)>(QUEUE);
        tokio::spawn(async move {
            use futures::StreamExt;
            let sink = &sink;
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .for_each_concurrent(WRITERS, |(regarding, note)| async move {
                    if let Err(e) = sink.try_publish(&regarding, &note).await {
                        tracing::warn!(error = %e, reason = note.reason, object = ?regarding.name, "could not write event");
                    }
                })
                .await;
        });
        Recorder {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues `note` about `regarding`. Never fails and never waits: an event that could not
    /// be written must not stop or slow the operation it reports on.
    pub async fn publish(&self, regarding: &ObjectReference, note: &Note) {
        if self
            .queue
            .try_send((regarding.clone(), note.clone()))
            .is_err()
        {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(reason = note.reason, object = ?regarding.name, dropped = n, "event queue full; event dropped");
        }
    }
}

impl Sink {
    async fn try_publish(
        &self,
        regarding: &ObjectReference,
        note: &Note,
    ) -> Result<(), kube::Error> {
        // Cluster-scoped objects (PVs) get their events in "default", as with client-go.
        let ns = regarding
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let obj_key = format!(
            "{}/{}/{}",
            regarding.kind.as_deref().unwrap_or(""),
            ns,
            regarding
                .uid
                .as_deref()
                .unwrap_or(regarding.name.as_deref().unwrap_or(""))
        );
        let key = (obj_key, note.warning, note.reason, note.message.clone());
        let now = Timestamp::now();
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let mut seen = self.seen.lock().await;
        seen.retain(|_, s| s.at.elapsed() < AGGREGATE_FOR);
        if let Some(s) = seen.get_mut(&key) {
            s.count += 1;
            s.at = tokio::time::Instant::now();
            let patch = serde_json::json!({
                "count": s.count,
                "lastTimestamp": Time(now),
            });
            let (name, namespace, count) = (s.name.clone(), s.namespace.clone(), s.count);
            drop(seen);
            let r = Api::<Event>::namespaced(self.client.clone(), &namespace)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            match r {
                Ok(_) => return Ok(()),
                // The event expired on the server (its TTL is an hour): start a new one.
                Err(kube::Error::Api(s)) if s.is_not_found() => {
                    self.seen.lock().await.remove(&key);
                }
                Err(e) => {
                    tracing::debug!(count, "event patch failed");
                    return Err(e);
                }
            }
            seen = self.seen.lock().await;
        }
        let mut reference = regarding.clone();
        // Aggregation is by object, not by version of it.
        reference.resource_version = None;
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or("object"),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: reference,
            reason: Some(note.reason.to_owned()),
            message: Some(truncate(&note.message, 1024)),
            type_: Some(if note.warning { "Warning" } else { "Normal" }.into()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: Some(self.host.clone()),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.host.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: None::<MicroTime>,
            count: Some(1),
            ..Default::default()
        };
        if seen.len() >= MAX_CACHED {
            seen.clear();
        }
        seen.insert(
            key,
            Seen {
                name,
                namespace: ns,
                count: 1,
                at: tokio::time::Instant::now(),
            },
        );
        drop(seen);
        api.create(&PostParams::default(), &event).await.map(|_| ())
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
