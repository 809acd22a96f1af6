//! A Linux tap interface for [`Net`](super::Net).
//!
//! **Existing taps only.** [`Tap::open`] never creates an interface: the tap must exist
//! (persistent, made with `ip tuntap add dev NAME mode tap vnet_hdr user USER`), so the
//! VMM needs no `CAP_NET_ADMIN` and is never run as root just to get a network. A
//! missing name, or an interface that is not a tap, is an error naming it.
//!
//! Opened from `/dev/net/tun` (`O_CLOEXEC | O_NONBLOCK`) with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a vnet header size of 12 (`virtio_net_hdr_v1`,
//! the same header the virtio-net driver uses) and every offload off
//! (`TUNSETOFFLOAD(0)`: the kernel hands over only complete, checksummed frames).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::VirtioDeviceError;

/// Path of the tun/tap clone device.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Where Linux lists network interfaces.
const SYS_CLASS_NET: &str = "/sys/class/net";
/// Longest interface name (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;
/// vnet header size configured on the tap.
const VNET_HDR_SIZE: libc::c_int = 12;

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the existing tap interface `name`; never creates one.
    ///
    /// Errors: [`VirtioDeviceError::TapMissing`] (with the command that creates it) when
    /// there is no interface `name`, [`VirtioDeviceError::NotTap`] when it is not a tap,
    /// [`VirtioDeviceError::TapName`] for a name no interface can have, and
    /// [`VirtioDeviceError::Tap`] naming the step that failed otherwise (such as
    /// `EPERM` from `TUNSETIFF` on a tap owned by another user).
    ///
    /// ```
    /// use ember_virtio_devices::{Tap, VirtioDeviceError};
    ///
    /// let err = Tap::open("no-such-tap0").unwrap_err();
    /// assert!(matches!(err, VirtioDeviceError::TapMissing { .. }));
    /// assert!(err.to_string().contains("ip tuntap add dev no-such-tap0 mode tap"));
    /// ```
    pub fn open(name: &str) -> Result<Tap, VirtioDeviceError> {
        // '/' would make the sysfs path below point elsewhere; no interface has one.
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name.as_bytes().contains(&0)
            || name.contains('/')
            || name == "."
            || name == ".."
        {
            return Err(VirtioDeviceError::TapName { name: name.into() });
        }
        check_existing_tap(name)?;
        let err = |op: &'static str| {
            move |source: io::Error| VirtioDeviceError::Tap {
                op,
                name: name.into(),
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(err("open /dev/net/tun"))?;

        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as
        // and outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if ret < 0 {
            return Err(err("attach to it with TUNSETIFF")(
                io::Error::last_os_error(),
            ));
        }
        // The tap existed above, but it could have gone before TUNSETIFF, which then
        // created a new one (with CAP_NET_ADMIN). An existing tap that another open
        // does not hold is persistent; one we created is not, and goes when `file`
        // is dropped here.
        let mut got = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq`, which `got` is laid out as and
        // outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF as _, &mut got) };
        if ret < 0 {
            return Err(err("read its flags with TUNGETIFF")(
                io::Error::last_os_error(),
            ));
        }
        if i32::from(got.flags) & libc::IFF_PERSIST == 0 {
            return Err(VirtioDeviceError::TapMissing { name: name.into() });
        }

        let hdr_size: libc::c_int = VNET_HDR_SIZE;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr_size) };
        if ret < 0 {
            return Err(err("set the vnet header size with TUNSETVNETHDRSZ")(
                io::Error::last_os_error(),
            ));
        }

        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is accessed.
        let ret = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                0 as libc::c_ulong,
            )
        };
        if ret < 0 {
            return Err(err("turn offloads off with TUNSETOFFLOAD")(
                io::Error::last_os_error(),
            ));
        }

        // The kernel may have completed a name pattern such as "tap%d".
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        Ok(Tap { file, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (vnet header included); `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header included).
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

/// Checks in sysfs that interface `name` exists and is a tap, without touching it.
fn check_existing_tap(name: &str) -> Result<(), VirtioDeviceError> {
    let dir = std::path::Path::new(SYS_CLASS_NET).join(name);
    if !dir.exists() {
        return Err(VirtioDeviceError::TapMissing { name: name.into() });
    }
    let not_tap = |what: String| VirtioDeviceError::NotTap {
        name: name.into(),
        what,
    };
    // Only tun/tap devices have `tun_flags` (hexadecimal, e.g. "0x5002").
    let flags = match std::fs::read_to_string(dir.join("tun_flags")) {
        Ok(flags) => flags,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(not_tap("it is not a tun/tap device".into()));
        }
        Err(e) => return Err(not_tap(format!("cannot read its tun_flags: {e}"))),
    };
    let text = flags.trim();
    let flags = i64::from_str_radix(text.trim_start_matches("0x"), 16)
        .map_err(|_| not_tap(format!("unreadable tun_flags {text:?}")))?;
    if flags & i64::from(libc::IFF_TAP) == 0 {
        return Err(not_tap(format!(
            "it is a tun (layer 3) device, tun_flags {text}; create a tap with `mode tap`"
        )));
    }
    Ok(())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::VIRTIO_NET_HDR_LEN;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn rejects_bad_names() {
        for name in ["", "0123456789abcdef", "a\0b", "../lo", ".", ".."] {
            assert!(matches!(
                Tap::open(name),
                Err(VirtioDeviceError::TapName { .. })
            ));
        }
    }

    /// Deletes the interface even if the test fails.
    struct DeleteLink(String);
    impl Drop for DeleteLink {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["link", "delete", &self.0])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    fn stat(name: &str, counter: &str) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{counter}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends `frame` out of interface `ifindex` with an AF_PACKET socket.
    fn packet_send(ifindex: i32, frame: &[u8]) -> io::Result<()> {
        // SAFETY: plain socket syscalls on a local fd with a sockaddr_ll we own.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            let ret = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = io::Error::last_os_error();
            libc::close(fd);
            if ret < 0 {
                return Err(err);
            }
        }
        Ok(())
    }

    fn sys_exists(name: &str) -> bool {
        std::path::Path::new(SYS_CLASS_NET).join(name).exists()
    }

    /// A missing tap is an error naming it, and nothing is created, even with the
    /// privileges to create one (as root).
    #[test]
    fn never_creates_a_missing_tap() {
        let name = format!("embm{}", std::process::id() % 100_000);
        let _guard = DeleteLink(name.clone());
        assert!(!sys_exists(&name));
        let result = Tap::open(&name);
        // Checked while `result` (a tap, if one was made) is still open.
        assert!(!sys_exists(&name), "Tap::open created {name}");
        let err = result.unwrap_err();
        assert!(
            matches!(&err, VirtioDeviceError::TapMissing { name: n } if *n == name),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("tap '{name}' does not exist"))
                && msg.contains(&format!("ip tuntap add dev {name} mode tap")),
            "{msg}"
        );
    }

    #[test]
    fn rejects_interfaces_that_are_not_taps() {
        // Every Linux network namespace has a loopback interface.
        if !sys_exists("lo") {
            eprintln!(
                "!!! no /sys/class/net/lo: test rejects_interfaces_that_are_not_taps did NOT run"
            );
            return;
        }
        let err = Tap::open("lo").unwrap_err();
        assert!(
            matches!(&err, VirtioDeviceError::NotTap { name, .. } if name == "lo"),
            "{err}"
        );
    }

    /// Creates persistent interface `name` with `ip tuntap add` (`mode` tap or tun);
    /// false (and a loud message) without the privileges or the tool.
    fn ip_tuntap_add(name: &str, mode: &str, test: &str) -> bool {
        let made = Command::new("ip")
            .args(["tuntap", "add", "dev", name, "mode", mode, "vnet_hdr"])
            .stderr(std::process::Stdio::null())
            .status();
        if !matches!(made, Ok(s) if s.success()) {
            eprintln!("!!! TAP UNAVAILABLE: test {test} did NOT run: `ip tuntap add` failed");
            return false;
        }
        true
    }

    #[test]
    fn rejects_a_tun_device() {
        let name = format!("embu{}", std::process::id() % 100_000);
        let _guard = DeleteLink(name.clone());
        if !ip_tuntap_add(&name, "tun", "rejects_a_tun_device") {
            return;
        }
        let err = Tap::open(&name).unwrap_err();
        assert!(matches!(&err, VirtioDeviceError::NotTap { .. }), "{err}");
        assert!(err.to_string().contains("tun"), "{err}");
    }

    /// A real (existing, persistent) tap, both directions. Needs root and /dev/net/tun;
    /// says so loudly and returns when they are missing.
    #[test]
    fn real_tap_round_trip() {
        let name = format!("embt{}", std::process::id() % 100_000);
        let _guard = DeleteLink(name.clone());
        if !ip_tuntap_add(&name, "tap", "real_tap_round_trip") {
            return;
        }
        let mut tap = Tap::open(&name).unwrap();
        // SAFETY: F_GETFD on an open fd.
        let fd_flags = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        assert_eq!(tap.name(), name);
        let up = Command::new("ip")
            .args(["link", "set", &name, "up"])
            .status();
        if !matches!(up, Ok(s) if s.success()) {
            eprintln!("!!! TAP UNAVAILABLE: test real_tap_round_trip did NOT run: `ip link set up` failed");
            return;
        }

        // Device -> host: a broadcast frame with an unused ethertype, after a zero header.
        let mut frame = vec![0u8; VIRTIO_NET_HDR_LEN];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        frame.extend_from_slice(&[0x5a; 46]);
        let before = stat(&name, "rx_packets");
        assert_eq!(tap.write_frame(&frame).unwrap(), frame.len());
        let deadline = Instant::now() + Duration::from_secs(5);
        while stat(&name, "rx_packets") <= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            stat(&name, "rx_packets") > before,
            "the host did not receive the frame"
        );

        // Host -> device: send a frame out of the interface; the tap reads it, with a
        // 12-byte vnet header in front (IPv6 autoconfiguration may interleave frames).
        let ifindex = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap();
        let eth = &frame[VIRTIO_NET_HDR_LEN..];
        packet_send(ifindex, eth).unwrap();
        let mut buf = vec![0u8; 65562];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tap.read_frame(&mut buf) {
                Ok(n) if n == frame.len() && &buf[VIRTIO_NET_HDR_LEN..n] == eth => {
                    // No offloads: gso_type NONE and no NEEDS_CSUM.
                    assert_eq!(buf[0] & 1, 0);
                    assert_eq!(buf[1], 0);
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "the tap never received the frame"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("tap read failed: {e}"),
            }
        }
    }
}
