//! The S3-compatible object-store back end (`s3://BUCKET/PREFIX`).
//!
//! Built on the Arrow project's `object_store` client (ranged GETs, retries with
//! backoff on 5xx and `SlowDown`, connection reuse, `If-None-Match: *` creates) on
//! its own tokio runtime. Callers are plain threads (the block stack's worker pool,
//! backup workers): each request enters the runtime with `block_on`, so a ublk or
//! NBD queue thread never waits on the network itself.
//!
//! - **Priority**: at most [`S3Options::in_flight`] requests run at once; a
//!   background read (pre-staging, read-ahead) waits while a demand read waits, and
//!   background reads never take the last quarter of the slots.
//! - **Bounded time**: every attempt has [`S3Options::attempt_timeout`]; a request
//!   with its retries gives up after [`S3Options::io_timeout`] (a block device must
//!   answer EIO in seconds, not wait out a 3-minute default).
//! - **Hedging**: a GET still unanswered after the recent p95 latency (at least
//!   [`HEDGE_MIN`]) is sent a second time; the first answer wins.
//! - **Deferred puts**: backups queue chunk uploads ([`Backend::put_deferred`],
//!   up to `in_flight` at once) and [`Backend::sync`] waits for them all before the
//!   index is written, so the index never names a chunk whose upload failed.
//!
//! Credentials come from `--s3-credentials FILE` (0600, AWS INI format), the AWS
//! environment variables, or `~/.aws/credentials` (profile `--s3-profile`,
//! `AWS_PROFILE` or `default`), in that order. They go to the client only: never to
//! [`Backend::describe`], errors, logs or status.

use super::{Backend, ObjectMeta, Put, PutMode, ReadClass, RequestReport};
use crate::error::{Error, Result};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutOptions, PutPayload,
    RetryConfig,
};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Shortest wait before a GET is hedged.
pub const HEDGE_MIN: Duration = Duration::from_millis(50);
/// Latencies kept for the hedging percentile.
const LATENCY_WINDOW: usize = 256;

/// The virtual-host endpoint of `bucket` on `endpoint` (`http://HOST:PORT` →
/// `http://BUCKET.HOST:PORT`); an endpoint whose host already starts with the
/// bucket's name is taken as the bucket's own. An IP address has no subdomains.
fn bucket_endpoint(endpoint: &str, bucket: &str) -> Result<String> {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("https", endpoint));
    let host = rest.split(['/', ':']).next().unwrap_or("");
    if rest.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
        return Err(Error::Invalid(format!(
            "--s3-virtual-host needs an endpoint with a host name (BUCKET.HOST), not the address in {endpoint}; drop --s3-virtual-host for path-style requests"
        )));
    }
    if rest.starts_with(&format!("{bucket}.")) {
        return Ok(endpoint.to_string());
    }
    Ok(format!("{scheme}://{bucket}.{rest}"))
}

/// Where and how to reach a bucket (everything but the secrets).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:3900`; None: AWS (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// Region (`AWS_REGION`, else `us-east-1`; Garage's default is `garage`).
    pub region: Option<String>,
    /// Virtual-host style requests (`BUCKET.endpoint`) instead of path style.
    pub virtual_host: bool,
    /// A credentials file (AWS INI format), which must be mode 0600.
    pub credentials_file: Option<PathBuf>,
    /// Profile in the credentials file.
    pub profile: Option<String>,
    /// Requests in flight at once.
    pub in_flight: usize,
    /// Time limit of one attempt.
    pub attempt_timeout: Duration,
    /// Time limit of a request with all its retries.
    pub io_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            virtual_host: false,
            credentials_file: None,
            profile: None,
            in_flight: 16,
            attempt_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// `s3://BUCKET/PREFIX` split into bucket and prefix (no leading or trailing `/`).
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| Error::Invalid(format!("{url:?} is not an s3:// URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'));
    if !bucket_ok {
        return Err(Error::Invalid(format!(
            "{url}: invalid bucket name {bucket:?} (3-63 lowercase letters, digits, '-', '.')"
        )));
    }
    let prefix = prefix.trim_matches('/');
    // Only characters object_store's paths keep as they are: others would be
    // percent-encoded in requests and listings would not match the prefix.
    let plain = prefix
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'));
    if !plain || prefix.split('/').any(|c| c == ".." || c == ".") || prefix.contains("//") {
        return Err(Error::Invalid(format!("{url}: invalid prefix {prefix:?}")));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Access key, secret and optional session token.
struct Credentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// `[profile]` → key=value pairs of an AWS INI credentials file.
fn ini_profile(text: &str, profile: &str) -> Option<Vec<(String, String)>> {
    let mut current: Option<&str> = None;
    let mut out = Vec::new();
    let mut found = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            let name = name.strip_prefix("profile ").unwrap_or(name);
            current = Some(name);
            found |= name == profile;
            continue;
        }
        if current == Some(profile) {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    found.then_some(out)
}

fn credentials_from_ini(text: &str, profile: &str, what: &str) -> Result<Credentials> {
    let pairs = ini_profile(text, profile)
        .ok_or_else(|| Error::Invalid(format!("{what}: no profile [{profile}]")))?;
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(key_id), Some(secret)) => Ok(Credentials {
            key_id,
            secret,
            token: get("aws_session_token"),
        }),
        _ => Err(Error::Invalid(format!(
            "{what}: profile [{profile}] lacks aws_access_key_id or aws_secret_access_key"
        ))),
    }
}

fn credentials(opts: &S3Options) -> Result<Option<Credentials>> {
    let profile = opts
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".into());
    if let Some(path) = &opts.credentials_file {
        use std::os::unix::fs::MetadataExt;
        let what = format!("credentials file {}", path.display());
        let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if m.mode() & 0o077 != 0 {
            return Err(Error::Invalid(format!(
                "{what} is readable by others (mode {:o}): chmod 600 it",
                m.mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        return credentials_from_ini(&text, &profile, &what).map(Some);
    }
    if let (Ok(key_id), Ok(secret)) = (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        return Ok(Some(Credentials {
            key_id,
            secret,
            token: std::env::var("AWS_SESSION_TOKEN").ok(),
        }));
    }
    let shared = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
    if let Some(path) = shared.filter(|p| p.exists()) {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let what = format!("credentials file {}", path.display());
        return credentials_from_ini(&text, &profile, &what).map(Some);
    }
    Ok(None)
}

/// Request slots with demand-first admission.
struct Gate {
    state: Mutex<GateState>,
    freed: Condvar,
    total: usize,
}

struct GateState {
    busy: usize,
    /// The most requests that were in flight at once.
    peak: usize,
    demand_waiting: usize,
}

struct Slot<'a>(&'a Gate);

impl Gate {
    fn new(total: usize) -> Gate {
        Gate {
            state: Mutex::new(GateState {
                busy: 0,
                peak: 0,
                demand_waiting: 0,
            }),
            freed: Condvar::new(),
            total: total.max(1),
        }
    }

    fn enter(&self, class: ReadClass) -> Slot<'_> {
        let background_cap = (self.total * 3 / 4).max(1);
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if class == ReadClass::Demand {
            s.demand_waiting += 1;
        }
        loop {
            let ok = match class {
                ReadClass::Demand => s.busy < self.total,
                ReadClass::Background => s.demand_waiting == 0 && s.busy < background_cap,
            };
            if ok {
                break;
            }
            s = match self.freed.wait(s) {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
        }
        if class == ReadClass::Demand {
            s.demand_waiting -= 1;
        }
        s.busy += 1;
        s.peak = s.peak.max(s.busy);
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut s = match self.0.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.busy -= 1;
        drop(s);
        self.0.freed.notify_all();
    }
}

/// Deferred uploads: how many are running and the first failure (what, reason),
/// which stays: every later sync reports it, so no caller can consume the error
/// another (the backup's final sync before its index) must see.
#[derive(Default)]
struct Pending {
    running: usize,
    failed: Option<(String, String)>,
}

fn upload_failed((what, reason): &(String, String)) -> Error {
    Error::Remote {
        what: what.clone(),
        reason: format!("upload failed: {reason}"),
    }
}

/// Counters of requests so far.
#[derive(Debug, Default, Clone, Copy)]
struct S3Counters {
    gets: u64,
    hedged: u64,
    puts: u64,
    bytes_in: u64,
}

/// A store in an S3-compatible bucket.
pub struct S3Backend {
    url: String,
    endpoint: String,
    prefix: String,
    store: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
    gate: Gate,
    io_timeout: Duration,
    latencies: Mutex<VecDeque<Duration>>,
    pending: Arc<(Mutex<Pending>, Condvar)>,
    counters: Mutex<S3Counters>,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl S3Backend {
    /// Connect to `url` (`s3://BUCKET/PREFIX`). Nothing is sent yet; the first
    /// request reports a wrong endpoint, bucket or credentials.
    pub fn open(url: &str, opts: &S3Options) -> Result<S3Backend> {
        let (bucket, prefix) = parse_url(url)?;
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        let region = opts
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        let client = ClientOptions::new()
            .with_timeout(opts.attempt_timeout)
            .with_connect_timeout(opts.attempt_timeout.min(Duration::from_secs(5)))
            .with_allow_http(true)
            .with_pool_max_idle_per_host(opts.in_flight.max(1) * 2);
        let retry = RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 8,
            retry_timeout: opts.io_timeout,
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(region)
            .with_client_options(client)
            .with_retry(retry)
            .with_virtual_hosted_style_request(opts.virtual_host)
            .with_disable_tagging(true);
        if let Some(ep) = &endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(Error::Invalid(format!(
                    "--s3-endpoint {ep:?}: use http://HOST:PORT or https://HOST:PORT"
                )));
            }
            let ep = ep.trim_end_matches('/');
            b = match opts.virtual_host {
                // The client sends virtual-host requests to the endpoint as given:
                // it must name the bucket's own host.
                true => b.with_endpoint(bucket_endpoint(ep, &bucket)?),
                false => b.with_endpoint(ep),
            };
        }
        match credentials(opts)? {
            Some(c) => {
                b = b
                    .with_access_key_id(c.key_id)
                    .with_secret_access_key(c.secret);
                if let Some(t) = c.token {
                    b = b.with_token(t);
                }
            }
            None => {
                return Err(Error::Invalid(format!(
                    "{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                     use ~/.aws/credentials, or pass --s3-credentials FILE"
                )))
            }
        }
        let store = b.build().map_err(|e| Error::Remote {
            what: url.to_string(),
            reason: one_line(&e.to_string()),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-client")
            .enable_all()
            .build()
            .map_err(|e| Error::io("tokio runtime", e))?;
        Ok(S3Backend {
            url: format!("s3://{bucket}/{prefix}")
                .trim_end_matches('/')
                .to_string(),
            endpoint: endpoint.unwrap_or_else(|| "AWS".into()),
            prefix,
            store: Arc::new(store),
            runtime,
            gate: Gate::new(opts.in_flight),
            io_timeout: opts.io_timeout,
            latencies: Mutex::new(VecDeque::with_capacity(LATENCY_WINDOW)),
            pending: Arc::new((Mutex::new(Pending::default()), Condvar::new())),
            counters: Mutex::new(S3Counters::default()),
        })
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn remote(&self, key: &str, e: impl std::fmt::Display) -> Error {
        Error::Remote {
            what: format!("{} at {}", self.describe_key(key), self.endpoint),
            reason: reason(&e.to_string()),
        }
    }

    /// Run `fut` on the runtime within the overall request time limit.
    fn run<T>(
        &self,
        key: &str,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<std::result::Result<T, object_store::Error>> {
        self.run_for(key, self.io_timeout, fut)
    }

    /// [`run`](Self::run) with its own limit (a listing is many requests).
    fn run_for<T>(
        &self,
        key: &str,
        limit: Duration,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<std::result::Result<T, object_store::Error>> {
        self.runtime
            .block_on(async { tokio::time::timeout(limit, fut).await })
            .map_err(|_| self.remote(key, format!("no answer within {} s", limit.as_secs())))
    }

    fn hedge_delay(&self) -> Duration {
        let Ok(l) = self.latencies.lock() else {
            return HEDGE_MIN * 20;
        };
        if l.len() < 16 {
            return Duration::from_secs(1);
        }
        let mut v: Vec<Duration> = l.iter().copied().collect();
        v.sort_unstable();
        v[v.len() * 95 / 100].max(HEDGE_MIN)
    }

    fn note_latency(&self, d: Duration) {
        if let Ok(mut l) = self.latencies.lock() {
            if l.len() == LATENCY_WINDOW {
                l.pop_front();
            }
            l.push_back(d);
        }
    }

    fn count(&self, f: impl FnOnce(&mut S3Counters)) {
        if let Ok(mut c) = self.counters.lock() {
            f(&mut c);
        }
    }

    /// GET with a hedge: `range` None is the whole object. Returns the body and the
    /// object's size.
    fn get_hedged(
        &self,
        key: &str,
        range: Option<std::ops::Range<u64>>,
        limit: u64,
        class: ReadClass,
    ) -> Result<Option<Vec<u8>>> {
        let _slot = self.gate.enter(class);
        let path = self.path(key);
        let opts = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            ..Default::default()
        };
        let one = |store: Arc<AmazonS3>, path: ObjPath, opts: GetOptions| async move {
            let r = store.get_opts(&path, opts).await?;
            if r.range.end - r.range.start > limit {
                return Ok(Err(r.meta.size));
            }
            r.bytes().await.map(|b| Ok(b.to_vec()))
        };
        let hedge_after = self.hedge_delay();
        let started = Instant::now();
        let store = self.store.clone();
        let hedged = std::sync::atomic::AtomicBool::new(false);
        let res = self.run(key, async {
            let first = one(store.clone(), path.clone(), opts.clone());
            tokio::pin!(first);
            tokio::select! {
                r = &mut first => r,
                _ = tokio::time::sleep(hedge_after) => {
                    hedged.store(true, std::sync::atomic::Ordering::Relaxed);
                    let second = one(store, path, opts);
                    tokio::select! {
                        r = &mut first => r,
                        r = second => r,
                    }
                }
            }
        })?;
        let hedged = hedged.into_inner();
        self.count(|c| {
            c.gets += 1 + u64::from(hedged);
            c.hedged += u64::from(hedged);
        });
        match res {
            Ok(Ok(bytes)) => {
                self.note_latency(started.elapsed());
                self.count(|c| c.bytes_in += bytes.len() as u64);
                Ok(Some(bytes))
            }
            Ok(Err(size)) => Err(Error::BadObject(format!(
                "{}: {size} bytes, more than a valid one can ({limit})",
                self.describe_key(key)
            ))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            // A range starting at or past the end of the object: nothing there.
            Err(e) if range.is_some() && e.to_string().contains("Range") => {
                match self.head(key)? {
                    Some(_) => Ok(Some(Vec::new())),
                    None => Ok(None),
                }
            }
            Err(e) => Err(self.remote(key, e)),
        }
    }
}

/// Listings read again after a page's body was cut off.
const LIST_RETRIES: u32 = 4;

/// True for a client error that says a response body ended early (a reset
/// connection mid-transfer).
fn cut_off(e: &str) -> bool {
    e.contains("body error") || e.contains("response body")
}

/// What a client error means for an operator, on one line: the common causes
/// named plainly, the client's own text (without a response body's XML) after.
fn reason(e: &str) -> String {
    // Never a response body: a server's error document may echo the request.
    let head = e.split('<').next().unwrap_or(e);
    // A status code only where the client reports one: the text also holds URLs,
    // ports and object names, whose digits may spell any code.
    let status = |code: &str| e.contains(&format!("status code: {code}"));
    let plain = if e.contains("NoSuchBucket") {
        Some("no such bucket")
    } else if status("403") || e.contains("AccessDenied") || e.contains("InvalidAccessKeyId") {
        Some("access denied (wrong credentials, or the key may not use this bucket)")
    } else if e.contains("error sending request") || e.contains("onnection refused") {
        Some("cannot reach the server")
    } else if e.contains("SlowDown") || status("503") {
        Some("the server is throttling requests (503 SlowDown) and retries ran out")
    } else {
        None
    };
    match plain {
        Some(p) => format!("{p}: {}", one_line(head)),
        None => one_line(head),
    }
}

/// Error text of the client on one line, without a response body's XML noise.
fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn get(&self, key: &str, limit: u64, class: ReadClass) -> Result<Option<Vec<u8>>> {
        self.get_hedged(key, None, limit, class)
    }

    fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: usize,
        class: ReadClass,
    ) -> Result<Option<Vec<u8>>> {
        if len == 0 {
            return Ok(self.head(key)?.map(|_| Vec::new()));
        }
        let end = offset.saturating_add(len as u64);
        self.get_hedged(key, Some(offset..end), len as u64, class)
    }

    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<Put> {
        let _slot = self.gate.enter(ReadClass::Demand);
        let path = self.path(key);
        let payload = PutPayload::from(bytes.to_vec());
        let opts = PutOptions {
            mode: match mode {
                PutMode::Overwrite => object_store::PutMode::Overwrite,
                PutMode::Create => object_store::PutMode::Create,
            },
            ..Default::default()
        };
        let store = self.store.clone();
        let res = self.run(
            key,
            async move { store.put_opts(&path, payload, opts).await },
        )?;
        self.count(|c| c.puts += 1);
        match res {
            Ok(_) => Ok(Put::Written),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Put::Existed),
            Err(e) => Err(self.remote(key, e)),
        }
    }

    fn put_deferred(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let (lock, cv) = &*self.pending;
        let limit = self.gate.total;
        {
            let mut p = lock
                .lock()
                .map_err(|_| self.remote(key, "upload queue poisoned"))?;
            while p.running >= limit && p.failed.is_none() {
                p = cv
                    .wait(p)
                    .map_err(|_| self.remote(key, "upload queue poisoned"))?;
            }
            if let Some(f) = &p.failed {
                return Err(upload_failed(f));
            }
            p.running += 1;
        }
        let store = self.store.clone();
        let path = self.path(key);
        let pending = self.pending.clone();
        let what = format!("{} at {}", self.describe_key(key), self.endpoint);
        let limit = self.io_timeout;
        self.runtime.spawn(async move {
            let opts = PutOptions {
                mode: object_store::PutMode::Create,
                ..Default::default()
            };
            let res =
                tokio::time::timeout(limit, store.put_opts(&path, PutPayload::from(bytes), opts))
                    .await;
            let err = match res {
                Ok(Ok(_))
                | Ok(Err(object_store::Error::AlreadyExists { .. }))
                | Ok(Err(object_store::Error::Precondition { .. })) => None,
                Ok(Err(e)) => Some(reason(&e.to_string())),
                Err(_) => Some(format!("no answer within {} s", limit.as_secs())),
            };
            let (lock, cv) = &*pending;
            if let Ok(mut p) = lock.lock() {
                p.running -= 1;
                if let Some(reason) = err {
                    p.failed.get_or_insert((what, reason));
                }
            }
            cv.notify_all();
        });
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        let store = self.store.clone();
        match self.run(key, async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.remote(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        use futures_util::TryStreamExt;
        let path = self.path(prefix.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut attempt = 0u32;
        // Each page is a request with its own attempt timeout and retries; the
        // whole listing of a large store takes many (1000 keys each). One limit for
        // the listing with its repeats.
        let limit = (self.io_timeout * 40).max(Duration::from_secs(600));
        let started = Instant::now();
        let metas: Vec<object_store::ObjectMeta> = loop {
            let (store, path) = (self.store.clone(), path.clone());
            let left = limit
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(1));
            let r = self.run_for(prefix, left, async move {
                store.list(Some(&path)).try_collect().await
            })?;
            match r {
                Ok(m) => break m,
                // A page whose body was cut off mid-stream: the client retries a
                // request that fails, and resumes an object's body, but not a
                // listing page it began to read. The listing is read again.
                Err(e)
                    if attempt < LIST_RETRIES
                        && started.elapsed() < limit
                        && cut_off(&e.to_string()) =>
                {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                }
                Err(e) => return Err(self.remote(prefix, e)),
            }
        };
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&strip)?.to_string();
                Some(ObjectMeta {
                    key,
                    size: m.size,
                    modified: m.last_modified.timestamp(),
                })
            })
            .collect())
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key);
        let store = self.store.clone();
        match self.run(key, async move { store.head(&path).await })? {
            Ok(m) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.size,
                modified: m.last_modified.timestamp(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.remote(key, e)),
        }
    }

    fn requests(&self) -> Option<RequestReport> {
        let c = self.counters.lock().map(|c| *c).unwrap_or_default();
        let mut lat: Vec<Duration> = self
            .latencies
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default();
        lat.sort_unstable();
        let pct = |p: usize| {
            lat.get((lat.len() * p / 100).min(lat.len().saturating_sub(1)))
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0)
        };
        let (in_flight, peak) = self
            .gate
            .state
            .lock()
            .map(|s| (s.busy as u64, s.peak as u64))
            .unwrap_or((0, 0));
        Some(RequestReport {
            gets: c.gets,
            hedged: c.hedged,
            puts: c.puts,
            bytes_in: c.bytes_in,
            in_flight,
            peak_in_flight: peak,
            get_p50_ms: pct(50),
            get_p99_ms: pct(99),
        })
    }

    fn sync(&self, _keys: &[String]) -> Result<()> {
        // Completed PUTs are durable; wait for the deferred ones.
        let (lock, cv) = &*self.pending;
        let mut p = lock
            .lock()
            .map_err(|_| self.remote("", "upload queue poisoned"))?;
        while p.running > 0 {
            p = cv
                .wait(p)
                .map_err(|_| self.remote("", "upload queue poisoned"))?;
        }
        match &p.failed {
            Some(f) => Err(upload_failed(f)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seen in CI: a 503 through a proxy on port 40381 was reported as "access
    /// denied" (the port contains 403).
    #[test]
    fn a_status_code_is_read_where_the_client_reports_it_not_in_a_port() {
        let e = "Error performing GET http://127.0.0.1:40381/b/chunks/7c/7c64 in 1.2s, after 8 retries - Server returned non-2xx status code: 503 Service Unavailable: ";
        assert!(
            reason(e).starts_with("the server is throttling"),
            "{}",
            reason(e)
        );
        let e = "Error performing GET http://127.0.0.1:5031/b/k - Server returned non-2xx status code: 403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code>";
        assert!(reason(e).starts_with("access denied"), "{}", reason(e));
        assert!(
            !reason(e).contains("SignatureDoesNotMatch"),
            "a response body was shown"
        );
    }

    #[test]
    fn a_virtual_host_endpoint_names_the_bucket_once() {
        let e = |ep: &str| bucket_endpoint(ep, "vms").map_err(|e| e.to_string());
        assert_eq!(
            e("http://s3.example.com:3900").unwrap(),
            "http://vms.s3.example.com:3900"
        );
        assert_eq!(
            e("https://vms.s3.example.com").unwrap(),
            "https://vms.s3.example.com"
        );
        assert_eq!(e("https://vmsx.host").unwrap(), "https://vms.vmsx.host");
        for ip in [
            "http://127.0.0.1:3900",
            "http://[::1]:3900",
            "http://127.0.0.2",
        ] {
            assert!(
                e(ip)
                    .unwrap_err()
                    .contains("needs an endpoint with a host name"),
                "{ip}"
            );
        }
    }

    #[test]
    fn urls_and_bucket_names() {
        assert_eq!(
            parse_url("s3://backups/site-a/").unwrap(),
            ("backups".into(), "site-a".into())
        );
        assert_eq!(
            parse_url("s3://backups").unwrap(),
            ("backups".into(), "".into())
        );
        for bad in [
            "s3://okname/a~b",
            "s3://okname/a%20b",
            "backups",
            "s3://ab",
            "s3://Upper/x",
            "s3://ok-name/../x",
            "s3://b_b/x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_files_profiles_and_modes() {
        let text = "[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n\n\
                    [profile other]\naws_access_key_id=AK2\naws_secret_access_key=SK2\naws_session_token=T\n";
        let c = credentials_from_ini(text, "default", "f").unwrap();
        assert_eq!((c.key_id.as_str(), c.secret.as_str()), ("AK", "SK"));
        let c = credentials_from_ini(text, "other", "f").unwrap();
        assert_eq!(c.token.as_deref(), Some("T"));
        let e = credentials_from_ini(text, "nope", "f")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no profile [nope]"), "{e}");
        // A file others can read is refused, and the message holds no secret.
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("creds");
        std::fs::write(&f, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let opts = S3Options {
            credentials_file: Some(f.clone()),
            ..Default::default()
        };
        let e = S3Backend::open("s3://bucket/x", &opts)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("readable by others") && !e.contains("SK"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let b = S3Backend::open("s3://bucket/x", &opts).unwrap();
        let shown = format!("{b:?} {}", b.describe());
        assert!(!shown.contains("SK") && !shown.contains("AK"), "{shown}");
    }

    #[test]
    fn background_requests_wait_for_demand_and_leave_slots_free() {
        let g = Arc::new(Gate::new(4));
        let held: Vec<_> = (0..3).map(|_| g.enter(ReadClass::Background)).collect();
        // Three of four slots taken by background reads: a fourth background read
        // would wait, a demand read gets the reserved slot at once.
        let _d = g.enter(ReadClass::Demand);
        let g2 = g.clone();
        let t = std::thread::spawn(move || {
            let _s = g2.enter(ReadClass::Background);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        drop(held);
        t.join().unwrap();
    }
}
