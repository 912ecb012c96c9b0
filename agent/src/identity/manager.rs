//! [`SecretManager`]: one certificate per identity, issued on first need, cached, renewed in the
//! background at half-life.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{ClientConfig, ServerConfig};
use tokio::{
    sync::{Mutex, Notify, OnceCell, watch},
    task::JoinHandle,
};

use super::{
    CaSource, CarriedCert, CertHandle, CertInfo, IdentityError, SignRequest, WorkloadCert,
    cert::{certificate_request, generate_key},
    tls,
};
use crate::{config::KeyExchange, state::Identity};

/// First delay before asking the CA again after a failed renewal; doubles up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Renewals never follow each other closer than this, even if a CA hands out certificates
/// that are already half spent.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);
/// Client configurations cached per source identity at most (one per destination identity
/// set); the cache starts over beyond this.
const MAX_CLIENT_CONFIGS: usize = 1024;

/// Issues, caches and renews workload certificates, and builds the HBONE TLS configurations
/// around them. Cheap to clone; background renewals stop when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct SecretManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ca: Arc<dyn CaSource>,
    ttl: Duration,
    key_exchange: KeyExchange,
    slots: Mutex<HashMap<Identity, Arc<Slot>>>,
}

/// One identity's certificate, once issued.
#[derive(Debug, Default)]
struct Slot {
    issued: OnceCell<Issued>,
}

#[derive(Debug)]
struct Issued {
    shared: Shared,
    _renewer: AbortOnDrop,
}

/// What callers of an issued slot use.
#[derive(Clone, Debug)]
struct Shared {
    sender: Arc<watch::Sender<Arc<WorkloadCert>>>,
    handle: CertHandle,
    server_config: Arc<ServerConfig>,
    /// HBONE client configurations by accepted server identities (they follow rotations by
    /// themselves, like `server_config`); dropped with the slot when the identity is forgotten.
    client_configs: Arc<std::sync::Mutex<HashMap<Vec<Identity>, Arc<ClientConfig>>>>,
    /// Wakes the renewer after a forced rotation, so it re-plans from the new certificate.
    replanned: Arc<Notify>,
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SecretManager {
    /// A manager asking `ca` for certificates that live `ttl`.
    pub fn new(ca: Arc<dyn CaSource>, ttl: Duration) -> Self {
        Self::with_key_exchange(ca, ttl, KeyExchange::Default)
    }

    /// [`SecretManager::new`] whose TLS configurations use the key exchange `policy`
    /// (`spec.tls.keyExchange`).
    pub fn with_key_exchange(ca: Arc<dyn CaSource>, ttl: Duration, policy: KeyExchange) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                ttl,
                key_exchange: policy,
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The key exchange policy of the configurations this manager hands out.
    pub fn key_exchange(&self) -> KeyExchange {
        self.inner.key_exchange
    }

    /// The live certificate of `identity`, issued now if this is its first need. Concurrent
    /// first callers share one issuance; a failed issuance is retried by the next caller.
    pub async fn fetch(&self, identity: &Identity) -> Result<CertHandle, IdentityError> {
        Ok(self.issued(identity).await?.handle.clone())
    }

    /// The HBONE server configuration presenting `identity`'s certificate (cached per
    /// identity; it follows rotations by itself).
    pub async fn server_config(
        &self,
        identity: &Identity,
    ) -> Result<Arc<ServerConfig>, IdentityError> {
        Ok(self.issued(identity).await?.server_config.clone())
    }

    /// An HBONE client configuration presenting `source`'s certificate and accepting only a
    /// server proving one of `expected`.
    pub async fn client_config(
        &self,
        source: &Identity,
        expected: Vec<Identity>,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let shared = self.issued(source).await?;
        let lock = || {
            shared
                .client_configs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(config) = lock().get(&expected) {
            return Ok(config.clone());
        }
        let config = Arc::new(tls::client_config_with(
            shared.handle.clone(),
            expected.clone(),
            self.inner.key_exchange,
        )?);
        let mut cache = lock();
        if cache.len() >= MAX_CLIENT_CONFIGS {
            cache.clear();
        }
        cache.insert(expected, config.clone());
        Ok(config)
    }

    /// Replaces `identity`'s certificate now (issuing it first if needed) and returns the new
    /// one. New handshakes use it; established connections are untouched.
    pub async fn rotate(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let issued = self.issued(identity).await?;
        let cert = Arc::new(issue(&*self.inner.ca, identity, self.inner.ttl).await?);
        issued.sender.send_replace(cert.clone());
        issued.replanned.notify_one();
        Ok(cert)
    }

    /// Stops renewing `identity`'s certificate and drops it from the cache (its pods are gone).
    /// Handles already given out keep the last certificate.
    pub async fn forget(&self, identity: &Identity) {
        self.inner.slots.lock().await.remove(identity);
    }

    /// Subject, serial and validity of every certificate held, by identity (no keys).
    pub async fn certificates(&self) -> Vec<CertInfo> {
        let slots: Vec<Arc<Slot>> = self.inner.slots.lock().await.values().cloned().collect();
        let mut infos: Vec<CertInfo> = slots
            .iter()
            .filter_map(|slot| slot.issued.get())
            .map(|issued| issued.shared.handle.current().info().clone())
            .collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    /// `identity`'s slot, made empty if it has none.
    async fn slot(&self, identity: &Identity) -> Arc<Slot> {
        self.inner
            .slots
            .lock()
            .await
            .entry(identity.clone())
            .or_default()
            .clone()
    }

    async fn issued(&self, identity: &Identity) -> Result<Shared, IdentityError> {
        let slot = self.slot(identity).await;
        // The map lock is not held while the CA works.
        let issued = slot
            .issued
            .get_or_try_init(|| self.first_issue(identity))
            .await?;
        Ok(issued.shared.clone())
    }

    async fn first_issue(&self, identity: &Identity) -> Result<Issued, IdentityError> {
        let cert = issue(&*self.inner.ca, identity, self.inner.ttl).await?;
        tracing::info!(
            target: "sluice::identity",
            identity = %identity,
            not_after = %cert.info().not_after,
            "issued workload certificate"
        );
        self.serve(identity, cert)
    }

    /// Makes `cert` the live certificate of `identity` and starts renewing it.
    fn serve(&self, identity: &Identity, cert: WorkloadCert) -> Result<Issued, IdentityError> {
        let (sender, receiver) = watch::channel(Arc::new(cert));
        let sender = Arc::new(sender);
        let handle = CertHandle::from_receiver(receiver);
        let server_config = Arc::new(tls::server_config_with(
            handle.clone(),
            self.inner.key_exchange,
        )?);
        let replanned = Arc::new(Notify::new());
        let renewer = tokio::spawn(renew(
            self.inner.ca.clone(),
            identity.clone(),
            self.inner.ttl,
            sender.clone(),
            replanned.clone(),
        ));
        Ok(Issued {
            shared: Shared {
                sender,
                handle,
                server_config,
                client_configs: Arc::default(),
                replanned,
            },
            _renewer: AbortOnDrop(renewer),
        })
    }

    /// Every certificate held, with its key, for a successor agent (see [`Self::adopt`]).
    /// Blocks on the manager's lock: call it off the runtime (the handover thread does).
    pub fn carry_blocking(&self) -> Vec<CarriedCert> {
        let slots: Vec<Arc<Slot>> = self.inner.slots.blocking_lock().values().cloned().collect();
        slots
            .iter()
            .filter_map(|slot| slot.issued.get())
            .map(|issued| CarriedCert::from_cert(&issued.shared.handle.current()))
            .collect()
    }

    /// Serves certificates a previous agent carried over, instead of issuing new ones, and
    /// renews them on the plan they had. A certificate is left out (and its identity issued
    /// anew on first need) when it does not unpack, expires within a minute, is not under one
    /// of the CA's [trust anchors](CaSource::trust_anchors) when it names any, or its identity
    /// is already held here.
    pub async fn adopt(&self, carried: Vec<CarriedCert>) -> Adopted {
        let anchors = self.inner.ca.trust_anchors();
        let mut report = Adopted::default();
        for one in carried {
            let name = one.identity.clone();
            match self.adopt_one(one, &anchors).await {
                Ok(()) => report.adopted += 1,
                Err(reason) => report.left_out.push((name, reason)),
            }
        }
        report
    }

    async fn adopt_one(
        &self,
        carried: CarriedCert,
        anchors: &[rustls_pki_types::CertificateDer<'static>],
    ) -> Result<(), String> {
        let cert = carried.into_cert().map_err(|e| e.to_string())?;
        if cert.info().seconds_to_expiry(SystemTime::now()) < ADOPT_MIN_LIFETIME_SECS {
            return Err("expires within a minute".into());
        }
        if !anchors.is_empty() && !cert.chain().roots().iter().any(|r| anchors.contains(r)) {
            return Err("not under this agent's mesh root".into());
        }
        let identity = cert.identity().clone();
        let slot = self.slot(&identity).await;
        let issued = self.serve(&identity, cert).map_err(|e| e.to_string())?;
        slot.issued
            .set(issued)
            .map_err(|_| "already held".to_owned())
    }
}

/// What [`SecretManager::adopt`] did.
#[derive(Debug, Default)]
pub struct Adopted {
    /// Certificates now served.
    pub adopted: usize,
    /// Identities left out, with why.
    pub left_out: Vec<(String, String)>,
}

/// A carried certificate closer to expiry than this is issued anew instead.
const ADOPT_MIN_LIFETIME_SECS: i64 = 60;

/// A fresh key, a request for it, the CA's signature.
async fn issue(
    ca: &dyn CaSource,
    identity: &Identity,
    ttl: Duration,
) -> Result<WorkloadCert, IdentityError> {
    let key = generate_key(identity)?;
    let csr = certificate_request(identity, &key)?;
    let chain = ca.sign(SignRequest { identity, csr, ttl }).await?;
    WorkloadCert::new(identity.clone(), chain, &key)
}

/// Renews `identity`'s certificate at half-life, forever; retries a failing CA with backoff
/// while the old certificate stays in use.
async fn renew(
    ca: Arc<dyn CaSource>,
    identity: Identity,
    ttl: Duration,
    sender: Arc<watch::Sender<Arc<WorkloadCert>>>,
    replanned: Arc<Notify>,
) {
    loop {
        let wait = sender
            .borrow()
            .refresh_in(SystemTime::now())
            .max(MIN_RENEWAL_INTERVAL);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = replanned.notified() => continue,
        }
        let mut backoff = RETRY_MIN;
        loop {
            match issue(&*ca, &identity, ttl).await {
                Ok(cert) => {
                    tracing::info!(
                        target: "sluice::identity",
                        identity = %identity,
                        not_after = %cert.info().not_after,
                        "renewed workload certificate"
                    );
                    sender.send_replace(Arc::new(cert));
                    break;
                }
                Err(error) => {
                    let expired = sender.borrow().info().seconds_to_expiry(SystemTime::now()) <= 0;
                    tracing::warn!(
                        target: "sluice::identity",
                        identity = %identity,
                        %error,
                        expired,
                        retry_in = ?backoff,
                        "renewing workload certificate failed"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use futures::future::BoxFuture;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::{BuiltinCa, CaError, CertChain, peer_identity};

    const TD: &str = "cluster.local";

    /// The built-in CA, counting its signatures and failing on demand.
    #[derive(Debug)]
    struct Counting {
        ca: BuiltinCa,
        signed: AtomicUsize,
        down: AtomicBool,
    }

    impl Counting {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                ca: BuiltinCa::generate(TD).unwrap(),
                signed: AtomicUsize::new(0),
                down: AtomicBool::new(false),
            })
        }
    }

    impl CaSource for Counting {
        fn trust_anchors(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
            self.ca.trust_anchors()
        }

        fn sign<'a>(
            &'a self,
            request: SignRequest<'a>,
        ) -> BoxFuture<'a, Result<CertChain, CaError>> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err(CaError::Unavailable("down for the test".into()));
                }
                self.signed.fetch_add(1, Ordering::SeqCst);
                // Let concurrent callers interleave.
                tokio::task::yield_now().await;
                self.ca.sign_now(&request)
            })
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new(TD, "shop", sa)
    }

    #[tokio::test]
    async fn issues_once_per_identity_and_caches() {
        let ca = Counting::new();
        let m = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let (web, db) = (id("web"), id("db"));
        let (h1, h2, h3) = tokio::join!(m.fetch(&web), m.fetch(&web), m.fetch(&db));
        let (h1, h2, h3) = (h1.unwrap(), h2.unwrap(), h3.unwrap());
        assert_eq!(ca.signed.load(Ordering::SeqCst), 2);
        assert_eq!(h1.current().info(), h2.current().info());
        assert_eq!(h1.current().identity(), &web);
        assert_eq!(h3.current().identity(), &db);
        assert_ne!(h1.current().info().serial, h3.current().info().serial);
        m.fetch(&web).await.unwrap();
        assert_eq!(ca.signed.load(Ordering::SeqCst), 2);

        let infos = m.certificates().await;
        let names: Vec<&str> = infos.iter().map(|i| i.identity.as_str()).collect();
        assert_eq!(
            names,
            [
                "spiffe://cluster.local/ns/shop/sa/db",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
        let lifetime = infos[0].not_after - infos[0].not_before;
        // One hour plus the clock-skew allowance before now.
        assert!(
            lifetime >= time::Duration::hours(1) && lifetime <= time::Duration::minutes(66),
            "{lifetime}"
        );
        let dump = serde_json::to_string(&infos).unwrap();
        assert!(!dump.to_lowercase().contains("private"), "{dump}");
    }

    #[tokio::test]
    async fn failed_first_issue_is_retried_by_the_next_caller() {
        let ca = Counting::new();
        let m = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        ca.down.store(true, Ordering::SeqCst);
        assert!(matches!(
            m.fetch(&id("web")).await,
            Err(IdentityError::Ca(CaError::Unavailable(_)))
        ));
        ca.down.store(false, Ordering::SeqCst);
        assert!(m.fetch(&id("web")).await.is_ok());
    }

    #[tokio::test]
    async fn foreign_trust_domain_is_not_signed() {
        let m = SecretManager::new(Counting::new(), Duration::from_secs(3600));
        let err = m
            .fetch(&Identity::new("other.td", "shop", "web"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, IdentityError::Ca(CaError::ForeignTrustDomain { .. })),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_and_retries_a_failing_ca() {
        let ca = Counting::new();
        let m = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let mut handle = m.fetch(&id("web")).await.unwrap();
        let first = handle.current();

        // Not before half-life (30 minutes)...
        let early = tokio::time::timeout(Duration::from_secs(29 * 60), handle.changed()).await;
        assert!(early.is_err(), "renewed before half-life");
        // ...but by then.
        let second = tokio::time::timeout(Duration::from_secs(2 * 60), handle.changed())
            .await
            .expect("not renewed at half-life")
            .unwrap();
        assert_ne!(second.info().serial, first.info().serial);
        assert_eq!(ca.signed.load(Ordering::SeqCst), 2);

        // The CA goes down at the next half-life: the certificate in force stays, and the
        // renewer keeps trying until the CA is back.
        ca.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(35 * 60)).await;
        assert_eq!(handle.current().info().serial, second.info().serial);
        ca.down.store(false, Ordering::SeqCst);
        let third = tokio::time::timeout(Duration::from_secs(2 * 60), handle.changed())
            .await
            .expect("not renewed once the CA came back")
            .unwrap();
        assert_ne!(third.info().serial, second.info().serial);
    }

    #[tokio::test]
    async fn client_configs_are_cached_per_destination_set_until_forgotten() {
        let m = SecretManager::new(Counting::new(), Duration::from_secs(3600));
        let (web, db, cache) = (id("web"), id("db"), id("cache"));
        let a = m.client_config(&web, vec![db.clone()]).await.unwrap();
        let b = m.client_config(&web, vec![db.clone()]).await.unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "same source and destination: one config"
        );
        let c = m.client_config(&web, vec![cache.clone()]).await.unwrap();
        assert!(
            !Arc::ptr_eq(&a, &c),
            "another destination identity: another config"
        );
        let d = m.client_config(&db, vec![db.clone()]).await.unwrap();
        assert!(!Arc::ptr_eq(&a, &d), "another source: another config");
        m.forget(&web).await;
        let e = m.client_config(&web, vec![db.clone()]).await.unwrap();
        assert!(!Arc::ptr_eq(&a, &e), "a forgotten source starts over");
    }

    #[tokio::test(start_paused = true)]
    async fn forgotten_identities_are_not_renewed() {
        let ca = Counting::new();
        let m = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let mut handle = m.fetch(&id("web")).await.unwrap();
        m.forget(&id("web")).await;
        assert!(handle.changed().await.is_none(), "renewer still alive");
        assert_eq!(ca.signed.load(Ordering::SeqCst), 1);
        assert!(m.certificates().await.is_empty());
    }

    async fn exchange(
        stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
        peer: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
    ) {
        stream.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[tokio::test]
    async fn rotation_keeps_established_connections_and_serves_new_handshakes() {
        let m = SecretManager::new(Counting::new(), Duration::from_secs(3600));
        let (web, db) = (id("web"), id("db"));
        let acceptor = TlsAcceptor::from(m.server_config(&db).await.unwrap());
        let connector = TlsConnector::from(m.client_config(&web, vec![db.clone()]).await.unwrap());
        let name = || ServerName::try_from("10.0.1.2").unwrap();
        let connect = || async {
            let (s, c) = tokio::io::duplex(16 * 1024);
            let (s, c) = tokio::join!(acceptor.accept(s), connector.connect(name(), c));
            (s.unwrap(), c.unwrap())
        };
        let leaf = |certs: Option<&[rustls_pki_types::CertificateDer<'static>]>| {
            certs.and_then(|c| c.first()).cloned().unwrap()
        };

        let (mut s1, mut c1) = connect().await;
        let old_db = m.fetch(&db).await.unwrap().current();
        let old_web = m.fetch(&web).await.unwrap().current();
        assert_eq!(&leaf(c1.get_ref().1.peer_certificates()), old_db.leaf());

        let new_db = m.rotate(&db).await.unwrap();
        let new_web = m.rotate(&web).await.unwrap();
        assert_ne!(new_db.leaf(), old_db.leaf());

        // The old connection goes on, both ways.
        exchange(&mut c1, &mut s1).await;
        exchange(&mut s1, &mut c1).await;

        // A new one sees the new certificates on both sides.
        let (mut s2, mut c2) = connect().await;
        assert_eq!(&leaf(c2.get_ref().1.peer_certificates()), new_db.leaf());
        assert_eq!(&leaf(s2.get_ref().1.peer_certificates()), new_web.leaf());
        assert_ne!(new_web.leaf(), old_web.leaf());
        assert_eq!(peer_identity(s2.get_ref().1), Some(web));
        exchange(&mut c2, &mut s2).await;
        assert_eq!(m.certificates().await.len(), 2);
    }

    #[tokio::test]
    async fn carried_certificates_are_served_without_asking_the_ca() {
        let old_ca = Counting::new();
        let old = SecretManager::new(old_ca.clone(), Duration::from_secs(3600));
        let (cart, pay) = (id("cart"), id("pay"));
        let served = old.fetch(&cart).await.unwrap().current();
        old.fetch(&pay).await.unwrap();
        let carried = tokio::task::spawn_blocking(move || old.carry_blocking())
            .await
            .unwrap();
        assert_eq!(carried.len(), 2);
        // The successor's CA signs under the same root.
        let (root, key) = old_ca.ca.root_pem_pair();
        let new_ca = Arc::new(Counting {
            ca: BuiltinCa::from_pem(&root, &key, TD, "the old agent's root").unwrap(),
            signed: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        });
        let new = SecretManager::new(new_ca.clone(), Duration::from_secs(3600));
        let report = new.adopt(carried.clone()).await;
        assert_eq!(
            (report.adopted, report.left_out.len()),
            (2, 0),
            "{report:?}"
        );
        let now_served = new.fetch(&cart).await.unwrap().current();
        assert_eq!(now_served.info().serial, served.info().serial);
        // Renewed on the old agent's plan (received-at travels in whole seconds).
        let drift = served
            .refresh_at()
            .duration_since(now_served.refresh_at())
            .unwrap_or_else(|e| e.duration());
        assert!(drift < Duration::from_secs(1), "{drift:?}");
        assert_eq!(new_ca.signed.load(Ordering::SeqCst), 0, "the CA was asked");
        // A successor under another root leaves them out and issues anew.
        let other = SecretManager::new(Counting::new(), Duration::from_secs(3600));
        let report = other.adopt(carried).await;
        assert_eq!(report.adopted, 0);
        assert!(
            report
                .left_out
                .iter()
                .all(|(_, why)| why.contains("mesh root")),
            "{report:?}"
        );
    }
}
