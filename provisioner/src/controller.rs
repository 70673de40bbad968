//! The kube-runtime side: two controllers (claims and volumes) that read the API through
//! watch caches, ask [`binder`] what to do, and do it: API writes with optimistic concurrency
//! (every update carries the resourceVersion it was computed from, so a stale cache costs a
//! Conflict and a retry, never a lost write), CSI calls, events and metrics.
//!
//! Safe under crashes at any point: a claim's volume and PV are named `pvc-<claim uid>`, so a
//! restarted provisioner finds what it already made (CreateVolume is idempotent by name, the
//! PV create answers AlreadyExists), and every decision is recomputed from the API.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Secret,
};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{Instrument, info_span};

use crate::binder::{self, BinderMode, ClaimAction, ClaimInput, Note, Policy, VolumeAction};
use crate::driver::{Driver, DriverError};
use crate::events::Recorder;
use crate::fresh::Fresh;
use crate::metrics::Metrics;
use crate::objects::{
    self as o, ANN_BETA_STORAGE_PROVISIONER, ANN_BIND_COMPLETED, ANN_DELETION_SECRET_NAME,
    ANN_DELETION_SECRET_NAMESPACE, ANN_SELECTED_NODE, ANN_STORAGE_PROVISIONER, ClaimPhase,
    FINALIZER, VolumePhase,
};
use crate::plan::{self, PlanInput, SecretRef};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The claim or class asks for something that cannot be done as it stands.
    #[error("{0}")]
    Refused(String),
    #[error("secret {namespace}/{name}: {reason}")]
    Secret {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("the watch caches did not fill: {0}")]
    Cache(String),
    /// A destructive step was skipped because the live API still shows the claim.
    #[error("claim {0} still exists; not reclaiming its volume")]
    ClaimAlive(String),
}

impl Error {
    fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| Error::Api { what, source }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Error::Api { source: kube::Error::Api(s), .. } if s.is_conflict())
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists())
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: BinderMode,
    /// Concurrent reconciles per controller.
    pub workers: u16,
    /// How often converged objects are looked at again (missed watch events, KCM's resync).
    pub resync: Duration,
    /// How often claims still Pending are looked at again (static volumes that appear).
    pub pending_resync: Duration,
    /// Longest retry delay after failures.
    pub max_backoff: Duration,
    /// The snapshot duty also does the common snapshot-controller's part.
    pub snapshot_common: bool,
}

pub struct Ctx {
    client: Client,
    driver: Driver,
    settings: Settings,
    claims: Store<PersistentVolumeClaim>,
    volumes: Store<PersistentVolume>,
    classes: Store<StorageClass>,
    /// Our writes, newer than the caches until the watches deliver them.
    fresh_claims: Fresh<PersistentVolumeClaim>,
    fresh_volumes: Fresh<PersistentVolume>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    failures: std::sync::Mutex<HashMap<String, u32>>,
    /// When provisioning of a claim (by UID) started, for the latency histogram.
    started: Mutex<HashMap<String, Instant>>,
    /// Tells the claim controller that a volume became free (pending claims may bind it).
    volume_freed: tokio::sync::mpsc::Sender<()>,
    /// True once all three watch caches hold a full list.
    ready: tokio::sync::watch::Receiver<bool>,
    /// Syncs in progress (shutdown waits for them, bounded).
    running: Arc<std::sync::atomic::AtomicUsize>,
}

/// Which caches have been filled; all three make the provisioner ready.
struct Filled {
    bits: std::sync::atomic::AtomicU8,
    tx: tokio::sync::watch::Sender<bool>,
}

impl Filled {
    fn seen<K>(&self, e: &watcher::Event<K>, bit: u8) {
        if matches!(e, watcher::Event::InitDone) {
            let all = self.bits.fetch_or(bit, std::sync::atomic::Ordering::SeqCst) | bit;
            if all == 7 {
                tracing::debug!("watch caches filled");
                let _ = self.tx.send(true);
            }
        }
    }
}

/// Counts a running sync for as long as it lives.
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Running {
    fn new(ctx: &Ctx) -> Self {
        ctx.running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Running(ctx.running.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Counts a finished sync (whatever its outcome) when dropped.
struct Counted<'a>(&'a Ctx, &'static str);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0
            .metrics
            .syncs
            .get_or_create(&crate::metrics::SyncLabels { kind: self.1 })
            .inc();
    }
}

impl Ctx {
    fn policy(&self) -> Policy<'_> {
        Policy {
            mode: self.settings.mode,
            driver: &self.driver.name,
        }
    }

    /// Waits until every cache is filled: a claim judged against a half-listed set of
    /// volumes could be provisioned when a volume for it already exists.
    async fn ready(&self) -> Result<(), Error> {
        let mut rx = self.ready.clone();
        rx.wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| Error::Cache("the cache watcher stopped".into()))
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    fn backoff(&self, key: &str, err: &Error) -> Duration {
        // A conflict only means the cache was behind an API write: retry soon, without
        // growing the delay.
        if err.is_conflict() {
            return Duration::from_millis(100);
        }
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        // 1 s, 2 s, 4 s ... capped (external-provisioner: 1 s .. 5 min).
        let d = Duration::from_secs(1u64 << (n - 1).min(16));
        d.min(self.settings.max_backoff)
    }

    async fn event(&self, regarding: &ObjectReference, note: &Note) {
        self.recorder.publish(regarding, note).await;
    }

    async fn secret(&self, r: &SecretRef) -> Result<BTreeMap<String, String>, Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &r.namespace);
        let err = |reason: String| Error::Secret {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            reason,
        };
        let s = api
            .get_opt(&r.name)
            .await
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err("not found".into()))?;
        let mut out = BTreeMap::new();
        for (k, v) in s.data.unwrap_or_default() {
            let v = String::from_utf8(v.0).map_err(|_| err(format!("key {k:?} is not UTF-8")))?;
            out.insert(k, v);
        }
        for (k, v) in s.string_data.unwrap_or_default() {
            out.insert(k, v);
        }
        Ok(out)
    }
}

fn claim_ref_of(pvc: &PersistentVolumeClaim) -> ObjectReference {
    pvc.object_ref(&())
}

fn volume_ref_of(pv: &PersistentVolume) -> ObjectReference {
    pv.object_ref(&())
}

fn with_phase(
    pv: &PersistentVolume,
    phase: VolumePhase,
    message: Option<String>,
) -> PersistentVolume {
    let mut pv = pv.clone();
    let st = pv.status.get_or_insert_with(Default::default);
    if st.phase.as_deref() != Some(phase.as_str()) {
        st.last_phase_transition_time = Some(Time(Timestamp::now()));
    }
    st.phase = Some(phase.as_str().to_owned());
    st.message = message;
    st.reason = None;
    pv
}

/// The claim sync's working copies: objects change as actions are applied, and each next
/// write must carry the resourceVersion the previous one returned.
struct ClaimRun<'a> {
    ctx: &'a Ctx,
    claim: PersistentVolumeClaim,
    /// The cache's volumes (shared, never copied wholesale: a sync touches one or two).
    cached: Vec<Arc<PersistentVolume>>,
    /// Volumes written (or created) during this sync, newer than the cache.
    written: HashMap<String, PersistentVolume>,
    /// Set by Provision: the claim's new (or already existing) volume.
    provisioned: Option<PersistentVolume>,
    pv_api: Api<PersistentVolume>,
    pvc_api: Api<PersistentVolumeClaim>,
}

impl ClaimRun<'_> {
    fn volume(&self, name: &str) -> Result<PersistentVolume, Error> {
        if let Some(v) = self.written.get(name) {
            return Ok(v.clone());
        }
        self.cached
            .iter()
            .find(|v| o::name(&v.metadata) == name)
            .map(|v| (**v).clone())
            .ok_or_else(|| Error::Cache(format!("volume {name} vanished from the cache")))
    }

    /// What the binder sees: the cache, with this sync's writes in place of stale copies.
    fn volume_refs(&self) -> Vec<&PersistentVolume> {
        self.cached
            .iter()
            .map(|v| v.as_ref())
            .filter(|v| !self.written.contains_key(o::name(&v.metadata)))
            .chain(self.written.values())
            .collect()
    }

    async fn apply(&mut self, action: ClaimAction) -> Result<(), Error> {
        match action {
            ClaimAction::BindVolume { volume } => {
                let mut pv = self.volume(&volume)?;
                if binder::bind_volume(&mut pv, &self.claim) {
                    let pv = self
                        .pv_api
                        .replace(&volume, &PostParams::default(), &pv)
                        .await
                        .map_err(Error::api(format!("binding volume {volume}")))?;
                    tracing::info!(volume = %volume, "volume bound to claim");
                    self.ctx.fresh_volumes.remember(&pv);
                    self.written.insert(volume, pv);
                }
            }
            ClaimAction::VolumePhase { volume, phase } => {
                let pv = with_phase(&self.volume(&volume)?, phase, None);
                let pv = self
                    .pv_api
                    .replace_status(&volume, &PostParams::default(), &pv)
                    .await
                    .map_err(Error::api(format!("setting phase of volume {volume}")))?;
                self.ctx.fresh_volumes.remember(&pv);
                self.written.insert(volume, pv);
            }
            ClaimAction::BindClaim { volume } => {
                let pv = self.volume(&volume)?;
                let mut c = self.claim.clone();
                if binder::bind_claim(&mut c, &pv) {
                    self.claim = self
                        .pvc_api
                        .replace(o::name(&c.metadata), &PostParams::default(), &c)
                        .await
                        .map_err(Error::api("binding claim"))?;
                    self.ctx.fresh_claims.remember(&self.claim);
                    self.ctx.metrics.record("bind", true, None);
                    tracing::info!(volume = %volume, "claim bound");
                }
            }
            ClaimAction::ClaimPhase { phase, volume } => {
                let pv = volume.map(|v| self.volume(&v)).transpose()?;
                let mut c = self.claim.clone();
                c.status = Some(binder::claim_status(&self.claim, phase, pv.as_ref()));
                self.claim = self
                    .pvc_api
                    .replace_status(o::name(&c.metadata), &PostParams::default(), &c)
                    .await
                    .map_err(Error::api(format!(
                        "setting claim phase {}",
                        phase.as_str()
                    )))?;
                self.ctx.fresh_claims.remember(&self.claim);
            }
            ClaimAction::AssignClass { class } => {
                let mut c = self.claim.clone();
                c.spec
                    .get_or_insert_with(Default::default)
                    .storage_class_name = Some(class.clone());
                self.claim = self
                    .pvc_api
                    .replace(o::name(&c.metadata), &PostParams::default(), &c)
                    .await
                    .map_err(Error::api("assigning the default StorageClass"))?;
                self.ctx.fresh_claims.remember(&self.claim);
                tracing::info!(class = %class, "default StorageClass assigned to the claim");
            }
            ClaimAction::AnnotateProvisioner { provisioner } => {
                let mut c = self.claim.clone();
                o::set_annotation(&mut c.metadata, ANN_STORAGE_PROVISIONER, &provisioner);
                o::set_annotation(&mut c.metadata, ANN_BETA_STORAGE_PROVISIONER, &provisioner);
                self.claim = self
                    .pvc_api
                    .replace(o::name(&c.metadata), &PostParams::default(), &c)
                    .await
                    .map_err(Error::api("annotating claim"))?;
                self.ctx.fresh_claims.remember(&self.claim);
            }
            ClaimAction::Provision { selected_node } => {
                match provision(self.ctx, &self.claim, selected_node.as_deref()).await {
                    Ok(pv) => self.provisioned = pv,
                    Err(e) => {
                        if self.ctx.settings.mode == BinderMode::Builtin {
                            for a in binder::pending_after_failed_provision(&self.claim) {
                                if let Err(pe) = Box::pin(self.apply(a)).await {
                                    tracing::warn!(error = %pe, "could not mark the claim Pending");
                                }
                            }
                        }
                        return Err(e);
                    }
                }
            }
            ClaimAction::Event(note) => {
                self.ctx.event(&claim_ref_of(&self.claim), &note).await;
            }
        }
        Ok(())
    }
}

async fn reconcile_claim(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let _running = Running::new(&ctx);
    let _counted = Counted(&ctx, "claim");
    let key = format!("pvc/{}", o::claim_key(&claim));
    let span =
        info_span!("claim", claim = %o::claim_key(&claim), volume_id = tracing::field::Empty);
    async {
        ctx.ready().await?;
        let claim = ctx.fresh_claims.newest(claim);
        let class_name = o::claim_class(&claim);
        let class = (!class_name.is_empty())
            .then(|| ctx.classes.get(&ObjectRef::new(class_name)))
            .flatten();
        let classes = ctx.classes.state();
        let default_class = binder::default_class(classes.iter().map(|c| c.as_ref()));
        // The node matters only to a claim that is still looking for a volume.
        let node = match o::annotation(&claim.metadata, ANN_SELECTED_NODE) {
            Some(n)
                if ctx.settings.mode == BinderMode::Builtin
                    && !o::has_annotation(&claim.metadata, ANN_BIND_COMPLETED) =>
            {
                Api::<Node>::all(ctx.client.clone())
                    .get_opt(n)
                    .await
                    .map_err(Error::api(format!("reading node {n}")))?
            }
            _ => None,
        };
        let written = ctx
            .fresh_volumes
            .newer_than(|name| ctx.volumes.get(&ObjectRef::new(name)))
            .into_iter()
            .map(|pv| (o::name(&pv.metadata).to_owned(), (*pv).clone()))
            .collect();
        let mut run = ClaimRun {
            ctx: &ctx,
            claim: (*claim).clone(),
            cached: ctx.volumes.state(),
            written,
            provisioned: None,
            pv_api: Api::all(ctx.client.clone()),
            pvc_api: Api::namespaced(ctx.client.clone(), o::namespace(&claim.metadata)),
        };
        // A second round binds a volume provisioned in the first one right away, instead of
        // waiting for the cache to show it.
        for _round in 0..2 {
            let actions = {
                let refs = run.volume_refs();
                binder::sync_claim(
                    ctx.policy(),
                    &ClaimInput {
                        claim: &run.claim,
                        class: class.as_deref(),
                        volumes: &refs,
                        node: node.as_ref(),
                        default_class,
                    },
                )
            };
            tracing::debug!(
                class = class_name,
                class_known = class.is_some(),
                ?actions,
                "claim sync"
            );
            for a in actions {
                run.apply(a).await?;
            }
            match run.provisioned.take() {
                Some(pv) if ctx.settings.mode == BinderMode::Builtin => {
                    run.written.insert(o::name(&pv.metadata).to_owned(), pv);
                }
                _ => break,
            }
        }
        ctx.succeeded(&key);
        let pending = ClaimPhase::of(&run.claim) != Some(ClaimPhase::Bound);
        Ok(Action::requeue(if pending {
            ctx.settings.pending_resync
        } else {
            ctx.settings.resync
        }))
    }
    .instrument(span)
    .await
}

/// The selected node's topology for this driver: the keys its CSINode lists, with the values
/// of the node's labels.
async fn node_topology(ctx: &Ctx, node: &str) -> Result<Option<BTreeMap<String, String>>, Error> {
    if !ctx.driver.caps.topology {
        return Ok(None);
    }
    let n = Api::<Node>::all(ctx.client.clone())
        .get_opt(node)
        .await
        .map_err(Error::api(format!("reading node {node}")))?
        .ok_or_else(|| Error::Refused(format!("selected node {node} does not exist")))?;
    let csinode = Api::<CSINode>::all(ctx.client.clone())
        .get_opt(node)
        .await
        .map_err(Error::api(format!("reading CSINode {node}")))?
        .ok_or_else(|| {
            Error::Refused(format!(
                "node {node} has no CSINode object: is the {} node plugin registered there?",
                ctx.driver.name
            ))
        })?;
    let keys = csinode
        .spec
        .drivers
        .iter()
        .find(|d| d.name == ctx.driver.name)
        .ok_or_else(|| {
            Error::Refused(format!(
                "driver {} is not registered on node {node}",
                ctx.driver.name
            ))
        })?
        .topology_keys
        .clone()
        .unwrap_or_default();
    let labels = n.metadata.labels.unwrap_or_default();
    let mut seg = BTreeMap::new();
    for k in keys {
        let v = labels
            .get(&k)
            .ok_or_else(|| Error::Refused(format!("node {node} has no label {k}")))?;
        seg.insert(k, v.clone());
    }
    Ok(Some(seg))
}

/// The volume handle a clone starts from: the source claim's PV, which must be this driver's.
fn clone_source(ctx: &Ctx, claim: &PersistentVolumeClaim) -> Option<String> {
    let ds = claim.spec.as_ref()?.data_source.as_ref()?;
    if ds.kind != "PersistentVolumeClaim" {
        return None;
    }
    let src = ctx
        .claims
        .get(&ObjectRef::new(&ds.name).within(o::namespace(&claim.metadata)))?;
    let vn = o::claim_volume_name(&src);
    let pv = ctx.volumes.get(&ObjectRef::new(vn))?;
    (o::csi_driver(&pv) == Some(ctx.driver.name.as_str()))
        .then(|| o::volume_handle(&pv).map(str::to_owned))
        .flatten()
}

/// Provisions the claim's volume and PV; returns the PV (also when it already existed).
async fn provision(
    ctx: &Ctx,
    claim: &PersistentVolumeClaim,
    selected_node: Option<&str>,
) -> Result<Option<PersistentVolume>, Error> {
    let pv_name = o::pv_name_for(claim);
    tracing::Span::current().record("volume_id", pv_name.as_str());
    let pv_api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    // The volume cache is filled before any sync sees the event that triggered it, so a
    // volume we made is found here; after a restart, CreateVolume (idempotent by name) and the
    // PV's AlreadyExists cover what the cache has not shown yet.
    if let Some(pv) = ctx.volumes.get(&ObjectRef::new(&pv_name)) {
        return Ok(Some((*ctx.fresh_volumes.newest(pv)).clone()));
    }
    let uid = o::uid(&claim.metadata).to_owned();
    let started = *ctx
        .started
        .lock()
        .await
        .entry(uid.clone())
        .or_insert_with(Instant::now);
    let cref = claim_ref_of(claim);
    let class_name = o::claim_class(claim);
    let class = ctx
        .classes
        .get(&ObjectRef::new(class_name))
        .ok_or_else(|| {
            Error::Refused(format!(
                "storageclass.storage.k8s.io {class_name:?} not found"
            ))
        })?;
    let fail = |e: Error| async {
        ctx.metrics.record("provision", false, None);
        ctx.event(
            &cref,
            &Note::warning(
                "ProvisioningFailed",
                format!("failed to provision volume with StorageClass {class_name:?}: {e}"),
            ),
        )
        .await;
        e
    };

    let node_topology = match selected_node {
        Some(n) => match node_topology(ctx, n).await {
            Ok(t) => t,
            Err(e) => return Err(fail(e).await),
        },
        None => None,
    };
    let input = PlanInput {
        driver: &ctx.driver.name,
        caps: ctx.driver.caps,
        claim,
        class: &class,
        node_topology,
        clone_source: clone_source(ctx, claim),
        snapshot_source: crate::snapshot::restore::lookup(&ctx.client, &ctx.driver.name, claim)
            .await,
    };
    let p = match plan::plan(&input) {
        Ok(p) => p,
        Err(e) => return Err(fail(Error::Refused(e.to_string())).await),
    };
    let mut request = p.request.clone();
    if let Some(s) = &p.provisioner_secret {
        match ctx.secret(s).await {
            Ok(data) => request.secrets = data.into_iter().collect(),
            Err(e) => return Err(fail(e).await),
        }
    }
    // "Provisioning" tells whoever watches a slow CreateVolume that it is under way; one that
    // finishes sooner gets only its outcome, which saves an event write per claim.
    let create = ctx.driver.create_volume(request);
    tokio::pin!(create);
    let created = tokio::select! {
        r = &mut create => r,
        () = tokio::time::sleep(PROVISIONING_EVENT_AFTER) => {
            ctx.event(
                &cref,
                &Note::normal(
                    "Provisioning",
                    format!(
                        "External provisioner is provisioning volume for claim {:?}",
                        o::claim_key(claim)
                    ),
                ),
            )
            .await;
            create.await
        }
    };
    let created = match created {
        Ok(v) => v,
        Err(e) => return Err(fail(e.into()).await),
    };
    tracing::info!(volume_handle = %created.volume_id, "backend volume ready");
    let pv = plan::build_pv(&p, &ctx.driver.name, claim, &class, &created);
    let pv = match pv_api.create(&PostParams::default(), &pv).await {
        Ok(pv) => pv,
        // Another attempt (or replica, before a lease expired) saved it already.
        Err(e) if is_already_exists(&e) => {
            return pv_api
                .get_opt(&pv_name)
                .await
                .map_err(Error::api(format!("reading volume {pv_name}")));
        }
        Err(e) => return Err(fail(Error::api(format!("saving volume {pv_name}"))(e)).await),
    };
    ctx.fresh_volumes.remember(&pv);
    ctx.started.lock().await.remove(&uid);
    ctx.metrics
        .record("provision", true, Some(started.elapsed()));
    ctx.event(
        &cref,
        &Note::normal(
            "ProvisioningSucceeded",
            format!("Successfully provisioned volume {pv_name}"),
        ),
    )
    .await;
    tracing::info!(volume = %pv_name, "volume provisioned");
    Ok(Some(pv))
}

/// The claim a volume points to, as the API has it now (not the cache).
async fn live_claim(
    ctx: &Ctx,
    pv: &PersistentVolume,
) -> Result<Option<PersistentVolumeClaim>, Error> {
    let Some(r) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return Ok(None);
    };
    let (Some(ns), Some(name)) = (r.namespace.as_deref(), r.name.as_deref()) else {
        return Ok(None);
    };
    Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(Error::api(format!("reading claim {ns}/{name}")))
}

fn cached_claim(ctx: &Ctx, pv: &PersistentVolume) -> Option<Arc<PersistentVolumeClaim>> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    ctx.claims
        .get(&ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
}

async fn deletion_secrets(
    ctx: &Ctx,
    pv: &PersistentVolume,
) -> Result<BTreeMap<String, String>, Error> {
    let name = o::annotation(&pv.metadata, ANN_DELETION_SECRET_NAME);
    let ns = o::annotation(&pv.metadata, ANN_DELETION_SECRET_NAMESPACE);
    match (name, ns) {
        (Some(name), Some(namespace)) => {
            ctx.secret(&SecretRef {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
            })
            .await
        }
        _ => Ok(BTreeMap::new()),
    }
}

/// The UID of the claim a volume is bound to (or was, when Released).
fn claim_uid(pv: &PersistentVolume) -> Option<String> {
    binder::claim_ref(pv).and_then(|r| r.uid.clone())
}

struct VolumeRun<'a> {
    ctx: &'a Ctx,
    pv: PersistentVolume,
    api: Api<PersistentVolume>,
    /// The object is gone; later steps that need it are done.
    gone: bool,
    /// The object moved on since the cache showed it (see [`VolumeRun::still_released`]);
    /// the rest of this sync is moot and the next one starts from the new state.
    stale: bool,
}

impl VolumeRun<'_> {
    fn name(&self) -> String {
        o::name(&self.pv.metadata).to_owned()
    }

    async fn replace(&mut self, what: &str) -> Result<(), Error> {
        let name = self.name();
        match self
            .api
            .replace(&name, &PostParams::default(), &self.pv)
            .await
        {
            Ok(pv) => {
                self.ctx.fresh_volumes.remember(&pv);
                self.pv = pv;
                Ok(())
            }
            Err(e) if is_not_found(&e) => {
                self.gone = true;
                Ok(())
            }
            Err(e) => Err(Error::api(format!("{what} of volume {name}"))(e)),
        }
    }

    async fn apply(&mut self, action: VolumeAction) -> Result<(), Error> {
        if self.gone || self.stale {
            return Ok(());
        }
        let ctx = self.ctx;
        let name = self.name();
        match action {
            VolumeAction::Phase { phase, message } => {
                let pv = with_phase(&self.pv, phase, message);
                match self
                    .api
                    .replace_status(&name, &PostParams::default(), &pv)
                    .await
                {
                    Ok(pv) => {
                        ctx.fresh_volumes.remember(&pv);
                        self.pv = pv;
                    }
                    Err(e) if is_not_found(&e) => self.gone = true,
                    Err(e) => return Err(Error::api(format!("setting phase of volume {name}"))(e)),
                }
                if phase == VolumePhase::Available {
                    let _ = ctx.volume_freed.try_send(());
                }
            }
            VolumeAction::Unbind => {
                self.update("unbinding", binder::unbind_volume).await?;
                let _ = ctx.volume_freed.try_send(());
            }
            VolumeAction::AddFinalizer => {
                self.update("adding the finalizer", |pv| {
                    let f = pv.metadata.finalizers.get_or_insert_with(Vec::new);
                    if !f.iter().any(|x| x == FINALIZER) {
                        f.push(FINALIZER.to_owned());
                    }
                })
                .await?
            }
            VolumeAction::RemoveFinalizer => {
                self.update("removing the finalizer", |pv| {
                    if let Some(f) = pv.metadata.finalizers.as_mut() {
                        f.retain(|x| x != FINALIZER);
                    }
                })
                .await?
            }
            VolumeAction::DeleteBackend => {
                if !self.still_released().await? {
                    return Ok(());
                }
                let handle = o::volume_handle(&self.pv).unwrap_or("").to_owned();
                let started = Instant::now();
                let res = match deletion_secrets(ctx, &self.pv).await {
                    Ok(secrets) => ctx
                        .driver
                        .delete_volume(&handle, secrets)
                        .await
                        .map_err(Error::from),
                    Err(e) => Err(e),
                };
                ctx.metrics
                    .record("delete", res.is_ok(), Some(started.elapsed()));
                if let Err(e) = res {
                    ctx.event(
                        &volume_ref_of(&self.pv),
                        &Note::warning("VolumeFailedDelete", e.to_string()),
                    )
                    .await;
                    return Err(e);
                }
                tracing::info!(volume_handle = %handle, "backend volume deleted");
            }
            VolumeAction::DeleteObject => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: self.pv.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match self.api.delete(&name, &dp).await {
                    // Left: the object still exists (finalizers hold it); Right: it is gone.
                    Ok(res) => match res.left() {
                        Some(pv) => {
                            ctx.fresh_volumes.remember(&pv);
                            self.pv = pv;
                        }
                        None => {
                            ctx.fresh_volumes.forget("", &name);
                            self.gone = true;
                        }
                    },
                    Err(e) if is_not_found(&e) => self.gone = true,
                    Err(e) => return Err(Error::api(format!("deleting volume {name}"))(e)),
                }
            }
            VolumeAction::Recycle => {
                if !self.still_released().await? {
                    return Ok(());
                }
                let handle = o::volume_handle(&self.pv).unwrap_or("").to_owned();
                let context: BTreeMap<String, String> = self
                    .pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.csi.as_ref())
                    .and_then(|c| c.volume_attributes.clone())
                    .unwrap_or_default();
                let started = Instant::now();
                let res = match deletion_secrets(ctx, &self.pv).await {
                    Ok(secrets) => ctx
                        .driver
                        .recycle_volume(&handle, secrets, context)
                        .await
                        .map_err(Error::from),
                    Err(e) => Err(e),
                };
                ctx.metrics
                    .record("recycle", res.is_ok(), Some(started.elapsed()));
                let vref = volume_ref_of(&self.pv);
                if let Err(e) = res {
                    let msg = format!("Recycle failed: {e}");
                    ctx.event(&vref, &Note::warning("VolumeFailedRecycle", msg.clone()))
                        .await;
                    if ctx.settings.mode == BinderMode::Builtin {
                        let pv = with_phase(&self.pv, VolumePhase::Failed, Some(msg));
                        if let Err(se) = self
                            .api
                            .replace_status(&name, &PostParams::default(), &pv)
                            .await
                        {
                            tracing::warn!(error = %se, "could not mark the volume Failed");
                        }
                    }
                    return Err(e);
                }
                tracing::info!(volume_handle = %handle, "volume recycled");
                ctx.event(
                    &vref,
                    &Note::normal(
                        "VolumeRecycled",
                        "Volume recycled: its contents were removed; it is available to new claims",
                    ),
                )
                .await;
            }
            VolumeAction::Event(note) => {
                ctx.event(&volume_ref_of(&self.pv), &note).await;
            }
        }
        Ok(())
    }

    /// The volume as the API has it now; None when it is gone (or a new object took the name).
    async fn live(&self) -> Result<Option<PersistentVolume>, Error> {
        let name = self.name();
        Ok(self
            .api
            .get_opt(&name)
            .await
            .map_err(Error::api(format!("reading volume {name}")))?
            .filter(|pv| pv.metadata.uid == self.pv.metadata.uid))
    }

    /// Writes a change to the volume's spec or metadata. Other controllers (KCM's binder and
    /// recycler, pv-protection) write the same object at the same moments, so a conflict is
    /// retried on a fresh copy while that copy still belongs to the same claim: after a
    /// DeleteVolume or a scrub, losing the follow-up write to a conflict would mean doing the
    /// destructive step again on the next sync.
    async fn update(&mut self, what: &str, change: fn(&mut PersistentVolume)) -> Result<(), Error> {
        let seen = claim_uid(&self.pv);
        for attempt in 0..5 {
            change(&mut self.pv);
            match self.replace(what).await {
                Err(e) if e.is_conflict() && attempt < 4 => {
                    let Some(pv) = self.live().await? else {
                        self.gone = true;
                        return Ok(());
                    };
                    if claim_uid(&pv) != seen {
                        self.stale = true;
                        return Ok(());
                    }
                    self.pv = pv;
                }
                other => return other,
            }
        }
        Ok(())
    }

    /// Before data goes away: the volume and its claim as the API has them now, not as the
    /// cache does. A sync that runs on a stale copy would otherwise delete a volume twice
    /// or, worse, scrub a volume that was already recycled and bound to the next claim.
    /// Ok(false): the volume is gone or its claimRef changed; nothing is to be done now.
    async fn still_released(&mut self) -> Result<bool, Error> {
        let Some(pv) = self.live().await? else {
            tracing::debug!("volume already gone");
            self.gone = true;
            return Ok(false);
        };
        // Our finalizer goes only once the backend volume is gone (or is not ours to delete),
        // so a live copy without it means an earlier sync finished the job.
        let moved_on = claim_uid(&pv) != claim_uid(&self.pv)
            || (o::has_finalizer(&self.pv.metadata, FINALIZER)
                && !o::has_finalizer(&pv.metadata, FINALIZER));
        self.pv = pv;
        if moved_on {
            tracing::debug!(
                "volume changed since the cached copy (claimRef or finalizer); skipping"
            );
            self.stale = true;
            return Ok(false);
        }
        let live = live_claim(self.ctx, &self.pv).await?;
        match binder::relation(&self.pv, live.as_ref()) {
            binder::Relation::Released
            | binder::Relation::Unclaimed
            | binder::Relation::Reserved => Ok(true),
            binder::Relation::ClaimElsewhere
                if o::has_annotation(&self.pv.metadata, o::ANN_PROVISIONED_BY) =>
            {
                Ok(true)
            }
            _ => Err(Error::ClaimAlive(
                live.map(|c| o::claim_key(&c)).unwrap_or_default(),
            )),
        }
    }
}

async fn reconcile_volume(pv: Arc<PersistentVolume>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let name = o::name(&pv.metadata).to_owned();
    let _running = Running::new(&ctx);
    let _counted = Counted(&ctx, "volume");
    let key = format!("pv/{name}");
    let span =
        info_span!("volume", volume = %name, volume_id = o::volume_handle(&pv).unwrap_or(""));
    async {
        ctx.ready().await?;
        let pv = ctx.fresh_volumes.newest(pv);
        let mut claim = cached_claim(&ctx, &pv).map(|c| (*ctx.fresh_claims.newest(c)).clone());
        let mut actions = binder::sync_volume(ctx.policy(), &pv, claim.as_ref());
        // KCM's double check: a claim missing from the cache may be one the cache has not
        // seen yet (a volume pre-bound by someone else); ask the API before releasing.
        if binder::relation(&pv, claim.as_ref()) == binder::Relation::Released
            && !actions.is_empty()
        {
            claim = live_claim(&ctx, &pv).await?;
            actions = binder::sync_volume(ctx.policy(), &pv, claim.as_ref());
        }
        tracing::debug!(?actions, "volume sync");
        let mut run = VolumeRun {
            ctx: &ctx,
            pv: (*pv).clone(),
            api: Api::all(ctx.client.clone()),
            gone: false,
            stale: false,
        };
        for a in actions {
            run.apply(a).await?;
        }
        ctx.succeeded(&key);
        Ok(Action::requeue(ctx.settings.resync))
    }
    .instrument(span)
    .await
}

fn error_policy_claim(claim: Arc<PersistentVolumeClaim>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = format!("pvc/{}", o::claim_key(&claim));
    let d = ctx.backoff(&key, err);
    tracing::warn!(claim = %o::claim_key(&claim), error = %err, retry_in = ?d, "claim sync failed");
    Action::requeue(d)
}

fn error_policy_volume(pv: Arc<PersistentVolume>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = format!("pv/{}", o::name(&pv.metadata));
    let d = ctx.backoff(&key, err);
    tracing::warn!(volume = %o::name(&pv.metadata), volume_id = o::volume_handle(&pv).unwrap_or(""), error = %err, retry_in = ?d, "volume sync failed");
    Action::requeue(d)
}

/// Runs both controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    driver: Driver,
    settings: Settings,
    metrics: Arc<Metrics>,
    host: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let wc = watcher::Config::default();
    let pvc_all: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let pv_all: Api<PersistentVolume> = Api::all(client.clone());

    // Our own caches, whose fill we observe in their streams (InitDone): kube-runtime's
    // Store::wait_until_ready wakes a single waiter, and each controller already waits on its
    // own store that way.
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let filled = Arc::new(Filled {
        bits: std::sync::atomic::AtomicU8::new(0),
        tx: ready_tx,
    });
    let (claim_reader, claim_writer) = reflector::store::<PersistentVolumeClaim>();
    let (volume_reader, volume_writer) = reflector::store::<PersistentVolume>();
    let (class_reader, class_writer) = reflector::store::<StorageClass>();
    // Each object watch feeds its cache first, then both controllers: the one it drives and
    // the other one through a mapping. A sync therefore never runs on a cache older than the
    // event that triggered it (a claim deletion seen by the volume controller is gone from
    // the claim cache too).
    let f = filled.clone();
    let claim_stream = watcher(pvc_all, wc.clone())
        .default_backoff()
        .modify(o::drop_managed_fields)
        .reflect(claim_writer)
        .inspect_ok(move |e| f.seen(e, 1))
        .touched_objects();
    let f = filled.clone();
    let volume_stream = watcher(pv_all, wc.clone())
        .default_backoff()
        .modify(o::drop_managed_fields)
        .reflect(volume_writer)
        .inspect_ok(move |e| f.seen(e, 2))
        .touched_objects();
    let f = filled.clone();
    let classes = watcher(Api::<StorageClass>::all(client.clone()), wc)
        .default_backoff()
        .modify(o::drop_managed_fields)
        .reflect(class_writer)
        .inspect_ok(move |e| f.seen(e, 4))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::warn!(error = %e, "StorageClass watch");
            }
        });
    let (claim_main, claim_side, claim_feed) = fan_out(claim_stream, "PersistentVolumeClaim");
    let (volume_main, volume_side, volume_feed) = fan_out(volume_stream, "PersistentVolume");
    let feeds = [tokio::spawn(claim_feed), tokio::spawn(volume_feed)];

    let claims_ctl = Controller::for_stream(claim_main, claim_reader.clone())
        .with_config(ControllerConfig::default().concurrency(settings.workers))
        .watches_stream(volume_side, |pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| {
                    Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
                })
        });
    let volumes_ctl = Controller::for_stream(volume_main, volume_reader.clone())
        .with_config(ControllerConfig::default().concurrency(settings.workers))
        .watches_stream(claim_side, |pvc| {
            let mut refs = vec![ObjectRef::new(&o::pv_name_for(&pvc))];
            let vn = o::claim_volume_name(&pvc);
            if !vn.is_empty() {
                refs.push(ObjectRef::new(vn));
            }
            refs
        });
    let (freed_tx, freed_rx) = tokio::sync::mpsc::channel::<()>(1);
    let claims_ctl =
        claims_ctl.reconcile_all_on(tokio_stream::wrappers::ReceiverStream::new(freed_rx));

    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(client.clone(), "stowage-provisioner", host),
        client,
        driver,
        settings,
        claims: claim_reader,
        volumes: volume_reader,
        classes: class_reader,
        fresh_claims: Fresh::default(),
        fresh_volumes: Fresh::default(),
        metrics,
        failures: Default::default(),
        started: Default::default(),
        volume_freed: freed_tx,
        running: Default::default(),
        ready: ready_rx,
    });
    let running = ctx.running.clone();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let claims = claims_ctl
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .run(reconcile_claim, error_policy_claim, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "claim controller");
            }
        });
    let volumes = volumes_ctl
        .graceful_shutdown_on(stopped(stop_rx))
        .run(reconcile_volume, error_policy_volume, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "volume controller");
            }
        });
    tokio::pin!(shutdown);
    tokio::select! {
        _ = classes => tracing::error!("the StorageClass watch ended"),
        _ = async { tokio::join!(claims, volumes) } => {}
        _ = async {
            (&mut shutdown).await;
            let _ = stop_tx.send(true);
            // No new syncs start; running ones get a moment to finish (a CreateVolume cut in
            // half is safe, only wasteful). The streams themselves would also wait for every
            // scheduled requeue, so they are not what shutdown waits for.
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while running.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } => tracing::info!(still_running = running.load(std::sync::atomic::Ordering::SeqCst), "stopped"),
    }
    for f in feeds {
        f.abort();
    }
}

type Feed<K> = tokio_stream::wrappers::ReceiverStream<Result<K, watcher::Error>>;

/// Splits one object stream into two trigger streams (same objects, same order) and the task
/// that feeds them. Watch errors are logged here; the watcher retries with backoff.
fn fan_out<K, S>(
    stream: S,
    kind: &'static str,
) -> (
    Feed<K>,
    Feed<K>,
    impl std::future::Future<Output = ()> + Send + 'static,
)
where
    K: Clone + Send + Sync + 'static,
    S: futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    let (a_tx, a_rx) = tokio::sync::mpsc::channel(1024);
    let (b_tx, b_rx) = tokio::sync::mpsc::channel(1024);
    let feed = async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => {
                    if a_tx.send(Ok(obj.clone())).await.is_err()
                        || b_tx.send(Ok(obj)).await.is_err()
                    {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, kind, "watch failed; retrying"),
            }
        }
    };
    (
        tokio_stream::wrappers::ReceiverStream::new(a_rx),
        tokio_stream::wrappers::ReceiverStream::new(b_rx),
        feed,
    )
}

/// A CreateVolume still running after this long gets a "Provisioning" event.
const PROVISIONING_EVENT_AFTER: Duration = Duration::from_secs(1);

/// How long running syncs may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
