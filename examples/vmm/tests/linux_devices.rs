//! Linux userland drives every `ember` device through Linux's own drivers, in one boot.
//!
//! The guest is Ember's small kernel (`scripts/small-kernel.sh`: virtio-mmio, which finds
//! Ember's devices in the ACPI DSDT and on the command line, virtio-blk/net/rng built in,
//! ext4, ACPI power-off) with an initramfs
//! this test writes itself (a newc cpio): Debian's static busybox (`BUSYBOX=` from
//! `scripts/linux-guest.sh`) and a `/init` script ([`INIT`]) that runs one step per device
//! and prints `EMBER-STEP <name> OK <detail>` or `EMBER-STEP <name> FAIL <why>` for each:
//!
//! * `init`: `/init` runs (the guest's uptime at that moment is the boot time to init);
//! * `console`: a line `/init` writes to its stdout, the 8250 tty, reaches `ember`'s
//!   stdout (the other step lines go through `/dev/kmsg`, see [`INIT`]);
//! * `disks`: two virtio-blk disks in `/sys/block`, one of them read-only;
//! * `blk-read`: the ext4 image the host made with `mkfs.ext4 -d` mounts, and a file in it
//!   holds the random token the host put there;
//! * `blk-write`: a second token (from the kernel command line) written to a new file and
//!   synced; after `ember` exits the host reads it out of the image with `debugfs`, and
//!   `e2fsck -fn` finds the file system clean (the guest unmounts it: `blk-umount`);
//! * `blk-ro`: the disk given with `readonly=on` reads back the host's random bytes, a
//!   write to it fails in the guest, and the image's bytes are unchanged afterwards;
//! * `rng`: `/sys/class/misc/hw_random/rng_current` names virtio and `/dev/hwrng` gives
//!   32 bytes that are not all equal;
//! * `net`: eth0 (virtio-net, the MAC from `--net`) on a tap in a network namespace the
//!   test creates, link-local addresses only (169.254.77.1/16 on the tap, .2 in the guest):
//!   3 pings to the host side all answered, and the tap's RX and TX counters moved;
//! * `cad-wait`, `cad`: `/init` sets `/proc/sys/kernel/ctrl-alt-del` to 0 and waits; the
//!   test presses Ctrl+Alt+Del (`PUT /actions` `SendCtrlAltDel` on `ember`'s API socket),
//!   Linux's i8042 and AT keyboard drivers (`i8042.dumbkbd`) take the scancodes from
//!   IRQ 1 and the kernel signals init, whose `SIGINT` trap reports it;
//! * `done`, then `poweroff -f`: the ACPI power-off ends `ember` with exit status 0.
//!
//! A missing step line is a failure like a `FAIL` one, and so is a guest kernel panic or a
//! guest process killed by a segfault (the kernel's `segfault at` line). Every failure is
//! listed, then the
//! whole console. The run is bounded ([`timeout`]; `ember` is killed when it expires).
//!
//! `EMBER_SMALL_KERNEL_VMLINUX=<vmlinux>` boots that kernel instead of the one
//! `scripts/small-kernel.sh` builds (or finds in its cache); `EMBER_LINUX_DEVICES_ECHO=1`
//! echoes every console line as it comes (otherwise only the step lines and a few
//! milestones are echoed, and the whole console is printed on failure);
//! `EMBER_LINUX_DEVICES_CMDLINE=...` appends to the kernel command line.
//!
//! Without KVM, the small kernel, busybox or e2fsprogs, the test prints a loud
//! `!!! ... did NOT run` line and returns; `EMBER_REQUIRE_LINUX=1` makes that fatal. Without
//! root, `/dev/net/tun` or `ip`, the network step is left out with a loud line;
//! `EMBER_REQUIRE_TAP=1` makes that fatal. The namespace is deleted, and the temporary
//! directory with the images and the initramfs removed, also when the test fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use ember_guests::testing::{
    api_request, guest_script_path, kvm_available, linux_unavailable, tap_part_unavailable,
    TapNamespace,
};

const TEST: &str = "linux_userland_drives_every_device";

/// The guest's MAC (locally administered) and the link-local addresses of both ends.
const GUEST_MAC: &str = "52:54:00:77:00:02";
const HOST_ADDR: &str = "169.254.77.1";
const TAP: &str = "etap0";
/// Pings the guest sends; all must be answered.
const PINGS: u32 = 3;
/// Bytes of random data on the read-only disk (the guest reads back the first 16).
const RO_DISK_BYTES: usize = 1 << 20;
/// Size of the ext4 image, in MiB.
const RW_DISK_MIB: u64 = 16;

/// The steps `/init` reports, in order.
const STEPS: &[&str] = &[
    "init",
    "console",
    "disks",
    "blk-read",
    "blk-write",
    "blk-ro",
    "rng",
    "net",
    "blk-umount",
    "cad-wait",
    "cad",
    "done",
];

/// The guest's `/init`: one `EMBER-STEP` line per step, every step attempted even when an
/// earlier one failed, then `poweroff -f`. It forks little: every fork, exec and system
/// call is kernel code, which KVM emulates instruction by instruction on nested hosts.
///
/// The step lines go to `/dev/kmsg`, so the kernel prints each as one whole console line
/// (never cut by another message) through its polled console driver; the `console` step
/// alone is written to `/init`'s stdout, `/dev/console`, to check the interrupt-driven
/// 8250 tty path a shell would use.
const INIT: &str = r#"#!/bin/sh
# /init of examples/vmm/tests/linux_devices.rs: one EMBER-STEP line per device check.
export PATH=/bin
step() { echo "EMBER-STEP $*" >/dev/kmsg; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read -r up idle </proc/uptime
read -r cmdline </proc/cmdline
read -r release </proc/sys/kernel/osrelease
read -r online </sys/devices/system/cpu/online
token=
net=0
for w in $cmdline; do
    case $w in
    ember.token=*) token=${w#ember.token=} ;;
    ember.net=*) net=${w#ember.net=} ;;
    esac
done
step init OK "uptime=$up release=$release cpus=$online"
echo "EMBER-STEP console OK written to /dev/console by /init"

# Disks: the read-only one is the one whose ro flag (VIRTIO_BLK_F_RO) is set.
rw=
ro=
sizes=
for d in /sys/block/vd*; do
    [ -e "$d/ro" ] || continue
    read -r flag <"$d/ro"
    read -r size <"$d/size"
    sizes="$sizes ${d##*/}:ro=$flag:sectors=$size"
    if [ "$flag" = 1 ]; then ro=${d##*/}; else rw=${d##*/}; fi
done
if [ -n "$rw" ] && [ -n "$ro" ]; then
    step disks OK "rw=$rw ro=$ro$sizes"
else
    step disks FAIL "want one read-write and one read-only virtio disk, found:${sizes:- none}"
fi

mounted=0
if [ -z "$rw" ]; then
    step blk-read FAIL "no read-write disk"
elif ! err=$(mount -t ext4 "/dev/$rw" /mnt 2>&1); then
    step blk-read FAIL "mount -t ext4 /dev/$rw /mnt: $err"
else
    mounted=1
    if read -r got </mnt/from-host.txt; then
        step blk-read OK "$got"
    else
        step blk-read FAIL "cannot read /mnt/from-host.txt"
    fi
fi

if [ "$mounted" != 1 ]; then
    step blk-write FAIL "the ext4 disk is not mounted"
elif [ -z "$token" ]; then
    step blk-write FAIL "no ember.token= on the kernel command line"
elif ! echo "$token" >/mnt/from-guest.txt; then
    step blk-write FAIL "cannot write /mnt/from-guest.txt"
elif ! sync; then
    step blk-write FAIL "sync failed"
elif ! read -r back </mnt/from-guest.txt || [ "$back" != "$token" ]; then
    step blk-write FAIL "read back '$back' instead of '$token'"
else
    step blk-write OK "$token"
fi

if [ -z "$ro" ]; then
    step blk-ro FAIL "no read-only disk"
else
    raw=$(od -An -tx1 -N16 -v "/dev/$ro" 2>&1)
    hex=
    for b in $raw; do hex=$hex$b; done
    if dd if=/dev/zero of="/dev/$ro" bs=512 count=1 conv=notrunc,fsync 2>/tmp/dd.err; then
        step blk-ro FAIL "bytes=$hex; a write to /dev/$ro succeeded"
    else
        why=
        read -r why </tmp/dd.err
        step blk-ro OK "bytes=$hex; write refused: $why"
    fi
fi

if ! read -r cur </sys/class/misc/hw_random/rng_current; then
    step rng FAIL "no /sys/class/misc/hw_random/rng_current"
else
    raw=$(timeout 120 od -An -tx1 -N32 -v /dev/hwrng 2>&1)
    hex=
    for b in $raw; do hex=$hex$b; done
    case $cur in
    *virtio*)
        if [ ${#hex} -eq 64 ]; then
            step rng OK "current=$cur bytes=$hex"
        else
            step rng FAIL "current=$cur; reading /dev/hwrng gave: $raw"
        fi
        ;;
    *) step rng FAIL "rng_current is '$cur', not virtio" ;;
    esac
fi

if [ "$net" != 1 ]; then
    step net SKIP "no --net for this run"
elif [ ! -e /sys/class/net/eth0 ]; then
    step net FAIL "no eth0"
else
    read -r mac </sys/class/net/eth0/address
    if ! err=$(ip link set eth0 up 2>&1 && ip addr add 169.254.77.2/16 dev eth0 2>&1); then
        step net FAIL "mac=$mac; ip: $err"
    else
        out=$(ping -c 3 -w 120 169.254.77.1 2>&1)
        rc=$?
        summary=
        set -f
        old_ifs=$IFS
        IFS='
'
        for l in $out; do
            case $l in *"packets transmitted"*) summary=$l ;; esac
        done
        IFS=$old_ifs
        set +f
        read -r rx </sys/class/net/eth0/statistics/rx_packets
        read -r tx </sys/class/net/eth0/statistics/tx_packets
        if [ "$rc" = 0 ]; then
            step net OK "mac=$mac; $summary; eth0 rx=$rx tx=$tx"
        else
            step net FAIL "mac=$mac; ping exit status $rc: ${summary:-$out}; eth0 rx=$rx tx=$tx"
        fi
    fi
fi

if [ "$mounted" != 1 ]; then
    step blk-umount FAIL "the ext4 disk is not mounted"
elif err=$(umount /mnt 2>&1); then
    step blk-umount OK "/dev/$rw"
else
    step blk-umount FAIL "$err"
fi

# Ctrl+Alt+Del: the host presses it (SendCtrlAltDel on the API socket) when it sees
# cad-wait. With /proc/sys/kernel/ctrl-alt-del 0 the kernel signals init (SIGINT)
# instead of rebooting at once, as a real init asks it to.
got_cad=0
trap 'got_cad=1' INT
if ! echo 0 >/proc/sys/kernel/ctrl-alt-del; then
    step cad-wait FAIL "cannot write /proc/sys/kernel/ctrl-alt-del"
else
    step cad-wait OK "press Ctrl+Alt+Del"
    waited=0
    while [ "$got_cad" = 0 ] && [ "$waited" -lt 120 ]; do
        sleep 1
        waited=$((waited + 1))
    done
    if [ "$got_cad" = 1 ]; then
        step cad OK "init got SIGINT within ${waited} s"
    else
        step cad FAIL "no SIGINT within 120 s"
    fi
fi
trap - INT

read -r up idle </proc/uptime
step done OK "uptime=$up"
poweroff -f
step poweroff FAIL "poweroff -f returned"
while :; do sleep 60; done
"#;

/// Applets `/init` uses, linked to `/bin/busybox`.
const APPLETS: &[&str] = &[
    "sh", "mount", "umount", "od", "dd", "sync", "ip", "ping", "timeout", "poweroff", "sleep",
    "cat", "ls", "dmesg",
];

// ---------------------------------------------------------------------------------------
// What the test needs, and saying so loudly when it is missing

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Runs a host tool; the error names the command and what it printed.
fn host_tool(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `{program} {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn kernel_code_is_emulated() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// How long the whole boot may take: minutes of emulated kernel code on nested hosts,
/// well under a minute on hardware KVM. `EMBER_LINUX_DEVICES_TIMEOUT_SECS` overrides it.
fn timeout() -> Duration {
    if let Ok(secs) = std::env::var("EMBER_LINUX_DEVICES_TIMEOUT_SECS") {
        return Duration::from_secs(
            secs.parse()
                .expect("EMBER_LINUX_DEVICES_TIMEOUT_SECS must be a number of seconds"),
        );
    }
    if kernel_code_is_emulated() {
        Duration::from_secs(20 * 60)
    } else {
        Duration::from_secs(5 * 60)
    }
}

// ---------------------------------------------------------------------------------------
// The initramfs: a newc cpio archive

/// A newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;
    const S_IFLNK: u32 = 0o120000;
    const S_IFCHR: u32 = 0o020000;

    fn pad(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == Self::S_IFDIR {
            2
        } else {
            1
        };
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(body.len()).unwrap(),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap(),
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, Self::S_IFDIR | 0o755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, Self::S_IFREG | perm, (0, 0), body);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, Self::S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, Self::S_IFCHR | 0o600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

fn initramfs(busybox: &[u8]) -> Vec<u8> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "mnt", "tmp"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdin, stdout and stderr before devtmpfs
    // is mounted; /dev/kmsg is there should mounting devtmpfs fail.
    cpio.char_device("dev/console", 5, 1);
    cpio.char_device("dev/kmsg", 1, 11);
    cpio.file("bin/busybox", 0o755, busybox);
    for applet in APPLETS {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.finish()
}

// ---------------------------------------------------------------------------------------
// The boot

/// One `EMBER-STEP` line.
struct Step {
    status: String,
    detail: String,
    /// Since `ember` started.
    at: Duration,
}

struct Boot {
    /// `None`: killed after the timeout (or after `poweroff -f` did not end it).
    exit_code: Option<i32>,
    killed_because: Option<String>,
    console: Vec<(Duration, String)>,
    stderr: String,
    steps: BTreeMap<String, Step>,
    /// Since `ember` started, when it exited or was killed.
    ended: Duration,
    /// The reply to `SendCtrlAltDel`, sent at the `cad-wait` step: status and body, or
    /// why it could not be sent.
    ctrl_alt_del: Option<Result<(u16, String), String>>,
}

impl Boot {
    fn console_text(&self) -> String {
        self.console
            .iter()
            .map(|(t, l)| format!("[{:8.2}] {l}\n", t.as_secs_f64()))
            .collect()
    }

    /// The first console line containing `needle`: when it came and the line.
    fn find(&self, needle: &str) -> Option<&(Duration, String)> {
        self.console.iter().find(|(_, l)| l.contains(needle))
    }
}

/// Runs `command` (`ember`, maybe under `ip netns exec`, serving its API on
/// `api_socket`), collecting the console and the step lines, until it exits; presses
/// Ctrl+Alt+Del at the `cad-wait` step; kills it at `limit`, or 120 s after the `done`
/// step when `poweroff -f` does not end it.
fn boot(mut command: Command, api_socket: &Path, limit: Duration) -> Boot {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let out_reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });

    let mut boot = Boot {
        exit_code: None,
        killed_because: None,
        console: Vec::new(),
        stderr: String::new(),
        steps: BTreeMap::new(),
        ended: Duration::ZERO,
        ctrl_alt_del: None,
    };
    let mut deadline = start + limit;
    let echo_all = required("EMBER_LINUX_DEVICES_ECHO");
    loop {
        let now = Instant::now();
        if now >= deadline {
            boot.killed_because = Some(if boot.steps.contains_key("done") {
                "poweroff -f did not end ember within 120 s of the done step".into()
            } else {
                format!("timed out after {limit:?}")
            });
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((at, line)) => {
                if echo_all
                    || line.contains("Run /init as init process")
                    || line.contains("Kernel panic")
                {
                    eprintln!("  {:8.2} s  console: {line}", at.as_secs_f64());
                }
                if let Some(i) = line.find("EMBER-STEP ") {
                    eprintln!("  {:8.2} s  {}", at.as_secs_f64(), &line[i..]);
                    let mut words = line[i + "EMBER-STEP ".len()..].splitn(3, ' ');
                    let name = words.next().unwrap_or_default().to_string();
                    let status = words.next().unwrap_or_default().to_string();
                    let detail = words.next().unwrap_or_default().to_string();
                    if name == "done" {
                        deadline = deadline.min(Instant::now() + Duration::from_secs(120));
                    }
                    if name == "cad-wait" && status == "OK" && boot.ctrl_alt_del.is_none() {
                        let body = r#"{"action_type": "SendCtrlAltDel"}"#;
                        boot.ctrl_alt_del = Some(
                            api_request(api_socket, "PUT", "/actions", Some(body))
                                .map_err(|e| e.to_string()),
                        );
                    }
                    boot.steps
                        .entry(name)
                        .or_insert(Step { status, detail, at });
                }
                boot.console.push((at, line));
            }
            Err(RecvTimeoutError::Timeout) => continue,
            // stdout closed: ember has exited (or closed it on its way out).
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if boot.killed_because.is_some() {
        let _ = child.kill();
    } else {
        // Bounded wait for the exit after stdout closed.
        let until = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().ok().flatten().is_none() {
            boot.killed_because = Some("stdout closed but ember did not exit within 30 s".into());
            let _ = child.kill();
        }
    }
    let status = child.wait().expect("waiting for ember");
    boot.ended = start.elapsed();
    if boot.killed_because.is_none() {
        boot.exit_code = status.code();
    }
    let _ = out_reader.join();
    boot.console.extend(rx.try_iter());
    boot.stderr = err_reader.join().unwrap();
    boot
}

/// The guest printk timestamp at the start of a console line (`[   12.345678] ...`).
fn printk_time(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest.split(']').next()?.trim().parse().ok()
}

// ---------------------------------------------------------------------------------------
// The test

#[test]
fn linux_userland_drives_every_device() {
    let test_start = Instant::now();
    if !kvm_available(TEST) {
        return;
    }
    let vmlinux = match std::env::var_os("EMBER_SMALL_KERNEL_VMLINUX") {
        Some(path) => PathBuf::from(path),
        None => match guest_script_path("small-kernel.sh", "SMALL_KERNEL_VMLINUX") {
            Ok(p) => p,
            Err(e) => return linux_unavailable(TEST, &format!("no small kernel: {e}")),
        },
    };
    let busybox = match guest_script_path("linux-guest.sh", "BUSYBOX") {
        Ok(p) => p,
        Err(e) => return linux_unavailable(TEST, &format!("no busybox: {e}")),
    };
    for (tool, args) in [
        ("mkfs.ext4", &["-V"][..]),
        ("debugfs", &["-V"][..]),
        ("e2fsck", &["-V"][..]),
    ] {
        if let Err(e) = host_tool(tool, args) {
            return linux_unavailable(TEST, &format!("{tool} (e2fsprogs) is unusable: {e}"));
        }
    }
    let busybox = std::fs::read(&busybox).unwrap_or_else(|e| panic!("{}: {e}", busybox.display()));

    // The disks: an ext4 image holding a random token, and a read-only raw image of
    // random bytes.
    let dir = tempfile::tempdir().unwrap();
    let read_token = hex(&random_bytes(16));
    let write_token = hex(&random_bytes(16));
    let content = dir.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("from-host.txt"), format!("{read_token}\n")).unwrap();
    let rw_img = dir.path().join("rw.img");
    host_tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "ember-rw",
            "-d",
            content.to_str().unwrap(),
            rw_img.to_str().unwrap(),
            &format!("{RW_DISK_MIB}M"),
        ],
    )
    .unwrap();
    let ro_img = dir.path().join("ro.img");
    let ro_before = random_bytes(RO_DISK_BYTES);
    std::fs::write(&ro_img, &ro_before).unwrap();
    let api_socket = dir.path().join("api.sock");
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(&initrd, initramfs(&busybox)).unwrap();

    let netns = match TapNamespace::with_address("devices", TAP, &format!("{HOST_ADDR}/16")) {
        Ok(ns) => Some(ns),
        Err(why) => {
            tap_part_unavailable(TEST, "the virtio-net step", why);
            None
        }
    };
    let counters_before = netns.as_ref().map(|ns| ns.packets().unwrap());

    // i8042.dumbkbd: the keyboard behind Ember's i8042 sends scancodes and answers no
    // commands (Firecracker documents the same for SendCtrlAltDel).
    let mut cmdline = format!(
        "console=ttyS0 reboot=k panic=1 printk.devkmsg=on i8042.dumbkbd \
         ember.token={write_token} ember.net={}",
        u8::from(netns.is_some())
    );
    if let Ok(extra) = std::env::var("EMBER_LINUX_DEVICES_CMDLINE") {
        cmdline = format!("{cmdline} {extra}");
    }
    let ember = env!("CARGO_BIN_EXE_ember");
    let mut command = match &netns {
        Some(ns) => ns.exec(ember),
        None => Command::new(ember),
    };
    command
        .args(["--kernel", vmlinux.to_str().unwrap()])
        .args(["--initrd", initrd.to_str().unwrap()])
        .args(["--cpus", "2", "--memory", "256M"])
        .args(["--disk", &format!("path={}", rw_img.display())])
        .args(["--disk", &format!("path={},readonly=on", ro_img.display())])
        .arg("--rng")
        .args(["--cmdline", &cmdline])
        .arg("--api-sock")
        .arg(&api_socket)
        .args(["--exit-stats", "-v"]);
    if netns.is_some() {
        command.args(["--net", &format!("tap={TAP},mac={GUEST_MAC}")]);
    }
    let limit = timeout();
    eprintln!(
        "{TEST}: booting {} (up to {limit:?}): {command:?}",
        vmlinux.display()
    );
    let boot = boot(command, &api_socket, limit);

    // -----------------------------------------------------------------------------------
    // Every step, checked; failures collected so that one run reports them all.
    let mut failures: Vec<String> = Vec::new();
    let mut fail = |msg: String| failures.push(msg);

    for name in STEPS {
        match boot.steps.get(*name) {
            None if *name == "console" => fail(
                "step `console`: no EMBER-STEP line (what /init wrote to /dev/console, the \
                 8250 tty, never reached ember's stdout)"
                    .into(),
            ),
            None => fail(format!("step `{name}`: no EMBER-STEP line")),
            Some(s) if *name == "net" && netns.is_none() => {
                if s.status != "SKIP" {
                    fail(format!(
                        "step `net` without a tap: {} {}",
                        s.status, s.detail
                    ));
                }
            }
            Some(s) if s.status != "OK" => {
                fail(format!("step `{name}`: {} {}", s.status, s.detail))
            }
            Some(_) => {}
        }
    }
    for (name, s) in &boot.steps {
        if !STEPS.contains(&name.as_str()) {
            fail(format!(
                "unexpected step `{name}`: {} {}",
                s.status, s.detail
            ));
        }
    }
    let ok = |name: &str| {
        boot.steps
            .get(name)
            .filter(|s| s.status == "OK")
            .map(|s| s.detail.as_str())
    };

    // disks: both, with the sizes given.
    if let Some(d) = ok("disks") {
        let rw_sectors = format!("ro=0:sectors={}", RW_DISK_MIB << 11);
        let ro_sectors = format!("ro=1:sectors={}", RO_DISK_BYTES / 512);
        if !d.contains(&rw_sectors) || !d.contains(&ro_sectors) {
            fail(format!(
                "step `disks`: want `{rw_sectors}` and `{ro_sectors}`, got `{d}`"
            ));
        }
    }
    // blk-read: the token the host put in the image.
    if let Some(d) = ok("blk-read") {
        if d != read_token {
            fail(format!(
                "step `blk-read`: the guest read `{d}`, the host wrote `{read_token}`"
            ));
        }
    }
    // blk-write: the guest's file is in the image, and the file system is clean.
    if let Some(d) = ok("blk-write") {
        if d != write_token {
            fail(format!(
                "step `blk-write`: the guest wrote `{d}`, not `{write_token}`"
            ));
        }
    }
    match host_tool(
        "debugfs",
        &["-R", "cat /from-guest.txt", rw_img.to_str().unwrap()],
    ) {
        Ok(text) if text.trim_end() == write_token => {}
        Ok(text) if text.is_empty() => {
            fail("image: no /from-guest.txt in it (debugfs printed nothing)".into())
        }
        Ok(text) => fail(format!(
            "image: debugfs found `/from-guest.txt` = `{}`, want `{write_token}`",
            text.trim_end()
        )),
        Err(e) => fail(format!("image: {e}")),
    }
    if let Err(e) = host_tool("e2fsck", &["-f", "-n", rw_img.to_str().unwrap()]) {
        fail(format!("image: the ext4 file system is not clean: {e}"));
    }
    // blk-ro: the guest read the image's first bytes, and nothing was written.
    if let Some(d) = ok("blk-ro") {
        let want = format!("bytes={}; write refused: ", hex(&ro_before[..16]));
        if !d.starts_with(&want) {
            fail(format!("step `blk-ro`: want `{want}...`, got `{d}`"));
        }
    }
    if std::fs::read(&ro_img).unwrap() != ro_before {
        fail("the readonly=on image changed".into());
    }
    // rng: virtio is the current hwrng, and its bytes are not all the same.
    if let Some(d) = ok("rng") {
        let current = d
            .split_whitespace()
            .find_map(|w| w.strip_prefix("current="))
            .unwrap_or_default();
        let bytes = d
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bytes="))
            .unwrap_or_default();
        if !current.starts_with("virtio") {
            fail(format!("step `rng`: rng_current is `{current}`"));
        }
        let pairs: Vec<&str> = (0..bytes.len() / 2)
            .map(|i| &bytes[2 * i..2 * i + 2])
            .collect();
        if pairs.len() != 32 || pairs.iter().all(|p| *p == pairs[0]) {
            fail(format!(
                "step `rng`: want 32 bytes, not all equal: `{bytes}`"
            ));
        }
    }
    // net: the MAC we gave, every ping answered, and the tap saw the traffic both ways.
    if let (Some(ns), Some((rx_before, tx_before))) = (&netns, counters_before) {
        if let Some(d) = ok("net") {
            let want =
                format!("mac={GUEST_MAC}; {PINGS} packets transmitted, {PINGS} packets received");
            if !d.starts_with(&want) {
                fail(format!("step `net`: want `{want}...`, got `{d}`"));
            }
        }
        match ns.packets() {
            // At least an ARP request and the echo requests from the guest, an ARP reply
            // and the echo replies to it.
            Ok((rx, tx)) => {
                let least = u64::from(PINGS) + 1;
                if rx < rx_before + least || tx < tx_before + least {
                    fail(format!(
                        "{TAP} counters: RX {rx_before} -> {rx}, TX {tx_before} -> {tx}; \
                         want each up by at least {least}"
                    ));
                } else {
                    eprintln!("{TAP} counters: RX {rx_before} -> {rx}, TX {tx_before} -> {tx}");
                }
            }
            Err(e) => fail(format!("{TAP} counters: {e}")),
        }
    }
    // cad: the API took the keys, and init got the signal (the step says so).
    match &boot.ctrl_alt_del {
        None if ok("cad-wait").is_some() => fail("SendCtrlAltDel was never sent".into()),
        None => {}
        Some(Ok((204, _))) => {}
        Some(Ok((status, body))) => fail(format!("SendCtrlAltDel: HTTP {status}: {body}")),
        Some(Err(e)) => fail(format!("SendCtrlAltDel: {e}")),
    }
    // poweroff -f: the ACPI power-off ends ember with status 0.
    match (&boot.killed_because, boot.exit_code) {
        (Some(why), _) => fail(format!("ember killed: {why}")),
        (None, Some(0)) => {}
        (None, code) => fail(format!("ember exit status {code:?}, want 0 (poweroff -f)")),
    }
    if boot.stderr.contains("panicked") {
        fail("ember panicked".into());
    }
    if let Some((_, line)) = boot.find("Kernel panic") {
        fail(format!("the guest kernel panicked: {line}"));
    }
    for (_, line) in boot
        .console
        .iter()
        .filter(|(_, l)| l.contains("segfault at"))
    {
        fail(format!("a guest process crashed: {line}"));
    }

    // -----------------------------------------------------------------------------------
    // Timings, on success and failure alike.
    let run_init = boot.find("Run /init as init process");
    eprintln!(
        "{TEST}: `Run /init` at {} wall ({} guest); init step at {}; done step at {}; \
         ember ended after {:.1} s; test total {:.1} s",
        run_init.map_or("-".into(), |(t, _)| format!("{:.1} s", t.as_secs_f64())),
        run_init
            .and_then(|(_, l)| printk_time(l))
            .map_or("-".into(), |t| format!("{t:.1} s")),
        boot.steps.get("init").map_or("-".into(), |s| format!(
            "{:.1} s wall ({})",
            s.at.as_secs_f64(),
            s.detail
        )),
        boot.steps.get("done").map_or("-".into(), |s| format!(
            "{:.1} s wall ({})",
            s.at.as_secs_f64(),
            s.detail
        )),
        boot.ended.as_secs_f64(),
        test_start.elapsed().as_secs_f64(),
    );
    if let Some(i) = boot.stderr.find("ember: exit profile") {
        eprintln!("--- ember --exit-stats ---\n{}", &boot.stderr[i..]);
    }

    assert!(
        failures.is_empty(),
        "{TEST}: {} failure(s):\n  {}\n--- console ---\n{}--- ember stderr ---\n{}",
        failures.len(),
        failures.join("\n  "),
        boot.console_text(),
        boot.stderr
    );
}
