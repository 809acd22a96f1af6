//! A Linux tap interface for [`Net`](super::Net).
//!
//! Opened from `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a vnet header
//! size of 12 (`virtio_net_hdr_v1`, the same header the virtio-net driver uses), every
//! offload off (`TUNSETOFFLOAD(0)`: the kernel hands over only complete, checksummed
//! frames) and `O_NONBLOCK`. Creating a tap needs `CAP_NET_ADMIN` (or an existing tap
//! owned by the caller). The interface is not made persistent, so it disappears when
//! the [`Tap`] is dropped, unless it existed before.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::VirtioDeviceError;

/// Path of the tun/tap clone device.
pub const TUN_PATH: &str = "/dev/net/tun";
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
    /// Opens (creating if needed) tap interface `name`. Errors name the interface and the
    /// step that failed.
    pub fn open(name: &str) -> Result<Tap, VirtioDeviceError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.as_bytes().contains(&0) {
            return Err(VirtioDeviceError::TapName { name: name.into() });
        }
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
            return Err(err("create it with TUNSETIFF")(io::Error::last_os_error()));
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
        for name in ["", "0123456789abcdef", "a\0b"] {
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

    /// A real tap, both directions. Needs root and /dev/net/tun; says so loudly and
    /// returns when they are missing.
    #[test]
    fn real_tap_round_trip() {
        let name = format!("embt{}", std::process::id() % 100_000);
        let mut tap = match Tap::open(&name) {
            Ok(tap) => tap,
            Err(e) => {
                eprintln!("!!! TAP UNAVAILABLE: test real_tap_round_trip did NOT run: {e}");
                return;
            }
        };
        let _guard = DeleteLink(name.clone());
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
