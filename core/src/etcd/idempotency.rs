//! Idempotency keys (C_API §8) on etcd (§9).
//!
//! A key lives at `<prefix>k/<escaped key>` ([`escape_key`]: its bytes of
//! `[A-Za-z0-9._/-]` as they are, the others as `%XX`). A claim is one transaction, compared
//! on the key's revision, that puts a claim record (the call's [`ClaimId`] and fingerprint)
//! bound to the lease of the plugin instance's session (`super::session`: one lease per
//! host, not per claim). The claim's fencing token is the revision of that put
//! (docs/C_API.md §8.1): etcd's revision is cluster-wide and only grows, so every later
//! claim of the key, through any member and from any host, has a greater one; keep-alives
//! do not change it, and read back it is the key's `mod_revision`. Claims of different keys
//! sent together share one transaction (`super::batch`) and so its revision: tokens only
//! grow per key, and this store and the lease keeper hold a claim by its key and token. The
//! value holds the call's identity rather than the token (the revision is not known before
//! the put): a retry of the same call whose earlier answer was lost finds its own claim and
//! acquires it with that claim's token.
//!
//! The session is kept alive by the runtime while the process lives, so a dead or stalled
//! host's claims vanish when its session lapses. The lease keeper's renewals of a claim are
//! keep-alives of the session (one for all the claims due, shared with concurrent callers),
//! answered Ok only once etcd acknowledged one sent no earlier than the call. An acquired
//! claim is vouched for by the session's last acknowledged keep-alive if that was sent at
//! most the session's keep-alive interval (a sixth of the lease) before the call, else by
//! one sent alongside its transaction; the keeper's view (docs/C_API.md §8.1) counts from
//! that keep-alive's sending ([`IdempotencyStore::vouched_ago`]), so it never outlasts the
//! session.
//! Completion is compared on the key's `mod_revision` being the claim's token (still our
//! claim) or on the key being free or expired, and puts a completion record (token,
//! fingerprint, result, expiry) bound to a shared lease of `idempotency_ttl` plus a little:
//! etcd deletes completions soon after they expire, so its space stays bounded by the live
//! keys. Release is one compare-and-delete on the token. A new key that completes costs at
//! most two raft writes, its claim and its completion, and less when concurrent callers'
//! claims and completions share transactions (0.27 per key with 8 threads).
//!
//! Records are compact binary: the keys live by the million, and etcd's space is the
//! cluster's quota. A claim takes 25 bytes (layout byte, claim id, the first 16 bytes of the
//! fingerprint, enough to tell two payloads of one key apart); a completion 21 in the common
//! case (layout byte and flags, those 16 bytes, the expiry in whole seconds rounded up; its
//! token only when it is not the key's `create_revision`, its result only when not 0). With
//! the etcd key (49 bytes for a 33-byte block id) a completed key costs about 144 B of DB
//! after compaction and defragmentation (198 B with the earlier layout; benches/README.md).
//! The first byte names the layout; the records of earlier builds are still read: the
//! fixed-size `c`/`d` (49 and 53 bytes, whole fingerprints) and the `C`/`D` before them,
//! whose token field held a lease ID (such a claim is never ours; its token is its
//! `mod_revision` all the same). Those builds kept keys at `<prefix>i/<base64url key>`:
//! while that space holds any ([`Legacy`]), a claim compares the key's name there in the
//! same transaction (a live record there answers as it would here; an expired completion
//! there is deleted by the claim), and reads and `forget` look there too.

use super::client::{is_lease_not_found, Conn, TxnOutcome};
use super::session::Session;
use super::EtcdClient;
use crate::error::{Error, ErrorCode, Result};
use crate::idempotency::{
    decide, display_key, Claim, ClaimId, ClaimToken, Completion, Fingerprint, Forgotten,
    IdempotencyStore, KeyRecord, KeyState, Lapsed, KEPT_FINGERPRINT,
};
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rounds of "the key changed under us, look again" before giving up; each round is a
/// real change of the key by another caller.
const MAX_ROUNDS: usize = 32;

pub struct EtcdIdempotencyStore {
    etcd: Arc<EtcdClient>,
    /// The instance's session: every claim of this handle is bound to its lease.
    session: Arc<Session>,
    lease: Duration,
    ttl: Duration,
    completions: Arc<Completions>,
    calls: Arc<Mutex<Calls>>,
    legacy: Arc<Legacy>,
}

/// The completion lease of this handle, and one grant of it at a time (concurrent first
/// completions share one).
#[derive(Default)]
struct Completions {
    current: Mutex<Option<CompletionLease>>,
    granting: tokio::sync::Mutex<()>,
}

/// The lease completions are bound to, shared while it outlives a completion's TTL.
#[derive(Clone, Copy)]
struct CompletionLease {
    id: i64,
    /// A completion recorded up to this instant (unix ms) still expires before the lease.
    usable_until_ms: u64,
}

/// What this handle knows of its claims (no etcd lease of their own: they are bound to the
/// session).
#[derive(Default)]
struct Calls {
    /// The calls still claiming (an attempt may have written unacknowledged), by the
    /// call's identity, with their key and when their last attempt failed (`None`: one is
    /// under way): what `abandon` and housekeeping look for.
    claiming: HashMap<ClaimId, (Vec<u8>, Option<Instant>)>,
    /// The acquired claims, by key and token (claims of different keys made in one
    /// transaction share its revision): the session lease they are bound to, and when they
    /// were last renewed (or acquired).
    held: HashMap<(Vec<u8>, ClaimToken), Held>,
}

struct Held {
    lease: i64,
    renewed: Instant,
    /// The claim's put created the key (its `create_revision` is the token): its
    /// completion need not carry the token.
    created: bool,
}

/// Claims to delete: (key, token) held but not renewed, (key, call) of calls that gave up.
type Stale = (Vec<(Vec<u8>, ClaimToken)>, Vec<(Vec<u8>, ClaimId)>);

impl Calls {
    /// What nobody has kept for `lease`: held claims not renewed (their owner's completion
    /// and release both failed), calls whose last attempt failed and were neither retried
    /// nor successfully abandoned. The session outlives them; their keys must not stay
    /// IN_PROGRESS while it does.
    fn stale(&self, lease: Duration) -> Stale {
        let old = |since: &Instant| since.elapsed() > lease;
        let orphans = self
            .held
            .iter()
            .filter(|(_, held)| old(&held.renewed))
            .map(|(claim, _)| claim.clone())
            .collect();
        let gave_up = self
            .claiming
            .iter()
            .filter(|(_, (_, failed))| failed.as_ref().is_some_and(old))
            .map(|(id, (key, _))| (key.clone(), *id))
            .collect();
        (orphans, gave_up)
    }
}

impl EtcdIdempotencyStore {
    /// `lease`: `idempotency_lease` (the session's TTL); `ttl`: `idempotency_ttl`.
    pub fn new(etcd: Arc<EtcdClient>, lease: Duration, ttl: Duration) -> Self {
        EtcdIdempotencyStore {
            session: etcd.session(lease),
            etcd,
            lease,
            ttl,
            completions: Arc::new(Completions::default()),
            calls: Arc::new(Mutex::new(Calls::default())),
            legacy: Arc::new(Legacy::default()),
        }
    }

    /// For tests: this host stalls (nothing renews its session in the background, so its
    /// claims lapse with it unless renewed by calls) or resumes. Its client's other stores
    /// stall with it.
    #[doc(hidden)]
    pub fn stall_session(&self, stalled: bool) {
        self.etcd.stall_sessions(stalled);
    }
}

/// A stored record as read back: for a claim, the call that wrote it (`None`: written by
/// an earlier build, never ours) and its token, the key's `mod_revision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    owner: Option<ClaimId>,
    record: KeyRecord,
}

/// Where this layout's keys live: `<prefix>k/<escaped key>` ([`escape_key`]).
const SPACE: &str = "k";
/// Where the builds before it kept them: `<prefix>i/<base64url key>`, read while it holds
/// keys ([`Legacy`]), never written.
const OLD_SPACE: &str = "i";

/// The etcd name of the key `raw`.
fn etcd_key(conn: &Conn, raw: &[u8]) -> Vec<u8> {
    let mut key = conn.key(SPACE, &[]);
    key.push(b'/');
    escape_key(raw, &mut key);
    key
}

/// Its name in the space of earlier builds.
fn old_etcd_key(conn: &Conn, raw: &[u8]) -> Vec<u8> {
    conn.key64(OLD_SPACE, raw)
}

/// The ranges `keys list` reads (docs/C_API.md §11), each as its first key and its end:
/// this layout's space (names by [`escape_key`]), then that of earlier builds (base64url).
pub fn key_spaces(conn: &Conn) -> [(Vec<u8>, Vec<u8>); 2] {
    let range = |start: Vec<u8>| {
        // The start ends in '/', and '0' follows it.
        let mut end = start.clone();
        *end.last_mut().expect("a non-empty prefix") += 1;
        (start, end)
    };
    [range(etcd_key(conn, b"")), range(old_etcd_key(conn, b""))]
}

/// Whether the byte stands for itself in an etcd name ([`escape_key`]).
fn kept_in_name(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-' | b'/')
}

/// Appends `raw` as it is named in etcd: the bytes of `[A-Za-z0-9._/-]` as they are, every
/// other byte (`%` too) as `%XX` (upper-case hex). One name per key and one key per name
/// (a kept byte is never escaped), so a taosX block id costs its own length; the name is
/// one part under `<prefix>k/` whatever the key holds (an etcd key is flat: a `/` or
/// `..` in it is just a byte).
pub fn escape_key(raw: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in raw {
        if kept_in_name(byte) {
            out.push(byte);
        } else {
            out.extend_from_slice(&[
                b'%',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 15)],
            ]);
        }
    }
}

/// The key that [`escape_key`] named `name`; `None` if it names none.
pub fn unescape_key(name: &[u8]) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut raw = Vec::with_capacity(name.len());
    let mut rest = name;
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let (hi, lo) = (digit(*tail.first()?)?, digit(*tail.get(1)?)?);
            let escaped = hi << 4 | lo;
            if kept_in_name(escaped) {
                return None;
            }
            raw.push(escaped);
            rest = &tail[2..];
        } else if kept_in_name(byte) {
            raw.push(byte);
            rest = tail;
        } else {
            return None;
        }
    }
    Some(raw)
}

/// A record's first byte: its kind and the layout's version.
/// This layout's claim: the byte, the call's claim id (8 bytes, big-endian), the
/// fingerprint as kept (16 bytes). No lease-until: a claim lives as long as its lease.
const CLAIMED_COMPACT: u8 = 0xC1;
const CLAIM_COMPACT_LEN: usize = 1 + 8 + KEPT_FINGERPRINT;
/// This layout's completion: the byte (with the flags below), the token (a varint, unless
/// it is the key's `create_revision`: the claim's put created the key), the fingerprint as
/// kept (16 bytes), the result (a zigzag varint, unless 0), the expiry (a varint: seconds
/// since [`EXPIRY_EPOCH_MS`], rounded up; unix ms if earlier).
const COMPLETED_COMPACT: u8 = 0xD0;
const TOKEN_GIVEN: u8 = 1;
const RESULT_GIVEN: u8 = 2;
const EXPIRY_IN_MS: u8 = 4;
const COMPLETION_FLAGS: u8 = TOKEN_GIVEN | RESULT_GIVEN | EXPIRY_IN_MS;
/// 2025-01-01T00:00:00Z: expiries until 2033 take 4 bytes.
const EXPIRY_EPOCH_MS: u64 = 1_735_689_600_000;
/// The fixed layout before it (`c`/`d`): kind, claim id (claim) or token (completion),
/// fingerprint, then lease-until (claim) or result and expiry (completion); integers
/// big-endian.
const CLAIMED: u8 = b'c';
const COMPLETED: u8 = b'd';
/// The layout of earlier builds still: the same fields, the token field holding the
/// claim's lease ID (not a fencing token).
const CLAIMED_BY_LEASE: u8 = b'C';
const COMPLETED_BY_LEASE: u8 = b'D';
const CLAIM_LEN: usize = 1 + 8 + 32 + 8;
const COMPLETION_LEN: usize = 1 + 8 + 32 + 4 + 8;

fn put_varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The varint at `*at`, which moves past it.
fn varint(value: &[u8], at: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *value.get(*at)?;
        *at += 1;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return None;
        }
        n |= bits << shift;
        if byte & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

fn zigzag(n: i32) -> u64 {
    u64::from(((n << 1) ^ (n >> 31)) as u32)
}

fn unzigzag(z: u64) -> Option<i32> {
    let z = u32::try_from(z).ok()?;
    Some((z >> 1) as i32 ^ -((z & 1) as i32))
}

/// The value of a claim by the call `id`.
fn encode_claim(id: ClaimId, fingerprint: &Fingerprint) -> Vec<u8> {
    let mut value = Vec::with_capacity(CLAIM_COMPACT_LEN);
    value.push(CLAIMED_COMPACT);
    value.extend_from_slice(&id.0.to_be_bytes());
    value.extend_from_slice(&fingerprint[..KEPT_FINGERPRINT]);
    value
}

/// The value of a completion by the claim `token` (its revision); `created`: the key's
/// `create_revision` is the token (the claim created the key, and the completion is put
/// over it), so the token is not written.
fn encode_completion(
    token: ClaimToken,
    fingerprint: &Fingerprint,
    result: i32,
    expires_at_ms: u64,
    created: bool,
) -> Vec<u8> {
    let mut flags = 0;
    let mut value = vec![0];
    if !created {
        flags |= TOKEN_GIVEN;
        put_varint(token.0, &mut value);
    }
    value.extend_from_slice(&fingerprint[..KEPT_FINGERPRINT]);
    if result != 0 {
        flags |= RESULT_GIVEN;
        put_varint(zigzag(result), &mut value);
    }
    match expires_at_ms.checked_sub(EXPIRY_EPOCH_MS) {
        Some(since) => put_varint(since.div_ceil(1000), &mut value),
        None => {
            flags |= EXPIRY_IN_MS;
            put_varint(expires_at_ms, &mut value);
        }
    }
    value[0] = COMPLETED_COMPACT | flags;
    value
}

/// The record a key-value of `<prefix>k/` or `<prefix>i/` holds, as a range read returns it
/// (for the operator's command line, docs/C_API.md §11). A claim's `lease_until_ms` is as
/// stored (this layout stores none: `u64::MAX`): what is left of it is its etcd lease's
/// time to live. A fingerprint of this layout is kept in part
/// ([`crate::idempotency::kept_fingerprint`]).
pub fn record_of(kv: &KeyValue) -> Result<KeyRecord> {
    decode(kv).map(|stored| stored.record)
}

fn decode(kv: &KeyValue) -> Result<Stored> {
    decode_value(
        kv.key(),
        kv.value(),
        kv.mod_revision(),
        kv.create_revision(),
    )
}

/// `mod_revision`: the key's, the token of the claim it holds; `create_revision`: the
/// key's, the token of a completion that does not carry it.
fn decode_value(
    key: &[u8],
    value: &[u8],
    mod_revision: i64,
    create_revision: i64,
) -> Result<Stored> {
    let revision = |r: i64| u64::try_from(r).ok().filter(|&r| r > 0).map(ClaimToken);
    let compact = || -> Option<Stored> {
        let first = *value.first()?;
        if first == CLAIMED_COMPACT && value.len() == CLAIM_COMPACT_LEN {
            let id = u64::from_be_bytes(value[1..9].try_into().ok()?);
            let fingerprint = kept(&value[9..])?;
            return Some(Stored {
                owner: Some(ClaimId(id)),
                record: KeyRecord {
                    fingerprint,
                    state: KeyState::Claimed {
                        token: revision(mod_revision)?,
                        lease_until_ms: u64::MAX,
                    },
                },
            });
        }
        if first & !COMPLETION_FLAGS != COMPLETED_COMPACT {
            return None;
        }
        let mut at = 1;
        let token = if first & TOKEN_GIVEN != 0 {
            ClaimToken(varint(value, &mut at)?)
        } else {
            revision(create_revision)?
        };
        let fingerprint = kept(value.get(at..at + KEPT_FINGERPRINT)?)?;
        at += KEPT_FINGERPRINT;
        let result = if first & RESULT_GIVEN != 0 {
            unzigzag(varint(value, &mut at)?)?
        } else {
            0
        };
        let expiry = varint(value, &mut at)?;
        let expires_at_ms = if first & EXPIRY_IN_MS != 0 {
            expiry
        } else {
            EXPIRY_EPOCH_MS.saturating_add(expiry.saturating_mul(1000))
        };
        (at == value.len()).then_some(Stored {
            owner: None,
            record: KeyRecord {
                fingerprint,
                state: KeyState::Completed {
                    token,
                    result,
                    expires_at_ms,
                },
            },
        })
    };
    let fixed = || -> Option<Stored> {
        let u64_at = |at: usize| Some(u64::from_be_bytes(value.get(at..at + 8)?.try_into().ok()?));
        let field = u64_at(1)?;
        let fingerprint: Fingerprint = value.get(9..41)?.try_into().ok()?;
        let claim_token = ClaimToken(u64::try_from(mod_revision).ok()?);
        let (owner, state) = match (value.first()?, value.len()) {
            (&(CLAIMED | CLAIMED_BY_LEASE), CLAIM_LEN) => (
                // A lease ID in the field: an identity that is never a call's.
                (value[0] == CLAIMED).then_some(ClaimId(field)),
                KeyState::Claimed {
                    token: claim_token,
                    lease_until_ms: u64_at(41)?,
                },
            ),
            (&(COMPLETED | COMPLETED_BY_LEASE), COMPLETION_LEN) => (
                None,
                KeyState::Completed {
                    // A lease ID is no fencing token: 0, "kept no token".
                    token: ClaimToken(if value[0] == COMPLETED { field } else { 0 }),
                    result: i32::from_be_bytes(value.get(41..45)?.try_into().ok()?),
                    expires_at_ms: u64_at(45)?,
                },
            ),
            _ => return None,
        };
        Some(Stored {
            owner,
            record: KeyRecord { fingerprint, state },
        })
    };
    compact().or_else(fixed).ok_or_else(|| {
        Error::Corruption(format!(
            "etcd key {} does not hold an idempotency record",
            String::from_utf8_lossy(key)
        ))
    })
}

/// A fingerprint as kept (16 bytes) in a record's value.
fn kept(bytes: &[u8]) -> Option<Fingerprint> {
    let mut fingerprint = [0; 32];
    fingerprint[..KEPT_FINGERPRINT].copy_from_slice(bytes.get(..KEPT_FINGERPRINT)?);
    Some(fingerprint)
}

/// Whether `<prefix>i/`, the space of the builds before this layout, still holds keys: a
/// key completed there still replays, conflicts or is in progress, and none is claimed
/// here while it is live there. Asked once per store handle with a count-only range, and
/// again every [`LEGACY_RECHECK`] while it holds any (its completions expire within
/// `idempotency_ttl`, its claims with their lease); once empty, never again (this build
/// never writes there, and the builds that did are not run beside it: docs/OPERATIONS.md).
#[derive(Default)]
struct Legacy {
    seen: Mutex<Seen>,
}

#[derive(Default, Clone, Copy)]
enum Seen {
    #[default]
    Unknown,
    Holds(Instant),
    Empty,
}

const LEGACY_RECHECK: Duration = Duration::from_secs(60);

impl Legacy {
    async fn in_use(&self, conn: &Conn) -> Result<bool> {
        match *self.seen.lock() {
            Seen::Empty => return Ok(false),
            Seen::Holds(asked) if asked.elapsed() < LEGACY_RECHECK => return Ok(true),
            _ => {}
        }
        let asked = Instant::now();
        let [_, (start, end)] = key_spaces(conn);
        let count = conn
            .request(
                "look for idempotency keys of earlier builds",
                |mut client| {
                    let (start, end) = (start.clone(), end.clone());
                    async move {
                        let options = GetOptions::new().with_range(end).with_count_only();
                        Ok(client.get(start, Some(options)).await?.count())
                    }
                },
            )
            .await?;
        *self.seen.lock() = if count == 0 {
            Seen::Empty
        } else {
            Seen::Holds(asked)
        };
        Ok(count > 0)
    }

    /// The key's name in the old space, if it is read.
    async fn name(&self, conn: &Conn, raw: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.in_use(conn).await?.then(|| old_etcd_key(conn, raw)))
    }
}

/// The record as the decision table of C_API §8 must see it: etcd keeps a claim only while
/// its lease lives, so a claim found is live whatever lease-until its value says (the
/// value is not rewritten by renewals).
fn as_found(stored: &Stored) -> KeyRecord {
    let mut record = stored.record;
    if let KeyState::Claimed { lease_until_ms, .. } = &mut record.state {
        *lease_until_ms = u64::MAX;
    }
    record
}

fn lease_ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

fn gave_up(key: &[u8]) -> Error {
    Error::InProgress(format!(
        "key {} kept changing under other callers",
        display_key(key)
    ))
}

/// The token of a claim applied at `revision` (never 0: etcd's revisions start at 1).
fn token_of(revision: i64) -> Result<ClaimToken> {
    match u64::try_from(revision) {
        Ok(revision) if revision > 0 => Ok(ClaimToken(revision)),
        _ => Err(Error::etcd(
            ErrorCode::Unknown,
            format!("etcd applied a claim but answered no revision ({revision})"),
        )),
    }
}

impl IdempotencyStore for EtcdIdempotencyStore {
    fn claim_as(
        &self,
        key: &[u8],
        fingerprint: &Fingerprint,
        now_ms: u64,
        id: ClaimId,
    ) -> Result<Claim> {
        // The lease keeper's view of the claim starts before this call (docs/C_API.md
        // §8.1): an acquired claim is vouched for by a keep-alive of its session sent no
        // earlier than now.
        let since = Instant::now();
        let (raw_key, fingerprint) = (key.to_vec(), *fingerprint);
        let (session, calls) = (self.session.clone(), self.calls.clone());
        let legacy = self.legacy.clone();
        self.etcd.run(move |conn| async move {
            let key = etcd_key(&conn, &raw_key);
            let old = legacy
                .name(&conn, &raw_key)
                .await
                .map_err(|f| with_key(f, &raw_key))?;
            let claimed = match session.lease(&conn).await {
                Ok(bound) => {
                    calls.lock().claiming.insert(id, (raw_key.clone(), None));
                    let claim = Attempt {
                        conn: &conn,
                        session: &session,
                        calls: &calls,
                        key: &key,
                        old: old.as_deref(),
                        raw_key: &raw_key,
                        id,
                        fingerprint: &fingerprint,
                        now_ms,
                        since,
                    };
                    let claimed = claim.acquire(bound).await;
                    if let Some((_, failed)) = calls.lock().claiming.get_mut(&id) {
                        // Kept for the call's retry or `abandon` (an attempt may have
                        // applied unacknowledged), and for housekeeping once it is neither.
                        *failed = Some(Instant::now());
                    }
                    claimed
                }
                Err(failure) => Err(failure),
            };
            match claimed {
                Ok(claim) => Ok(claim),
                Err(failure) => {
                    let names = [Some(key.as_slice()), old.as_deref()];
                    answer_without_writing(&conn, &names, &fingerprint, now_ms, failure)
                        .await
                        .map_err(|f| with_key(f, &raw_key))
                }
            }
        })
    }

    fn renew(&self, claims: &[(Vec<u8>, ClaimToken)], _now_ms: u64) -> Result<Lapsed> {
        // One acknowledged keep-alive of the session, sent no earlier than now, renews
        // every claim bound to it (docs/C_API.md §8.1: Ok only once etcd extended it).
        let since = Instant::now();
        let claims = claims.to_vec();
        let (session, calls) = (self.session.clone(), self.calls.clone());
        self.etcd.run(move |conn| async move {
            let mut lapsed = Vec::new();
            let mut by_lease: Vec<(i64, Lapsed)> = Vec::new();
            {
                let calls = calls.lock();
                for claim in claims {
                    match calls.held.get(&claim) {
                        // Completed, released, or never this handle's: not held here.
                        None => lapsed.push(claim),
                        Some(held) => match by_lease.iter_mut().find(|(l, _)| *l == held.lease) {
                            Some((_, claims)) => claims.push(claim),
                            None => by_lease.push((held.lease, vec![claim])),
                        },
                    }
                }
            }
            for (lease, claims) in by_lease {
                // A lease that is gone took its claims with it: nothing else deletes a
                // live claim (release is the owner's).
                let alive = session.renewed_since(&conn, lease, since).await?;
                let mut calls = calls.lock();
                for claim in claims {
                    if alive {
                        if let Some(held) = calls.held.get_mut(&claim) {
                            held.renewed = held.renewed.max(since);
                        }
                    } else {
                        calls.held.remove(&claim);
                        lapsed.push(claim);
                    }
                }
            }
            Ok(lapsed)
        })
    }

    fn vouched_ago(&self, key: &[u8], token: ClaimToken) -> Option<Duration> {
        let calls = self.calls.lock();
        let held = calls.held.get(&(key.to_vec(), token))?;
        Some(held.renewed.elapsed())
    }

    fn complete(
        &self,
        key: &[u8],
        token: ClaimToken,
        fingerprint: &Fingerprint,
        result: i32,
        now_ms: u64,
    ) -> Result<Completion> {
        let (ttl, raw_key, fingerprint) = (self.ttl, key.to_vec(), *fingerprint);
        let completions = self.completions.clone();
        let calls = self.calls.clone();
        self.etcd.run(move |conn| async move {
            let key = etcd_key(&conn, &raw_key);
            let created = calls
                .lock()
                .held
                .get(&(raw_key.clone(), token))
                .is_some_and(|held| held.created);
            let record = Record {
                token,
                fingerprint,
                result,
                expires_at_ms: now_ms.saturating_add(lease_ms(ttl)),
                created,
            };
            let outcome = complete(&conn, &completions, &key, record, now_ms, ttl).await;
            if outcome.is_ok() {
                // The key is bound to the completion lease now (or was never ours).
                calls.lock().held.remove(&(raw_key.clone(), token));
            }
            outcome.map_err(|f| with_key(f, &raw_key))
        })
    }

    /// Deletes what the call's attempts may have written unacknowledged (a claim holding
    /// its identity), instead of leaving the key IN_PROGRESS while the session lives.
    fn abandon(&self, key: &[u8], id: ClaimId) {
        if !self.calls.lock().claiming.contains_key(&id) {
            return;
        }
        let raw_key = key.to_vec();
        let dropped = self
            .etcd
            .run(move |conn| async move { drop_unacknowledged(&conn, &raw_key, id).await });
        match dropped {
            Ok(()) => {
                self.calls.lock().claiming.remove(&id);
            }
            // Kept: housekeeping tries again a lease later.
            Err(failure) => {
                tracing::warn!(key = %display_key(key), reason = %failure.detail(), "abandoned claim not deleted yet; housekeeping deletes it later")
            }
        }
    }

    fn release(&self, key: &[u8], token: ClaimToken) -> Result<()> {
        let raw_key = key.to_vec();
        let calls = self.calls.clone();
        self.etcd.run(move |conn| async move {
            let key = etcd_key(&conn, &raw_key);
            // Deleted only while the key holds this claim: a taker's claim has its own
            // revision. One compare-and-delete; the session lease stays.
            let when = Compare::mod_revision(key.clone(), CompareOp::Equal, token.0 as i64);
            let deleted = conn
                .txn_or_get(
                    "release a claim",
                    &key,
                    when,
                    vec![TxnOp::delete(key.clone(), None)],
                )
                .await;
            if deleted.is_ok() {
                calls.lock().held.remove(&(raw_key.clone(), token));
            }
            deleted.map(|_| ()).map_err(|f| with_key(f, &raw_key))
        })
    }

    /// Deletes the claims nobody keeps any more ([`Calls::stale`]), each compared on its
    /// revision or its call's identity.
    fn maintain(&self, _now_ms: u64) -> Result<()> {
        let (orphans, gave_up) = self.calls.lock().stale(self.lease);
        for (key, token) in orphans {
            self.release(&key, token)?;
        }
        for (key, id) in gave_up {
            let raw_key = key.clone();
            self.etcd
                .run(move |conn| async move { drop_unacknowledged(&conn, &raw_key, id).await })?;
            let mut calls = self.calls.lock();
            // Unless the call tried again meanwhile.
            if calls
                .claiming
                .get(&id)
                .is_some_and(|(_, failed)| failed.is_some())
            {
                calls.claiming.remove(&id);
            }
        }
        Ok(())
    }

    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<KeyRecord>> {
        let raw_key = key.to_vec();
        let legacy = self.legacy.clone();
        self.etcd.run(move |conn| async move {
            let key = etcd_key(&conn, &raw_key);
            let mut found = conn.get("read an idempotency key", &key).await?;
            if found.is_none() {
                if let Some(old) = legacy.name(&conn, &raw_key).await? {
                    found = conn.get("read an idempotency key", &old).await?;
                }
            }
            let Some(kv) = found else {
                return Ok(None);
            };
            let stored = decode(&kv)?;
            match stored.record.state {
                KeyState::Claimed { token, .. } => {
                    let left = conn
                        .time_to_live("read a claim's lease", kv.lease())
                        .await?;
                    Ok(left.map(|seconds| KeyRecord {
                        fingerprint: stored.record.fingerprint,
                        state: KeyState::Claimed {
                            token,
                            lease_until_ms: now_ms.saturating_add(seconds * 1000),
                        },
                    }))
                }
                KeyState::Completed { expires_at_ms, .. } => {
                    Ok((now_ms < expires_at_ms).then_some(stored.record))
                }
            }
        })
    }

    fn forget(&self, key: &[u8], now_ms: u64) -> Result<Forgotten> {
        let raw_key = key.to_vec();
        let legacy = self.legacy.clone();
        self.etcd.run(move |conn| async move {
            let key = etcd_key(&conn, &raw_key);
            let here = forget(&conn, &key, &raw_key, now_ms).await?;
            let Some(old) = legacy.name(&conn, &raw_key).await? else {
                return Ok(here);
            };
            let there = forget(&conn, &old, &raw_key, now_ms).await?;
            Ok(match (here, there) {
                (Forgotten::InProgress, _) | (_, Forgotten::InProgress) => Forgotten::InProgress,
                (Forgotten::Removed, _) | (_, Forgotten::Removed) => Forgotten::Removed,
                _ => Forgotten::Absent,
            })
        })
    }
}

/// Deletes the completion `key` holds, compared on its revision, unless it holds a claim.
async fn forget(conn: &Conn, key: &[u8], raw_key: &[u8], now_ms: u64) -> Result<Forgotten> {
    let key = key.to_vec();
    let mut found = conn.get("read an idempotency key", &key).await?;
    for _ in 0..MAX_ROUNDS {
        let Some(kv) = found else {
            return Ok(Forgotten::Absent);
        };
        let stored = decode(&kv)?;
        if let KeyState::Claimed { .. } = stored.record.state {
            // etcd keeps a claim only while its lease lives.
            return Ok(Forgotten::InProgress);
        }
        let live = stored.record.is_live(now_ms);
        let when = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
        match conn
            .txn_or_get(
                "forget an idempotency key",
                &key,
                when,
                vec![TxnOp::delete(key.clone(), None)],
            )
            .await?
        {
            TxnOutcome::Applied { .. } => {
                return Ok(if live {
                    Forgotten::Removed
                } else {
                    Forgotten::Absent
                })
            }
            TxnOutcome::Found(now) => found = now,
            TxnOutcome::LeaseGone => found = None,
        }
    }
    Err(gave_up(raw_key))
}

fn with_key(failure: Error, key: &[u8]) -> Error {
    failure.context(format!(" (idempotency key {})", display_key(key)))
}

/// A full cluster (its NOSPACE alarm raised) refuses every write, lease grants included,
/// but a key completed or claimed by another caller needs none: it still replays, conflicts
/// or is in progress (C_API §8's table, [`decide`]). Otherwise, and for any other failure,
/// the claim fails as it did. `names`: the key's, and its name in the old space if that is
/// read.
async fn answer_without_writing(
    conn: &Conn,
    names: &[Option<&[u8]>],
    fingerprint: &Fingerprint,
    now_ms: u64,
    failure: Error,
) -> Result<Claim> {
    if failure.kind() != ErrorCode::DiskFull {
        return Err(failure);
    }
    for name in names.iter().flatten() {
        let Ok(found) = conn.get("read an idempotency key", name).await else {
            return Err(failure);
        };
        let Some(kv) = found else {
            continue;
        };
        match decide(
            Some(&as_found(&decode(&kv)?)),
            fingerprint,
            now_ms,
            ClaimToken(0),
        ) {
            // Acquiring it would need a write.
            Claim::Acquired { .. } => {}
            answer => return Ok(answer),
        }
    }
    Err(failure)
}

/// One call's claim of a key.
struct Attempt<'a> {
    conn: &'a Arc<Conn>,
    session: &'a Arc<Session>,
    calls: &'a Mutex<Calls>,
    key: &'a [u8],
    /// The key's name in the old space, while that is read.
    old: Option<&'a [u8]>,
    raw_key: &'a [u8],
    id: ClaimId,
    fingerprint: &'a Fingerprint,
    now_ms: u64,
    since: Instant,
}

impl Attempt<'_> {
    /// The claim, bound to the session lease `bound` (or a new session's), an acquired one
    /// noted as held and vouched for by an acknowledged renewal of its session: the last
    /// one, when it was sent at most the session's keep-alive interval (a sixth of the TTL,
    /// half the keeper's renewal period) before the call, as it is while the session is
    /// kept alive; else a keep-alive sent alongside the transaction. The claim lasts as
    /// long as its lease, which lasts a TTL from that renewal's sending at least
    /// (docs/C_API.md §8.1).
    async fn acquire(&self, mut bound: i64) -> Result<Claim> {
        let (conn, session) = (self.conn, self.session);
        let window = session.keep_alive_interval();
        let recent = self.since.checked_sub(window).unwrap_or(self.since);
        let vouched = |lease| session.acked_sent(lease).filter(|sent| *sent >= recent);
        for _ in 0..MAX_ROUNDS {
            let claimed = if vouched(bound).is_some() {
                claim(conn, session, self, &mut bound).await
            } else {
                // Whatever its answer: read back below from the session's state.
                let renewing = bound;
                let (claimed, _) = tokio::join!(
                    claim(conn, session, self, &mut bound),
                    session.renewed_since(conn, renewing, self.since)
                );
                claimed
            };
            let Claimed {
                claim,
                lease: on,
                created,
            } = claimed?;
            let Claim::Acquired { token, .. } = claim else {
                // Nothing of this call is on the key.
                self.calls.lock().claiming.remove(&self.id);
                return Ok(claim);
            };
            // Bound to another lease than the one renewed alongside (a new session, or an
            // earlier attempt's found as ours), or that keep-alive failed: vouched for now.
            let renewed = match vouched(on) {
                Some(sent) => Some(sent),
                // A keep-alive sent at `since` or later was acknowledged.
                None if session.renewed_since(conn, on, self.since).await? => Some(self.since),
                None => None,
            };
            if let Some(renewed) = renewed {
                let mut calls = self.calls.lock();
                calls.claiming.remove(&self.id);
                calls.held.insert(
                    (self.raw_key.to_vec(), token),
                    Held {
                        lease: on,
                        renewed,
                        created,
                    },
                );
                return Ok(claim);
            }
            // The session lapsed, and the claim with it: claimed again under a new one.
            bound = session.lease(conn).await?;
        }
        Err(gave_up(self.raw_key))
    }
}

/// Deletes the claim of the call `id` on `raw_key`, if the key holds one: compared on its
/// revision, so that nothing else is touched.
async fn drop_unacknowledged(conn: &Conn, raw_key: &[u8], id: ClaimId) -> Result<()> {
    let key = etcd_key(conn, raw_key);
    let Some(kv) = conn.get("read an abandoned claim", &key).await? else {
        return Ok(());
    };
    if decode(&kv)?.owner != Some(id) {
        return Ok(());
    }
    let when = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
    conn.txn_or_get(
        "delete an abandoned claim",
        &key,
        when,
        vec![TxnOp::delete(key.clone(), None)],
    )
    .await
    .map(|_| ())
}

/// What a claim's transaction did: applied at `revision`, or refused for a lease that is
/// gone, or found the key (and its name in the old space, when that was compared).
enum ClaimOutcome {
    Applied { revision: i64 },
    LeaseGone,
    Found(Option<KeyValue>, Option<KeyValue>),
}

impl From<TxnOutcome> for ClaimOutcome {
    fn from(outcome: TxnOutcome) -> Self {
        match outcome {
            TxnOutcome::Applied { revision } => ClaimOutcome::Applied { revision },
            TxnOutcome::LeaseGone => ClaimOutcome::LeaseGone,
            TxnOutcome::Found(kv) => ClaimOutcome::Found(kv, None),
        }
    }
}

/// A claim's answer, the lease it is bound to when acquired, and whether its put created
/// the key.
struct Claimed {
    claim: Claim,
    lease: i64,
    created: bool,
}

/// The claim's transaction, repeated while the key changes under us. `lease` is the
/// session's lease the claim is put with; replaced by a new session's if it was found gone.
async fn claim(
    conn: &Arc<Conn>,
    session: &Arc<Session>,
    call: &Attempt<'_>,
    lease: &mut i64,
) -> Result<Claimed> {
    let (key, id, fingerprint, now_ms) = (call.key, call.id, call.fingerprint, call.now_ms);
    let value = encode_claim(id, fingerprint);
    // Absent is revision 0: a fresh key is claimed in one round trip.
    let mut expected_revision = 0;
    // The same for its name in the old space, while that is read: compared in the same
    // transaction, so that a key live there is never claimed here; an expired completion
    // found there is deleted by the claim.
    let mut old_expected = 0;
    // The first attempt goes with other callers' writes (`super::batch`): the claims of
    // one transaction share its revision, which is fine, since tokens only grow per key
    // (docs/C_API.md §8.1) and this store and the lease keeper hold a claim by its key
    // and token. A retry goes alone, and so does every claim while the old space is read.
    let mut together = call.old.is_none();
    let answer = |claim, lease, created| {
        Ok(Claimed {
            claim,
            lease,
            created,
        })
    };
    for _ in 0..MAX_ROUNDS {
        let put = TxnOp::put(
            key.to_vec(),
            value.clone(),
            Some(PutOptions::new().with_lease(*lease)),
        );
        let outcome = if let Some(old) = call.old {
            claim_beside_old(conn, key, expected_revision, old, old_expected, put).await?
        } else if std::mem::take(&mut together) {
            match conn.write_batched(key, expected_revision, put).await? {
                Some(outcome) => outcome.into(),
                None => continue,
            }
        } else {
            let when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, expected_revision);
            conn.txn_or_get("claim an idempotency key", key, when, vec![put])
                .await?
                .into()
        };
        let (found, found_old) = match outcome {
            // docs/C_API.md §8.1: the token is the claim's revision.
            ClaimOutcome::Applied { revision } => {
                let token = token_of(revision)?;
                let acquired = Claim::Acquired {
                    token,
                    taken_over: false,
                };
                return answer(acquired, *lease, expected_revision == 0);
            }
            ClaimOutcome::LeaseGone => {
                session.lapsed(*lease);
                *lease = session.lease(conn).await?;
                continue;
            }
            ClaimOutcome::Found(found, found_old) => (found, found_old),
        };
        expected_revision = 0;
        if let Some(kv) = found {
            let stored = decode(&kv)?;
            if let (Some(owner), KeyState::Claimed { token, .. }) =
                (stored.owner, stored.record.state)
            {
                if owner == id {
                    // An earlier attempt of this call whose answer was lost did apply.
                    crate::metrics::store().unknown_outcomes.inc();
                    let acquired = Claim::Acquired {
                        token,
                        taken_over: false,
                    };
                    let created = kv.create_revision() == kv.mod_revision();
                    return answer(acquired, kv.lease(), created);
                }
            }
            match decide(Some(&as_found(&stored)), fingerprint, now_ms, ClaimToken(0)) {
                // An expired completion, not yet deleted by its lease: claimed over,
                // compared on its revision.
                Claim::Acquired { .. } => expected_revision = kv.mod_revision(),
                other => return answer(other, *lease, false),
            }
        }
        old_expected = 0;
        if let Some(kv) = found_old {
            let stored = decode(&kv)?;
            match decide(Some(&as_found(&stored)), fingerprint, now_ms, ClaimToken(0)) {
                Claim::Acquired { .. } => old_expected = kv.mod_revision(),
                other => return answer(other, *lease, false),
            }
        }
    }
    Err(gave_up(call.raw_key))
}

/// A claim of `key` while the old space is read: compared on `key`'s revision and on that
/// of its name there, `old` (deleted with the claim if it holds an expired completion);
/// otherwise both are read back.
async fn claim_beside_old(
    conn: &Conn,
    key: &[u8],
    expected: i64,
    old: &[u8],
    old_expected: i64,
    put: TxnOp,
) -> Result<ClaimOutcome> {
    let mut then = vec![put];
    if old_expected != 0 {
        then.push(TxnOp::delete(old.to_vec(), None));
    }
    let txn = Txn::new()
        .when([
            Compare::mod_revision(key.to_vec(), CompareOp::Equal, expected),
            Compare::mod_revision(old.to_vec(), CompareOp::Equal, old_expected),
        ])
        .and_then(then)
        .or_else([
            TxnOp::get(key.to_vec(), None),
            TxnOp::get(old.to_vec(), None),
        ]);
    conn.request("claim an idempotency key", |mut client| {
        let txn = txn.clone();
        async move {
            match client.txn(txn).await {
                Ok(response) if response.succeeded() => Ok(ClaimOutcome::Applied {
                    revision: response.header().map_or(0, |h| h.revision()),
                }),
                Ok(response) => {
                    let mut read = response.op_responses().into_iter().map(|op| match op {
                        TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
                        _ => None,
                    });
                    let found = read.next().flatten();
                    Ok(ClaimOutcome::Found(found, read.next().flatten()))
                }
                Err(error) if is_lease_not_found(&error) => Ok(ClaimOutcome::LeaseGone),
                Err(error) => Err(error),
            }
        }
    })
    .await
}

/// A completion to record: the claim's token, fingerprint and result, when it expires,
/// and whether the claim created the key.
struct Record {
    token: ClaimToken,
    fingerprint: Fingerprint,
    result: i32,
    expires_at_ms: u64,
    created: bool,
}

async fn complete(
    conn: &Arc<Conn>,
    completions: &Completions,
    key: &[u8],
    record: Record,
    now_ms: u64,
    ttl: Duration,
) -> Result<Completion> {
    let token = record.token;
    // First: our claim is still the key's (its revision is the token).
    let mut expected = token.0 as i64;
    // The first attempt goes with other callers' writes (`super::batch`); a retry alone.
    let mut together = true;
    for _ in 0..MAX_ROUNDS {
        let lease = completion_lease(conn, completions, now_ms, ttl).await?;
        // Put over the claim that created the key, the completion finds its token in the
        // key's `create_revision`; otherwise it carries it.
        let value = encode_completion(
            token,
            &record.fingerprint,
            record.result,
            record.expires_at_ms,
            record.created && expected == token.0 as i64,
        );
        let put = TxnOp::put(
            key.to_vec(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        );
        let outcome = if std::mem::take(&mut together) {
            match conn.write_batched(key, expected, put).await? {
                Some(outcome) => outcome,
                None => continue,
            }
        } else {
            let when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, expected);
            conn.txn_or_get("record a completion", key, when, vec![put])
                .await?
        };
        let kv = match outcome {
            TxnOutcome::Applied { .. } => return Ok(Completion::Recorded),
            TxnOutcome::LeaseGone => {
                let mut cached = completions.current.lock();
                if cached.is_some_and(|c| c.id == lease) {
                    *cached = None;
                }
                continue;
            }
            // The key is free (our lease lapsed and nobody took over): record it.
            TxnOutcome::Found(None) => {
                expected = 0;
                continue;
            }
            TxnOutcome::Found(Some(kv)) => kv,
        };
        match decode(&kv)?.record.state {
            // An earlier attempt whose answer was lost did apply.
            KeyState::Completed { token: done, .. } if done == token => {
                crate::metrics::store().unknown_outcomes.inc();
                return Ok(Completion::Recorded);
            }
            KeyState::Completed { expires_at_ms, .. } if now_ms >= expires_at_ms => {
                expected = kv.mod_revision();
            }
            // Another caller's live claim (etcd keeps claims only while their lease lives;
            // ours would have matched the compare) or live completion: never overwritten.
            _ => return Ok(Completion::Superseded),
        }
    }
    Err(gave_up(key))
}

/// The shared completion lease, granted anew once a completion recorded now could outlive
/// it. Its TTL is `ttl` plus a slack, so completions are deleted at most that much late.
async fn completion_lease(
    conn: &Conn,
    completions: &Completions,
    now_ms: u64,
    ttl: Duration,
) -> Result<i64> {
    let usable = || {
        completions
            .current
            .lock()
            .filter(|lease| now_ms <= lease.usable_until_ms)
            .map(|lease| lease.id)
    };
    if let Some(id) = usable() {
        return Ok(id);
    }
    let _turn = completions.granting.lock().await;
    if let Some(id) = usable() {
        return Ok(id);
    }
    let slack = (ttl / 16).max(Duration::from_secs(3));
    let id = conn.grant("grant a completion lease", ttl + slack).await?;
    // A second of margin for the grant's latency and the rounding of the TTL, and one for
    // the expiry's, which a completion keeps in whole seconds rounded up.
    let usable_until_ms = now_ms + lease_ms(slack).saturating_sub(2000);
    *completions.current.lock() = Some(CompletionLease {
        id,
        usable_until_ms,
    });
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::idempotency::{kept_fingerprint, same_fingerprint};

    const FP: Fingerprint = [0xab; 32];
    /// A time of this layout's life: expiries after its epoch.
    const NOW: u64 = 1_765_000_000_000;

    fn decode_at(value: &[u8], mod_revision: i64, create_revision: i64) -> Result<Stored> {
        decode_value(b"k", value, mod_revision, create_revision)
    }

    fn bad(value: &[u8]) {
        let err = decode_at(value, 7, 7).unwrap_err();
        assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
    }

    fn escaped(raw: &[u8]) -> Vec<u8> {
        let mut name = Vec::new();
        escape_key(raw, &mut name);
        name
    }

    /// The fixed layout's claim (`c`), as the build before this one wrote it.
    fn fixed_claim(id: u64, fingerprint: &Fingerprint, lease_until_ms: u64) -> Vec<u8> {
        [
            &[CLAIMED][..],
            &id.to_be_bytes(),
            fingerprint,
            &lease_until_ms.to_be_bytes(),
        ]
        .concat()
    }

    /// The fixed layout's completion (`d`).
    fn fixed_completion(
        token: u64,
        fingerprint: &Fingerprint,
        result: i32,
        expiry: u64,
    ) -> Vec<u8> {
        [
            &[COMPLETED][..],
            &token.to_be_bytes(),
            fingerprint,
            &result.to_be_bytes(),
            &expiry.to_be_bytes(),
        ]
        .concat()
    }

    #[test]
    fn key_names_keep_safe_bytes_and_escape_the_rest() {
        assert_eq!(
            escaped(b"task-0042/vg-040/blk-000000004008"),
            b"task-0042/vg-040/blk-000000004008",
            "a taosX block id costs its own length"
        );
        assert_eq!(escaped(b"a/b"), b"a/b");
        assert_eq!(escaped(b"a%2Fb"), b"a%252Fb");
        assert_eq!(escaped(b"\x00\xff"), b"%00%FF");
        assert_eq!(escaped(b"e/2 with space"), b"e/2%20with%20space");
        assert_eq!(escaped(b"A.z_9~"), b"A.z_9%7E");
    }

    #[test]
    fn key_names_round_trip_and_never_collide() {
        let mut tricky: Vec<Vec<u8>> = vec![
            b"a/b".to_vec(),
            b"a%2Fb".to_vec(),
            b"a%2fb".to_vec(),
            b"a%".to_vec(),
            b"%".to_vec(),
            b"%25".to_vec(),
            b"\x00".to_vec(),
            b"\xff".to_vec(),
            b"\x00\xff".to_vec(),
            b"../../x".to_vec(),
            b"/".to_vec(),
            b"//".to_vec(),
            b"k/x".to_vec(),
            b"\n".to_vec(),
            "é".as_bytes().to_vec(),
            vec![b'x'; 255],
            vec![0xff; 255],
            vec![b'%'; 255],
            (0..=255u8).collect(),
        ];
        tricky.extend((0..=255u8).map(|b| vec![b]));
        tricky.sort();
        tricky.dedup();
        let mut names = std::collections::HashSet::new();
        for raw in &tricky {
            let name = escaped(raw);
            assert_eq!(unescape_key(&name).as_deref(), Some(&raw[..]), "{raw:?}");
            assert!(names.insert(name.clone()), "two keys named {name:?}");
            // Nothing but the safe bytes and escapes: no control byte, no byte that a
            // range of another space could hold.
            assert!(
                name.iter().all(|&b| kept_in_name(b) || b == b'%'),
                "{name:?}"
            );
        }
        assert_eq!(escaped(&[0xff; 255]).len(), 765, "at most 3 bytes a byte");
        // Only the names it writes are taken back: no lower-case or short escape, no
        // escaped safe byte (which would give a key two names), no unsafe raw byte.
        for name in [
            &b"a%2fb"[..],
            b"a%2",
            b"%",
            b"%41",
            b"%2F",
            b"a b",
            b"\xff",
            b"a%G0",
        ] {
            assert_eq!(unescape_key(name), None, "{name:?}");
        }
    }

    #[test]
    fn a_claim_holds_its_calls_identity_and_its_token_is_the_keys_revision() {
        let id = ClaimId(0x1234_5678_9abc_def0);
        let value = encode_claim(id, &FP);
        assert_eq!(value.len(), CLAIM_COMPACT_LEN);
        assert_eq!(value.len(), 25);
        let stored = decode_at(&value, 42, 42).unwrap();
        assert_eq!(stored.owner, Some(id));
        assert_eq!(
            stored.record,
            KeyRecord {
                fingerprint: kept_fingerprint(&FP),
                state: KeyState::Claimed {
                    token: ClaimToken(42),
                    // A claim lives as long as its lease: no lease-until in the value.
                    lease_until_ms: u64::MAX,
                },
            }
        );
        // Renewals change no revision; a new claim (a new put) has a greater one.
        let later = decode_at(&value, 43, 40).unwrap();
        assert!(
            matches!(later.record.state, KeyState::Claimed { token, .. } if token == ClaimToken(43))
        );
    }

    #[test]
    fn a_completion_holds_the_token_of_the_claim_that_completed_it() {
        let expiry = NOW + 86_400_000;
        // Put over the claim that created the key: the token is its create_revision.
        let value = encode_completion(ClaimToken(42), &FP, 0, expiry, true);
        assert_eq!(value.len(), 1 + 16 + 4, "layout byte, fingerprint, expiry");
        let stored = decode_at(&value, 57, 42).unwrap();
        assert_eq!(stored.owner, None);
        assert!(same_fingerprint(&stored.record.fingerprint, &FP));
        assert_eq!(
            stored.record.state,
            KeyState::Completed {
                token: ClaimToken(42),
                result: 0,
                expires_at_ms: expiry,
            }
        );
        // Otherwise it carries its token; any result round trips.
        for (token, result, expiry) in [
            (42, -6, expiry),
            (1, i32::MIN, expiry + 1),
            (u64::MAX, i32::MAX, expiry + 999),
            ((1 << 40) + 3, 1, EXPIRY_EPOCH_MS),
        ] {
            let value = encode_completion(ClaimToken(token), &FP, result, expiry, false);
            let stored = decode_at(&value, 99, 98).unwrap();
            let KeyState::Completed {
                token: t,
                result: r,
                expires_at_ms,
            } = stored.record.state
            else {
                panic!("{stored:?}")
            };
            assert_eq!((t, r), (ClaimToken(token), result));
            // Whole seconds, rounded up: replayed no shorter than its TTL.
            assert!(expires_at_ms >= expiry && expires_at_ms < expiry + 1000);
        }
        // Expiries before the layout's epoch (test clocks) are kept to the millisecond,
        // and the longest TTL saturates.
        for expiry in [0, 99, EXPIRY_EPOCH_MS - 1, u64::MAX] {
            let value = encode_completion(ClaimToken(3), &FP, 0, expiry, false);
            let stored = decode_at(&value, 9, 9).unwrap();
            assert!(
                matches!(stored.record.state, KeyState::Completed { expires_at_ms, .. } if expires_at_ms == expiry),
                "{expiry}: {stored:?}"
            );
        }
    }

    #[test]
    fn records_of_earlier_layouts_are_read_and_never_taken_for_ours() {
        // The fixed layout (c/d) of the build before.
        let stored = decode_at(&fixed_claim(7, &FP, 5), 9, 9).unwrap();
        assert_eq!(stored.owner, Some(ClaimId(7)));
        assert_eq!(stored.record.fingerprint, FP, "kept whole");
        assert!(
            matches!(stored.record.state, KeyState::Claimed { token, lease_until_ms: 5 } if token == ClaimToken(9))
        );
        let stored = decode_at(&fixed_completion(8, &FP, -6, 99), 9, 3).unwrap();
        assert_eq!(
            stored.record.state,
            KeyState::Completed {
                token: ClaimToken(8),
                result: -6,
                expires_at_ms: 99
            }
        );
        // What earlier builds wrote: the claim's lease ID where the identity is now.
        let lease_id: u64 = 0x7a3f_0000_0001;
        let mut claim = fixed_claim(lease_id, &FP, 5);
        claim[0] = CLAIMED_BY_LEASE;
        let stored = decode_at(&claim, 9, 9).unwrap();
        assert_eq!(stored.owner, None, "an ID that is never a call's");
        assert!(
            matches!(stored.record.state, KeyState::Claimed { token, .. } if token == ClaimToken(9))
        );
        let mut done = fixed_completion(lease_id, &FP, 0, 99);
        done[0] = COMPLETED_BY_LEASE;
        let stored = decode_at(&done, 9, 9).unwrap();
        assert!(
            matches!(stored.record.state, KeyState::Completed { token, .. } if token == ClaimToken(0)),
            "a lease ID is no fencing token"
        );
    }

    #[test]
    fn malformed_records_are_corruption() {
        for value in [
            encode_claim(ClaimId(1), &FP),
            encode_completion(ClaimToken(3), &FP, -1, NOW, false),
            encode_completion(ClaimToken(3), &FP, 0, NOW, true),
            fixed_claim(1, &FP, 5),
            fixed_completion(3, &FP, 0, 9),
        ] {
            // Cut short or too long: not a record.
            bad(&value[..value.len() - 1]);
            bad(&[value.clone(), vec![0]].concat());
        }
        // An unknown flag, a varint that never ends or overflows.
        bad(&[&[COMPLETED_COMPACT | 8][..], &[0; 20]].concat());
        bad(&[&[COMPLETED_COMPACT | TOKEN_GIVEN][..], &[0xff; 30]].concat());
        bad(&[
            &[COMPLETED_COMPACT | TOKEN_GIVEN][..],
            &[0xff; 9],
            &[2],
            &[0; 17],
        ]
        .concat());
        // The text form of earlier builds (another key space) is not taken for a record.
        bad(b"c 5 ab 99");
        bad(b"");
    }

    #[test]
    fn a_claim_found_is_live_whatever_its_value_says() {
        let stored = decode_at(&encode_claim(ClaimId(1), &FP), 8, 8).unwrap();
        let now = 1_000;
        assert_eq!(
            decide(Some(&as_found(&stored)), &FP, now, ClaimToken(0)),
            Claim::InProgress
        );
        assert_eq!(
            decide(Some(&as_found(&stored)), &[0; 32], now, ClaimToken(0)),
            Claim::Conflict
        );
        // The fixed layout's lease-until is the claim's first; renewals do not rewrite it.
        let stored = decode_at(&fixed_claim(1, &FP, 5), 8, 8).unwrap();
        assert_eq!(
            decide(Some(&as_found(&stored)), &FP, now, ClaimToken(0)),
            Claim::InProgress
        );
        // An expired completion not yet deleted is claimed over.
        let done = decode_at(&encode_completion(ClaimToken(8), &FP, 0, 999, false), 9, 8).unwrap();
        assert!(matches!(
            decide(Some(&as_found(&done)), &FP, now, ClaimToken(0)),
            Claim::Acquired { .. }
        ));
    }
}
