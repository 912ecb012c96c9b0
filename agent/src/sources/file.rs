//! The local file source: one YAML stream holding an `AgentConfig` and Kubernetes-shaped
//! resources (Namespaces, Pods, Services, Nodes, and the mesh's own kinds).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use crate::{
    config::AgentConfig,
    resources::{
        AGENT_CONFIG_KIND, DocumentError, ResourceSet,
        kinds::{self, KindVisitor, WatchedKind},
    },
    state::{KindPrints, LastGood, StatePublisher},
};

/// What a config file holds.
#[derive(Debug, Default)]
pub struct LocalFile {
    pub agent: AgentConfig,
    pub resources: ResourceSet,
    /// Each kind's fingerprint (a hash of its documents' text), when read through a
    /// [`DocumentCache`]; unknown after a whole parse.
    pub prints: KindPrints,
}

/// Why the file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Document {
        path: PathBuf,
        source: DocumentError,
    },
    #[error("{path}: document {index} ({AGENT_CONFIG_KIND}): spec: {source}")]
    AgentConfig {
        path: PathBuf,
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("{path}: more than one {AGENT_CONFIG_KIND} document")]
    TwoAgentConfigs { path: PathBuf },
}

#[derive(Deserialize)]
struct AgentConfigDocument {
    #[serde(default)]
    spec: Option<serde_yaml::Value>,
}

/// How often the config file's size and modification time are checked for changes (a `stat`:
/// cheap; a change waits for the next check, so this bounds what a change's propagation adds).
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
/// Every this many checks (half a second) the file is read and hashed even if its size and
/// modification time stayed (a rewrite can keep both).
const FULL_CHECK_EVERY: u32 = 25;

/// Republishes the file's resources whenever the file changes (its agent settings stay as they
/// were at start: changing those needs a restart). A file that no longer parses is reported and
/// changes nothing. Dropping it stops watching; the last state stays.
#[derive(Debug)]
pub struct Watch {
    task: Option<tokio::task::JoinHandle<()>>,
    _publisher: Option<std::sync::Arc<crate::state::StatePublisher>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Watch {
    /// Watches `path` (when given), publishing through `publisher`.
    pub fn start(
        path: Option<PathBuf>,
        agent: AgentConfig,
        publisher: crate::state::StatePublisher,
        mut last_good: crate::state::LastGood,
    ) -> Self {
        let publisher = std::sync::Arc::new(publisher);
        let Some(path) = path else {
            return Self {
                task: None,
                _publisher: Some(publisher),
            };
        };
        let task = tokio::spawn({
            let publisher = publisher.clone();
            async move {
                // A fingerprint, not the bytes: a cluster's file is megabytes. The documents'
                // cache is filled from the same read, off the runtime's threads, and the state
                // built again through it, so that the next change rebuilds only what it touches
                // (the state published at start came from a whole parse; an equal state is not
                // published again).
                let warm = tokio::task::spawn_blocking({
                    let (path, agent, publisher) = (path.clone(), agent.clone(), publisher.clone());
                    let mut kept = std::mem::take(&mut last_good);
                    move || {
                        let mut cache = DocumentCache::default();
                        let bytes = std::fs::read(&path).ok();
                        let print = bytes.as_deref().map(fingerprint);
                        if let Some(bytes) = bytes
                            && let Ok(file) =
                                parse_cached(&String::from_utf8_lossy(&bytes), &path, &mut cache)
                        {
                            publish(file.resources, &file.prints, &agent, &publisher, &mut kept);
                        }
                        (print, cache, kept)
                    }
                })
                .await;
                let (mut last, mut cache) = match warm {
                    Ok((f, cache, kept)) => {
                        last_good = kept;
                        (f, cache)
                    }
                    Err(_) => (None, DocumentCache::default()),
                };
                let stat = |path: &Path| {
                    std::fs::metadata(path)
                        .ok()
                        .map(|m| (m.len(), m.modified().ok()))
                };
                let mut checks = Checks::new(stat(&path));
                loop {
                    tokio::time::sleep(WATCH_INTERVAL).await;
                    // A stat is cheap; reading and hashing a cluster's file is not.
                    if !checks.read_now(stat(&path)) {
                        continue;
                    }
                    let Ok(bytes) = std::fs::read(&path) else {
                        continue;
                    };
                    let now = fingerprint(&bytes);
                    if last == Some(now) {
                        continue;
                    }
                    last = Some(now);
                    // Parsing and building a cluster's worth of resources takes a second or
                    // more: off the runtime's threads, which keep proxying meanwhile.
                    let (agent, publisher, path) = (agent.clone(), publisher.clone(), path.clone());
                    let mut kept = std::mem::take(&mut last_good);
                    let mut docs = std::mem::take(&mut cache);
                    let rebuilt = tokio::task::spawn_blocking(move || {
                        let text = String::from_utf8_lossy(&bytes);
                        let settings = agent.mesh_settings();
                        // Only the kinds of the parts of the state that change are read.
                        let wanted = |prints: &KindPrints| kept.kinds_read(prints, &settings);
                        match parse_cached_kinds(&text, &path, &mut docs, wanted) {
                            Ok(file) => {
                                tracing::info!(path = %path.display(), "config file changed; republishing its resources");
                                publish(file.resources, &file.prints, &agent, &publisher, &mut kept);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "config file changed but does not parse; keeping the last state")
                            }
                        }
                        (kept, docs)
                    })
                    .await;
                    last_good = match rebuilt {
                        Ok((kept, docs)) => {
                            cache = docs;
                            kept
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "rebuilding from the config file failed; the next change rebuilds from scratch");
                            crate::state::LastGood::default()
                        }
                    };
                }
            }
        });
        Self {
            task: Some(task),
            _publisher: Some(publisher),
        }
    }
}

/// When the watcher reads the file: once its size and modification time, after changing, have
/// stayed the same for one check (a writer rewriting the file in place may not be done: a
/// truncated cluster file parses, and would be published), and every [`FULL_CHECK_EVERY`]
/// checks in any case.
#[derive(Debug)]
struct Checks<S> {
    last: S,
    settling: bool,
    count: u32,
}

impl<S: PartialEq> Checks<S> {
    fn new(stat: S) -> Self {
        Self {
            last: stat,
            settling: false,
            count: 0,
        }
    }

    /// Whether to read the file now, given its `stat`.
    fn read_now(&mut self, stat: S) -> bool {
        self.count += 1;
        if stat != self.last {
            self.last = stat;
            self.settling = true;
            return false;
        }
        if self.settling || self.count >= FULL_CHECK_EVERY {
            self.settling = false;
            self.count = 0;
            return true;
        }
        false
    }
}

/// Length and hash of a file's bytes, to notice a change without keeping them.
fn fingerprint(bytes: &[u8]) -> (usize, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    (bytes.len(), h.finish())
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<LocalFile, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text, path)
}

/// Parses a YAML stream; `path` only labels errors.
pub fn parse(text: &str, path: &Path) -> Result<LocalFile, FileError> {
    let mut file = LocalFile::default();
    let mut agent_seen = false;
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|source| FileError::Document {
            path: path.into(),
            source: DocumentError::Yaml { index, source },
        })?;
        if value.is_null() {
            continue; // an empty document between separators
        }
        if !crate::resources::is_agent_config(&value) {
            file.resources
                .add_document(index, value)
                .map_err(|source| FileError::Document {
                    path: path.into(),
                    source,
                })?;
            continue;
        }
        if agent_seen {
            return Err(FileError::TwoAgentConfigs { path: path.into() });
        }
        agent_seen = true;
        let doc: AgentConfigDocument =
            serde_yaml::from_value(value).map_err(|source| FileError::AgentConfig {
                path: path.into(),
                index,
                source,
            })?;
        let spec = doc
            .spec
            .unwrap_or(serde_yaml::Value::Mapping(Default::default()));
        file.agent = serde_yaml::from_value(spec).map_err(|source| FileError::AgentConfig {
            path: path.into(),
            index,
            source,
        })?;
    }
    Ok(file)
}

/// The documents of the file's last read, by a hash of their text, each as what it parsed to
/// (a resource kept as compact JSON), so that a rewrite changing one document parses only that
/// one. About the size of the file's JSON; the typed resources are not kept.
#[derive(Debug, Default)]
pub struct DocumentCache {
    docs: HashMap<u64, Parsed>,
}

/// What one document parsed to.
#[derive(Clone, Debug)]
enum Parsed {
    /// Nothing (an empty document, or only comments).
    Nothing,
    /// The agent's own configuration document (valid).
    AgentConfig,
    /// A resource of the kind with [`WatchedKind::INDEX`] `kind`.
    Resource { kind: usize, json: Arc<[u8]> },
}

/// As [`parse`], reusing `cache` for the documents whose text has not changed, and updating it.
/// The result is the same as [`parse`]'s: a stream this cannot split plainly (directives,
/// document end markers, content on a `---` line) and every error go through [`parse`].
pub fn parse_cached(
    text: &str,
    path: &Path,
    cache: &mut DocumentCache,
) -> Result<LocalFile, FileError> {
    parse_cached_kinds(text, path, cache, |_| [true; kinds::COUNT])
}

/// As [`parse_cached`], reading into the result only the kinds (by
/// [`WatchedKind::INDEX`]) for which `wanted` says so; the others' lists stay empty, and their
/// fingerprints tell whether they changed.
pub fn parse_cached_kinds(
    text: &str,
    path: &Path,
    cache: &mut DocumentCache,
    wanted: impl Fn(&KindPrints) -> [bool; kinds::COUNT],
) -> Result<LocalFile, FileError> {
    let Some(documents) = split_documents(text) else {
        return parse(text, path);
    };
    let mut next = HashMap::with_capacity(cache.docs.len());
    let mut order = Vec::with_capacity(documents.len());
    let mut agent_seen = false;
    // Each kind's fingerprint: a hash of its documents' hashes, in order.
    let mut hashers: Vec<std::collections::hash_map::DefaultHasher> =
        (0..kinds::COUNT).map(|_| Default::default()).collect();
    for doc in documents {
        use std::hash::{Hash, Hasher};
        let key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            doc.hash(&mut h);
            h.finish()
        };
        let parsed = match cache.docs.remove(&key).or_else(|| next.get(&key).cloned()) {
            Some(p) => p,
            None => match parse_one(doc, path) {
                Some(p) => p,
                None => return parse(text, path),
            },
        };
        match &parsed {
            Parsed::Nothing => {}
            Parsed::AgentConfig if agent_seen => return parse(text, path),
            Parsed::AgentConfig => agent_seen = true,
            Parsed::Resource { kind, .. } => {
                let Some(h) = hashers.get_mut(*kind) else {
                    return parse(text, path);
                };
                key.hash(h);
                order.push(parsed.clone());
            }
        }
        next.insert(key, parsed);
    }
    let mut prints = KindPrints::unknown();
    for (i, h) in hashers.iter().enumerate() {
        use std::hash::Hasher;
        prints.0[i] = Some(h.finish());
    }
    let wanted = wanted(&prints);
    let mut file = LocalFile {
        prints,
        ..LocalFile::default()
    };
    for parsed in &order {
        if let Parsed::Resource { kind, json } = parsed
            && wanted.get(*kind).copied().unwrap_or(true)
            && !push_json(&mut file.resources, *kind, json)
        {
            return parse(text, path);
        }
    }
    cache.docs = next;
    // The agent settings are read at start only (see `Watch`), so the cache does not keep them.
    Ok(file)
}

/// The documents of a YAML stream, split at `---` lines; `None` if the stream has directives,
/// document end markers or content on a `---` line, which [`parse`] reads instead.
fn split_documents(text: &str) -> Option<Vec<&str>> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare.starts_with('%') || bare.starts_with("...") {
            return None;
        }
        if bare.starts_with("---") {
            // Only YAML's white space (space, tab) may follow the marker here; `trim_end` would
            // also take characters YAML does not count as space (a vertical tab), which make
            // the line no separator to YAML.
            if bare.trim_end_matches([' ', '\t']) != "---" {
                return None;
            }
            docs.push(&text[start..at]);
            start = at + line.len();
        }
        at += line.len();
    }
    docs.push(&text[start..]);
    Some(docs)
}

/// Parses one document alone; `None` if it does not parse (the caller then reads the whole
/// stream for the error).
fn parse_one(doc: &str, path: &Path) -> Option<Parsed> {
    struct Find<'a> {
        set: &'a ResourceSet,
        found: Vec<(usize, Vec<u8>)>,
        unfaithful: bool,
    }
    impl KindVisitor for Find<'_> {
        fn visit<K: WatchedKind>(&mut self) {
            for o in K::list(self.set) {
                // Kept only if it reads back as it was (else the stream is parsed whole).
                let Ok(json) = serde_json::to_vec(o) else {
                    continue;
                };
                let back = serde_json::from_slice::<K>(&json);
                if back.is_ok_and(|b| format!("{b:?}") == format!("{o:?}")) {
                    self.found.push((K::INDEX, json));
                } else {
                    self.unfaithful = true;
                }
            }
        }
    }
    let file = parse(doc, path).ok()?;
    let mut find = Find {
        set: &file.resources,
        found: Vec::new(),
        unfaithful: false,
    };
    kinds::for_each_kind(&mut find);
    if find.unfaithful {
        return None;
    }
    match find.found.len() {
        0 => {
            let value: serde_yaml::Value = serde_yaml::from_str(doc).ok()?;
            if value.is_null() {
                Some(Parsed::Nothing)
            } else if crate::resources::is_agent_config(&value) {
                Some(Parsed::AgentConfig)
            } else {
                None
            }
        }
        1 => find.found.pop().map(|(kind, json)| Parsed::Resource {
            kind,
            json: json.into(),
        }),
        _ => None,
    }
}

/// Adds the resource of kind `kind` read from `json` to `set`; false if it does not read.
fn push_json(set: &mut ResourceSet, kind: usize, json: &[u8]) -> bool {
    struct Push<'a> {
        set: &'a mut ResourceSet,
        kind: usize,
        json: &'a [u8],
        done: bool,
    }
    impl KindVisitor for Push<'_> {
        fn visit<K: WatchedKind>(&mut self) {
            if K::INDEX != self.kind {
                return;
            }
            if let Ok(o) = serde_json::from_slice::<K>(self.json) {
                K::list_mut(self.set).push(o);
                self.done = true;
            }
        }
    }
    let mut push = Push {
        set,
        kind,
        json,
        done: false,
    };
    kinds::for_each_kind(&mut push);
    push.done
}

/// Builds and publishes the file's resources (falling back to the last valid version of a
/// resource an edit made invalid), logging what was rejected. `prints` are the kinds'
/// fingerprints ([`LocalFile::prints`]): the parts of the state they show unchanged are reused.
pub(crate) fn publish(
    resources: ResourceSet,
    prints: &KindPrints,
    agent: &AgentConfig,
    publisher: &StatePublisher,
    last_good: &mut LastGood,
) {
    let built = last_good.build_changed(resources, prints, &agent.mesh_settings());
    for r in &built.rejections {
        tracing::warn!(rejection = %r, "resource rejected");
    }
    publisher.publish_built(built.state, &built.rejections);
    crate::memory::release_freed();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_agent_config_and_resources() {
        let f = parse(
            "apiVersion: sluice.dev/v1alpha1\nkind: AgentConfig\nspec: {nodeName: n1, capture: {excludedPorts: [22]}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        assert_eq!(f.agent.node_name, "n1");
        assert_eq!(f.agent.capture.excluded_ports, vec![22]);
        assert_eq!(f.resources.namespaces.len(), 1);
    }

    /// Found by the `config_build` fuzz target: a `---` followed by a character that Rust counts
    /// as whitespace and YAML does not (a vertical tab) was a document separator to the cache
    /// and not to YAML, so the watcher accepted a file that a whole parse refuses.
    #[test]
    fn the_document_cache_splits_only_where_yaml_does() {
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        for text in [
            "---\x0b".to_owned(),
            format!("---\x0b\n{ns}"),
            format!("{ns}---\u{85}\n{ns}"),
            format!("{ns}--- \t\n{ns}"),
        ] {
            let path = Path::new("t.yaml");
            let whole = parse(&text, path);
            let cached = parse_cached(&text, path, &mut DocumentCache::default());
            match (whole, cached) {
                (Ok(w), Ok(c)) => assert_eq!(
                    format!("{:?}", c.resources),
                    format!("{:?}", w.resources),
                    "{text:?}"
                ),
                (Err(_), Err(_)) => {}
                (w, c) => panic!("{text:?}: whole {:?}, cached {:?}", w.is_ok(), c.is_ok()),
            }
        }
    }

    /// Kinds the seeds lack, with the fields the state reads.
    const KINDS: &str = r#"---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: u1, labels: {app: web}, annotations: {a: b}}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{name: app, ports: [{containerPort: 8080, name: http, protocol: TCP}]}]
status:
  phase: Running
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {zone: z}}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1], conditions: {ready: true}}]
ports: [{name: http, port: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ap, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [a], ipBlocks: [10.0.0.0/8]}}]
    to: [{operation: {ports: ["80"], methods: [GET]}}]
    when: [{key: destination.port, values: ["80"]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec: {hosts: [example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}
"#;

    /// Every seed document reads the same through the cache as through a whole parse, each
    /// is cached, and a rewrite reuses the cached documents and parses the changed one.
    #[test]
    fn the_document_cache_reads_what_a_whole_parse_reads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/seeds");
        let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                (path, text)
            })
            .collect();
        files.push((PathBuf::from("kinds.yaml"), KINDS.into()));
        let mut seen = 0;
        for (path, text) in files {
            let whole = parse(&text, &path).unwrap();
            let mut cache = DocumentCache::default();
            let cached = parse_cached(&text, &path, &mut cache).unwrap();
            assert_eq!(
                format!("{:?}", cached.resources),
                format!("{:?}", whole.resources),
                "{}",
                path.display()
            );
            let resources = cache
                .docs
                .values()
                .filter(|d| matches!(d, Parsed::Resource { .. }))
                .count();
            assert!(resources > 0, "{} is cached", path.display());
            seen += resources;
        }
        assert!(seen >= 10, "{seen} seed resources");
    }

    #[test]
    fn a_rewrite_parses_only_the_documents_that_changed() {
        let ns = |n: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n");
        let text = format!("---\n{}---\n{}", ns("a"), ns("b"));
        let mut cache = DocumentCache::default();
        let file = parse_cached(&text, Path::new("t.yaml"), &mut cache).unwrap();
        assert_eq!(file.resources.namespaces.len(), 2);
        // Mark the cached `a`: a reuse shows the mark, a fresh parse would not.
        for d in cache.docs.values_mut() {
            if let Parsed::Resource { json, .. } = d {
                let text = String::from_utf8(json.to_vec()).unwrap();
                if text.contains("\"a\"") {
                    *json = text.replace("\"a\"", "\"a-cached\"").into_bytes().into();
                }
            }
        }
        let text = format!("---\n{}---\n{}", ns("a"), ns("c"));
        let file = parse_cached(&text, Path::new("t.yaml"), &mut cache).unwrap();
        let names: Vec<_> = file
            .resources
            .namespaces
            .iter()
            .map(|n| n.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(names, ["a-cached", "c"]);
        // `b` is gone from the cache: `a`, `c` and the empty document before the first `---`.
        let resources = |c: &DocumentCache| {
            c.docs
                .values()
                .filter(|d| matches!(d, Parsed::Resource { .. }))
                .count()
        };
        assert_eq!((cache.docs.len(), resources(&cache)), (3, 2));

        // Errors are the whole parse's, with the document's index in the stream.
        let broken = format!("---\n{}---\napiVersion: v9\nkind: Thing\n", ns("a"));
        let err = parse_cached(&broken, Path::new("t.yaml"), &mut cache).unwrap_err();
        let whole = parse(&broken, Path::new("t.yaml")).unwrap_err();
        assert_eq!(err.to_string(), whole.to_string());
    }

    /// The watcher's path (the cache, only the kinds the changed parts read, the incremental
    /// build) publishes what a whole parse and build would, through every kind of rewrite.
    #[test]
    fn rewrites_through_the_cache_build_what_a_whole_parse_builds() {
        let settings = crate::state::MeshSettings::default();
        let pa = |mode: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                 metadata: {{name: default, namespace: shop}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
            )
        };
        let pod = |i: usize| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: shop, uid: p{i}}}\n\
                 spec: {{containers: []}}\nstatus: {{podIP: 10.0.9.{i}}}\n"
            )
        };
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
        let files = [
            vec![ns.to_owned(), pod(1), pa("STRICT"), KINDS.to_owned()],
            vec![
                ns.to_owned(),
                pod(1),
                pod(2),
                pa("STRICT"),
                KINDS.to_owned(),
            ],
            vec![ns.to_owned(), pod(1), pod(2), pa("STRCT"), KINDS.to_owned()],
            vec![ns.to_owned(), pod(2), pa("STRCT"), KINDS.to_owned()],
            vec![ns.to_owned(), pod(2), pa("DISABLE"), KINDS.to_owned()],
            vec![
                ns.to_owned(),
                pod(2),
                pod(3),
                pa("DISABLE"),
                KINDS.to_owned(),
            ],
            vec![ns.to_owned(), pod(3), KINDS.to_owned()],
        ];
        let (mut cache, mut incremental, mut whole) = (
            DocumentCache::default(),
            LastGood::default(),
            LastGood::default(),
        );
        let mut skipped = 0;
        for (i, docs) in files.iter().enumerate() {
            let text = format!("---\n{}", docs.join("---\n"));
            let path = Path::new("t.yaml");
            let settings_ = &settings;
            let file = parse_cached_kinds(&text, path, &mut cache, |p| {
                incremental.kinds_read(p, settings_)
            })
            .unwrap();
            skipped += usize::from(file.resources.authorization_policies.is_empty());
            let got = incremental.build_changed(file.resources, &file.prints, &settings);
            let want = whole.build(parse(&text, path).unwrap().resources, &settings);
            assert_eq!(got.state, want.state, "file {i}");
            assert_eq!(got.rejections, want.rejections, "file {i}");
        }
        // Pod changes left the policies (KINDS holds an AuthorizationPolicy) unread.
        assert_eq!(skipped, 2, "files 1 and 5 change pods alone");
    }

    /// The agent benchmark caught the watcher reading a file its writer had truncated and not
    /// yet refilled (and publishing the nearly empty state): a changed file is read only once
    /// its size and modification time have stayed for one check.
    #[test]
    fn a_changed_file_is_read_once_it_has_settled() {
        let mut checks = Checks::new((100, 1));
        assert!(!checks.read_now((100, 1)), "unchanged");
        assert!(!checks.read_now((0, 2)), "truncated: being written");
        assert!(!checks.read_now((900, 3)), "still growing");
        assert!(checks.read_now((900, 3)), "settled");
        assert!(!checks.read_now((900, 3)), "read already");
        // Unchanged, it is still read now and then (a rewrite can keep size and time).
        let reads = (0..FULL_CHECK_EVERY * 2)
            .filter(|_| checks.read_now((900, 3)))
            .count();
        assert_eq!(reads, 2);
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let err = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: sluice.dev/v1alpha1\nkind: AgentConfig\nspec: {nodeName: n1, cgroupRot: /x}\n",
            Path::new("t.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("document 1") && err.contains("cgroupRot"),
            "{err}"
        );
        let err = parse("apiVersion: v9\nkind: Thing\n", Path::new("t.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("v9 Thing"), "{err}");
    }
}
