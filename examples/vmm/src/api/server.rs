//! The API server: one thread (`ember-api`) that accepts connections on the Unix
//! socket, frames HTTP requests ([`super::http`]), routes them ([`super::model::route`])
//! and hands each to the VMM thread over a channel, waking it with an eventfd; it waits
//! for the VMM's [`ApiReply`] and writes the response. Requests to the VMM are
//! serialized, as in Firecracker: one at a time.
//!
//! The thread polls (`poll(2)`) the listener, a wake-up eventfd and up to
//! [`MAX_CONNECTIONS`] connections, each non-blocking with its own input and output
//! buffer, so a client that stops mid-request (or stops reading its responses) holds up
//! no other.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::http::{self, Parsed, MAX_BODY_BYTES, MAX_HEADER_BYTES};
use super::model::{route, ApiReply, ApiRequest, Routed};

/// The most connections served at once; a further client gets a 503 and is closed.
pub const MAX_CONNECTIONS: usize = 16;

/// How long the API thread waits for the VMM to answer a request (a snapshot of a large
/// VM takes a while) before answering 504.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// The API thread's name.
pub const THREAD_NAME: &str = "ember-api";

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process answers on the socket.
    #[error("API socket {path}: another process is serving it (remove it or choose another path)")]
    InUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path.
    #[error("API socket {path}: the path exists and is not a socket ({kind})")]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What is there (`regular file`, `directory`, ...).
        kind: &'static str,
    },
    /// The path could not be examined, or a stale socket there not removed.
    #[error("API socket {path}: {what}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// `bind(2)`/`listen(2)` failed.
    #[error("cannot listen on API socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An eventfd or the socket's non-blocking mode could not be set up.
    #[error("cannot set up the API server: {0}")]
    Setup(io::Error),
    /// The thread could not be started.
    #[error("cannot start the {THREAD_NAME} thread: {0}")]
    Spawn(io::Error),
    /// The thread's start hook (its seccomp filter) failed.
    #[error("the {THREAD_NAME} thread could not start: {0}")]
    Hook(String),
}

/// The running API server. Dropping it stops the thread, which closes every
/// connection and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// The VMM thread's end: requests arrive here. Read [`Self::event_fd`] from the event
/// loop; when it is readable, call [`Self::try_recv`] until it returns `None`.
#[derive(Debug)]
pub struct ApiRequests {
    rx: mpsc::Receiver<(ApiRequest, Responder)>,
    event: Arc<EventFd>,
}

/// Answers one request. Dropping it without [`Self::reply`] answers 500.
#[derive(Debug)]
pub struct Responder {
    tx: Option<mpsc::SyncSender<ApiReply>>,
}

impl Responder {
    /// Sends the reply (to the API thread, which writes the response).
    pub fn reply(mut self, reply: ApiReply) {
        if let Some(tx) = self.tx.take() {
            // The API thread may have given up waiting (timeout, shutdown).
            let _ = tx.send(reply);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(ApiReply::internal(
                "the VMM dropped the request without answering it",
            ));
        }
    }
}

impl ApiRequests {
    /// The eventfd (`EFD_NONBLOCK | EFD_CLOEXEC`) the API thread writes after queuing a
    /// request: register it in the VMM's event loop.
    pub fn event_fd(&self) -> &EventFd {
        &self.event
    }

    /// The next request, if any. Clears the eventfd first, so a request queued after
    /// this call makes it readable again.
    pub fn try_recv(&self) -> Option<(ApiRequest, Responder)> {
        // EAGAIN when nothing was signalled: fine.
        let _ = self.event.read();
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for a request (for a VMM thread without an event loop).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn recv_timeout(&self, timeout: Duration) -> Option<(ApiRequest, Responder)> {
        let request = self.rx.recv_timeout(timeout).ok();
        if request.is_some() {
            let _ = self.event.read();
        }
        request
    }
}

impl ApiServer {
    /// Listens on `path` and starts the `ember-api` thread, which installs its seccomp
    /// filter ([`crate::seccomp::ThreadKind::Api`]) first. An existing socket at `path`
    /// that nobody answers on (left by a process that died) is replaced; one that
    /// answers, or anything else at `path`, is an error.
    ///
    /// Start it before a filter that forbids thread creation is installed on the
    /// calling thread (the new thread would inherit it).
    pub fn start(path: impl AsRef<Path>) -> Result<(ApiServer, ApiRequests), ApiError> {
        Self::start_with_hook(path.as_ref(), || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Api).map_err(|e| e.to_string())
        })
    }

    /// [`Self::start`] with `hook` run first on the new thread instead of the seccomp
    /// filter (tests).
    pub fn start_with_hook(
        path: &Path,
        hook: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<(ApiServer, ApiRequests), ApiError> {
        prepare_path(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        // From here on, the socket file is ours: removed again on any error.
        let remove = RemoveOnDrop(Some(path.to_path_buf()));
        listener.set_nonblocking(true).map_err(ApiError::Setup)?;
        let flags = libc::EFD_NONBLOCK | libc::EFD_CLOEXEC;
        let event = Arc::new(EventFd::new(flags).map_err(ApiError::Setup)?);
        let wake = Arc::new(EventFd::new(flags).map_err(ApiError::Setup)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let mut worker = Worker {
            listener,
            conns: Vec::new(),
            link: VmmLink {
                tx,
                vmm_event: event.clone(),
                stop: stop.clone(),
                reply_timeout: REPLY_TIMEOUT,
            },
            wake: wake.clone(),
            stop: stop.clone(),
            _remove: remove,
        };
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.to_string())
            .spawn(move || {
                let started = hook();
                let ok = started.is_ok();
                let _ = ready_tx.send(started);
                if ok {
                    worker.run();
                }
                // Dropping the worker closes the connections and removes the socket.
            })
            .map_err(ApiError::Spawn)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                let _ = thread.join();
                return Err(ApiError::Hook(message));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ApiError::Hook("the thread ended at once".into()));
            }
        }
        log::info!("API server listening on {}", path.display());
        Ok((
            ApiServer {
                stop,
                wake,
                thread: Some(thread),
            },
            ApiRequests { rx, event },
        ))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the {THREAD_NAME} thread to stop it: {e}");
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Makes `path` free for `bind`: nothing there, or a stale socket (removed).
fn prepare_path(path: &Path) -> Result<(), ApiError> {
    let err = |what, source| ApiError::Path {
        path: path.to_path_buf(),
        what,
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("cannot examine the path", e)),
    };
    let kind = meta.file_type();
    if !kind.is_socket() {
        let kind = if kind.is_file() {
            "regular file"
        } else if kind.is_dir() {
            "directory"
        } else if kind.is_symlink() {
            "symbolic link"
        } else if kind.is_fifo() {
            "FIFO"
        } else {
            "device or other file"
        };
        return Err(ApiError::NotASocket {
            path: path.to_path_buf(),
            kind,
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing the stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(|e| err("cannot remove the stale socket", e))
        }
        Err(e) => Err(err("cannot check whether a server answers there", e)),
    }
}

/// Removes the socket file when dropped (on the thread that drops it).
#[derive(Debug)]
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                log::warn!("cannot remove the API socket {}: {e}", path.display());
            }
        }
    }
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    /// Bytes received and not yet parsed.
    input: Vec<u8>,
    /// Bytes of responses not yet sent.
    output: Vec<u8>,
    /// `100 Continue` sent for the request being received.
    continue_sent: bool,
    /// Close once `output` is sent.
    close_after_write: bool,
    /// The client closed its end.
    eof: bool,
    /// Done: to be dropped.
    closed: bool,
}

/// The most bytes a connection buffers before a request is complete: a request larger
/// than this is refused by the framing limits before it gets here.
const INPUT_LIMIT: usize = MAX_HEADER_BYTES + MAX_BODY_BYTES;

/// How often a wait for the VMM's reply checks for shutdown.
const REPLY_POLL: Duration = Duration::from_millis(100);

/// The API thread's state.
struct Worker {
    listener: UnixListener,
    conns: Vec<Conn>,
    link: VmmLink,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    /// Removes the socket file when the thread ends.
    _remove: RemoveOnDrop,
}

impl Worker {
    fn run(&mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2 + MAX_CONNECTIONS);
        while !self.stop.load(Ordering::SeqCst) {
            fds.clear();
            for fd in [self.wake.as_raw_fd(), self.listener.as_raw_fd()] {
                fds.push(pollfd(fd, libc::POLLIN));
            }
            for c in &self.conns {
                let events = if c.output.is_empty() && !c.close_after_write {
                    libc::POLLIN
                } else {
                    libc::POLLOUT
                };
                fds.push(pollfd(c.stream.as_raw_fd(), events));
            }
            let nfds = fds.len() as libc::nfds_t;
            // SAFETY: `fds` holds `nfds` initialised pollfds that poll may write to.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("{THREAD_NAME}: poll failed, the API server stops: {e}");
                return;
            }
            if fds.first().is_some_and(|f| f.revents != 0) {
                // Only ever written to stop the thread: checked at the loop's top.
                let _ = self.wake.read();
                continue;
            }
            let existing = self.conns.len();
            if fds.get(1).is_some_and(|f| f.revents != 0) {
                self.accept_all();
            }
            for i in 0..existing {
                let revents = fds.get(2 + i).map_or(0, |f| f.revents);
                if revents != 0 {
                    self.service(i);
                }
            }
            self.conns.retain(|c| !c.closed);
        }
    }

    /// Accepts every pending connection; past [`MAX_CONNECTIONS`], answers 503 and
    /// closes.
    fn accept_all(&mut self) {
        loop {
            // SAFETY: no address is asked for (null pointers); the returned fd, if any,
            // is new and owned by the UnixStream below.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    _ => {
                        log::warn!("{THREAD_NAME}: accept failed: {e}");
                        return;
                    }
                }
            }
            // SAFETY: `fd` was just returned by accept4 and nothing else owns it.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            let mut conn = Conn {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                continue_sent: false,
                close_after_write: false,
                eof: false,
                closed: false,
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                let message =
                    format!("too many API connections (at most {MAX_CONNECTIONS}); try again");
                log::warn!("{THREAD_NAME}: {message}");
                http::write_response(
                    &mut conn.output,
                    503,
                    Some(&http::fault_body(&message)),
                    true,
                );
                // Best effort: the response fits the socket buffer of a new connection.
                flush(&mut conn);
                continue;
            }
            self.conns.push(conn);
        }
    }

    /// Reads what connection `i` sent, answers every complete request, writes.
    fn service(&mut self, i: usize) {
        let Some(conn) = self.conns.get_mut(i) else {
            return;
        };
        if conn.output.is_empty() && !conn.close_after_write {
            read_available(conn);
        }
        loop {
            flush(conn);
            if conn.closed || !conn.output.is_empty() {
                break;
            }
            if conn.close_after_write {
                conn.closed = true;
                break;
            }
            if !self.link.answer_one(conn) {
                break;
            }
        }
    }
}

/// The API thread's link to the VMM thread.
struct VmmLink {
    tx: mpsc::Sender<(ApiRequest, Responder)>,
    vmm_event: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    reply_timeout: Duration,
}

impl VmmLink {
    /// Answers the request at the start of `conn.input`, if complete; false when there
    /// is none.
    fn answer_one(&self, conn: &mut Conn) -> bool {
        match http::parse_request(&conn.input) {
            Parsed::Incomplete { expect_continue } => {
                if conn.eof {
                    // The client is gone (mid-request or between requests).
                    conn.closed = true;
                } else if expect_continue && !conn.continue_sent {
                    conn.output.extend_from_slice(http::CONTINUE);
                    conn.continue_sent = true;
                    flush(conn);
                }
                false
            }
            Parsed::Request(request, used) => {
                conn.input.drain(..used.min(conn.input.len()));
                conn.continue_sent = false;
                let reply = match route(&request.method, &request.path, &request.body) {
                    Ok(Routed::Vmm(r)) => self.ask_vmm(r),
                    Ok(Routed::Local(reply)) | Err(reply) => reply,
                };
                let (status, body) = to_http(reply);
                log::debug!("API: {} {} -> {status}", request.method, request.path);
                http::write_response(&mut conn.output, status, body.as_deref(), request.close);
                conn.close_after_write = request.close;
                true
            }
            Parsed::Error(e) => {
                log::debug!("API: refused a request: {} {}", e.status, e.message);
                let body = http::fault_body(&e.message);
                http::write_response(&mut conn.output, e.status, Some(&body), true);
                conn.close_after_write = true;
                conn.input.clear();
                true
            }
        }
    }

    /// Hands `request` to the VMM and waits for its reply.
    fn ask_vmm(&self, request: ApiRequest) -> ApiReply {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.tx.send((request, Responder { tx: Some(tx) })).is_err() {
            return ApiReply::Error {
                status: 503,
                message: "the VMM is no longer taking requests (it has stopped)".into(),
            };
        }
        if let Err(e) = self.vmm_event.write(1) {
            log::warn!("{THREAD_NAME}: cannot wake the VMM thread: {e}");
        }
        let start = Instant::now();
        loop {
            match rx.recv_timeout(REPLY_POLL) {
                Ok(reply) => return reply,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return ApiReply::internal("the VMM dropped the request without answering it")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.stop.load(Ordering::SeqCst) {
                        return ApiReply::Error {
                            status: 503,
                            message: "the API server is shutting down".into(),
                        };
                    }
                    if start.elapsed() >= self.reply_timeout {
                        return ApiReply::Error {
                            status: 504,
                            message: format!(
                                "the VMM did not answer within {} s",
                                self.reply_timeout.as_secs()
                            ),
                        };
                    }
                }
            }
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// The status and body of `reply`.
fn to_http(reply: ApiReply) -> (u16, Option<Vec<u8>>) {
    match reply {
        ApiReply::NoContent => (204, None),
        ApiReply::Json(value) => (200, Some(value.to_string().into_bytes())),
        ApiReply::Error { status, message } => {
            let status = if (400..=599).contains(&status) {
                status
            } else {
                500
            };
            (status, Some(http::fault_body(&message)))
        }
    }
}

/// Reads what the client sent, up to [`INPUT_LIMIT`] buffered bytes, without blocking.
fn read_available(conn: &mut Conn) {
    let mut chunk = [0u8; 4096];
    while conn.input.len() < INPUT_LIMIT {
        let want = chunk.len().min(INPUT_LIMIT - conn.input.len());
        // SAFETY: `chunk` is valid for writes of `want` <= its length bytes.
        let n = unsafe { libc::read(conn.stream.as_raw_fd(), chunk.as_mut_ptr().cast(), want) };
        match usize::try_from(n) {
            Ok(0) => {
                conn.eof = true;
                return;
            }
            Ok(n) => conn.input.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        conn.closed = true;
                        return;
                    }
                }
            }
        }
    }
}

/// Sends what it can of `conn.output` without blocking; a send error closes it.
fn flush(conn: &mut Conn) {
    while !conn.output.is_empty() {
        // SAFETY: `output` is valid for reads of its length. MSG_NOSIGNAL: a client
        // that has gone gives EPIPE, not SIGPIPE.
        let n = unsafe {
            libc::send(
                conn.stream.as_raw_fd(),
                conn.output.as_ptr().cast(),
                conn.output.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(n) => {
                conn.output.drain(..n.min(conn.output.len()));
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        conn.output.clear();
                        conn.closed = true;
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A fake VMM thread: waits on the eventfd with poll(2), answers every request with
    /// `answer` (or drops it when `answer` gives `None`), counts them.
    struct FakeVmm {
        stop: Arc<AtomicBool>,
        seen: Arc<std::sync::Mutex<Vec<ApiRequest>>>,
        thread: Option<JoinHandle<()>>,
    }

    impl FakeVmm {
        fn start(
            requests: ApiRequests,
            answer: impl Fn(&ApiRequest) -> Option<ApiReply> + Send + 'static,
        ) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (stop2, seen2) = (stop.clone(), seen.clone());
            let thread = std::thread::spawn(move || {
                while !stop2.load(Ordering::SeqCst) {
                    let mut fd = [pollfd(requests.event_fd().as_raw_fd(), libc::POLLIN)];
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(fd.as_mut_ptr(), 1, 20) };
                    while let Some((request, responder)) = requests.try_recv() {
                        seen2.lock().unwrap().push(request.clone());
                        if let Some(reply) = answer(&request) {
                            responder.reply(reply);
                        }
                    }
                }
            });
            FakeVmm {
                stop,
                seen,
                thread: Some(thread),
            }
        }

        fn seen(&self) -> Vec<ApiRequest> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Drop for FakeVmm {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    /// Answers GET / with an InstanceInfo, everything else with 204.
    fn standard(request: &ApiRequest) -> Option<ApiReply> {
        Some(match request {
            ApiRequest::GetInstanceInfo => ApiReply::Json(
                crate::api::InstanceInfo::new("test", crate::api::InstanceState::NotStarted)
                    .to_json(),
            ),
            ApiRequest::InstanceStart => ApiReply::bad_request("no kernel"),
            _ => ApiReply::NoContent,
        })
    }

    fn start(path: &Path) -> (ApiServer, ApiRequests) {
        ApiServer::start_with_hook(path, || Ok(())).unwrap()
    }

    fn client(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// One response read from `s`: status, headers (lower-case names), body.
    #[derive(Debug)]
    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap()
        }

        fn fault(&self) -> String {
            self.json()["fault_message"].as_str().unwrap().to_string()
        }
    }

    fn read_response(s: &mut UnixStream) -> Response {
        let mut buf = Vec::new();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut r = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = r.parse(&buf).unwrap() {
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let status = r.code.unwrap();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .map(|(_, v)| v.parse().unwrap())
                    .expect("every response has a Content-Length");
                // The head was read a byte at a time: nothing of the body (or of the
                // next response) is in `buf` yet.
                assert_eq!(buf.len(), n);
                let mut body = vec![0u8; len];
                s.read_exact(&mut body).unwrap();
                return Response {
                    status,
                    headers,
                    body: String::from_utf8(body).unwrap(),
                };
            }
            let mut chunk = [0u8; 1];
            let got = s.read(&mut chunk).unwrap();
            assert!(got > 0, "connection closed before a response: {buf:?}");
            buf.push(chunk[0]);
        }
    }

    fn put(path: &str, body: &str) -> String {
        format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// Asserts the server closed `s` (read gives EOF).
    fn assert_closed(s: &mut UnixStream) {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[test]
    fn keep_alive_two_requests_on_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (server, requests) = start(&path);
        let vmm = FakeVmm::start(requests, standard);
        let mut s = client(&path);
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("connection"), None);
        let info = r.json();
        assert_eq!(info["state"], "Not started");
        assert_eq!(info["id"], "test");

        s.write_all(
            put(
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(r.header("content-length"), Some("0"));
        assert_eq!(r.header("content-type"), None);

        // A VMM error comes back as its status and fault_message.
        s.write_all(put("/actions", r#"{"action_type": "InstanceStart"}"#).as_bytes())
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!((r.status, r.fault()), (400, "no kernel".to_string()));

        assert_eq!(
            vmm.seen(),
            [
                ApiRequest::GetInstanceInfo,
                ApiRequest::PutMachineConfig(crate::api::model::MachineConfig {
                    vcpu_count: 2,
                    mem_size_mib: 256,
                    smt: None,
                    track_dirty_pages: None,
                    cpu_template: None,
                    huge_pages: None,
                }),
                ApiRequest::InstanceStart,
            ]
        );
        drop(vmm);
        drop(server);
    }

    #[test]
    fn pipelined_requests_in_one_write_are_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (_server, requests) = start(&path);
        let vmm = FakeVmm::start(requests, standard);
        let mut s = client(&path);
        let mut both = put("/entropy", "{}");
        both.push_str(&put("/actions", r#"{"action_type": "SendCtrlAltDel"}"#));
        both.push_str("GET /version HTTP/1.1\r\nConnection: close\r\n\r\n");
        s.write_all(both.as_bytes()).unwrap();
        assert_eq!(read_response(&mut s).status, 204);
        assert_eq!(read_response(&mut s).status, 204);
        let r = read_response(&mut s);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
        assert_closed(&mut s);
        assert_eq!(
            vmm.seen(),
            [
                ApiRequest::PutEntropy(Default::default()),
                ApiRequest::SendCtrlAltDel
            ]
        );
    }

    #[test]
    fn errors_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (_server, requests) = start(&path);
        let vmm = FakeVmm::start(requests, standard);

        // Routing errors keep the connection.
        let mut s = client(&path);
        s.write_all(b"DELETE /drives/x HTTP/1.1\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 400);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.fault(),
            "invalid request method and/or path: DELETE /drives/x"
        );
        s.write_all(put("/balloon", r#"{"amount_mib": 1}"#).as_bytes())
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("not supported by Ember"), "{r:?}");
        s.write_all(b"PUT /machine-config HTTP/1.1\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("needs a JSON body"), "{r:?}");

        // Framing errors close it.
        s.write_all(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 501);
        assert!(r.fault().contains("chunked"), "{r:?}");
        assert_eq!(r.header("connection"), Some("close"));
        assert_closed(&mut s);

        let mut s = client(&path);
        s.write_all(b"PUT /vm HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 413);
        assert_closed(&mut s);

        let mut s = client(&path);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 10_000));
        s.write_all(&big).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("8192"), "{r:?}");
        assert_closed(&mut s);

        // None of these reached the VMM.
        assert!(vmm.seen().is_empty(), "{:?}", vmm.seen());
    }

    #[test]
    fn expect_100_continue_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (_server, requests) = start(&path);
        let _vmm = FakeVmm::start(requests, standard);
        let mut s = client(&path);
        let body = r#"{"state": "Paused"}"#;
        s.write_all(
            format!(
                "PATCH /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut interim = [0u8; http::CONTINUE.len()];
        s.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, http::CONTINUE);
        s.write_all(body.as_bytes()).unwrap();
        assert_eq!(read_response(&mut s).status, 204);
    }

    #[test]
    fn a_stalled_client_does_not_block_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (_server, requests) = start(&path);
        let vmm = FakeVmm::start(requests, standard);
        // Half a request head, and half a body.
        let mut stalled = client(&path);
        stalled
            .write_all(b"PUT /machine-config HTTP/1.1\r\nCont")
            .unwrap();
        let mut stalled_body = client(&path);
        let body = r#"{"state": "Paused"}"#;
        stalled_body
            .write_all(
                format!(
                    "PATCH /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .unwrap();
        stalled_body.write_all(&body.as_bytes()[..5]).unwrap();
        // One that sends requests and never reads the responses, until its socket
        // buffer is full.
        let mut deaf = client(&path);
        deaf.set_nonblocking(true).unwrap();
        let mut sent = 0;
        loop {
            match deaf.write(b"GET /version HTTP/1.1\r\n\r\n") {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(sent < 1_000_000, "the server reads without bound");
        }
        let t = Instant::now();
        let mut s = client(&path);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(vmm.seen(), [ApiRequest::GetInstanceInfo]);
        // The stalled ones complete when they go on.
        stalled_body.write_all(&body.as_bytes()[5..]).unwrap();
        assert_eq!(read_response(&mut stalled_body).status, 204);
        stalled.write_all(b"ent-Length: 2\r\n\r\n{}").unwrap();
        let r = read_response(&mut stalled);
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("missing field `vcpu_count`"), "{r:?}");
        assert_eq!(vmm.seen().len(), 2);
    }

    #[test]
    fn more_than_16_connections_get_503() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (_server, requests) = start(&path);
        let _vmm = FakeVmm::start(requests, standard);
        let mut held: Vec<UnixStream> = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = client(&path);
            // Make sure each is accepted before the next.
            s.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
            assert_eq!(read_response(&mut s).status, 200);
            held.push(s);
        }
        let mut extra = client(&path);
        let r = read_response(&mut extra);
        assert_eq!(r.status, 503);
        assert!(r.fault().contains("16"), "{r:?}");
        assert_closed(&mut extra);
        // Closing one makes room.
        drop(held.pop());
        let t = Instant::now();
        loop {
            let mut s = client(&path);
            s.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
            let r = read_response(&mut s);
            if r.status == 200 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_dropped_responder_answers_500_and_a_gone_vmm_503() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (_server, requests) = start(&path);
        let vmm = FakeVmm::start(requests, |_| None);
        let mut s = client(&path);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 500);
        assert!(r.fault().contains("without answering"), "{r:?}");
        drop(vmm); // drops ApiRequests
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 503);
        assert!(r.fault().contains("no longer taking requests"), "{r:?}");
    }

    #[test]
    fn the_socket_is_removed_on_drop_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // A stale socket: bound, then its listener closed.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (server, requests) = start(&path);
        let vmm = FakeVmm::start(requests, standard);
        let mut s = client(&path);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut s).status, 200);
        drop(server);
        assert!(!path.exists(), "socket left behind");
        assert_closed(&mut s);
        drop(vmm);
    }

    #[test]
    fn a_live_socket_or_another_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (first, _requests) = start(&path);
        let e = ApiServer::start_with_hook(&path, || Ok(())).unwrap_err();
        assert!(matches!(e, ApiError::InUse { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("another process is serving it"), "{text}");
        drop(first);

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = ApiServer::start_with_hook(&file, || Ok(())).unwrap_err();
        assert!(
            e.to_string().contains("is not a socket (regular file)"),
            "{e}"
        );
        assert!(file.exists(), "a regular file is never removed");
        let e = ApiServer::start_with_hook(dir.path(), || Ok(())).unwrap_err();
        assert!(e.to_string().contains("(directory)"), "{e}");
    }

    #[test]
    fn a_failing_hook_fails_start_and_leaves_no_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let e = ApiServer::start_with_hook(&path, || Err("no filter".into())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the ember-api thread could not start: no filter"
        );
        assert!(!path.exists());
    }

    #[test]
    fn fds_are_close_on_exec() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (_server, requests) = start(&path);
        // SAFETY: F_GETFD takes no pointer.
        let flags = unsafe { libc::fcntl(requests.event_fd().as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        // SAFETY: as above.
        let fl = unsafe { libc::fcntl(requests.event_fd().as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, libc::O_NONBLOCK);
        // The listener (std binds with SOCK_CLOEXEC): every fd of this process that is
        // a socket and not close-on-exec would be a leak; check the listener by path
        // through /proc.
        let mut leaks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
                continue;
            };
            // SAFETY: F_GETFD takes no pointer; a closed fd gives -1.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            if flags >= 0
                && flags & libc::FD_CLOEXEC == 0
                && target.to_string_lossy().starts_with("socket:")
            {
                leaks.push(fd);
            }
        }
        assert!(leaks.is_empty(), "sockets without FD_CLOEXEC: {leaks:?}");
    }

    #[test]
    fn a_slow_vmm_times_out_with_504() {
        let link = VmmLink {
            tx: mpsc::channel().0,
            vmm_event: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            stop: Arc::new(AtomicBool::new(false)),
            reply_timeout: Duration::from_millis(150),
        };
        // The receiver is gone: 503 at once.
        match link.ask_vmm(ApiRequest::GetVmConfig) {
            ApiReply::Error { status: 503, .. } => {}
            other => panic!("{other:?}"),
        }
        let (tx, rx) = mpsc::channel();
        let link = VmmLink { tx, ..link };
        let t = Instant::now();
        match link.ask_vmm(ApiRequest::GetVmConfig) {
            ApiReply::Error {
                status: 504,
                message,
            } => assert!(message.contains("did not answer"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() >= Duration::from_millis(150));
        drop(rx);
    }
}
