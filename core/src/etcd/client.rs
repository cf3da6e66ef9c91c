//! The connection to the cluster: one lazily connected etcd client per endpoint, driven
//! by the plugin's etcd runtime, and one request loop that fails over across endpoints
//! within `etcd_timeout` and maps etcd's failures onto the contract's codes.
//!
//! Every write the stores make is a conditional transaction whose "else" branch reads the
//! key back, and every value carries the writer's token: retrying a write whose outcome is
//! unknown is therefore safe, since the retry either applies or shows the earlier write.

use super::runtime::EtcdRuntime;
use super::session::Session;
use super::EtcdSettings;
use crate::error::{Error, ErrorCode};
use crate::hex::hex;
use etcd_client::{
    Certificate, Client, Compare, ConnectOptions, Identity, KeyValue, TlsOptions, Txn, TxnOp,
    TxnOpResponse,
};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The client of the plugin: the runtime thread and the shared connection state.
pub struct EtcdClient {
    conn: Arc<Conn>,
    /// The sessions of this plugin instance, one per lease TTL (both stores use
    /// `idempotency_lease`: one in practice).
    sessions: parking_lot::Mutex<Vec<Arc<Session>>>,
    /// For tests: no session is renewed in the background (a stalled host).
    stalled: Arc<std::sync::atomic::AtomicBool>,
    // Declared last: dropped after `conn`'s last use by this handle.
    runtime: EtcdRuntime,
}

/// What a request running on the runtime needs; shared by the futures.
pub struct Conn {
    endpoints: Vec<String>,
    prefix: Vec<u8>,
    timeout: Duration,
    /// Holds the password: never printed (its `Debug` would show it).
    options: ConnectOptions,
    clients: Vec<tokio::sync::Mutex<Option<Client>>>,
    /// The endpoint requests go to; moves on when one fails.
    current: AtomicUsize,
    /// Attempts that failed transiently and moved to the next endpoint.
    failovers: AtomicU64,
    /// The queue of the writes combined into shared transactions (`super::batch`), started
    /// on first use.
    batches: std::sync::OnceLock<super::batch::Queue>,
    /// When (unix ms) the last "space quota exhausted" line was logged: one every 10 s is
    /// enough, however many calls a full cluster refuses.
    disk_full_logged_ms: AtomicU64,
}

/// Why one attempt failed.
enum Fault {
    /// Another attempt (on another endpoint) may succeed. `sent`: the request may have
    /// reached a server, so its outcome is unknown.
    Retry {
        reason: String,
        sent: bool,
    },
    Permanent(Error),
}

impl EtcdClient {
    /// Starts the runtime thread; connects nothing yet (init does not need the cluster).
    pub fn new(settings: &EtcdSettings) -> Result<Self, Error> {
        settings.validate()?;
        let mut options = ConnectOptions::new()
            .with_require_leader(true)
            .with_auto_token_refresh(true)
            .with_connect_timeout(settings.timeout);
        if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
            options = options.with_user(user.clone(), password.expose().to_string());
        }
        if settings.endpoints.iter().any(|e| e.starts_with("https://")) {
            options = options.with_tls(tls_options(settings)?);
        }
        let conn = Arc::new(Conn {
            endpoints: settings.endpoints.clone(),
            prefix: settings.prefix.as_bytes().to_vec(),
            timeout: settings.timeout,
            options,
            clients: settings
                .endpoints
                .iter()
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            // Hosts spread over the members instead of all starting on the first one.
            current: AtomicUsize::new(fastrand::usize(..settings.endpoints.len())),
            failovers: AtomicU64::new(0),
            disk_full_logged_ms: AtomicU64::new(0),
            batches: std::sync::OnceLock::new(),
        });
        Ok(EtcdClient {
            conn,
            sessions: parking_lot::Mutex::new(Vec::new()),
            stalled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            runtime: EtcdRuntime::start()?,
        })
    }

    /// Runs `work` on the runtime with the connection and waits for its result.
    pub fn run<T, F, Fut>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        self.runtime.run(work(self.conn.clone()))
    }

    /// Starts `work` in the background; the handle aborts it.
    pub fn spawn<F, Fut>(&self, work: F) -> tokio::task::AbortHandle
    where
        F: FnOnce(Arc<Conn>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(work(self.conn.clone()))
    }

    /// The session of lease `ttl` that every claim of this instance is bound to.
    pub fn session(&self, ttl: Duration) -> Arc<Session> {
        let mut sessions = self.sessions.lock();
        if let Some(session) = sessions.iter().find(|s| s.ttl() == ttl) {
            return session.clone();
        }
        let session = Session::new(ttl, self.stalled.clone());
        sessions.push(session.clone());
        session
    }

    /// For tests: a host whose process stalled (its sessions renewed by nobody in the
    /// background; calls still renew them), or that resumed.
    #[doc(hidden)]
    pub fn stall_sessions(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Relaxed);
    }

    /// Requests moved to another endpoint (or retried on the only one) since the start.
    pub fn failovers(&self) -> u64 {
        self.conn.failovers.load(Ordering::Relaxed)
    }

    /// The endpoint requests go to now (picked at random at the start, moved on failure).
    pub fn endpoint(&self) -> &str {
        &self.conn.endpoints[self.conn.current_index()]
    }
}

fn tls_options(settings: &EtcdSettings) -> Result<TlsOptions, Error> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::InvalidArgument(format!("`{key}`: cannot read {}: {e}", path.display()))
        })
    };
    let Some(ca) = &settings.ca_file else {
        return Err(Error::InvalidArgument(
            "https:// etcd endpoints need `etcd_ca_file`, the CA that signed the cluster's certificates".to_string(),
        ));
    };
    let mut tls =
        TlsOptions::new().ca_certificate(Certificate::from_pem(read("etcd_ca_file", ca)?));
    if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
        tls = tls.identity(Identity::from_pem(
            read("etcd_cert_file", cert)?,
            read("etcd_key_file", key)?,
        ));
    }
    Ok(tls)
}

impl Conn {
    /// `<prefix><space>/<hex of each part, '/'-separated>`: raw names never escape the prefix.
    pub fn key(&self, space: &str, parts: &[&[u8]]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(space.as_bytes());
        for part in parts {
            key.push(b'/');
            key.extend_from_slice(hex(part).as_bytes());
        }
        key
    }

    /// `<prefix><space>/<part in unpadded base64url>`: 4/3 of the part (hex takes 2x), for
    /// the keys stored by the million. The alphabet has no '/': a raw name never escapes
    /// the prefix or the space.
    pub fn key64(&self, space: &str, part: &[u8]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(space.as_bytes());
        key.push(b'/');
        base64url(part, &mut key);
        key
    }

    /// The index of the endpoint requests go to now.
    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.endpoints.len()
    }

    /// One logical request: `call` is tried on the current endpoint and, while it fails
    /// with a transient fault, on the next ones, until `etcd_timeout` has passed. `what`
    /// names the request in messages.
    pub async fn request<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let deadline = started + self.timeout;
        // Short enough that a stalled member leaves time for another one.
        let per_attempt = (self.timeout / 4).max(Duration::from_millis(200));
        let mut backoff = Duration::from_millis(20);
        let mut sent_any = false;
        loop {
            let index = self.current_index();
            let budget = per_attempt.min(deadline.saturating_duration_since(Instant::now()));
            let attempt = async {
                let client = self.client(index).await?;
                call(client).await
            };
            let fault = match tokio::time::timeout(budget, attempt).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => classify(&error),
                Err(_) => Fault::Retry {
                    reason: format!("no answer within {budget:?}"),
                    sent: true,
                },
            };
            let (reason, sent) = match fault {
                Fault::Permanent(failure) => {
                    if failure.kind() == ErrorCode::DiskFull && self.disk_full_log_due() {
                        tracing::error!(request = what, reason = %failure, "etcd space quota exhausted (alarm NOSPACE): writes fail closed with DISK_FULL until an operator compacts (etcdctl compact <revision> --physical), defragments every member (etcdctl defrag --cluster) and disarms the alarm (etcdctl alarm disarm)");
                    }
                    return Err(failure);
                }
                Fault::Retry { reason, sent } => (reason, sent),
            };
            sent_any |= sent;
            self.failovers.fetch_add(1, Ordering::Relaxed);
            crate::metrics::store().failovers.inc();
            let next = (index + 1) % self.endpoints.len();
            let _ =
                self.current
                    .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
            if Instant::now() + backoff >= deadline {
                let code = if sent_any {
                    ErrorCode::ConnectionLost
                } else {
                    ErrorCode::Network
                };
                tracing::warn!(request = what, reason = %reason, "etcd request failed on every endpoint within etcd_timeout");
                return Err(Error::etcd(
                    code,
                    format!(
                        "etcd request to {what} failed within etcd_timeout ({:?}) on {:?}: {reason}",
                        self.timeout, self.endpoints
                    ),
                ));
            }
            if self.endpoints.len() > 1 {
                tracing::info!(
                    request = what,
                    from = %self.endpoints[index],
                    to = %self.endpoints[next],
                    reason = %reason,
                    "etcd failover"
                );
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(250));
        }
    }

    fn disk_full_log_due(&self) -> bool {
        let now = crate::clock::unix_ms_now();
        let last = self.disk_full_logged_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 10_000
            && self
                .disk_full_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    async fn client(&self, index: usize) -> Result<Client, etcd_client::Error> {
        let mut slot = self.clients[index].lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = Client::connect([&self.endpoints[index]], Some(self.options.clone())).await?;
        *slot = Some(client.clone());
        Ok(client)
    }
}

/// Appends `bytes` in base64url (RFC 4648 §5) without padding.
fn base64url(bytes: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]);
        }
    }
}

/// What a conditional transaction found: its compare held and its writes applied (at
/// `revision`, the cluster's revision after the transaction: the `mod_revision` of every
/// key it wrote), or the key as it is (the "else" branch reads it), or a lease of its
/// writes is gone.
pub enum TxnOutcome {
    Applied { revision: i64 },
    Found(Option<KeyValue>),
    LeaseGone,
}

impl Conn {
    /// Runs `when` then `then` on `key`; otherwise reads `key`.
    pub async fn txn_or_get(
        &self,
        what: &str,
        key: &[u8],
        when: Compare,
        then: Vec<TxnOp>,
    ) -> Result<TxnOutcome, Error> {
        let txn = Txn::new()
            .when([when])
            .and_then(then)
            .or_else([TxnOp::get(key.to_vec(), None)]);
        self.request(what, |mut client| {
            let txn = txn.clone();
            async move {
                match client.txn(txn).await {
                    Ok(response) if response.succeeded() => Ok(TxnOutcome::Applied {
                        revision: response.header().map_or(0, |h| h.revision()),
                    }),
                    Ok(response) => Ok(TxnOutcome::Found(
                        response.op_responses().into_iter().find_map(|op| match op {
                            TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
                            _ => None,
                        }),
                    )),
                    Err(error) if is_lease_not_found(&error) => Ok(TxnOutcome::LeaseGone),
                    Err(error) => Err(error),
                }
            }
        })
        .await
    }

    /// Puts `put` on `key` if its `mod_revision` is `expected` (0: absent), in one
    /// transaction with the other writes queued meanwhile (`super::batch`); otherwise reads
    /// it. `None`: not applied because of another write of its batch (try it alone).
    pub async fn write_batched(
        self: &Arc<Self>,
        key: &[u8],
        expected: i64,
        put: TxnOp,
    ) -> Result<Option<TxnOutcome>, Error> {
        let queue = self.batches.get_or_init(|| super::batch::start(self));
        let (reply, answer) = tokio::sync::oneshot::channel();
        let write = super::batch::Write {
            key: key.to_vec(),
            expected,
            put,
            reply,
            queued: std::time::Instant::now(),
        };
        if queue.send(write).is_err() {
            return Ok(None);
        }
        answer.await.unwrap_or(Ok(None))
    }

    /// The key as it is now (a linearizable read).
    pub async fn get(&self, what: &str, key: &[u8]) -> Result<Option<KeyValue>, Error> {
        self.request(what, |mut client| {
            let key = key.to_vec();
            async move {
                let mut response = client.get(key, None).await?;
                Ok(response.take_kvs().into_iter().next())
            }
        })
        .await
    }

    /// A new lease of `ttl` (whole seconds, at least 1); its ID.
    pub async fn grant(&self, what: &str, ttl: Duration) -> Result<i64, Error> {
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = seconds.clamp(1, i64::MAX as u64) as i64;
        self.request(what, |mut client| async move {
            Ok(client.lease_grant(seconds, None).await?.id())
        })
        .await
    }

    /// Ends a lease and deletes its keys; a lease already gone is fine.
    pub async fn revoke(&self, what: &str, lease: i64) -> Result<(), Error> {
        self.request(what, |mut client| async move {
            match client.lease_revoke(lease).await {
                Ok(_) => Ok(()),
                Err(error) if is_lease_not_found(&error) => Ok(()),
                Err(error) => Err(error),
            }
        })
        .await
    }

    /// Renews a lease for its whole TTL; `false` if it is gone.
    pub async fn keep_alive(&self, what: &str, lease: i64) -> Result<bool, Error> {
        self.request(what, |mut client| async move {
            match client.lease_keep_alive(lease).await {
                Ok(_) => Ok(true),
                Err(error) if is_lease_not_found(&error) => Ok(false),
                Err(error) => Err(error),
            }
        })
        .await
    }

    /// Renews a lease for its whole TTL and keeps the stream open for the next renewals
    /// (see [`KeepAlive`]); `None` if the lease is gone.
    pub async fn open_keep_alive(
        &self,
        what: &str,
        lease: i64,
    ) -> Result<Option<KeepAlive>, Error> {
        self.request(what, |mut client| async move {
            match client.lease_keep_alive(lease).await {
                Ok((keeper, stream)) => Ok(Some(KeepAlive {
                    lease,
                    keeper,
                    stream,
                    clean: true,
                })),
                Err(error) if is_lease_not_found(&error) => Ok(None),
                Err(error) => Err(error),
            }
        })
        .await
    }

    /// How long one attempt of a request may take before another endpoint is tried.
    pub fn attempt_budget(&self) -> Duration {
        (self.timeout / 4).max(Duration::from_millis(200))
    }

    /// Seconds a lease has left; `None` if it is gone.
    pub async fn time_to_live(&self, what: &str, lease: i64) -> Result<Option<u64>, Error> {
        self.request(what, |mut client| async move {
            match client.lease_time_to_live(lease, None).await {
                Ok(response) if response.ttl() > 0 => Ok(Some(response.ttl() as u64)),
                Ok(_) => Ok(None),
                Err(error) if is_lease_not_found(&error) => Ok(None),
                Err(error) => Err(error),
            }
        })
        .await
    }
}

/// An open keep-alive stream of one lease: a renewal is one message each way on it, not a
/// new stream per renewal.
pub struct KeepAlive {
    pub lease: i64,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
    /// No renewal left unanswered on it (one cut off midway would answer the next one).
    clean: bool,
}

impl KeepAlive {
    /// One renewal on the open stream: `Some(alive)` when answered, `None` when the stream
    /// failed or did not answer within `budget` (open another one).
    pub async fn renew(&mut self, budget: Duration) -> Option<bool> {
        if !self.clean {
            return None;
        }
        self.clean = false;
        let exchange = async {
            self.keeper.keep_alive().await.ok()?;
            let response = self.stream.message().await.ok()??;
            Some(response.ttl() > 0)
        };
        let answer = tokio::time::timeout(budget, exchange).await.ok().flatten();
        self.clean = answer.is_some();
        answer
    }
}

/// Whether `error` says that a lease does not exist (expired, revoked).
pub fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    }
}

fn classify(error: &etcd_client::Error) -> Fault {
    use etcd_client::Error as E;
    use tonic::Code;
    let retry = |reason: String, sent: bool| Fault::Retry { reason, sent };
    match error {
        E::GRpcStatus(status) => {
            let message = status.message();
            if message.contains("database space exceeded") {
                // etcd keeps every revision until compacted; past its space quota it raises
                // the NOSPACE alarm and refuses every write until an operator clears it.
                return Fault::Permanent(Error::etcd(
                    ErrorCode::DiskFull,
                    format!("the etcd cluster refused the write: its space quota (--quota-backend-bytes) is exhausted and its NOSPACE alarm is raised (etcd: {message}). An operator must, in this order: compact the history up to the current revision and wait for it to be applied (etcdctl compact <revision> --physical, the revision from etcdctl endpoint status -w json; without --physical the defragmentation can run before the compaction is applied, and the alarm comes straight back), defragment every member (etcdctl defrag --cluster), then clear the alarm (etcdctl alarm disarm); or raise the quota (--quota-backend-bytes)"),
                ));
            }
            if message.contains("authentication failed") {
                return Fault::Permanent(Error::etcd(
                    ErrorCode::PermissionDenied,
                    format!("etcd refused the credentials of `etcd_user` (etcd: {message})"),
                ));
            }
            match status.code() {
                Code::PermissionDenied => Fault::Permanent(Error::etcd(
                    ErrorCode::PermissionDenied,
                    format!("etcd refused access under the configured prefix (etcd: {message}); grant the user's role read-write on `etcd_prefix`"),
                )),
                Code::Unauthenticated if !message.contains("invalid auth token") => {
                    Fault::Permanent(Error::etcd(
                        ErrorCode::PermissionDenied,
                        format!("etcd requires authentication (etcd: {message}); set `etcd_user` and `etcd_password`"),
                    ))
                }
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::NotFound
                | Code::AlreadyExists | Code::Unimplemented => Fault::Permanent(Error::etcd(
                    ErrorCode::Unknown,
                    format!("etcd rejected the request: {message}"),
                )),
                // Unavailable, DeadlineExceeded, Aborted, ResourceExhausted (too many
                // requests), Internal, Unknown, Cancelled: no leader, a leader change, a
                // member going away, or a dropped connection.
                _ => {
                    let sent = message.contains("etcdserver") || !looks_unreachable(message);
                    retry(format!("{:?}: {message}", status.code()), sent)
                }
            }
        }
        E::TransportError(e) => retry(format!("transport error: {}", chain(e)), false),
        E::IoError(e) => retry(format!("I/O error: {e}"), true),
        E::LeaseKeepAliveError(message) | E::WatchError(message) => {
            retry(format!("lease keep-alive: {message}"), true)
        }
        E::InvalidArgs(message) | E::EndpointError(message) => {
            Fault::Permanent(Error::InvalidArgument(format!("etcd client: {message}")))
        }
        E::InvalidUri(e) => {
            Fault::Permanent(Error::InvalidArgument(format!("`etcd_endpoints`: {e}")))
        }
        other => Fault::Permanent(Error::etcd(
            ErrorCode::Unknown,
            format!("etcd client: {other}"),
        )),
    }
}

fn looks_unreachable(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    ["connect", "refused", "dns", "unreachable", "transport"]
        .iter()
        .any(|m| message.contains(m))
}

/// An error with its sources: tonic's transport errors say little at the top.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        base64url(bytes, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn base64url_is_rfc_4648_without_padding() {
        // RFC 4648 §10's vectors, unpadded.
        for (raw, encoded) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64(raw.as_bytes()), encoded);
        }
        // The URL-safe alphabet: 62 and 63 are '-' and '_', never '+' or '/'.
        assert_eq!(b64(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn a_hostile_name_stays_one_part_under_the_prefix() {
        let settings = crate::config::EtcdSettings {
            endpoints: vec!["http://127.0.0.1:1".into()],
            ..Default::default()
        };
        let client = EtcdClient::new(&settings).unwrap();
        let key = client.conn.key64("i", b"../../\x00\xff/x\n");
        let rest = key.strip_prefix(b"/taosx/backup/i/".as_slice()).unwrap();
        assert!(
            rest.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'),
            "{}",
            String::from_utf8_lossy(&key)
        );
        assert_eq!(rest.len(), 15, "11 bytes take 15 characters");
    }
}
