//! From the API's bodies ([`super::model`]) to the VMM's [`VmConfig`], with the values
//! checked (vCPU count, memory size, MAC, tap name, one root drive, ...), and back to
//! Firecracker's `FullVmConfiguration` for `GET /vm/config`.
//!
//! Firecracker's resources have ids (`drive_id`, `iface_id`) that [`VmConfig`] does not
//! keep, so [`PreBootConfig`] holds them next to it.

use serde_json::{json, Value};

use crate::config::{
    self, DiskConfig, KernelSource, NetConfig, RateLimit, VmConfig, DEFAULT_CMDLINE,
};

use super::model::{
    ApiReply, ApiRequest, BootSource, Drive, EntropyDevice, MachineConfig, NetworkInterface,
    RateLimiter, TokenBucket,
};

const MIB: u64 = 1 << 20;

/// The longest tap name (`IFNAMSIZ` - 1).
const MAX_TAP_NAME: usize = 15;

/// Applies `PUT /machine-config` to `vm`: vCPU count in 1..=[`ember_vm::MAX_VCPUS`]
/// (the host's KVM may allow fewer, checked at boot), memory in Ember's range, and
/// `track_dirty_pages` (false when absent).
pub fn apply_machine_config(vm: &mut VmConfig, m: &MachineConfig) -> Result<(), String> {
    super::model::check_supported_machine(m)?;
    let max = ember_vm::MAX_VCPUS;
    if m.vcpu_count == 0 || m.vcpu_count > max {
        return Err(format!(
            "machine-config: vcpu_count={} is out of range (1 to {max})",
            m.vcpu_count
        ));
    }
    let (min_mib, max_mib) = (
        ember_memory::MIN_RAM_SIZE / MIB,
        ember_memory::MAX_RAM_SIZE / MIB,
    );
    if m.mem_size_mib < min_mib || m.mem_size_mib > max_mib {
        return Err(format!(
            "machine-config: mem_size_mib={} is out of range ({min_mib} to {max_mib})",
            m.mem_size_mib
        ));
    }
    vm.vcpus = m.vcpu_count;
    vm.memory_bytes = m.mem_size_mib * MIB;
    vm.track_dirty_pages = m.track_dirty_pages.unwrap_or(false);
    Ok(())
}

/// Applies `PUT /boot-source` to `vm`: the kernel, the command line (Ember's default
/// when `boot_args` is absent) and the initrd.
pub fn apply_boot_source(vm: &mut VmConfig, b: &BootSource) -> Result<(), String> {
    if b.kernel_image_path.as_os_str().is_empty() {
        return Err("boot-source: kernel_image_path is empty".into());
    }
    if b.initrd_path
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err("boot-source: initrd_path is empty".into());
    }
    vm.kernel = KernelSource::File(b.kernel_image_path.clone());
    vm.cmdline = b.boot_args.clone();
    vm.initrd = b.initrd_path.clone();
    Ok(())
}

/// Applies `PUT /entropy` to `vm`: a virtio-rng device, with its limits.
pub fn apply_entropy(vm: &mut VmConfig, e: &EntropyDevice) -> Result<(), String> {
    vm.rng = true;
    vm.rng_rate_limit = e.rate_limiter.as_ref().and_then(rate_limit);
    Ok(())
}

/// A token bucket; `None` when `size` or `refill_time` is 0 (Firecracker's rule: such
/// a bucket is disabled).
pub fn token_bucket(b: &TokenBucket) -> Option<config::TokenBucket> {
    (b.size > 0 && b.refill_time > 0).then_some(config::TokenBucket {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    })
}

/// A rate limiter; `None` when neither bucket is enabled.
pub fn rate_limit(r: &RateLimiter) -> Option<RateLimit> {
    let limit = RateLimit {
        bandwidth: r.bandwidth.as_ref().and_then(token_bucket),
        ops: r.ops.as_ref().and_then(token_bucket),
    };
    (limit.bandwidth.is_some() || limit.ops.is_some()).then_some(limit)
}

/// The disk `PUT /drives/{id}` describes.
pub fn disk_config(d: &Drive) -> Result<DiskConfig, String> {
    let id = &d.drive_id;
    let path = match &d.path_on_host {
        Some(p) if !p.as_os_str().is_empty() => p.clone(),
        _ => return Err(format!("drive {id}: path_on_host is missing or empty")),
    };
    if d.partuuid.is_some() || d.socket.is_some() {
        return Err(format!(
            "drive {id}: partuuid and socket are not supported by Ember"
        ));
    }
    Ok(DiskConfig {
        path,
        read_only: d.is_read_only.unwrap_or(false),
        serial: None,
        rate_limit: d.rate_limiter.as_ref().and_then(rate_limit),
    })
}

/// The card `PUT /network-interfaces/{id}` describes.
pub fn net_config(n: &NetworkInterface) -> Result<NetConfig, String> {
    let id = &n.iface_id;
    let tap = &n.host_dev_name;
    if tap.is_empty() || tap.len() > MAX_TAP_NAME || tap.contains(['/', '\0']) {
        return Err(format!(
            "network interface {id}: host_dev_name {tap:?} is not a tap name \
             (1 to {MAX_TAP_NAME} bytes, no '/')"
        ));
    }
    let mac = match &n.guest_mac {
        Some(m) => Some(parse_mac(m).map_err(|e| format!("network interface {id}: {e}"))?),
        None => None,
    };
    Ok(NetConfig {
        tap: tap.clone(),
        mac,
        rx_rate_limit: n.rx_rate_limiter.as_ref().and_then(rate_limit),
        tx_rate_limit: n.tx_rate_limiter.as_ref().and_then(rate_limit),
    })
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, either case), refusing multicast addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("guest_mac {s:?} is not a MAC address like \"06:00:ac:10:00:02\"");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "guest_mac {s:?} is a multicast address (lowest bit of the first byte set)"
        ));
    }
    Ok(mac)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The VM the API configures: a [`VmConfig`] and what Firecracker's API keeps beside
/// it (resource ids, the root drive).
///
/// Drives keep the order they were first put in, except that the root drive is always
/// first (`/dev/vda`), as in Firecracker. Disks and cards already in the base config
/// (from the command line) get the ids `disk0`, `disk1`, ... and `net0`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreBootConfig {
    /// The VM, as configured so far.
    pub vm: VmConfig,
    /// `drive_id` of each of `vm.disks`, in the same order.
    pub drive_ids: Vec<String>,
    /// The root drive's id; it is `vm.disks[0]`.
    pub root_drive: Option<String>,
    /// `iface_id` of each of `vm.nets`, in the same order.
    pub iface_ids: Vec<String>,
}

impl PreBootConfig {
    /// Starts from `base` (the command line's VM).
    pub fn new(base: VmConfig) -> Self {
        let drive_ids = (0..base.disks.len()).map(|i| format!("disk{i}")).collect();
        let iface_ids = (0..base.nets.len()).map(|i| format!("net{i}")).collect();
        PreBootConfig {
            vm: base,
            drive_ids,
            root_drive: None,
            iface_ids,
        }
    }

    /// Handles the configuration requests (`PUT /machine-config`, `/boot-source`,
    /// `/drives/{id}`, `/network-interfaces/{id}`, `/entropy`, and `GET /vm/config`,
    /// `GET /machine-config`); `None` for any other request. The caller refuses the
    /// `PUT`s after boot.
    pub fn handle(&mut self, request: &ApiRequest) -> Option<ApiReply> {
        let result = match request {
            ApiRequest::PutMachineConfig(m) => apply_machine_config(&mut self.vm, m),
            ApiRequest::PutBootSource(b) => apply_boot_source(&mut self.vm, b),
            ApiRequest::PutDrive(d) => self.put_drive(d),
            ApiRequest::PutNetworkInterface(n) => self.put_network_interface(n),
            ApiRequest::PutEntropy(e) => apply_entropy(&mut self.vm, e),
            ApiRequest::GetVmConfig => return Some(ApiReply::Json(self.full_config())),
            ApiRequest::GetMachineConfig => return Some(ApiReply::Json(self.machine_config())),
            _ => return None,
        };
        Some(match result {
            Ok(()) => ApiReply::NoContent,
            Err(message) => ApiReply::bad_request(message),
        })
    }

    /// The VM as configured so far (without [`Self::finish`]'s additions).
    pub fn base(&self) -> &VmConfig {
        &self.vm
    }

    /// `PUT /drives/{id}`: adds the drive, or replaces the one with the same id.
    pub fn put_drive(&mut self, d: &Drive) -> Result<(), String> {
        let id = &d.drive_id;
        let disk = disk_config(d)?;
        let existing = self.drive_ids.iter().position(|i| i == id);
        if let Some(other) = self
            .drive_ids
            .iter()
            .zip(&self.vm.disks)
            .find(|(i, disk)| *i != id && disk.path == disk_path(d))
            .map(|(i, _)| i)
        {
            return Err(format!(
                "drive {id}: {} is already the image of drive {other}",
                disk.path.display()
            ));
        }
        if d.is_root_device {
            if let Some(root) = self.root_drive.as_ref().filter(|r| *r != id) {
                return Err(format!(
                    "drive {id}: drive {root} is already the root device (there can be one)"
                ));
            }
        }
        if let Some(i) = existing {
            self.vm.disks.remove(i);
            self.drive_ids.remove(i);
            if self.root_drive.as_ref() == Some(id) {
                self.root_drive = None;
            }
        }
        let at = if d.is_root_device {
            self.root_drive = Some(id.clone());
            0
        } else {
            existing
                .unwrap_or(self.vm.disks.len())
                .min(self.vm.disks.len())
        };
        self.vm.disks.insert(at, disk);
        self.drive_ids.insert(at, id.clone());
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: adds the card, or replaces the one with the same
    /// id.
    pub fn put_network_interface(&mut self, n: &NetworkInterface) -> Result<(), String> {
        let id = &n.iface_id;
        let net = net_config(n)?;
        if let Some((other, _)) = self
            .iface_ids
            .iter()
            .zip(&self.vm.nets)
            .find(|(i, other)| *i != id && other.tap == net.tap)
        {
            return Err(format!(
                "network interface {id}: tap {} is already used by interface {other}",
                net.tap
            ));
        }
        if let (Some(mac), Some((other, _))) = (
            net.mac,
            self.iface_ids
                .iter()
                .zip(&self.vm.nets)
                .find(|(i, other)| *i != id && other.mac == net.mac),
        ) {
            return Err(format!(
                "network interface {id}: guest_mac {} is already used by interface {other}",
                format_mac(&mac)
            ));
        }
        match self.iface_ids.iter().position(|i| i == id) {
            Some(i) => {
                if let Some(slot) = self.vm.nets.get_mut(i) {
                    *slot = net;
                }
            }
            None => {
                self.vm.nets.push(net);
                self.iface_ids.push(id.clone());
            }
        }
        Ok(())
    }

    /// The VM to build: [`Self::vm`] with `root=/dev/vda rw` (`ro` for a read-only
    /// drive) added to the command line when there is a root drive and the command line
    /// names no `root=` itself, as Firecracker does. (Nothing fails today; the `Result`
    /// leaves room for checks that need the whole configuration.)
    pub fn finish(&self) -> Result<VmConfig, String> {
        let mut vm = self.vm.clone();
        if let (Some(_), Some(disk)) = (&self.root_drive, vm.disks.first()) {
            let base = vm.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
            if !base.split_whitespace().any(|w| w.starts_with("root=")) {
                let mode = if disk.read_only { "ro" } else { "rw" };
                vm.cmdline = Some(format!("{base} root=/dev/vda {mode}"));
            }
        }
        Ok(vm)
    }

    /// `GET /machine-config`'s body (Firecracker's `MachineConfiguration`).
    pub fn machine_config(&self) -> Value {
        json!({
            "vcpu_count": self.vm.vcpus,
            "mem_size_mib": self.vm.memory_bytes / MIB,
            "smt": false,
            "track_dirty_pages": self.vm.track_dirty_pages,
            "huge_pages": "None",
        })
    }

    /// `GET /vm/config`'s body (Firecracker's `FullVmConfiguration`): what Ember has
    /// (machine, boot source, drives, network interfaces, entropy), `null` for the
    /// resources it does not have.
    pub fn full_config(&self) -> Value {
        let vm = &self.vm;
        let boot_source = match &vm.kernel {
            KernelSource::Demo => Value::Null,
            KernelSource::File(path) => {
                let mut b = json!({
                    "kernel_image_path": path,
                    "boot_args": vm.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE),
                });
                if let (Some(initrd), Some(obj)) = (&vm.initrd, b.as_object_mut()) {
                    obj.insert("initrd_path".into(), json!(initrd));
                }
                b
            }
        };
        let drives: Vec<Value> = self
            .drive_ids
            .iter()
            .zip(&vm.disks)
            .map(|(id, d)| {
                json!({
                    "drive_id": id,
                    "partuuid": null,
                    "is_root_device": self.root_drive.as_ref() == Some(id),
                    "cache_type": "Writeback",
                    "is_read_only": d.read_only,
                    "path_on_host": d.path,
                    "rate_limiter": rate_limit_json(d.rate_limit.as_ref()),
                    "io_engine": "Sync",
                    "socket": null,
                })
            })
            .collect();
        let nets: Vec<Value> = self
            .iface_ids
            .iter()
            .zip(&vm.nets)
            .map(|(id, n)| {
                json!({
                    "iface_id": id,
                    "host_dev_name": n.tap,
                    "guest_mac": n.mac.as_ref().map(format_mac),
                    "rx_rate_limiter": rate_limit_json(n.rx_rate_limit.as_ref()),
                    "tx_rate_limiter": rate_limit_json(n.tx_rate_limit.as_ref()),
                })
            })
            .collect();
        let entropy = if vm.rng {
            json!({ "rate_limiter": rate_limit_json(vm.rng_rate_limit.as_ref()) })
        } else {
            Value::Null
        };
        json!({
            "balloon": null,
            "drives": drives,
            "boot-source": boot_source,
            "cpu-config": null,
            "logger": null,
            "machine-config": self.machine_config(),
            "metrics": null,
            "mmds-config": null,
            "network-interfaces": nets,
            "vsock": null,
            "entropy": entropy,
        })
    }
}

fn disk_path(d: &Drive) -> &std::path::Path {
    d.path_on_host
        .as_deref()
        .unwrap_or(std::path::Path::new(""))
}

fn rate_limit_json(r: Option<&RateLimit>) -> Value {
    let bucket = |b: Option<&config::TokenBucket>| match b {
        Some(b) => json!({
            "size": b.size,
            "one_time_burst": b.one_time_burst,
            "refill_time": b.refill_time_ms,
        }),
        None => Value::Null,
    };
    match r {
        Some(r) => json!({
            "bandwidth": bucket(r.bandwidth.as_ref()),
            "ops": bucket(r.ops.as_ref()),
        }),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{route, Routed};
    use crate::config::{CpuTemplateChoice, EntryChoice, SerialConfig};

    fn base() -> VmConfig {
        VmConfig {
            kernel: KernelSource::Demo,
            cmdline: None,
            memory_bytes: 256 * MIB,
            vcpus: 1,
            serial: SerialConfig::None,
            initrd: None,
            cpu_template: CpuTemplateChoice::Auto,
            entry: EntryChoice::Auto,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            rng_rate_limit: None,
            exit_stats: false,
            track_dirty_pages: false,
        }
    }

    /// Routes and applies one request, returning the reply.
    fn put(c: &mut PreBootConfig, path: &str, body: &str) -> ApiReply {
        match route("PUT", path, body.as_bytes()) {
            Ok(Routed::Vmm(r)) => c.handle(&r).expect("a configuration request"),
            Err(reply) => reply,
            Ok(other) => panic!("{other:?}"),
        }
    }

    fn fault(reply: ApiReply) -> String {
        match reply {
            ApiReply::Error {
                status: 400,
                message,
            } => message,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn machine_config_values_are_checked() {
        let mut c = PreBootConfig::new(base());
        assert_eq!(
            put(
                &mut c,
                "/machine-config",
                r#"{"vcpu_count": 4, "mem_size_mib": 1024, "track_dirty_pages": true}"#
            ),
            ApiReply::NoContent
        );
        assert_eq!((c.vm.vcpus, c.vm.memory_bytes), (4, 1024 * MIB));
        assert!(c.vm.track_dirty_pages);
        assert_eq!(c.machine_config()["track_dirty_pages"], true);
        let m = fault(put(
            &mut c,
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 1024}"#,
        ));
        assert!(m.contains("vcpu_count=0 is out of range (1 to 254)"), "{m}");
        let m = fault(put(
            &mut c,
            "/machine-config",
            r#"{"vcpu_count": 255, "mem_size_mib": 1024}"#,
        ));
        assert!(m.contains("vcpu_count=255"), "{m}");
        let m = fault(put(
            &mut c,
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 0}"#,
        ));
        assert!(m.contains("mem_size_mib=0 is out of range (16 to"), "{m}");
        let m = fault(put(
            &mut c,
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 18446744073709551615}"#,
        ));
        assert!(m.contains("mem_size_mib=18446744073709551615"), "{m}");
        // A refused request changes nothing.
        assert_eq!((c.vm.vcpus, c.vm.memory_bytes), (4, 1024 * MIB));
        assert_eq!(c.machine_config()["vcpu_count"], 4);
        assert_eq!(c.machine_config()["mem_size_mib"], 1024);
    }

    #[test]
    fn boot_source_and_entropy() {
        let mut c = PreBootConfig::new(base());
        assert_eq!(
            put(
                &mut c,
                "/boot-source",
                r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0 quiet", "initrd_path": "/i"}"#
            ),
            ApiReply::NoContent
        );
        assert_eq!(c.vm.kernel, KernelSource::File("/k".into()));
        assert_eq!(c.vm.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(c.vm.initrd, Some("/i".into()));
        assert!(
            fault(put(&mut c, "/boot-source", r#"{"kernel_image_path": ""}"#))
                .contains("kernel_image_path is empty")
        );

        assert_eq!(
            put(
                &mut c,
                "/entropy",
                r#"{"rate_limiter": {"bandwidth": {"size": 0, "refill_time": 10},
                    "ops": {"size": 5, "one_time_burst": 2, "refill_time": 10}}}"#
            ),
            ApiReply::NoContent
        );
        assert!(c.vm.rng);
        assert_eq!(
            c.vm.rng_rate_limit,
            Some(RateLimit {
                bandwidth: None, // size 0: disabled, as in Firecracker
                ops: Some(config::TokenBucket {
                    size: 5,
                    one_time_burst: 2,
                    refill_time_ms: 10
                }),
            })
        );
    }

    #[test]
    fn drives_root_first_and_updates_in_place() {
        let mut c = PreBootConfig::new(base());
        let drive = |id: &str, path: &str, root: bool, ro: bool| {
            format!(
                r#"{{"drive_id": "{id}", "path_on_host": "{path}", "is_root_device": {root},
                    "is_read_only": {ro}}}"#
            )
        };
        assert_eq!(
            put(&mut c, "/drives/data", &drive("data", "/d", false, false)),
            ApiReply::NoContent
        );
        assert_eq!(
            put(&mut c, "/drives/rootfs", &drive("rootfs", "/r", true, true)),
            ApiReply::NoContent
        );
        assert_eq!(c.drive_ids, ["rootfs", "data"]);
        assert_eq!(c.vm.disks[0].path, std::path::Path::new("/r"));
        assert!(c.vm.disks[0].read_only);
        let m = fault(put(
            &mut c,
            "/drives/other",
            &drive("other", "/o", true, false),
        ));
        assert!(m.contains("drive rootfs is already the root device"), "{m}");
        let m = fault(put(
            &mut c,
            "/drives/other",
            &drive("other", "/d", false, false),
        ));
        assert!(m.contains("/d is already the image of drive data"), "{m}");
        // Same id: replaced in place.
        assert_eq!(
            put(&mut c, "/drives/data", &drive("data", "/d2", false, true)),
            ApiReply::NoContent
        );
        assert_eq!(c.drive_ids, ["rootfs", "data"]);
        assert_eq!(c.vm.disks[1].path, std::path::Path::new("/d2"));

        let vm = c.finish().unwrap();
        assert_eq!(
            vm.cmdline.as_deref(),
            Some(format!("{DEFAULT_CMDLINE} root=/dev/vda ro").as_str())
        );
        c.vm.cmdline = Some("console=ttyS0 root=/dev/vdb".into());
        assert_eq!(
            c.finish().unwrap().cmdline.as_deref(),
            Some("console=ttyS0 root=/dev/vdb")
        );

        let full = c.full_config();
        assert_eq!(full["drives"][0]["drive_id"], "rootfs");
        assert_eq!(full["drives"][0]["is_root_device"], true);
        assert_eq!(full["drives"][1]["is_root_device"], false);
        assert_eq!(full["drives"][1]["path_on_host"], "/d2");
        assert_eq!(full["drives"][1]["is_read_only"], true);
    }

    #[test]
    fn network_interfaces_and_macs() {
        let mut c = PreBootConfig::new(base());
        assert_eq!(
            put(
                &mut c,
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02",
                    "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#
            ),
            ApiReply::NoContent
        );
        assert_eq!(c.vm.nets[0].mac, Some([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(c.vm.nets[0].tap, "tap0");
        assert!(c.vm.nets[0].rx_rate_limit.is_some());
        for (mac, want) in [
            ("06:00:ac:10:00", "is not a MAC address"),
            ("06:00:ac:10:00:02:03", "is not a MAC address"),
            ("06:00:ac:10:00:zz", "is not a MAC address"),
            ("6:00:ac:10:00:02:", "is not a MAC address"),
            ("01:00:5e:00:00:01", "multicast"),
        ] {
            let m = fault(put(
                &mut c,
                "/network-interfaces/eth1",
                &format!(
                    r#"{{"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "{mac}"}}"#
                ),
            ));
            assert!(m.contains(mac) && m.contains(want), "{mac}: {m}");
        }
        let m = fault(put(
            &mut c,
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#,
        ));
        assert!(
            m.contains("tap tap0 is already used by interface eth0"),
            "{m}"
        );
        let m = fault(put(
            &mut c,
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth1", "host_dev_name": "a-very-long-tap-name"}"#,
        ));
        assert!(m.contains("is not a tap name"), "{m}");
        assert_eq!(c.vm.nets.len(), 1);

        let full = c.full_config();
        assert_eq!(full["network-interfaces"][0]["iface_id"], "eth0");
        assert_eq!(
            full["network-interfaces"][0]["guest_mac"],
            "06:00:ac:10:00:02"
        );
        assert_eq!(
            full["network-interfaces"][0]["rx_rate_limiter"]["bandwidth"]["size"],
            1000
        );
        assert_eq!(
            full["network-interfaces"][0]["tx_rate_limiter"],
            Value::Null
        );
    }

    #[test]
    fn full_config_shape() {
        let mut vm = base();
        vm.disks.push(DiskConfig {
            path: "/cli.img".into(),
            read_only: false,
            serial: None,
            rate_limit: None,
        });
        let c = PreBootConfig::new(vm);
        let full = c.full_config();
        for key in [
            "balloon",
            "drives",
            "boot-source",
            "cpu-config",
            "logger",
            "machine-config",
            "metrics",
            "mmds-config",
            "network-interfaces",
            "vsock",
            "entropy",
        ] {
            assert!(full.get(key).is_some(), "{key} missing: {full}");
        }
        assert_eq!(full["drives"][0]["drive_id"], "disk0");
        assert_eq!(full["boot-source"], Value::Null, "the demo guest");
        assert_eq!(full["entropy"], Value::Null);
        assert_eq!(full["machine-config"]["smt"], false);
        assert_eq!(full["machine-config"]["mem_size_mib"], 256);
        // Not a configuration request.
        let mut c = c;
        assert_eq!(c.handle(&ApiRequest::InstanceStart), None);
    }
}
