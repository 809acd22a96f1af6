//! The snapshot benchmark's parts (`src/bin/snapshot.rs`): its command line, its three
//! guests, a minimal HTTP/1.1 client for `ember`'s API socket, an `ember` process
//! driven through that API, the two floors (a bare restore in a child process, and a
//! plain `write(2)` of the RAM size), and the summary table.
//!
//! What is measured, for a 2-vCPU VM with 256 MiB of RAM:
//!
//! 1. Restore to the guest's first instruction: `ember --restore DIR` (its own
//!    boot-done figure, from its `main()`) against [`floor_restore`] run in a child
//!    process (`snapshot --floor-restore DIR`): map the memory file privately, create
//!    the VM, irqchip, PIT and two vCPUs, enter vCPU 0 at the guest, run it to its
//!    first boot-done write.
//! 2. A full snapshot (`PUT /snapshot/create`, client side round trip) against
//!    [`floor_write`]: writing the RAM size from an untouched anonymous mapping to a
//!    new file.
//! 3. A diff snapshot after the guest wrote 1% of its pages, against the full
//!    snapshot of the same VM just before.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_bus::{Bus, BusKind};
use ember_devices::{
    BootDone, BOOT_DONE_MAGIC, BOOT_DONE_PORT, BOOT_DONE_PORT_SIZE, DEBUG_EXIT_PORT,
};
use ember_guests::elf::{flat_elf, GUEST_LOAD_ADDR};
use ember_guests::GuestError;
use ember_memory::vm_memory::GuestAddress;
use ember_memory::{map_guest_memory_file, MemoryLayout, MIB, PAGE_SIZE};
use ember_vcpu::syscall_trap::SyscallTrap;
use ember_vcpu::{regs, BootRegs, Vcpu};
use ember_vm::Vm;
use iced_x86::code_asm::*;

use crate::report::median;
use crate::Error;

/// Guest RAM of every VM here, in MiB.
pub const RAM_MIB: u64 = 256;
/// Guest RAM of every VM here, in bytes.
pub const RAM_SIZE: u64 = RAM_MIB * MIB;
/// vCPUs of every VM here.
pub const VCPUS: u32 = 2;
/// Default number of timed runs per measurement.
pub const DEFAULT_REPEAT: usize = 5;
/// The byte guest A polls: 0 while it loops, 1 (patched into the memory file) to end.
/// In the image's bss, one page after its code.
pub const FLAG_ADDR: u64 = GUEST_LOAD_ADDR + 0x1000;
/// Guest C writes pages from here up.
pub const DIRTY_START: u64 = 2 * MIB;
/// Guest C writes one page in this many.
pub const DIRTY_STRIDE_PAGES: u64 = 100;
/// The state file's name in a snapshot directory (as `ember --restore DIR` reads it).
pub const STATE_FILE: &str = "vmstate";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Goal for restore time, `ember` / floor.
pub const RESTORE_GOAL: f64 = 1.5;
/// Goal for full snapshot time, `ember` / floor.
pub const FULL_GOAL: f64 = 1.2;
/// Goal for diff snapshot time / full snapshot time.
pub const DIFF_GOAL: f64 = 0.05;
/// Firecracker's published full snapshot time for a 2-vCPU, 256 MB VM, in ms.
pub const FIRECRACKER_FULL_MS: f64 = 180.0;
/// Firecracker's published diff snapshot time for a 2-vCPU, 256 MB VM, in ms.
pub const FIRECRACKER_DIFF_MS: f64 = 70.0;
/// What the floor-restore child prints on stderr before its figure in ms.
pub const FLOOR_LINE: &str = "snapshot: floor restore: first guest exit after ";
/// Largest single `write(2)` of [`floor_write`] (as `ember_memory`'s memory file
/// writer: 1 GiB).
const MAX_WRITE: usize = 1 << 30;

// ---------------------------------------------------------------------------------------
// Command line

/// The usage text.
pub const USAGE: &str = "\
usage: snapshot [--ember PATH] [--repeat N]

Measures Ember's snapshot and restore (2 vCPUs, 256 MiB) against floors, in one run:
1. `ember --restore DIR` to the guest's first instruction (ember's boot-done figure)
   vs a bare restore (map the memory file, VM, irqchip, 2 vCPUs, run to the first
   exit) in a child process.
2. A full snapshot (`PUT /snapshot/create`, round trip) vs writing 256 MiB from an
   untouched mapping to a new file.
3. A diff snapshot after the guest changed 1% of its pages vs the full snapshot.
Files go to <target-dir>/snapshot-bench-<pid>, removed at the end. Prints a Markdown
table on stdout and progress on stderr.

  --ember PATH   the `ember` binary (default: <target-dir>/release/ember; build it with
                 `cargo build --release -p ember-vmm`)
  --repeat N     timed runs per measurement, at least 1 (default 5)
  -h, --help     this text";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The `ember` binary, if given.
    pub ember: Option<PathBuf>,
    /// Timed runs per measurement.
    pub repeat: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ember: None,
            repeat: DEFAULT_REPEAT,
        }
    }
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cli {
    /// Run the benchmark.
    Run(Options),
    /// Print [`USAGE`].
    Help,
    /// The hidden floor mode: [`floor_restore`] of the snapshot in `dir`
    /// (`--floor-restore DIR [--syscall-trap]`).
    FloorRestore {
        /// The snapshot directory.
        dir: PathBuf,
        /// Whether to set up the syscall trap as `ember` does on hosts that need it.
        syscall_trap: bool,
    },
}

/// Parses the arguments after the program name; `--flag value` and `--flag=value`.
///
/// ```
/// use ember_benches::snapshot::{parse_args, Cli, Options};
/// let args = ["--repeat", "3"].map(String::from);
/// assert_eq!(parse_args(args), Ok(Cli::Run(Options { repeat: 3, ..Options::default() })));
/// ```
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Cli, String> {
    let mut options = Options::default();
    let (mut floor_dir, mut syscall_trap) = (None, false);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
            None => (arg, None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{flag} needs {what}"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Cli::Help),
            "--ember" => options.ember = Some(value("a path")?.into()),
            "--repeat" => {
                let v = value("a value")?;
                options.repeat = v
                    .replace('_', "")
                    .parse()
                    .map_err(|_| format!("--repeat: `{v}` is not a valid number"))?;
                if options.repeat == 0 {
                    return Err("--repeat must be at least 1".into());
                }
            }
            "--floor-restore" => floor_dir = Some(value("a directory")?.into()),
            "--syscall-trap" => syscall_trap = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    match floor_dir {
        Some(dir) => Ok(Cli::FloorRestore { dir, syscall_trap }),
        None if syscall_trap => Err("--syscall-trap goes with --floor-restore".into()),
        None => Ok(Cli::Run(options)),
    }
}

// ---------------------------------------------------------------------------------------
// Guests: 64-bit code in a flat ELF, entered by `ember`'s 64-bit entry on vCPU 0.

/// Guest A: writes the boot-done magic in a loop until the byte at [`FLAG_ADDR`] is
/// nonzero, then writes it once more and 0 to the debug-exit port. Whatever
/// instruction a restore resumes it at, its first port write is boot-done.
///
/// ```text
///     mov al, MAGIC ; mov ebx, FLAG_ADDR
/// l:  out BOOT_DONE_PORT, al ; cmp byte [rbx], 0 ; je l
///     out BOOT_DONE_PORT, al ; mov al, 0 ; out DEBUG_EXIT_PORT, al ; hlt
/// ```
pub fn restore_guest() -> Result<Vec<u8>, GuestError> {
    let code = ember_guests::asm::assemble(GUEST_LOAD_ADDR, |a| {
        let mut top = a.create_label();
        a.mov(al, u32::from(BOOT_DONE_MAGIC))?;
        a.mov(ebx, FLAG_ADDR as u32)?;
        a.set_label(&mut top)?;
        a.out(u32::from(BOOT_DONE_PORT), al)?;
        a.cmp(byte_ptr(rbx), 0)?;
        a.je(top)?;
        a.out(u32::from(BOOT_DONE_PORT), al)?;
        a.mov(al, 0u32)?;
        a.out(u32::from(DEBUG_EXIT_PORT), al)?;
        a.hlt()
    })?;
    Ok(image_with_flag_page(&code))
}

/// Guest B: writes the boot-done magic forever (`out BOOT_DONE_PORT, al; jmp`).
pub fn looping_guest() -> Result<Vec<u8>, GuestError> {
    let code = ember_guests::asm::assemble(GUEST_LOAD_ADDR, |a| {
        let mut top = a.create_label();
        a.mov(al, u32::from(BOOT_DONE_MAGIC))?;
        a.set_label(&mut top)?;
        a.out(u32::from(BOOT_DONE_PORT), al)?;
        a.jmp(top)
    })?;
    Ok(image_with_flag_page(&code))
}

/// Guest C: forever, writes the magic byte to the first byte of every
/// [`DIRTY_STRIDE_PAGES`]th page from [`DIRTY_START`] to `ram_size`, then writes
/// boot-done (one pass). `ram_size` must be below 2 GiB (else [`Error::Vmm`]).
///
/// ```text
///     mov al, MAGIC
/// o:  mov ebx, DIRTY_START
/// i:  mov [rbx], al ; add rbx, STRIDE ; cmp rbx, ram_size ; jb i
///     out BOOT_DONE_PORT, al ; jmp o
/// ```
pub fn dirtying_guest(ram_size: u64) -> Result<Vec<u8>, Error> {
    let end = i32::try_from(ram_size).map_err(|_| {
        Error::Vmm(format!(
            "the dirtying guest's RAM must be below 2 GiB, not {ram_size:#x}"
        ))
    })?;
    let code = ember_guests::asm::assemble(GUEST_LOAD_ADDR, |a| {
        let mut outer = a.create_label();
        let mut inner = a.create_label();
        a.mov(al, u32::from(BOOT_DONE_MAGIC))?;
        a.set_label(&mut outer)?;
        a.mov(ebx, DIRTY_START as u32)?;
        a.set_label(&mut inner)?;
        a.mov(byte_ptr(rbx), al)?;
        a.add(rbx, (DIRTY_STRIDE_PAGES * PAGE_SIZE) as i32)?;
        a.cmp(rbx, end)?;
        a.jb(inner)?;
        a.out(u32::from(BOOT_DONE_PORT), al)?;
        a.jmp(outer)
    })?;
    Ok(image_with_flag_page(&code))
}

/// The guest physical addresses guest C writes in each pass.
///
/// ```
/// use ember_benches::snapshot::dirtied_pages;
/// let pages: Vec<u64> = dirtied_pages(256 << 20).collect();
/// assert_eq!(pages.len(), 651); // (65536 - 512) / 100, rounded up: 1% of the pages
/// assert_eq!(pages[0], 2 << 20);
/// ```
pub fn dirtied_pages(ram_size: u64) -> impl Iterator<Item = u64> {
    (DIRTY_START..ram_size).step_by((DIRTY_STRIDE_PAGES * PAGE_SIZE) as usize)
}

/// A flat ELF of `code` at [`GUEST_LOAD_ADDR`] whose bss covers [`FLAG_ADDR`].
fn image_with_flag_page(code: &[u8]) -> Vec<u8> {
    let covered = FLAG_ADDR - GUEST_LOAD_ADDR + PAGE_SIZE;
    flat_elf(
        GUEST_LOAD_ADDR,
        code,
        covered.saturating_sub(code.len() as u64),
    )
}

/// The offset of guest physical address `addr` in a memory file of `layout` (regions
/// back to back in address order), or `None` if `addr` is not RAM.
///
/// ```
/// use ember_benches::snapshot::memory_file_offset;
/// use ember_memory::{MemoryLayout, GIB, MIB};
/// let small = MemoryLayout::new(256 * MIB).unwrap();
/// assert_eq!(memory_file_offset(&small, 0x10_1000), Some(0x10_1000));
/// let big = MemoryLayout::new(5 * GIB).unwrap(); // 3 GiB low, 2 GiB from 4 GiB
/// assert_eq!(memory_file_offset(&big, 4 * GIB + 1), Some(3 * GIB + 1));
/// assert_eq!(memory_file_offset(&big, 3 * GIB), None); // the MMIO hole
/// ```
pub fn memory_file_offset(layout: &MemoryLayout, addr: u64) -> Option<u64> {
    let mut offset = 0u64;
    for &(start, size) in layout.ram_regions() {
        if let Some(inside) = addr.checked_sub(start.0).filter(|d| *d < size) {
            return offset.checked_add(inside);
        }
        offset = offset.checked_add(size)?;
    }
    None
}

/// Writes `value` at guest physical address `addr` in the memory file `path` of a VM
/// with `layout`.
pub fn patch_memory_file(
    path: &Path,
    layout: &MemoryLayout,
    addr: u64,
    value: u8,
) -> Result<(), Error> {
    let offset = memory_file_offset(layout, addr)
        .ok_or_else(|| Error::Vmm(format!("{addr:#x} is not guest RAM")))?;
    let file = File::options()
        .write(true)
        .open(path)
        .map_err(|source| io_error(format!("cannot open {}", path.display()), source))?;
    file.write_all_at(&[value], offset).map_err(|source| {
        io_error(
            format!("cannot write at offset {offset:#x} of {}", path.display()),
            source,
        )
    })
}

fn io_error(what: impl Into<String>, source: std::io::Error) -> Error {
    Error::Process {
        what: what.into(),
        source,
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 over a Unix socket

/// An HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// The header fields, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header field named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The most a response head may take.
const MAX_HEAD: usize = 16 * 1024;

/// Parses one response from the start of `buf`. `Ok(None)` if more bytes are needed;
/// `eof` says no more will come (a response without `Content-Length` then ends
/// there). On success, also returns how many bytes of `buf` it took.
///
/// ```
/// use ember_benches::snapshot::parse_response;
/// let (r, used) = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", false).unwrap().unwrap();
/// assert_eq!((r.status, used), (204, 27));
/// assert_eq!(parse_response(b"HTTP/1.1 204 No", false), Ok(None));
/// ```
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(HttpResponse, usize)>, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(format!("response head longer than {MAX_HEAD} bytes"));
        }
        if eof {
            return Err(format!(
                "connection closed after {} bytes, before the end of the response head",
                buf.len()
            ));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| "the response head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line `{status_line}`"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| format!("bad status code in `{status_line}`"))?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line `{line}`"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut response = HttpResponse {
        status,
        reason,
        headers,
        body: Vec::new(),
    };
    if response
        .header("transfer-encoding")
        .is_some_and(|te| !te.eq_ignore_ascii_case("identity"))
    {
        return Err("chunked responses are not supported".into());
    }
    let body_start = head_end + 4;
    let rest = &buf[body_start..];
    let length = match response.header("content-length") {
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| format!("bad Content-Length `{v}`"))?,
        ),
        None if status < 200 || status == 204 || status == 304 => Some(0),
        None => None,
    };
    match length {
        Some(n) if rest.len() >= n => {
            response.body = rest[..n].to_vec();
            Ok(Some((response, body_start + n)))
        }
        Some(n) if eof => Err(format!(
            "connection closed after {} of {n} body bytes",
            rest.len()
        )),
        Some(_) => Ok(None),
        None if eof => {
            response.body = rest.to_vec();
            Ok(Some((response, buf.len())))
        }
        None => Ok(None),
    }
}

/// The bytes of a request with a JSON `body` (or none).
///
/// ```
/// let r = ember_benches::snapshot::format_request("PATCH", "/vm", Some("{}"));
/// assert_eq!(r, b"PATCH /vm HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
///     Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}");
/// ```
pub fn format_request(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut out =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(body) = body {
        let _ = write!(
            out,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    out.push_str("\r\n");
    if let Some(body) = body {
        out.push_str(body);
    }
    out.into_bytes()
}

/// One connection to an API socket.
#[derive(Debug)]
pub struct ApiConnection {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl ApiConnection {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> std::io::Result<ApiConnection> {
        let stream = UnixStream::connect(path)?;
        // A snapshot of a large VM to a slow disk may take a while, but not forever.
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(ApiConnection {
            stream,
            buf: Vec::with_capacity(1024),
        })
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<HttpResponse, Error> {
        let what = || format!("API request {method} {path}");
        self.stream
            .write_all(&format_request(method, path, body))
            .map_err(|source| io_error(what(), source))?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((response, used)) = parse_response(&self.buf, false)
                .map_err(|e| Error::Vmm(format!("{}: {e}", what())))?
            {
                self.buf.drain(..used);
                return Ok(response);
            }
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|source| io_error(what(), source))?;
            if n == 0 {
                let parsed = parse_response(&self.buf, true)
                    .map_err(|e| Error::Vmm(format!("{}: {e}", what())))?;
                let (response, _) =
                    parsed.ok_or_else(|| Error::Vmm(format!("{}: no response", what())))?;
                self.buf.clear();
                return Ok(response);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a request that must answer `204 No Content`; returns the round trip time.
    pub fn expect_no_content(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<Duration, Error> {
        let start = Instant::now();
        let response = self.request(method, path, Some(body))?;
        let elapsed = start.elapsed();
        if response.status != 204 {
            return Err(Error::Vmm(format!(
                "{method} {path} {body}: HTTP {} {}: {}",
                response.status,
                response.reason,
                String::from_utf8_lossy(&response.body).trim()
            )));
        }
        Ok(elapsed)
    }
}

/// A snapshot's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// All of guest RAM.
    Full,
    /// The pages written since the last snapshot.
    Diff,
}

impl SnapshotKind {
    /// Firecracker's `snapshot_type`.
    pub fn name(self) -> &'static str {
        match self {
            SnapshotKind::Full => "Full",
            SnapshotKind::Diff => "Diff",
        }
    }
}

/// The JSON body of `PUT /snapshot/create`.
///
/// ```
/// use ember_benches::snapshot::{snapshot_body, SnapshotKind};
/// let body = snapshot_body(SnapshotKind::Diff, "/d/vmstate".as_ref(), "/d/memory".as_ref());
/// assert_eq!(body, r#"{"snapshot_type":"Diff","snapshot_path":"/d/vmstate","mem_file_path":"/d/memory"}"#);
/// ```
pub fn snapshot_body(kind: SnapshotKind, state: &Path, memory: &Path) -> String {
    let quote = |p: &Path| serde_json::Value::String(p.display().to_string()).to_string();
    format!(
        r#"{{"snapshot_type":"{}","snapshot_path":{},"mem_file_path":{}}}"#,
        kind.name(),
        quote(state),
        quote(memory)
    )
}

// ---------------------------------------------------------------------------------------
// `ember` driven through its API

/// An `ember` process serving its API, killed when dropped.
#[derive(Debug)]
pub struct EmberVm {
    child: Child,
    api: ApiConnection,
    log: PathBuf,
}

impl EmberVm {
    /// Boots `image` (2 vCPUs, [`RAM_MIB`] MiB) with the API on `socket`, stderr to
    /// `log`, and waits (up to 10 s) until the API answers.
    pub fn start(
        ember: &Path,
        image: &Path,
        socket: &Path,
        track_dirty_pages: bool,
        extra_args: &[&str],
        log: &Path,
    ) -> Result<EmberVm, Error> {
        let stderr = File::create(log)
            .map_err(|source| io_error(format!("cannot create {}", log.display()), source))?;
        let mut command = Command::new(ember);
        command
            .arg("--kernel")
            .arg(image)
            .args(["--cpus", &VCPUS.to_string()])
            .args(["--memory", &format!("{RAM_MIB}M")])
            .arg("--api-sock")
            .arg(socket)
            .args(["--serial", "none"]);
        if track_dirty_pages {
            command.arg("--track-dirty-pages");
        }
        command.args(extra_args);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| io_error(format!("cannot start {}", ember.display()), source))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let api = loop {
            match ApiConnection::connect(socket) {
                Ok(api) => break api,
                Err(e) => {
                    let ended = child.try_wait().ok().flatten();
                    if ended.is_some() || Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(Error::Vmm(format!(
                            "{} {}: the API socket {} never answered ({e}; {}); stderr: {}",
                            ember.display(),
                            command_line(&command),
                            socket.display(),
                            ended.map_or("still running".into(), |s| s.to_string()),
                            read_log(log)
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        Ok(EmberVm {
            child,
            api,
            log: log.to_path_buf(),
        })
    }

    /// `PATCH /vm {"state":"Paused"}`.
    pub fn pause(&mut self) -> Result<Duration, Error> {
        self.checked(|api| api.expect_no_content("PATCH", "/vm", r#"{"state":"Paused"}"#))
    }

    /// `PATCH /vm {"state":"Resumed"}`.
    pub fn resume(&mut self) -> Result<Duration, Error> {
        self.checked(|api| api.expect_no_content("PATCH", "/vm", r#"{"state":"Resumed"}"#))
    }

    /// `PUT /snapshot/create`; the round trip time.
    pub fn snapshot(
        &mut self,
        kind: SnapshotKind,
        state: &Path,
        memory: &Path,
    ) -> Result<Duration, Error> {
        let body = snapshot_body(kind, state, memory);
        self.checked(|api| api.expect_no_content("PUT", "/snapshot/create", &body))
    }

    /// Runs `request`, adding `ember`'s stderr to any error.
    fn checked(
        &mut self,
        request: impl FnOnce(&mut ApiConnection) -> Result<Duration, Error>,
    ) -> Result<Duration, Error> {
        request(&mut self.api).map_err(|e| {
            let status = self
                .child
                .try_wait()
                .ok()
                .flatten()
                .map_or("still running".into(), |s| s.to_string());
            Error::Vmm(format!(
                "{e} (ember: {status}; stderr: {})",
                read_log(&self.log)
            ))
        })
    }
}

impl Drop for EmberVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command_line(command: &Command) -> String {
    command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn read_log(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        "(empty)".to_string()
    } else {
        text.to_string()
    }
}

// ---------------------------------------------------------------------------------------
// Floors

/// The restore floor, timed from `start` (the process's `main()`): maps `dir`'s memory
/// file privately and lazily ([`map_guest_memory_file`]), creates the VM with its
/// irqchip and PIT and [`VCPUS`] vCPUs, gives vCPU 0 CPUID and a 64-bit entry at
/// [`GUEST_LOAD_ADDR`] (Ember's boot tables written first), and runs it until the
/// guest writes boot-done (recorded by Ember's [`BootDone`] device, as in `ember`).
/// Returns the time from `start` to that write.
///
/// With `syscall_trap`, also sets up Ember's [syscall trap](ember_vcpu::syscall_trap)
/// on both vCPUs, at the addresses `ember` uses, as `ember` does (on creation and on
/// restore) on hosts whose KVM needs it: its `KVM_X86_SET_MSR_FILTER` waits for an
/// SRCU grace period.
pub fn floor_restore(dir: &Path, syscall_trap: bool, start: Instant) -> Result<Duration, Error> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path)
        .map_err(|source| io_error(format!("cannot open {}", path.display()), source))?;
    let len = file
        .metadata()
        .map_err(|source| io_error(format!("cannot stat {}", path.display()), source))?
        .len();
    let layout = MemoryLayout::new(len)?;
    let memory = map_guest_memory_file::<()>(&layout, &file)?;
    let kvm = kvm_ioctls::Kvm::new().map_err(|source| Error::Kvm {
        op: "open /dev/kvm",
        source,
    })?;
    let vm = Vm::new(&kvm, memory)?;
    vm.create_irqchip_and_pit()?;
    let boot_done = Arc::new(BootDone::new(start));
    let pio = Arc::new(Bus::new(BusKind::Pio));
    pio.insert(
        u64::from(BOOT_DONE_PORT),
        BOOT_DONE_PORT_SIZE,
        boot_done.clone(),
    )?;
    let mmio = Arc::new(Bus::new(BusKind::Mmio));
    let trap = if syscall_trap {
        Some(SyscallTrap::new(
            &vm,
            GuestAddress(ember_arch::layout::VMM_RESERVED_START),
            GuestAddress(ember_arch::layout::SYSCALL_TRAP_MMIO_START),
        )?)
    } else {
        None
    };
    let mut vcpus = Vec::with_capacity(VCPUS as usize);
    for index in 0..VCPUS {
        let mut vcpu = Vcpu::new(&vm, index, pio.clone(), mmio.clone())?;
        vcpu.set_syscall_trap(trap.clone());
        vcpus.push(vcpu);
    }
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| Error::Kvm {
            op: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    let boot = &mut vcpus[0];
    boot.set_cpuid(&supported, VCPUS)?;
    regs::write_boot_tables(vm.memory())?;
    boot.set_long_mode_entry(&BootRegs {
        entry: GuestAddress(GUEST_LOAD_ADDR),
        stack: GuestAddress(regs::BOOT_STACK_POINTER),
        rsi: 0,
        rdi: 0,
    })?;
    loop {
        if let Some(outcome) = boot.step()? {
            return Err(Error::UnexpectedExit {
                side: "floor restore",
                exit: format!("{outcome:?}"),
            });
        }
        if let Some(t) = boot_done.boot_time() {
            return Ok(t);
        }
    }
}

/// Parses the floor-restore child's figure (ms) from its stderr.
///
/// ```
/// use ember_benches::snapshot::{floor_restore_ms, FLOOR_LINE};
/// assert_eq!(floor_restore_ms(&format!("{FLOOR_LINE}2.500 ms\n")), Some(2.5));
/// assert_eq!(floor_restore_ms("ember: guest boot done after 2.5 ms"), None);
/// ```
pub fn floor_restore_ms(stderr: &str) -> Option<f64> {
    stderr.lines().find_map(|line| {
        line.strip_prefix(FLOOR_LINE)?
            .strip_suffix(" ms")?
            .parse()
            .ok()
    })
}

/// The full snapshot floor: creates `path` (which must not exist) and writes `size`
/// bytes to it from a fresh anonymous mapping nobody touched (like guest RAM the guest
/// never used: every page reads from the zero page), with `write(2)` in chunks of up
/// to 1 GiB, without `fsync`. Returns the time from creating the file to closing it
/// (the mapping is made before and removed after).
pub fn floor_write(path: &Path, size: usize) -> Result<Duration, Error> {
    // SAFETY: a new private anonymous mapping, at an address the kernel picks; nothing
    // else refers to it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io_error(
            format!("cannot map {size} bytes"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the mapping above is `size` readable bytes, alive until the munmap below,
    // and nothing writes to it.
    let ram = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), size) };
    let timed = (|| {
        let start = Instant::now();
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| io_error(format!("cannot create {}", path.display()), source))?;
        for chunk in ram.chunks(MAX_WRITE) {
            file.write_all(chunk)
                .map_err(|source| io_error(format!("cannot write {}", path.display()), source))?;
        }
        drop(file);
        Ok(start.elapsed())
    })();
    // SAFETY: `addr`/`size` is the mapping made above; `ram` is not used after this.
    unsafe { libc::munmap(addr, size) };
    timed
}

/// Bytes of disk space `path` takes (`st_blocks * 512`).
pub fn allocated_bytes(path: &Path) -> Result<u64, Error> {
    let meta = std::fs::metadata(path)
        .map_err(|source| io_error(format!("cannot stat {}", path.display()), source))?;
    Ok(meta.blocks() * 512)
}

// ---------------------------------------------------------------------------------------
// Summary

/// Median, minimum and maximum of some runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// The median.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub runs: usize,
}

impl Stats {
    /// The statistics of `values`, or `None` if there are none.
    ///
    /// ```
    /// let s = ember_benches::snapshot::Stats::new(&[3.0, 1.0, 2.0]).unwrap();
    /// assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
    /// ```
    pub fn new(values: &[f64]) -> Option<Stats> {
        Some(Stats {
            median: median(values)?,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            runs: values.len(),
        })
    }

    /// `12.34 ms (11.00–14.10)`.
    pub fn ms(&self) -> String {
        format!("{:.2} ms ({:.2}–{:.2})", self.median, self.min, self.max)
    }
}

/// One measurement: Ember against its floor.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured.
    pub measurement: String,
    /// Ember's times, ms.
    pub ember: Stats,
    /// What the floor is.
    pub floor_label: String,
    /// The floor's times, ms.
    pub floor: Stats,
    /// The goal for Ember's median / the floor's median.
    pub goal: f64,
    /// Firecracker's published figure for the same measurement, ms.
    pub firecracker_ms: Option<f64>,
}

impl Row {
    /// Ember's median over the floor's.
    pub fn ratio(&self) -> f64 {
        self.ember.median / self.floor.median
    }

    /// Whether the ratio meets the goal.
    pub fn meets_goal(&self) -> bool {
        self.ratio() <= self.goal
    }
}

/// The rows as a Markdown table.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| measurement | Ember, median (min–max) | floor | floor, median (min–max) \
         | Ember / floor | goal | met? | Firecracker (reference) |\n",
    );
    out.push_str("|---|--:|---|--:|--:|--:|---|--:|\n");
    for r in rows {
        let firecracker = r
            .firecracker_ms
            .map_or_else(|| "—".to_string(), |ms| format!("{ms:.0} ms"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.3} | ≤ {} | {} | {} |",
            r.measurement,
            r.ember.ms(),
            r.floor_label,
            r.floor.ms(),
            r.ratio(),
            r.goal,
            if r.meets_goal() { "yes" } else { "**NO**" },
            firecracker,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn p(args: &[&str]) -> Result<Cli, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        assert_eq!(p(&[]), Ok(Cli::Run(Options::default())));
        assert_eq!(
            p(&["--ember", "/x/ember", "--repeat=7"]),
            Ok(Cli::Run(Options {
                ember: Some("/x/ember".into()),
                repeat: 7
            }))
        );
        assert_eq!(
            p(&["--floor-restore", "/d"]),
            Ok(Cli::FloorRestore {
                dir: "/d".into(),
                syscall_trap: false
            })
        );
        assert_eq!(
            p(&["--syscall-trap", "--floor-restore=/d"]),
            Ok(Cli::FloorRestore {
                dir: "/d".into(),
                syscall_trap: true
            })
        );
        assert!(p(&["--syscall-trap"])
            .unwrap_err()
            .contains("--floor-restore"));
        assert_eq!(p(&["--repeat", "2", "--help"]), Ok(Cli::Help));
        assert!(p(&["--repeat", "0"]).unwrap_err().contains("at least 1"));
        assert!(p(&["--repeat", "x"]).unwrap_err().contains("`x`"));
        assert!(p(&["--repeat"]).unwrap_err().contains("needs a value"));
        assert!(p(&["--ember="]).unwrap_err().contains("needs a path"));
        assert!(p(&["--floor-restore"]).unwrap_err().contains("directory"));
        assert!(p(&["--bogus"])
            .unwrap_err()
            .contains("unknown argument `--bogus`"));
    }

    #[test]
    fn responses_with_and_without_bodies() {
        let text = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
                     Content-Length: 24\r\n\r\n{\"fault_message\":\"bad\"}\nHTTP/1.1 204 x\r\n\r\n";
        // Byte by byte: incomplete until the whole body is there.
        let whole = 2 + text.iter().position(|&b| b == b'}').unwrap();
        for cut in 0..whole {
            assert_eq!(parse_response(&text[..cut], false), Ok(None), "cut {cut}");
        }
        let (r, used) = parse_response(text, false).unwrap().unwrap();
        assert_eq!(used, whole);
        assert_eq!(r.status, 400);
        assert_eq!(r.reason, "Bad Request");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.body, b"{\"fault_message\":\"bad\"}\n");
        // The next response follows in the same buffer.
        let (next, used2) = parse_response(&text[used..], false).unwrap().unwrap();
        assert_eq!((next.status, next.body.len(), used2), (204, 0, 18));

        // No Content-Length: the body runs to the end of the connection.
        let open = b"HTTP/1.0 200 OK\r\n\r\nhello";
        assert_eq!(parse_response(open, false), Ok(None));
        let (r, _) = parse_response(open, true).unwrap().unwrap();
        assert_eq!(r.body, b"hello");
    }

    #[test]
    fn malformed_responses_are_errors() {
        for (bad, needle) in [
            (&b"HTTP/1.1 20 OK\r\n\r\n"[..], "status code"),
            (b"SPDY 200 OK\r\n\r\n", "status line"),
            (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "header line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "chunked",
            ),
        ] {
            let e = parse_response(bad, false).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let e = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", true);
        assert!(e.unwrap_err().contains("2 of 5"));
        assert!(parse_response(b"HTTP/1.1", true).is_err());
        assert!(parse_response(&vec![b'a'; MAX_HEAD + 1], false).is_err());
    }

    #[test]
    fn a_request_round_trip_over_a_socket_pair() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let mut api = ApiConnection {
            stream: client,
            buf: Vec::new(),
        };
        let server = std::thread::spawn(move || {
            let mut got = vec![0u8; 512];
            let n = server.read(&mut got).unwrap();
            got.truncate(n);
            // The answer in two pieces, then one more response on the same connection.
            server.write_all(b"HTTP/1.1 204 No ").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            server.write_all(b"Content\r\n\r\n").unwrap();
            let n = server.read(&mut [0u8; 512]).unwrap();
            assert!(n > 0);
            server
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno")
                .unwrap();
            got
        });
        let t = api
            .expect_no_content("PATCH", "/vm", r#"{"state":"Paused"}"#)
            .unwrap();
        assert!(t >= Duration::from_millis(15), "{t:?}");
        let e = api
            .expect_no_content("PATCH", "/vm", "{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTP 400 Bad Request: no"), "{e}");
        let sent = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(sent.starts_with("PATCH /vm HTTP/1.1\r\n"), "{sent}");
        assert!(sent.ends_with("Content-Length: 18\r\n\r\n{\"state\":\"Paused\"}"));
    }

    fn mnemonics(image: &[u8]) -> Vec<Mnemonic> {
        // flat_elf puts the code one page into the file.
        let code = &image[0x1000..];
        Decoder::with_ip(64, code, GUEST_LOAD_ADDR, DecoderOptions::NONE)
            .into_iter()
            .map(|i| i.mnemonic())
            .collect()
    }

    #[test]
    fn guests_are_the_short_loops_described() {
        use Mnemonic::*;
        assert_eq!(
            mnemonics(&restore_guest().unwrap()),
            [Mov, Mov, Out, Cmp, Je, Out, Mov, Out, Hlt]
        );
        assert_eq!(mnemonics(&looping_guest().unwrap()), [Mov, Out, Jmp]);
        assert_eq!(
            mnemonics(&dirtying_guest(RAM_SIZE).unwrap()),
            [Mov, Mov, Mov, Add, Cmp, Jb, Out, Jmp]
        );
        assert!(dirtying_guest(4 << 30).is_err());
        // The flag byte is inside the image's bss, so the loader zeroes it.
        let image = restore_guest().unwrap();
        let memsz = u64::from_le_bytes(image[64 + 40..64 + 48].try_into().unwrap());
        assert!(GUEST_LOAD_ADDR + memsz > FLAG_ADDR);
    }

    #[test]
    fn table_has_ratio_goal_and_reference() {
        let row = Row {
            measurement: "full snapshot".into(),
            ember: Stats::new(&[120.0, 100.0, 110.0]).unwrap(),
            floor_label: "write(2)".into(),
            floor: Stats::new(&[100.0]).unwrap(),
            goal: 1.2,
            firecracker_ms: Some(FIRECRACKER_FULL_MS),
        };
        let slow = Row {
            ember: Stats::new(&[130.0]).unwrap(),
            firecracker_ms: None,
            ..row.clone()
        };
        let table = markdown_table(&[row, slow]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[2],
            "| full snapshot | 110.00 ms (100.00–120.00) | write(2) | 100.00 ms \
             (100.00–100.00) | 1.100 | ≤ 1.2 | yes | 180 ms |"
        );
        assert!(
            lines[3].contains("| 1.300 | ≤ 1.2 | **NO** | — |"),
            "{}",
            lines[3]
        );
        for line in &lines {
            assert_eq!(line.matches('|').count(), 9, "{line}");
        }
    }

    #[test]
    fn floor_write_makes_a_file_of_the_size() {
        let dir = std::env::temp_dir().join(format!("ember-floor-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m");
        floor_write(&path, 4 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        assert!(floor_write(&path, 4096).is_err(), "must not overwrite");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn floor_restore_runs_a_memory_file_to_the_first_boot_done_write() {
        use ember_memory::vm_memory::Bytes;
        use ember_memory::{create_guest_memory, write_memory_file, HugePages};
        if !ember_guests::testing::kvm_available(
            "floor_restore_runs_a_memory_file_to_the_first_boot_done_write",
        ) {
            return;
        }
        // A memory file as a snapshot of guest A would hold: boot tables and the code.
        let layout = MemoryLayout::new(32 * MIB).unwrap();
        let mem = create_guest_memory(&layout, HugePages::None).unwrap();
        let image = restore_guest().unwrap();
        mem.write_slice(&image[0x1000..], GuestAddress(GUEST_LOAD_ADDR))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("ember-floor-restore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = File::create(dir.join(MEMORY_FILE)).unwrap();
        write_memory_file(&mem, &file).unwrap();
        let start = Instant::now();
        let t = floor_restore(&dir, false, start).unwrap();
        assert!(t > Duration::ZERO && t <= start.elapsed());
        let with_trap = floor_restore(&dir, true, Instant::now());
        if ember_vcpu::cpuid::CpuTemplate::detect().0.syscall_trap() {
            with_trap.unwrap();
        }
        // No memory file: a clear error, not a panic.
        std::fs::remove_file(dir.join(MEMORY_FILE)).unwrap();
        let e = floor_restore(&dir, false, start).unwrap_err().to_string();
        assert!(e.contains("cannot open"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
