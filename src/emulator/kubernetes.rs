//! A fake Kubernetes API server with just what per-pod identity reads: pods
//! and service accounts under `/api/v1/`, listed (with field selectors),
//! fetched one by one and watched as a stream of changes, whole or (as kube
//! asks for `PartialObjectMeta`) metadata only, behind a bearer token, with
//! an outage switch. Objects come and go through the control API or the
//! [`Emulator`](super::Emulator)'s methods.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{Body, Shared, json_answer, parse_query};

/// The bearer token the fake API server accepts;
/// [`Emulator::kubeconfig`](super::Emulator::kubeconfig) carries it.
pub const TOKEN: &str = "emulator-kubernetes-token";
/// How many changes the fake remembers for watches that resume (1000); a
/// watch from an older `resourceVersion` gets `410 Gone`.
pub const MAX_HISTORY: usize = 1000;
/// How long a watch without `timeoutSeconds` streams (290 s, what kube
/// asks for).
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// Where the fake API is served.
pub(super) const PREFIX: &str = "/api/v1/";

/// A pod of the fake cluster (`PUT /emulator/v1/kubernetes/pods` takes it
/// as JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakePod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its `metadata.uid`; generated if absent (a replaced pod keeps its
    /// own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The node it runs on (`spec.nodeName`); empty for a pod not yet
    /// scheduled.
    #[serde(default)]
    pub node: String,
    /// Its service account (`spec.serviceAccountName`); `default` if
    /// absent.
    #[serde(default = "default_service_account")]
    pub service_account: String,
}

/// A service account of the fake cluster (`PUT
/// /emulator/v1/kubernetes/serviceaccounts` takes it as JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its `metadata.annotations`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `PUT /emulator/v1/kubernetes/outage`: whether the API is down.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Outage {
    /// While true, every `/api/v1/` request gets 503 and watches end.
    pub(super) down: bool,
}

fn default_service_account() -> String {
    "default".to_string()
}

/// A kubeconfig for the fake API server at `addr`: cluster, user (with
/// [`TOKEN`]) and context all named `emulator`.
pub(super) fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: emulator
  cluster:
    server: http://{addr}
users:
- name: emulator
  user:
    token: {TOKEN}
contexts:
- name: emulator
  context:
    cluster: emulator
    user: emulator
    namespace: default
current-context: emulator
"
    )
}

// === impl FakePod, FakeServiceAccount ===

impl FakePod {
    /// The pod, if the API paths can carry its names.
    pub(super) fn checked(self) -> Result<Self, String> {
        check_names(&self.namespace, &self.name)?;
        Ok(self)
    }

    /// The pod as the API serves it, without its `resourceVersion`.
    fn object(&self, uid: &str) -> Value {
        let mut spec = json!({
            "serviceAccountName": self.service_account,
            "containers": [{"name": "app"}],
        });
        if !self.node.is_empty() {
            spec["nodeName"] = json!(self.node);
        }
        let phase = if self.node.is_empty() {
            "Pending"
        } else {
            "Running"
        };
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": uid},
            "spec": spec,
            "status": {"phase": phase},
        })
    }
}

impl FakeServiceAccount {
    /// The account, if the API paths can carry its names.
    pub(super) fn checked(self) -> Result<Self, String> {
        check_names(&self.namespace, &self.name)?;
        Ok(self)
    }

    /// The account as the API serves it, without its `resourceVersion`.
    fn object(&self, uid: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": uid,
                "annotations": self.annotations,
            },
        })
    }
}

fn check_names(namespace: &str, name: &str) -> Result<(), String> {
    if [namespace, name]
        .iter()
        .any(|n| n.is_empty() || n.contains('/'))
    {
        return Err(format!(
            "namespace {namespace:?} and name {name:?} must be non-empty, without '/'\n"
        ));
    }
    Ok(())
}

// === Kinds and selectors ===

/// The kinds of object the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    Pod,
    ServiceAccount,
}

impl Kind {
    /// The kind named by a path segment (`pods`, `serviceaccounts`).
    pub(super) fn of(plural: &str) -> Option<Self> {
        match plural {
            "pods" => Some(Self::Pod),
            "serviceaccounts" => Some(Self::ServiceAccount),
            _ => None,
        }
    }

    /// Its name in paths (`pods`).
    pub(super) fn plural(self) -> &'static str {
        match self {
            Self::Pod => "pods",
            Self::ServiceAccount => "serviceaccounts",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Pod => "PodList",
            Self::ServiceAccount => "ServiceAccountList",
        }
    }

    /// The fields a selector may name, with where they are in the object.
    fn fields(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Pod => &[
                ("metadata.name", "/metadata/name"),
                ("metadata.namespace", "/metadata/namespace"),
                ("spec.nodeName", "/spec/nodeName"),
                ("spec.serviceAccountName", "/spec/serviceAccountName"),
                ("status.phase", "/status/phase"),
            ],
            Self::ServiceAccount => &[
                ("metadata.name", "/metadata/name"),
                ("metadata.namespace", "/metadata/namespace"),
            ],
        }
    }
}

/// One `field=value` (or `==`, `!=`) term of a field selector.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Term {
    pointer: &'static str,
    value: String,
    equal: bool,
}

/// A field selector: terms that must all hold.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Selector(Vec<Term>);

impl Selector {
    /// Parses `fieldSelector` for `kind`, refusing fields Kubernetes would
    /// refuse for it.
    fn parse(kind: Kind, text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            let Some(&(_, pointer)) = kind.fields().iter().find(|(name, _)| *name == field) else {
                return Err(format!(
                    "field label not supported for {}: {field}",
                    kind.plural()
                ));
            };
            terms.push(Term {
                pointer,
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(Self(terms))
    }

    /// Adds the namespace of a namespaced path.
    fn in_namespace(mut self, namespace: &str) -> Self {
        self.0.push(Term {
            pointer: "/metadata/namespace",
            value: namespace.to_string(),
            equal: true,
        });
        self
    }

    /// Whether `object` holds every term (a missing field is empty, as in
    /// Kubernetes).
    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|term| {
            let actual = object
                .pointer(term.pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == term.value) == term.equal
        })
    }
}

// === The cluster's state ===

type Key = (Kind, String, String);

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One remembered change: the object after it (for a deletion, its last
/// state) and, for a modification, before it.
struct Event {
    revision: u64,
    kind: Kind,
    change: Change,
    object: Value,
    previous: Option<Value>,
}

impl Event {
    /// What a watch with `selector` sees of this change, if anything: an
    /// object entering the selection is `ADDED`, one leaving it `DELETED`,
    /// as the real API server reports them.
    fn seen_through(&self, selector: &Selector) -> Option<(Change, Value)> {
        let now = selector.matches(&self.object);
        let before = self.previous.as_ref().map(|p| selector.matches(p));
        match (self.change, before, now) {
            (Change::Modified, Some(false), true) => Some((Change::Added, self.object.clone())),
            (Change::Modified, Some(true), false) => {
                let mut gone = self.previous.clone()?;
                gone["metadata"]["resourceVersion"] =
                    self.object["metadata"]["resourceVersion"].clone();
                Some((Change::Deleted, gone))
            }
            (change, _, true) => Some((change, self.object.clone())),
            _ => None,
        }
    }
}

/// The fake cluster: its objects, the recent changes watches resume from,
/// and the outage switch.
pub(super) struct Cluster {
    /// The latest `resourceVersion` (starts at 1, as no real one is 0).
    revision: u64,
    /// The newest revision no longer in `history` (a watch from before it
    /// has missed changes).
    floor: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    down: bool,
    /// Ticks on every change and outage switch, waking open watches.
    changed: watch::Sender<()>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            revision: 1,
            floor: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            down: false,
            changed: watch::Sender::new(()),
        }
    }
}

impl Cluster {
    /// Adds `pod`, or replaces the pod of its namespace and name (another
    /// `uid` makes it a new pod under an old name: deleted, then added).
    pub(super) fn put_pod(&mut self, pod: FakePod) {
        let key = (Kind::Pod, pod.namespace.clone(), pod.name.clone());
        self.put(key, pod.uid.clone(), |uid| pod.object(uid));
    }

    /// Adds or replaces a service account.
    pub(super) fn put_service_account(&mut self, account: FakeServiceAccount) {
        let key = (
            Kind::ServiceAccount,
            account.namespace.clone(),
            account.name.clone(),
        );
        self.put(key, None, |uid| account.object(uid));
    }

    /// Deletes an object; false if there was none.
    pub(super) fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.remove(&(kind, namespace.to_string(), name.to_string()))
    }

    /// Turns the outage on or off; on ends every open watch.
    pub(super) fn set_down(&mut self, down: bool) {
        self.down = down;
        self.changed.send_replace(());
    }

    fn put(&mut self, key: Key, uid: Option<String>, object: impl FnOnce(&str) -> Value) {
        let mut previous = self.objects.get(&key).cloned();
        if let (Some(new), Some(old)) = (&uid, &previous)
            && *new != uid_of(old)
        {
            self.remove(&key);
            previous = None;
        }
        let uid = uid
            .or_else(|| previous.as_ref().map(uid_of))
            .unwrap_or_else(new_uid);
        let mut object = object(&uid);
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.objects.insert(key.clone(), object.clone());
        let change = if previous.is_some() {
            Change::Modified
        } else {
            Change::Added
        };
        self.record(key.0, change, object, previous);
    }

    fn remove(&mut self, key: &Key) -> bool {
        let Some(mut object) = self.objects.remove(key) else {
            return false;
        };
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.record(key.0, Change::Deleted, object, None);
        true
    }

    fn record(&mut self, kind: Kind, change: Change, object: Value, previous: Option<Value>) {
        if self.history.len() >= MAX_HISTORY
            && let Some(forgotten) = self.history.pop_front()
        {
            self.floor = forgotten.revision;
        }
        self.history.push_back(Event {
            revision: self.revision,
            kind,
            change,
            object,
            previous,
        });
        self.changed.send_replace(());
    }

    /// The objects of `kind` that `selector` selects, by namespace and name.
    fn select<'a>(
        &'a self,
        kind: Kind,
        selector: &'a Selector,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |((k, _, _), object)| *k == kind && selector.matches(object))
            .map(|(_, object)| object)
    }

    /// The list answer: `{"kind":"PodList","metadata":{"resourceVersion"},"items"}`.
    fn list(&self, kind: Kind, selector: &Selector, shape: Shape) -> Value {
        let items: Vec<Value> = self
            .select(kind, selector)
            .map(|object| shape.of(object))
            .collect();
        let (api_version, list_kind) = shape.list_type(kind);
        json!({
            "apiVersion": api_version,
            "kind": list_kind,
            "metadata": {"resourceVersion": self.revision.to_string()},
            "items": items,
        })
    }

    /// What a watch that has seen everything up to `after` is sent next.
    fn watch_step(&self, kind: Kind, selector: &Selector, shape: Shape, after: u64) -> Step {
        if self.down {
            return Step::End(Vec::new());
        }
        if after < self.floor {
            let message = format!("too old resource version: {after} ({})", self.floor);
            let expired = failure(StatusCode::GONE, "Expired", &message);
            return Step::End(event_line("ERROR", &expired));
        }
        let start = self.history.partition_point(|e| e.revision <= after);
        let mut lines = Vec::new();
        for event in self.history.range(start..).filter(|e| e.kind == kind) {
            if let Some((change, object)) = event.seen_through(selector) {
                lines.extend(event_line(change.name(), &shape.of(&object)));
            }
        }
        Step::More(lines, self.revision)
    }
}

/// A watch's next lines: more to come (and the revision they reach), or
/// the last ones.
enum Step {
    More(Vec<u8>, u64),
    End(Vec<u8>),
}

/// How objects are answered: whole, or only their metadata, as
/// `meta.k8s.io/v1` `PartialObjectMetadata` (what a client asks for with
/// `Accept: application/json;as=PartialObjectMetadata…`, as kube does for
/// an `Api<PartialObjectMeta<_>>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Whole,
    Metadata,
}

impl Shape {
    /// The shape a request's `Accept` header asks for.
    fn asked_by(request: &Request<Incoming>) -> Self {
        let metadata = request
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|accept| accept.contains("as=PartialObjectMetadata"));
        if metadata {
            Self::Metadata
        } else {
            Self::Whole
        }
    }

    /// `object` in this shape.
    fn of(self, object: &Value) -> Value {
        match self {
            Self::Whole => object.clone(),
            Self::Metadata => json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": object["metadata"],
            }),
        }
    }

    /// `(apiVersion, kind)` of a list of `kind` in this shape.
    fn list_type(self, kind: Kind) -> (&'static str, &'static str) {
        match self {
            Self::Whole => ("v1", kind.list_kind()),
            Self::Metadata => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
        }
    }
}

fn uid_of(object: &Value) -> String {
    object["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A random version-4 UUID, as Kubernetes gives every object.
fn new_uid() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        fastrand::u16(0x8000..0xc000),
        fastrand::u64(..1 << 48),
    )
}

/// One watch event as a line of JSON.
fn event_line(change: &str, object: &Value) -> Vec<u8> {
    let mut line = json!({"type": change, "object": object})
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

// === The API ===

/// What a path under `/api/v1/` names.
enum Route<'a> {
    /// `{plural}` or `namespaces/{ns}/{plural}`: list or watch.
    Collection {
        kind: Kind,
        namespace: Option<&'a str>,
    },
    /// `namespaces/{ns}/{plural}/{name}`: get.
    Object {
        kind: Kind,
        namespace: &'a str,
        name: &'a str,
    },
}

impl<'a> Route<'a> {
    fn of(path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.strip_prefix(PREFIX)?.split('/').collect();
        match segments.as_slice() {
            [plural] => Some(Self::Collection {
                kind: Kind::of(plural)?,
                namespace: None,
            }),
            ["namespaces", namespace, plural] if !namespace.is_empty() => Some(Self::Collection {
                kind: Kind::of(plural)?,
                namespace: Some(namespace),
            }),
            ["namespaces", namespace, plural, name]
                if !namespace.is_empty() && !name.is_empty() =>
            {
                Some(Self::Object {
                    kind: Kind::of(plural)?,
                    namespace,
                    name,
                })
            }
            _ => None,
        }
    }
}

/// Answers a request under `/api/v1/`: refused during an outage or without
/// the bearer token, else a get, a list or a watch.
pub(super) fn serve(shared: &Arc<Shared>, request: &Request<Incoming>) -> Response<Body> {
    if shared.cluster().down {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the Kubernetes API is down (the emulator's outage switch is on)",
        );
    }
    if super::bearer(request.headers()) != Some(TOKEN) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if request.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the emulator's Kubernetes API only reads (GET)",
        );
    }
    let Some(route) = Route::of(request.uri().path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let query = parse_query(request.uri().query().unwrap_or(""));
    let shape = Shape::asked_by(request);
    let answer = match route {
        Route::Object {
            kind,
            namespace,
            name,
        } => Ok(get(shared, kind, namespace, name, shape)),
        Route::Collection { kind, namespace } => collection(shared, kind, namespace, shape, &query),
    };
    answer.unwrap_or_else(|message| status(StatusCode::BAD_REQUEST, "BadRequest", &message))
}

fn get(shared: &Shared, kind: Kind, namespace: &str, name: &str, shape: Shape) -> Response<Body> {
    shared.count(|s| s.kubernetes_gets += 1);
    let key = (kind, namespace.to_string(), name.to_string());
    let object = shared.cluster().objects.get(&key).cloned();
    match object {
        Some(object) => json_answer(StatusCode::OK, &shape.of(&object)),
        None => {
            let message = format!("{} \"{name}\" not found", kind.plural());
            let mut response = failure(StatusCode::NOT_FOUND, "NotFound", &message);
            response["details"] = json!({"name": name, "kind": kind.plural()});
            json_answer(StatusCode::NOT_FOUND, &response)
        }
    }
}

/// A list, or with `watch=true` a watch; `Err` with the message of a 400.
fn collection(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<&str>,
    shape: Shape,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, String> {
    let param = |name: &str| query.get(name).map(String::as_str);
    let mut selector = Selector::parse(kind, param("fieldSelector").unwrap_or(""))?;
    if let Some(namespace) = namespace {
        selector = selector.in_namespace(namespace);
    }
    if param("labelSelector").is_some_and(|l| !l.is_empty()) {
        return Err("labelSelector is not supported: the emulator's objects have no labels".into());
    }
    let watching = match param("watch") {
        None | Some("" | "false" | "0") => false,
        Some("true" | "1") => true,
        Some(other) => return Err(format!("watch={other:?}: want true or false")),
    };
    if !watching {
        shared.count(|s| s.kubernetes_lists += 1);
        let list = shared.cluster().list(kind, &selector, shape);
        return Ok(json_answer(StatusCode::OK, &list));
    }
    if param("sendInitialEvents") == Some("true") {
        return Err("sendInitialEvents is not supported by the emulator: list, then watch".into());
    }
    // 0 means the server's default, as in Kubernetes.
    let timeout = match param("timeoutSeconds") {
        None | Some("" | "0") => DEFAULT_WATCH_TIMEOUT,
        Some(secs) => Duration::from_secs(
            secs.parse()
                .map_err(|_| format!("timeoutSeconds={secs:?}: want whole seconds"))?,
        ),
    };
    let deadline = tokio::time::Instant::now()
        .checked_add(timeout)
        .ok_or_else(|| format!("timeoutSeconds={}: too long", timeout.as_secs()))?;
    let from = match param("resourceVersion") {
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| format!("resourceVersion={rv:?}: want a number"))?,
        ),
    };
    Ok(watch(shared, kind, selector, shape, from, deadline))
}

/// Starts a watch that streams until `deadline`: from `from`, or without
/// it from now, after the objects that exist as synthetic `ADDED` events
/// (as Kubernetes does).
fn watch(
    shared: &Arc<Shared>,
    kind: Kind,
    selector: Selector,
    shape: Shape,
    from: Option<u64>,
    deadline: tokio::time::Instant,
) -> Response<Body> {
    shared.count(|s| s.kubernetes_watches += 1);
    let (lines, after, changed) = {
        let cluster = shared.cluster();
        let changed = cluster.changed.subscribe();
        match from {
            Some(after) => (Vec::new(), after, changed),
            None => {
                let lines = cluster
                    .select(kind, &selector)
                    .flat_map(|object| event_line(Change::Added.name(), &shape.of(object)))
                    .collect();
                (lines, cluster.revision, changed)
            }
        }
    };
    let (sender, receiver) = mpsc::channel(16);
    let open = OpenWatch {
        shared: shared.clone(),
        kind,
        selector,
        shape,
        after,
        changed,
        sender,
    };
    tokio::spawn(open.stream(lines, deadline));
    let mut response = Response::new(StreamBody::new(ReceiverStream::new(receiver)).boxed());
    super::as_json(&mut response);
    response
}

/// A watch being streamed.
struct OpenWatch {
    shared: Arc<Shared>,
    kind: Kind,
    selector: Selector,
    shape: Shape,
    /// The revision it has sent everything up to.
    after: u64,
    changed: watch::Receiver<()>,
    sender: mpsc::Sender<std::io::Result<Frame<Bytes>>>,
}

impl OpenWatch {
    /// Sends `lines`, then the changes as they happen, until the deadline,
    /// an outage, a history it fell behind, the client leaving or the
    /// emulator stopping.
    async fn stream(mut self, mut lines: Vec<u8>, deadline: tokio::time::Instant) {
        loop {
            // Marks the tick seen before reading, so no change slips by.
            self.changed.borrow_and_update();
            let step =
                self.shared
                    .cluster()
                    .watch_step(self.kind, &self.selector, self.shape, self.after);
            let end = match step {
                Step::More(more, reached) => {
                    lines.extend(more);
                    self.after = reached;
                    false
                }
                Step::End(last) => {
                    lines.extend(last);
                    true
                }
            };
            if !lines.is_empty() {
                let chunk = Frame::data(Bytes::from(std::mem::take(&mut lines)));
                if self.sender.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
            tokio::select! {
                () = self.shared.stop.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => return,
                () = self.sender.closed() => return,
                ticked = self.changed.changed() => if ticked.is_err() { return },
            }
        }
    }
}

/// A Kubernetes `Status` failure, answered.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_answer(code, &failure(code, reason, message))
}

/// A Kubernetes `Status` failure object.
fn failure(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

#[cfg(test)]
mod tests {
    use futures_util::{Stream, StreamExt};
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use kube::core::PartialObjectMeta;
    use kube::runtime::watcher;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::emulator::{Emulator, EmulatorConfig};

    /// A safety net for awaits that should finish at once.
    const PATIENCE: Duration = Duration::from_secs(10);

    async fn start() -> (Emulator, kube::Client) {
        let listen = "127.0.0.1:0".parse().expect("an address");
        let emulator = Emulator::start(listen, EmulatorConfig::default())
            .await
            .expect("the emulator starts");
        let kubeconfig = Kubeconfig::from_yaml(&emulator.kubeconfig()).expect("a kubeconfig");
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kube takes the kubeconfig");
        // kube retries a 503 for minutes by default; the outage tests want
        // to see the first one.
        config.default_retry = false;
        let client = kube::Client::try_from(config).expect("a client");
        (emulator, client)
    }

    fn pod(namespace: &str, name: &str, node: &str) -> FakePod {
        FakePod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: None,
            node: node.to_string(),
            service_account: "runner".to_string(),
        }
    }

    async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
        tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("the stream moves on")
    }

    /// What a new kube watcher reads first: `Init`, the listed objects
    /// (returned), `InitDone`.
    async fn initial_list<K, S>(events: &mut S) -> Vec<K>
    where
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
    {
        assert!(matches!(next(events).await, Some(Ok(watcher::Event::Init))));
        let mut listed = Vec::new();
        loop {
            match next(events).await {
                Some(Ok(watcher::Event::InitApply(object))) => listed.push(object),
                Some(Ok(watcher::Event::InitDone)) => return listed,
                _ => panic!("the initial list, then its end"),
            }
        }
    }

    /// The fake API's latest `resourceVersion`, from a list.
    async fn latest_version(pods: &Api<Pod>) -> String {
        let list = pods.list(&ListParams::default()).await.expect("a list");
        list.metadata.resource_version.expect("a resourceVersion")
    }

    /// Every pod's events after `version`.
    async fn watch_pods_from(
        pods: &Api<Pod>,
        version: &str,
    ) -> impl Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin + use<> {
        pods.watch(&WatchParams::default(), version)
            .await
            .expect("a watch")
            .boxed()
    }

    fn names(pods: &[Pod]) -> Vec<String> {
        let mut names: Vec<String> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        names.sort();
        names
    }

    fn api_code(error: kube::Error) -> u16 {
        match error {
            kube::Error::Api(status) => status.code,
            other => panic!("not an API error: {other}"),
        }
    }

    /// Sends one HTTP/1.1 request and reads the whole answer.
    async fn raw(emulator: &Emulator, method: &str, path: &str, extra: &str, body: &str) -> String {
        let mut stream = TcpStream::connect(emulator.addr()).await.expect("connects");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: emulator\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("sends");
        let mut answer = String::new();
        tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
            .await
            .expect("the answer ends")
            .expect("reads");
        answer
    }

    #[test]
    fn field_selectors_parse_as_kubernetes_does() {
        let selector = Selector::parse(
            Kind::Pod,
            "spec.nodeName=n1, metadata.namespace!=kube-system",
        )
        .expect("a valid selector");
        let object = |ns: &str, node: &str| json!({"metadata": {"namespace": ns}, "spec": {"nodeName": node}});
        assert!(selector.matches(&object("apps", "n1")));
        assert!(!selector.matches(&object("kube-system", "n1")));
        assert!(!selector.matches(&object("apps", "n2")));
        let unscheduled = Selector::parse(Kind::Pod, "spec.nodeName==").expect("valid");
        assert!(unscheduled.matches(&json!({"spec": {}})));
        assert!(
            Selector::parse(Kind::Pod, "")
                .expect("valid")
                .matches(&json!({}))
        );
        let unknown = Selector::parse(Kind::ServiceAccount, "spec.nodeName=n1");
        assert_eq!(
            unknown,
            Err("field label not supported for serviceaccounts: spec.nodeName".into())
        );
        assert!(Selector::parse(Kind::Pod, "spec.nodeName").is_err());
    }

    #[tokio::test]
    async fn lists_the_pods_of_one_node() {
        let (emulator, client) = start().await;
        emulator.add_pod(pod("a", "one", "node-1"));
        emulator.add_pod(pod("b", "two", "node-2"));
        emulator.add_pod(pod("b", "three", "node-1"));
        let pods: Api<Pod> = Api::all(client.clone());

        let list = pods
            .list(&ListParams::default().fields("spec.nodeName=node-1"))
            .await
            .expect("a list");
        assert_eq!(names(&list.items), ["one", "three"]);
        assert!(list.metadata.resource_version.is_some_and(|rv| rv == "4"));
        for pod in &list.items {
            assert!(pod.metadata.uid.as_ref().is_some_and(|uid| uid.len() == 36));
            assert!(pod.metadata.resource_version.is_some());
            let spec = pod.spec.as_ref().expect("a spec");
            assert_eq!(spec.node_name.as_deref(), Some("node-1"));
            assert_eq!(spec.service_account_name.as_deref(), Some("runner"));
        }

        let both = ListParams::default().fields("spec.nodeName=node-1,metadata.namespace=b");
        assert_eq!(
            names(&pods.list(&both).await.expect("a list").items),
            ["three"]
        );
        let in_b: Api<Pod> = Api::namespaced(client, "b");
        assert_eq!(
            names(
                &in_b
                    .list(&ListParams::default())
                    .await
                    .expect("a list")
                    .items
            ),
            ["three", "two"]
        );

        let unknown = ListParams::default().fields("spec.hostname=x");
        assert_eq!(
            api_code(pods.list(&unknown).await.expect_err("refused")),
            400
        );
        assert_eq!(emulator.stats().kubernetes_lists, 3);
    }

    #[tokio::test]
    async fn a_watcher_sees_a_pod_come_and_go() {
        let (emulator, client) = start().await;
        emulator.add_pod(pod("apps", "old", "node-1"));
        emulator.add_pod(pod("apps", "elsewhere", "node-2"));
        let config = watcher::Config::default().fields("spec.nodeName=node-1");
        let mut events = watcher(Api::<Pod>::all(client), config).boxed();

        let listed = initial_list(&mut events).await;
        assert_eq!(names(&listed), ["old"], "the existing pod first");

        emulator.add_pod(pod("apps", "other", "node-2"));
        emulator.add_pod(pod("apps", "new", "node-1"));
        let Some(Ok(watcher::Event::Apply(new))) = next(&mut events).await else {
            panic!("the new pod, not the other node's");
        };
        assert_eq!(new.metadata.name.as_deref(), Some("new"));

        assert!(emulator.delete_pod("apps", "new"));
        assert!(!emulator.delete_pod("apps", "new"));
        let Some(Ok(watcher::Event::Delete(gone))) = next(&mut events).await else {
            panic!("the deletion");
        };
        assert_eq!(gone.metadata.name.as_deref(), Some("new"));
        assert_eq!(gone.metadata.uid, new.metadata.uid);
        assert!(emulator.stats().kubernetes_watches >= 1);
    }

    #[tokio::test]
    async fn a_pod_moved_off_the_node_or_recreated_is_reported_as_kubernetes_does() {
        let (emulator, client) = start().await;
        let pods: Api<Pod> = Api::all(client);
        let rv = latest_version(&pods).await;
        let watch = WatchParams::default().fields("spec.nodeName=node-1");
        let mut events = pods.watch(&watch, &rv).await.expect("a watch").boxed();
        let mut first = pod("apps", "p", "node-1");
        first.uid = Some("uid-1".into());
        emulator.add_pod(first.clone());
        emulator.add_pod(first.clone()); // the same again: MODIFIED
        emulator.add_pod(FakePod {
            uid: Some("uid-2".into()),
            ..first.clone()
        });
        emulator.add_pod(FakePod {
            node: "node-2".into(),
            uid: None,
            ..first
        });
        let mut seen = Vec::new();
        while seen.len() < 5 {
            let event = next(&mut events)
                .await
                .expect("an event")
                .expect("no error");
            seen.push(match event {
                WatchEvent::Added(p) => format!("ADDED {}", p.metadata.uid.unwrap_or_default()),
                WatchEvent::Modified(p) => {
                    format!("MODIFIED {}", p.metadata.uid.unwrap_or_default())
                }
                WatchEvent::Deleted(p) => format!("DELETED {}", p.metadata.uid.unwrap_or_default()),
                other => panic!("unexpected {other:?}"),
            });
        }
        assert_eq!(
            seen,
            [
                "ADDED uid-1",
                "MODIFIED uid-1",
                "DELETED uid-1",
                "ADDED uid-2",
                "DELETED uid-2"
            ]
        );
    }

    #[tokio::test]
    async fn service_accounts_are_got_with_their_annotations() {
        let (emulator, client) = start().await;
        let annotations = BTreeMap::from([(
            "iam.gke.io/gcp-service-account".to_string(),
            "runner@p.iam.gserviceaccount.com".to_string(),
        )]);
        emulator.put_service_account("apps", "runner", annotations.clone());
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "apps");

        let runner = accounts
            .get_opt("runner")
            .await
            .expect("a get")
            .expect("found");
        assert_eq!(runner.metadata.annotations, Some(annotations));
        assert!(runner.metadata.uid.is_some());
        assert!(
            accounts
                .get_opt("missing")
                .await
                .expect("a 404 is no error")
                .is_none()
        );
        assert_eq!(emulator.stats().kubernetes_gets, 2);

        let all = Api::<ServiceAccount>::all(client);
        let mut events = watcher(all, watcher::Config::default()).boxed();
        assert_eq!(initial_list(&mut events).await.len(), 1);
        assert!(emulator.delete_service_account("apps", "runner"));
        let Some(Ok(watcher::Event::Delete(gone))) = next(&mut events).await else {
            panic!("the deletion");
        };
        assert_eq!(gone.metadata.name.as_deref(), Some("runner"));
        assert!(accounts.get_opt("runner").await.expect("a get").is_none());
    }

    /// What kube's watcher of `Api<PartialObjectMeta<_>>` reads: lists and
    /// watch events of `PartialObjectMetadata`, the object's metadata only.
    #[tokio::test]
    async fn service_accounts_are_listed_and_watched_as_metadata_when_asked() {
        let (emulator, client) = start().await;
        let annotation = |gsa: &str| {
            BTreeMap::from([(
                "iam.gke.io/gcp-service-account".to_string(),
                gsa.to_string(),
            )])
        };
        emulator.put_service_account("apps", "runner", annotation("a@p.iam.gserviceaccount.com"));
        let all = Api::<PartialObjectMeta<ServiceAccount>>::all(client);
        let mut events = watcher(all, watcher::Config::default()).boxed();

        let [listed] = &initial_list(&mut events).await[..] else {
            panic!("the listed account");
        };
        let types = listed.types.as_ref().expect("typed");
        assert_eq!(
            (types.api_version.as_str(), types.kind.as_str()),
            ("meta.k8s.io/v1", "PartialObjectMetadata")
        );
        assert_eq!(
            listed.metadata.annotations,
            Some(annotation("a@p.iam.gserviceaccount.com"))
        );
        emulator.put_service_account("apps", "runner", annotation("b@p.iam.gserviceaccount.com"));
        let Some(Ok(watcher::Event::Apply(changed))) = next(&mut events).await else {
            panic!("the change");
        };
        assert_eq!(changed.types, listed.types);
        assert_eq!(
            changed.metadata.annotations,
            Some(annotation("b@p.iam.gserviceaccount.com"))
        );

        let accept = "Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1\r\n";
        let authorization = format!("Authorization: Bearer {TOKEN}\r\n");
        let whole = raw(
            &emulator,
            "GET",
            "/api/v1/serviceaccounts",
            &authorization,
            "",
        )
        .await;
        let metadata = raw(
            &emulator,
            "GET",
            "/api/v1/serviceaccounts",
            &format!("{authorization}{accept}"),
            "",
        )
        .await;
        assert!(whole.contains(r#""kind":"ServiceAccountList""#), "{whole}");
        assert!(whole.contains(r#""kind":"ServiceAccount""#), "{whole}");
        assert!(
            metadata.contains(r#""kind":"PartialObjectMetadataList""#),
            "{metadata}"
        );
        assert!(
            !metadata.contains(r#""kind":"ServiceAccount"#),
            "{metadata}"
        );
    }

    #[tokio::test]
    async fn an_outage_fails_lists_and_ends_watches() {
        let (emulator, client) = start().await;
        let pods: Api<Pod> = Api::all(client);
        let mut watching = watcher(pods.clone(), watcher::Config::default()).boxed();
        assert!(initial_list(&mut watching).await.is_empty());
        let rv = latest_version(&pods).await;
        let mut events = watch_pods_from(&pods, &rv).await;
        emulator.add_pod(pod("apps", "p", "node-1"));
        assert!(matches!(
            next(&mut events).await,
            Some(Ok(WatchEvent::Added(_)))
        ));
        assert!(matches!(
            next(&mut watching).await,
            Some(Ok(watcher::Event::Apply(_)))
        ));

        emulator.set_kubernetes_outage(true);
        assert!(next(&mut events).await.is_none(), "the watch ends");
        // The watcher's watch ends too, and watching again fails.
        assert!(matches!(
            next(&mut watching).await,
            Some(Err(watcher::Error::WatchStartFailed(_)))
        ));
        assert_eq!(
            api_code(pods.list(&ListParams::default()).await.expect_err("down")),
            503
        );
        assert_eq!(
            emulator.stats().kubernetes_lists,
            2,
            "a refused list is not counted"
        );

        emulator.set_kubernetes_outage(false);
        assert_eq!(
            pods.list(&ListParams::default())
                .await
                .expect("back")
                .items
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn a_watch_from_a_forgotten_version_gets_410() {
        let (emulator, client) = start().await;
        for _ in 0..=MAX_HISTORY {
            emulator.add_pod(pod("apps", "busy", "node-1"));
        }
        let pods: Api<Pod> = Api::all(client);
        let mut events = watch_pods_from(&pods, "1").await;
        let Some(Ok(WatchEvent::Error(status))) = next(&mut events).await else {
            panic!("an ERROR event");
        };
        assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        assert!(next(&mut events).await.is_none(), "then the end");

        // The oldest version still remembered is fine.
        let mut events = watch_pods_from(&pods, "2").await;
        let Some(Ok(WatchEvent::Modified(busy))) = next(&mut events).await else {
            panic!("the change after 2");
        };
        assert_eq!(busy.metadata.resource_version.as_deref(), Some("3"));

        // On the wire: a chunked JSON stream of one line.
        let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
        let answer = raw(
            &emulator,
            "GET",
            "/api/v1/pods?watch=1&resourceVersion=1",
            &bearer,
            "",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        assert!(answer.contains("transfer-encoding: chunked"), "{answer}");
        assert!(
            answer.contains(r#"{"object":{"apiVersion":"v1","code":410,"#),
            "{answer}"
        );
        assert!(answer.contains(r#""type":"ERROR"}"#), "{answer}");
    }

    #[tokio::test]
    async fn the_bearer_token_is_required() {
        let (emulator, _client) = start().await;
        let missing = raw(&emulator, "GET", "/api/v1/pods", "", "").await;
        assert!(missing.starts_with("HTTP/1.1 401"), "{missing}");
        assert!(missing.contains(r#""reason":"Unauthorized""#), "{missing}");
        let wrong = raw(
            &emulator,
            "GET",
            "/api/v1/pods",
            "Authorization: Bearer nope\r\n",
            "",
        )
        .await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        assert_eq!(emulator.stats().kubernetes_lists, 0);
    }

    #[tokio::test]
    async fn the_control_api_changes_the_cluster() {
        let (emulator, client) = start().await;
        let put = raw(
            &emulator,
            "PUT",
            "/emulator/v1/kubernetes/pods",
            "",
            r#"{"namespace":"apps","name":"p","node":"node-1"}"#,
        )
        .await;
        assert!(put.starts_with("HTTP/1.1 200"), "{put}");
        let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
        let p = pods.get("p").await.expect("the pod");
        assert_eq!(
            p.spec.and_then(|s| s.service_account_name).as_deref(),
            Some("default")
        );

        let account = r#"{"namespace":"apps","name":"default","annotations":{"a":"b"}}"#;
        let put = raw(
            &emulator,
            "PUT",
            "/emulator/v1/kubernetes/serviceaccounts",
            "",
            account,
        )
        .await;
        assert!(put.starts_with("HTTP/1.1 200"), "{put}");
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "apps");
        assert!(accounts.get_opt("default").await.expect("a get").is_some());

        // Each call in turn, and the status it gets.
        for (method, path, body, status) in [
            ("PUT", "pods", r#"{"namespace":"","name":"p"}"#, 400),
            ("DELETE", "pods/apps/p", "", 200),
            ("DELETE", "pods/apps/p", "", 404),
            ("DELETE", "serviceaccounts/apps/default", "", 200),
            ("GET", "kubeconfig", "", 200),
            ("PUT", "outage", r#"{"down":true}"#, 200),
        ] {
            let path = format!("/emulator/v1/kubernetes/{path}");
            let answer = raw(&emulator, method, &path, "", body).await;
            let expected = format!("HTTP/1.1 {status}");
            assert!(answer.starts_with(&expected), "{method} {path}: {answer}");
        }
        assert_eq!(api_code(pods.get("p").await.expect_err("down")), 503);
    }
}
