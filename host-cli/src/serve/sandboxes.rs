//! The service's sandboxes. Each lives on a thread of its own that owns its backend
//! (provisioned and started once, stopped and deprovisioned when the sandbox is deleted,
//! expires or the service stops). Where the backend can run commands side by side (a
//! persistent process sandbox, a microVM) each exec runs on a thread of its own, many at
//! once; otherwise the sandbox's thread runs them one after another. Output streams to
//! the HTTP response as it comes; a running exec can be signalled by its id.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use policy::{Containment, FsView};
use sandbox::output::{ExecIo, OutputSink, StdinMode, StreamKind};
use sandbox::{ExecOutcome, ExecRequest, ExecSignals, ExitKind, SandboxSpec, SharedExec};
use serde::Serialize;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::metrics::Metrics;

/// What a client may ask of the service at once.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sandboxes: usize,
    pub max_execs: usize,
    /// The exec timeout when neither the request nor the policy names one.
    pub default_exec_timeout: Duration,
}

/// One event of an exec, as streamed to the client.
#[derive(Debug)]
pub enum ExecEvent {
    Output(StreamKind, Vec<u8>),
    Exit(ExecOutcome),
    Failed(ApiError),
}

/// A request to run one command.
pub struct ExecJob {
    pub req: ExecRequest,
    pub stdin: Option<Vec<u8>>,
    pub events: mpsc::Sender<ExecEvent>,
}

enum Job {
    Exec(u64, ExecJob, ExecSignals),
    Stop,
}

/// A running exec, as the API lists and signals it.
#[derive(Debug, Clone)]
pub struct Active {
    pub argv: Vec<String>,
    pub started: SystemTime,
    pub signals: ExecSignals,
}

/// What ends an exec, wherever it ran: its metrics, counters and listing.
#[derive(Clone)]
struct Books {
    metrics: Arc<Metrics>,
    running: Arc<AtomicUsize>,
    active: Arc<Mutex<HashMap<u64, Active>>>,
}

impl Books {
    /// Send the exec's last event and forget it.
    fn close(
        &self,
        id: u64,
        events: &mpsc::Sender<ExecEvent>,
        done: (Result<ExecOutcome, ApiError>, bool),
        start: Instant,
    ) {
        let (result, stalled) = done;
        let event = match result {
            Ok(outcome) => {
                self.metrics.exec_done(start.elapsed(), &outcome);
                ExecEvent::Exit(outcome)
            }
            Err(e) => ExecEvent::Failed(e),
        };
        if let Ok(mut active) = self.active.lock() {
            if let Some(a) = active.remove(&id) {
                a.signals.end();
            }
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        // A client that stopped reading gets no more patience.
        let patience = if stalled {
            Duration::ZERO
        } else {
            STALLED_CLIENT
        };
        let _ = send_patiently(events, event, patience);
    }
}

/// A live sandbox.
pub struct Entry {
    pub id: String,
    pub backend: Containment,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    created_at: Instant,
    pub ttl: Option<Duration>,
    pub idle_ttl: Option<Duration>,
    last_used: Mutex<Instant>,
    /// The policy's resolved file view: what the files API may touch.
    pub view: FsView,
    /// The policy's limit of each exec ([`policy::Policy::exec_timeout`]): a request may
    /// only lower it.
    pub policy_timeout: Option<Duration>,
    pub execs: AtomicU64,
    jobs: Mutex<std_mpsc::Sender<Job>>,
    /// Runs execs side by side, when the backend can.
    shared: Option<Arc<dyn SharedExec>>,
    books: Books,
    output_limit: Option<u64>,
    /// The sandbox's root process, when the backend has one for its whole life (a
    /// persistent process sandbox): deleting the sandbox kills it, ending running execs.
    root_pid: Option<u32>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Serialize)]
pub struct SandboxInfo {
    pub id: String,
    pub backend: &'static str,
    pub state: &'static str,
    pub labels: BTreeMap<String, String>,
    pub created_unix_ms: u128,
    pub ttl_s: Option<u64>,
    pub idle_ttl_s: Option<u64>,
    pub running_execs: usize,
    pub execs: u64,
}

impl Entry {
    pub fn info(&self) -> SandboxInfo {
        SandboxInfo {
            id: self.id.clone(),
            backend: self.backend.as_str(),
            state: "running",
            labels: self.labels.clone(),
            created_unix_ms: self
                .created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            ttl_s: self.ttl.map(|d| d.as_secs()),
            idle_ttl_s: self.idle_ttl.map(|d| d.as_secs()),
            running_execs: self.books.running.load(Ordering::SeqCst),
            execs: self.execs.load(Ordering::SeqCst),
        }
    }

    pub fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    /// Whether a TTL has run out (the idle one only counts while no exec runs).
    fn expired(&self, now: Instant) -> bool {
        let idle_since = self.last_used.lock().map_or(now, |t| *t);
        let absolute = self
            .ttl
            .is_some_and(|t| now.duration_since(self.created_at) >= t);
        let idle = self.idle_ttl.is_some_and(|t| {
            self.books.running.load(Ordering::SeqCst) == 0 && now.duration_since(idle_since) >= t
        });
        absolute || idle
    }

    /// Start an exec: on a thread of its own when the backend runs execs side by side,
    /// else queued for the sandbox's thread. Its id.
    pub fn submit(&self, job: ExecJob, signals: ExecSignals) -> Result<u64, ApiError> {
        let id = self.execs.fetch_add(1, Ordering::SeqCst) + 1;
        self.books.running.fetch_add(1, Ordering::SeqCst);
        self.touch();
        if let Ok(mut active) = self.books.active.lock() {
            active.insert(
                id,
                Active {
                    argv: job.req.argv.clone(),
                    started: SystemTime::now(),
                    signals: signals.clone(),
                },
            );
        }
        let undo = |e: ApiError| {
            if let Ok(mut active) = self.books.active.lock() {
                active.remove(&id);
            }
            self.books.running.fetch_sub(1, Ordering::SeqCst);
            e
        };
        let Some(shared) = &self.shared else {
            let sent = self
                .jobs
                .lock()
                .map_err(|_| ApiError::internal("sandbox state is poisoned"))?
                .send(Job::Exec(id, job, signals));
            return sent
                .map(|()| id)
                .map_err(|_| undo(ApiError::gone(&self.id)));
        };
        let shared = Arc::clone(shared);
        let books = self.books.clone();
        let limit = self.output_limit;
        std::thread::Builder::new()
            .name(format!("exec {id}"))
            .spawn(move || {
                let events = job.events.clone();
                let start = Instant::now();
                let done = run_exec(&mut |req, io| shared.exec(req, io), job, limit, signals);
                books.close(id, &events, done, start);
            })
            .map(|_| id)
            .map_err(|e| {
                undo(ApiError::internal(format!(
                    "cannot start an exec thread: {e}"
                )))
            })
    }

    /// The running execs, oldest first.
    pub fn active(&self) -> Vec<(u64, Active)> {
        let mut all: Vec<(u64, Active)> = self
            .books
            .active
            .lock()
            .map(|m| m.iter().map(|(id, a)| (*id, a.clone())).collect())
            .unwrap_or_default();
        all.sort_by_key(|(id, _)| *id);
        all
    }

    /// A running exec's signal handle.
    pub fn signals(&self, exec: u64) -> Option<ExecSignals> {
        self.books
            .active
            .lock()
            .ok()?
            .get(&exec)
            .map(|a| a.signals.clone())
    }

    fn stop(&self) {
        if let Ok(tx) = self.jobs.lock() {
            let _ = tx.send(Job::Stop);
        }
        if let Some(pid) = self
            .root_pid
            .filter(|_| self.books.running.load(Ordering::SeqCst) > 0)
        {
            // SAFETY: kill() has no memory effects; the sandbox's thread reaps its root
            // only in its stop, after this, so the pid is still its child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// What `POST /v1/sandboxes` asks for, validated.
pub struct CreateRequest {
    pub policy: policy::Policy,
    pub labels: BTreeMap<String, String>,
    pub ttl: Option<Duration>,
    pub idle_ttl: Option<Duration>,
}

/// Every sandbox of the service.
pub struct Registry {
    sandboxes: Mutex<HashMap<String, Arc<Entry>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// Restored microVMs waiting for a sandbox (`--warm-pool`).
    pub pool: Option<sandbox::microvm::WarmPool>,
    next: AtomicU64,
}

impl Registry {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            sandboxes: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            limits,
            metrics,
            pool: None,
            next: AtomicU64::new(1),
        }
    }

    pub fn get(&self, id: &str) -> Result<Arc<Entry>, ApiError> {
        self.sandboxes
            .lock()
            .map_err(|_| ApiError::internal("registry is poisoned"))?
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))
    }

    pub fn list(&self) -> Vec<Arc<Entry>> {
        let mut all: Vec<Arc<Entry>> = self
            .sandboxes
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by_key(|e| e.created_at);
        all
    }

    pub fn running_execs(&self) -> usize {
        self.sandboxes
            .lock()
            .map(|m| {
                m.values()
                    .map(|e| e.books.running.load(Ordering::SeqCst))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Provision and start a sandbox (blocking: a microVM boots here).
    pub fn create(&self, req: CreateRequest) -> Result<Arc<Entry>, ApiError> {
        let count = self.sandboxes.lock().map(|m| m.len()).unwrap_or(0);
        if count >= self.limits.max_sandboxes {
            return Err(ApiError::too_many(format!(
                "the service already runs {count} sandboxes (--max-sandboxes {})",
                self.limits.max_sandboxes
            )));
        }
        let policy = req.policy;
        let containment = sandbox::select_backend(policy.containment);
        let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let view = policy::resolve_fs(&policy.filesystem, &base)
            .map_err(|e| ApiError::bad_policy(e.to_string()))?;
        // `<pid>-<hex>`, as `mxc-vm run` names its sandboxes: what a service that died
        // left behind (a microVM's runtime directory) is swept by the next start.
        let id = format!(
            "{}-{:08x}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::SeqCst)
        );
        let spec = SandboxSpec {
            policy: policy.clone(),
            view: view.clone(),
            id: id.clone(),
            net: Default::default(),
        };
        let (jobs_tx, jobs_rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<Ready, ApiError>>(1);
        let books = Books {
            metrics: Arc::clone(&self.metrics),
            running: Arc::new(AtomicUsize::new(0)),
            active: Arc::new(Mutex::new(HashMap::new())),
        };
        let thread_books = books.clone();
        let pool = self.pool.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sandbox {id}"))
            .spawn(move || {
                let backend = make_backend(containment, pool);
                sandbox_thread(backend, spec, jobs_rx, ready_tx, thread_books)
            })
            .map_err(|e| ApiError::internal(format!("cannot start a sandbox thread: {e}")))?;
        let ready = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ApiError::internal("the sandbox thread ended during setup"));
            }
        };
        let now = Instant::now();
        let entry = Arc::new(Entry {
            id: id.clone(),
            backend: containment,
            labels: req.labels,
            created: SystemTime::now(),
            created_at: now,
            ttl: req.ttl,
            idle_ttl: req.idle_ttl,
            last_used: Mutex::new(now),
            view,
            policy_timeout: policy.exec_timeout(),
            execs: AtomicU64::new(0),
            jobs: Mutex::new(jobs_tx),
            shared: ready.shared,
            books,
            output_limit: policy.limits.output_bytes,
            root_pid: ready.root_pid,
        });
        if let Ok(mut m) = self.sandboxes.lock() {
            m.insert(id, Arc::clone(&entry));
        }
        if let Ok(mut t) = self.threads.lock() {
            t.retain(|h| !h.is_finished());
            t.push(thread);
        }
        self.metrics.created(containment.as_str());
        Ok(entry)
    }

    /// Remove a sandbox: it stops once its queued execs are done.
    pub fn delete(&self, id: &str) -> Result<Arc<Entry>, ApiError> {
        let entry = self
            .sandboxes
            .lock()
            .map_err(|_| ApiError::internal("registry is poisoned"))?
            .remove(id)
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))?;
        entry.stop();
        self.metrics.deleted(entry.backend.as_str());
        Ok(entry)
    }

    /// Delete every sandbox whose TTL ran out; returns their ids.
    pub fn reap_expired(&self) -> Vec<String> {
        let now = Instant::now();
        let expired: Vec<String> = self
            .list()
            .into_iter()
            .filter(|e| e.expired(now))
            .map(|e| e.id.clone())
            .collect();
        for id in &expired {
            let _ = self.delete(id);
        }
        expired
    }

    /// Stop every sandbox and wait for their threads (service shutdown).
    pub fn shutdown(&self) {
        let ids: Vec<String> = self.list().into_iter().map(|e| e.id.clone()).collect();
        for id in ids {
            let _ = self.delete(&id);
        }
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// How long an exec's output may wait for a client that does not read it before the
/// rest of the output is dropped (the command, its timeout and the sandbox go on).
const STALLED_CLIENT: Duration = Duration::from_secs(30);

/// Sends output chunks to the exec's HTTP response. The channel is bounded, so a slow
/// client slows the command down; one that went away, or stopped reading for
/// [`STALLED_CLIENT`], only loses the output: the supervisor must keep its hands free
/// to enforce the timeout.
struct ChannelSink {
    tx: mpsc::Sender<ExecEvent>,
    dropping: bool,
}

/// Send an event unless the client is gone or has not made room within `patience`;
/// whether it was sent.
fn send_patiently(tx: &mpsc::Sender<ExecEvent>, event: ExecEvent, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    let mut event = event;
    loop {
        match tx.try_send(event) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(back)) => {
                if Instant::now() >= deadline {
                    return false;
                }
                event = back;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl OutputSink for ChannelSink {
    fn chunk(&mut self, kind: StreamKind, data: &[u8]) -> std::io::Result<()> {
        if !self.dropping {
            let event = ExecEvent::Output(kind, data.to_vec());
            self.dropping = !send_patiently(&self.tx, event, STALLED_CLIENT);
        }
        Ok(())
    }
}

/// What a started sandbox tells the service.
struct Ready {
    root_pid: Option<u32>,
    shared: Option<Arc<dyn SharedExec>>,
}

fn sandbox_thread(
    backend: Result<Box<dyn sandbox::Backend>, ApiError>,
    spec: SandboxSpec,
    jobs: std_mpsc::Receiver<Job>,
    ready: std_mpsc::SyncSender<Result<Ready, ApiError>>,
    books: Books,
) {
    let mut backend = match backend {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let started = backend
        .provision(&spec)
        .and_then(|()| backend.start())
        .map_err(|e| ApiError::unprocessable("sandbox_refused", super::error::chain(&e)));
    if let Err(e) = started {
        let _ = backend.stop();
        let _ = backend.deprovision();
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(Ready {
        root_pid: backend.root_pid(),
        shared: backend.shared_exec(),
    }));
    let output_limit = spec.policy.limits.output_bytes;
    for job in jobs {
        let Job::Exec(id, job, signals) = job else {
            break;
        };
        let events = job.events.clone();
        let start = Instant::now();
        let done = run_exec(
            &mut |req, io| backend.exec(req, io),
            job,
            output_limit,
            signals,
        );
        books.close(id, &events, done, start);
    }
    let _ = backend.stop();
    let _ = backend.deprovision();
}

fn make_backend(
    containment: Containment,
    pool: Option<sandbox::microvm::WarmPool>,
) -> Result<Box<dyn sandbox::Backend>, ApiError> {
    // One sandbox for all its execs: namespaces and root made once, /tmp kept.
    let options = sandbox::BackendOptions {
        persistent: true,
        microvm: sandbox::microvm::MicrovmOptions {
            pool,
            ..Default::default()
        },
    };
    sandbox::backend_for(containment, options)
        .map_err(|e| ApiError::unprocessable("backend_unavailable", e.to_string()))
}

/// Run one exec; the outcome, and whether the client stopped reading its output.
fn run_exec(
    exec: &mut dyn FnMut(
        &ExecRequest,
        &mut ExecIo<'_>,
    ) -> Result<ExecOutcome, sandbox::SandboxError>,
    job: ExecJob,
    output_limit: Option<u64>,
    signals: ExecSignals,
) -> (Result<ExecOutcome, ApiError>, bool) {
    let mut sink = ChannelSink {
        tx: job.events.clone(),
        dropping: false,
    };
    // Stdin bytes go through a pipe, written by a thread of their own so that a command
    // that does not read them cannot block the sandbox.
    let mut writer = None;
    let mut read_end = None;
    if let Some(bytes) = job.stdin {
        let (r, w) = match sandbox::output::pipe() {
            Ok(ends) => ends,
            Err(e) => {
                return (
                    Err(ApiError::internal(format!("cannot create a pipe: {e}"))),
                    false,
                )
            }
        };
        writer = Some(std::thread::spawn(move || {
            use std::io::Write;
            let _ = std::fs::File::from(w).write_all(&bytes);
        }));
        read_end = Some(r);
    }
    let stdin = match &read_end {
        Some(r) => StdinMode::Fd(r.as_raw_fd()),
        None => StdinMode::Null,
    };
    let mut io = ExecIo {
        stdin,
        sink: Some(&mut sink),
        output_limit,
        signals: Some(signals.clone()),
    };
    let result = exec(&job.req, &mut io);
    // A backend that failed before its command ran never ended the handle.
    signals.end();
    // The command is gone: its end of the pipe closes, and so does the writer's.
    drop(read_end);
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stalled = sink.dropping;
    (
        result.map_err(|e| ApiError::unprocessable("exec_failed", super::error::chain(&e))),
        stalled,
    )
}

/// The exit event's JSON.
pub fn exit_json(outcome: &ExecOutcome) -> serde_json::Value {
    let (code, signal) = match outcome.exit {
        ExitKind::Code(c) => (Some(c), None),
        ExitKind::Signal(s) => (None, Some(s)),
    };
    serde_json::json!({
        "type": "exit",
        "exit_code": code,
        "signal": signal,
        "timed_out": outcome.timed_out,
        "output_truncated": outcome.output_truncated,
        "duration_ms": outcome.duration.as_secs_f64() * 1000.0,
    })
}
