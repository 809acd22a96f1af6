//! The API's request and response bodies, in Firecracker's shapes (its
//! `firecracker.yaml` swagger), and the typed requests the VMM thread receives.
//!
//! Every body struct refuses unknown fields (`deny_unknown_fields`). Fields Firecracker
//! has and Ember does not support are known here, so that a request using them gets a
//! 400 that says so ([`check_supported_machine`] and the like) rather than "unknown field".

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT /machine-config` (Firecracker's `MachineConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: only `false` (Ember has no SMT topology).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking, for diff snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Firecracker's static CPU template: only `"None"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages: only `"None"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// `PUT /boot-source` (Firecracker's `BootSource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel image on the host.
    pub kernel_image_path: PathBuf,
    /// The kernel command line; Ember's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// A token bucket (Firecracker's `TokenBucket`). A zero `size` or `refill_time`
/// disables the bucket, as in Firecracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds.
    pub size: u64,
    /// Extra tokens available once, at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the whole bucket.
    pub refill_time: u64,
}

/// A rate limiter (Firecracker's `RateLimiter`): bytes and operations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations (requests, packets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `PUT /drives/{drive_id}` (Firecracker's `Drive`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id; must equal the path's.
    pub drive_id: String,
    /// The raw image on the host (required: Ember has no vhost-user-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Whether this is the root device (`root=/dev/vda` is added to the command line).
    pub is_root_device: bool,
    /// Whether the guest may only read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// Root partition UUID: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Only `"Writeback"` (Ember's virtio-blk always offers FLUSH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Only `"Sync"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// vhost-user-block socket: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PUT /network-interfaces/{iface_id}` (Firecracker's `NetworkInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id; must equal the path's.
    pub iface_id: String,
    /// The host tap device.
    pub host_dev_name: String,
    /// The guest's MAC, `aa:bb:cc:dd:ee:ff`; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
    /// VIRTIO_NET_F_MTU: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// `PUT /entropy` (Firecracker's `EntropyDevice`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /actions`'s `action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the i8042 keyboard.
    SendCtrlAltDel,
    /// Not supported (Ember has no metrics).
    FlushMetrics,
}

/// `PUT /actions` (Firecracker's `InstanceActionInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// `PATCH /vm`'s `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateRequest {
    /// Pause every vCPU and device.
    Paused,
    /// Resume them.
    Resumed,
}

/// `PATCH /vm` (Firecracker's `Vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The wanted state.
    pub state: VmStateRequest,
}

/// A snapshot's kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages dirtied since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// `PUT /snapshot/create` (Firecracker's `SnapshotCreateParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full (the default) or Diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
    /// The state file to write.
    pub snapshot_path: PathBuf,
    /// The memory file to write.
    pub mem_file_path: PathBuf,
    /// Target snapshot format version (older Firecracker): not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `mem_backend`'s `backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// A memory file, mapped privately.
    File,
    /// A userfaultfd handler: not supported.
    Uffd,
}

/// Firecracker's `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file (or, for Uffd, the handler's socket).
    pub backend_path: PathBuf,
}

/// `PUT /snapshot/load` (Firecracker's `SnapshotLoadParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// Where guest memory comes from (or `mem_file_path`; exactly one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// The memory file (deprecated in Firecracker in favour of `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages after the restore (for diff snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Resume the VM once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// Tap overrides: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<serde_json::Value>>,
    /// vsock override: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<serde_json::Value>,
    /// KVM_CLOCK_REALTIME on restore: only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

/// A snapshot to write, as the VMM gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotCreate {
    /// Full or Diff.
    pub snapshot_type: SnapshotType,
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_file_path: PathBuf,
}

/// A snapshot to load, as the VMM gets it (`mem_backend` or `mem_file_path` resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLoad {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_file_path: PathBuf,
    /// `track_dirty_pages` or `enable_diff_snapshots`.
    pub track_dirty_pages: bool,
    /// Resume once loaded.
    pub resume_vm: bool,
}

/// `GET /`'s `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Before `InstanceStart` (or a snapshot load).
    #[serde(rename = "Not started")]
    NotStarted,
    /// Running.
    Running,
    /// Paused (`PATCH /vm {"state": "Paused"}`, or loaded without `resume_vm`).
    Paused,
}

/// `GET /` (Firecracker's `InstanceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The instance's id.
    pub id: String,
    /// Its state.
    pub state: InstanceState,
    /// Ember's version.
    pub vmm_version: String,
    /// `"Ember"`.
    pub app_name: String,
}

impl InstanceInfo {
    /// The info of instance `id` in `state`, with Ember's version and name.
    pub fn new(id: &str, state: InstanceState) -> Self {
        InstanceInfo {
            id: id.to_string(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            app_name: "Ember".to_string(),
        }
    }

    /// The JSON body of `GET /`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// A request for the VMM thread, parsed and checked for what Ember supports (values
/// such as the vCPU count are checked by [`super::convert`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`: reply with [`InstanceInfo::to_json`].
    GetInstanceInfo,
    /// `GET /vm/config`: reply with [`super::convert::PreBootConfig::full_config`].
    GetVmConfig,
    /// `GET /machine-config`: reply with
    /// [`super::convert::PreBootConfig::machine_config`].
    GetMachineConfig,
    /// `PUT /machine-config` (pre-boot).
    PutMachineConfig(MachineConfig),
    /// `PUT /boot-source` (pre-boot).
    PutBootSource(BootSource),
    /// `PUT /drives/{id}` (pre-boot); the id is the body's, equal to the path's.
    PutDrive(Drive),
    /// `PUT /network-interfaces/{id}` (pre-boot); id checked like drives'.
    PutNetworkInterface(NetworkInterface),
    /// `PUT /entropy` (pre-boot).
    PutEntropy(EntropyDevice),
    /// `PUT /actions {"action_type": "InstanceStart"}`.
    InstanceStart,
    /// `PUT /actions {"action_type": "SendCtrlAltDel"}`.
    SendCtrlAltDel,
    /// `PATCH /vm {"state": "Paused"}`.
    Pause,
    /// `PATCH /vm {"state": "Resumed"}`.
    Resume,
    /// `PUT /snapshot/create` (VM paused).
    CreateSnapshot(SnapshotCreate),
    /// `PUT /snapshot/load` (fresh process only).
    LoadSnapshot(SnapshotLoad),
}

/// The VMM's answer to an [`ApiRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// 204, no body.
    NoContent,
    /// 200 with this JSON body.
    Json(serde_json::Value),
    /// An error: `status` (400 for a request that cannot be done now or with these
    /// values, 500 for a failure) with `{"fault_message": message}`.
    Error {
        /// The HTTP status.
        status: u16,
        /// The `fault_message`.
        message: String,
    },
}

impl ApiReply {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiReply::Error {
            status: 400,
            message: message.into(),
        }
    }

    /// A 500 with `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiReply::Error {
            status: 500,
            message: message.into(),
        }
    }
}

/// "`what` is not supported by Ember (`why`)".
fn unsupported(what: String, why: &str) -> String {
    format!("{what} is not supported by Ember ({why})")
}

/// Refuses the fields Ember knows but does not support, naming field and value.
pub fn check_supported_machine(m: &MachineConfig) -> Result<(), String> {
    if m.smt == Some(true) {
        return Err(unsupported(
            "machine-config: smt=true".into(),
            "its vCPUs have no SMT topology",
        ));
    }
    if let Some(t) = m.cpu_template.as_deref().filter(|t| *t != "None") {
        return Err(unsupported(
            format!("machine-config: cpu_template={t:?}"),
            "it picks its own CPUID template; only \"None\" is accepted",
        ));
    }
    if let Some(h) = m.huge_pages.as_deref().filter(|h| *h != "None") {
        return Err(unsupported(
            format!("machine-config: huge_pages={h:?}"),
            "only \"None\" is accepted",
        ));
    }
    Ok(())
}

fn check_supported_drive(d: &Drive) -> Result<(), String> {
    let id = &d.drive_id;
    if let Some(p) = &d.partuuid {
        return Err(unsupported(
            format!("drive {id}: partuuid={p:?}"),
            "the root device is always /dev/vda",
        ));
    }
    if let Some(s) = &d.socket {
        return Err(unsupported(
            format!("drive {id}: socket={s:?} (vhost-user-block)"),
            "it has no vhost-user devices",
        ));
    }
    if let Some(c) = d.cache_type.as_deref().filter(|c| *c != "Writeback") {
        return Err(unsupported(
            format!("drive {id}: cache_type={c:?}"),
            "its virtio-blk always offers FLUSH; only \"Writeback\" is accepted",
        ));
    }
    if let Some(e) = d.io_engine.as_deref().filter(|e| *e != "Sync") {
        return Err(unsupported(
            format!("drive {id}: io_engine={e:?}"),
            "its virtio-blk does synchronous I/O; only \"Sync\" is accepted",
        ));
    }
    if d.path_on_host.is_none() {
        return Err(format!(
            "drive {id}: path_on_host is required (Ember has no vhost-user-block)"
        ));
    }
    Ok(())
}

fn check_supported_net(n: &NetworkInterface) -> Result<(), String> {
    if let Some(mtu) = n.mtu {
        return Err(unsupported(
            format!("network interface {}: mtu={mtu}", n.iface_id),
            "its virtio-net does not offer VIRTIO_NET_F_MTU",
        ));
    }
    Ok(())
}

fn snapshot_create(p: SnapshotCreateParams) -> Result<SnapshotCreate, String> {
    if let Some(v) = &p.version {
        return Err(unsupported(
            format!("snapshot/create: version={v:?}"),
            "it writes one snapshot format",
        ));
    }
    Ok(SnapshotCreate {
        snapshot_type: p.snapshot_type.unwrap_or_default(),
        snapshot_path: p.snapshot_path,
        mem_file_path: p.mem_file_path,
    })
}

fn snapshot_load(p: SnapshotLoadParams) -> Result<SnapshotLoad, String> {
    if p.network_overrides.as_ref().is_some_and(|o| !o.is_empty()) {
        return Err(unsupported(
            "snapshot/load: network_overrides".into(),
            "a restored VM keeps its taps",
        ));
    }
    if p.vsock_override.is_some() {
        return Err(unsupported(
            "snapshot/load: vsock_override".into(),
            "it has no vsock device",
        ));
    }
    if p.clock_realtime == Some(true) {
        return Err(unsupported(
            "snapshot/load: clock_realtime=true".into(),
            "kvmclock resumes where it was saved",
        ));
    }
    let mem_file_path = match (p.mem_backend, p.mem_file_path) {
        (Some(b), None) => match b.backend_type {
            MemBackendType::File => b.backend_path,
            MemBackendType::Uffd => {
                return Err(unsupported(
                    "snapshot/load: mem_backend.backend_type=\"Uffd\"".into(),
                    "it maps the memory file; use \"File\"",
                ))
            }
        },
        (None, Some(path)) => path,
        (Some(_), Some(_)) => {
            return Err("snapshot/load: give either mem_backend or mem_file_path, not both".into())
        }
        (None, None) => {
            return Err("snapshot/load: mem_backend (or mem_file_path) is required".into())
        }
    };
    Ok(SnapshotLoad {
        snapshot_path: p.snapshot_path,
        mem_file_path,
        track_dirty_pages: p.track_dirty_pages.unwrap_or(false)
            || p.enable_diff_snapshots.unwrap_or(false),
        resume_vm: p.resume_vm.unwrap_or(false),
    })
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    /// To the VMM thread.
    Vmm(ApiRequest),
    /// Answered by the API thread itself (`GET /version`).
    Local(ApiReply),
}

/// Endpoints Firecracker has and Ember does not (any method).
const UNSUPPORTED_ENDPOINTS: &[&str] = &[
    "/logger",
    "/metrics",
    "/balloon",
    "/mmds",
    "/vsock",
    "/cpu-config",
    "/hotplug",
    "/pmem",
    "/serial",
];

/// Parses a request into what it asks for, or the error reply (400 with a
/// `fault_message` naming what was wrong).
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Routed, ApiReply> {
    let bad = |m: String| ApiReply::bad_request(m);
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or("\0").split('/').collect();
    let known_unsupported = UNSUPPORTED_ENDPOINTS.iter().any(|e| {
        path == *e
            || path
                .strip_prefix(e)
                .is_some_and(|rest| rest.starts_with('/'))
    });
    if known_unsupported {
        return Err(bad(format!(
            "{method} {path}: {path} is not supported by Ember"
        )));
    }
    let invalid = || {
        ApiReply::bad_request(format!(
            "invalid request method and/or path: {method} {path}"
        ))
    };
    let endpoint = match (method, segments.as_slice()) {
        ("GET", [""]) => Endpoint::Get(ApiRequest::GetInstanceInfo),
        ("GET", ["version"]) => Endpoint::Version,
        ("GET", ["vm", "config"]) => Endpoint::Get(ApiRequest::GetVmConfig),
        ("GET", ["machine-config"]) => Endpoint::Get(ApiRequest::GetMachineConfig),
        ("PUT", ["machine-config"]) => Endpoint::MachineConfig,
        ("PUT", ["boot-source"]) => Endpoint::BootSource,
        ("PUT", ["drives", id]) if !id.is_empty() => Endpoint::Drive(id),
        ("PUT", ["network-interfaces", id]) if !id.is_empty() => Endpoint::Net(id),
        ("PUT", ["entropy"]) => Endpoint::Entropy,
        ("PUT", ["actions"]) => Endpoint::Actions,
        ("PATCH", ["vm"]) => Endpoint::Vm,
        ("PUT", ["snapshot", "create"]) => Endpoint::SnapshotCreate,
        ("PUT", ["snapshot", "load"]) => Endpoint::SnapshotLoad,
        ("PATCH", ["machine-config"])
        | ("PATCH", ["drives", _])
        | ("PATCH", ["network-interfaces", _]) => {
            return Err(bad(format!(
                "{method} {path} is not supported by Ember (configuration changes \
                 after boot; use PUT before InstanceStart)"
            )))
        }
        _ => return Err(invalid()),
    };
    let request = match endpoint {
        Endpoint::Get(_) | Endpoint::Version if !body.is_empty() => {
            return Err(bad(format!("{method} {path}: a GET request takes no body")));
        }
        Endpoint::Get(request) => return Ok(Routed::Vmm(request)),
        Endpoint::Version => {
            return Ok(Routed::Local(ApiReply::Json(serde_json::json!({
                "firecracker_version": env!("CARGO_PKG_VERSION"),
                "ember_version": env!("CARGO_PKG_VERSION"),
            }))))
        }
        _ if body.is_empty() => {
            return Err(bad(format!(
                "{method} {path} needs a JSON body (with a Content-Length header)"
            )))
        }
        Endpoint::MachineConfig => {
            let m: MachineConfig = json(method, path, body)?;
            check_supported_machine(&m).map_err(bad)?;
            ApiRequest::PutMachineConfig(m)
        }
        Endpoint::BootSource => ApiRequest::PutBootSource(json(method, path, body)?),
        Endpoint::Drive(id) => {
            let d: Drive = json(method, path, body)?;
            check_id("drive_id", id, &d.drive_id).map_err(bad)?;
            check_supported_drive(&d).map_err(bad)?;
            ApiRequest::PutDrive(d)
        }
        Endpoint::Net(id) => {
            let n: NetworkInterface = json(method, path, body)?;
            check_id("iface_id", id, &n.iface_id).map_err(bad)?;
            check_supported_net(&n).map_err(bad)?;
            ApiRequest::PutNetworkInterface(n)
        }
        Endpoint::Entropy => ApiRequest::PutEntropy(json(method, path, body)?),
        Endpoint::Actions => {
            let a: InstanceActionInfo = json(method, path, body)?;
            match a.action_type {
                ActionType::InstanceStart => ApiRequest::InstanceStart,
                ActionType::SendCtrlAltDel => ApiRequest::SendCtrlAltDel,
                ActionType::FlushMetrics => {
                    return Err(bad(unsupported(
                        "action_type \"FlushMetrics\"".into(),
                        "it has no metrics",
                    )))
                }
            }
        }
        Endpoint::Vm => {
            let v: Vm = json(method, path, body)?;
            match v.state {
                VmStateRequest::Paused => ApiRequest::Pause,
                VmStateRequest::Resumed => ApiRequest::Resume,
            }
        }
        Endpoint::SnapshotCreate => {
            ApiRequest::CreateSnapshot(snapshot_create(json(method, path, body)?).map_err(bad)?)
        }
        Endpoint::SnapshotLoad => {
            ApiRequest::LoadSnapshot(snapshot_load(json(method, path, body)?).map_err(bad)?)
        }
    };
    Ok(Routed::Vmm(request))
}

enum Endpoint<'a> {
    Get(ApiRequest),
    Version,
    MachineConfig,
    BootSource,
    Drive(&'a str),
    Net(&'a str),
    Entropy,
    Actions,
    Vm,
    SnapshotCreate,
    SnapshotLoad,
}

/// Deserializes the body; the error names the endpoint and what serde found (the
/// unknown or missing field, the bad value, the JSON syntax error and its position).
fn json<T: serde::de::DeserializeOwned>(
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<T, ApiReply> {
    serde_json::from_slice(body)
        .map_err(|e| ApiReply::bad_request(format!("{method} {path}: invalid body: {e}")))
}

fn check_id(field: &str, in_path: &str, in_body: &str) -> Result<(), String> {
    if in_path == in_body {
        Ok(())
    } else {
        Err(format!(
            "the {field} in the body ({in_body:?}) differs from the one in the path \
             ({in_path:?})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, path: &str, body: &str) -> ApiRequest {
        match route(method, path, body.as_bytes()) {
            Ok(Routed::Vmm(r)) => r,
            other => panic!("{method} {path} {body}: {other:?}"),
        }
    }

    /// The 400's message.
    fn err(method: &str, path: &str, body: &str) -> String {
        match route(method, path, body.as_bytes()) {
            Err(ApiReply::Error {
                status: 400,
                message,
            }) => message,
            other => panic!("{method} {path} {body}: {other:?}"),
        }
    }

    #[test]
    fn gets() {
        assert_eq!(ok("GET", "/", ""), ApiRequest::GetInstanceInfo);
        assert_eq!(ok("GET", "/vm/config", ""), ApiRequest::GetVmConfig);
        assert_eq!(
            ok("GET", "/machine-config", ""),
            ApiRequest::GetMachineConfig
        );
        match route("GET", "/version", b"") {
            Ok(Routed::Local(ApiReply::Json(v))) => {
                assert_eq!(v["firecracker_version"], env!("CARGO_PKG_VERSION"))
            }
            other => panic!("{other:?}"),
        }
        assert!(err("GET", "/", "{}").contains("takes no body"));
    }

    #[test]
    fn machine_config() {
        assert_eq!(
            ok(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                    "track_dirty_pages": true, "cpu_template": "None", "huge_pages": "None"}"#
            ),
            ApiRequest::PutMachineConfig(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                smt: Some(false),
                track_dirty_pages: Some(true),
                cpu_template: Some("None".into()),
                huge_pages: Some("None".into()),
            })
        );
        let m = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#,
        );
        assert!(
            m.contains("smt=true") && m.contains("not supported by Ember"),
            "{m}"
        );
        let m = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "T2"}"#,
        );
        assert!(
            m.contains("cpu_template=\"T2\"") && m.contains("not supported by Ember"),
            "{m}"
        );
        let m = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#,
        );
        assert!(m.contains("huge_pages=\"2M\""), "{m}");
        let m = err("PUT", "/machine-config", r#"{"vcpu_count": 2}"#);
        assert!(m.contains("missing field `mem_size_mib`"), "{m}");
        let m = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": -1, "mem_size_mib": 256}"#,
        );
        assert!(m.contains("invalid value: integer `-1`"), "{m}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let m = err(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "vcpus": 3}"#,
        );
        assert!(m.contains("unknown field `vcpus`"), "{m}");
        assert!(m.starts_with("PUT /machine-config: invalid body"), "{m}");
        let m = err(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "a", "path_on_host": "/x", "is_root_device": false,
                "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "rate": 3}}}"#,
        );
        assert!(m.contains("unknown field `rate`"), "{m}");
    }

    #[test]
    fn bad_json() {
        let m = err("PUT", "/boot-source", r#"{"kernel_image_path": "/k""#);
        assert!(m.contains("EOF while parsing"), "{m}");
        let m = err("PUT", "/boot-source", "nonsense");
        assert!(m.contains("expected ident at line 1 column 2"), "{m}");
        let m = err("PUT", "/boot-source", "");
        assert!(m.contains("needs a JSON body"), "{m}");
    }

    #[test]
    fn boot_source_entropy_actions_vm() {
        assert_eq!(
            ok(
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"}"#
            ),
            ApiRequest::PutBootSource(BootSource {
                kernel_image_path: "/k".into(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: Some("/i".into()),
            })
        );
        assert_eq!(
            ok("PUT", "/entropy", "{}"),
            ApiRequest::PutEntropy(EntropyDevice::default())
        );
        assert_eq!(
            ok(
                "PUT",
                "/entropy",
                r#"{"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#
            ),
            ApiRequest::PutEntropy(EntropyDevice {
                rate_limiter: Some(RateLimiter {
                    bandwidth: None,
                    ops: Some(TokenBucket {
                        size: 10,
                        one_time_burst: None,
                        refill_time: 100
                    })
                })
            })
        );
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            ApiRequest::InstanceStart
        );
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
            ApiRequest::SendCtrlAltDel
        );
        let m = err("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
        assert!(
            m.contains("FlushMetrics") && m.contains("not supported by Ember"),
            "{m}"
        );
        let m = err("PUT", "/actions", r#"{"action_type": "Reboot"}"#);
        assert!(m.contains("unknown variant `Reboot`"), "{m}");
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state": "Paused"}"#),
            ApiRequest::Pause
        );
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state": "Resumed"}"#),
            ApiRequest::Resume
        );
    }

    #[test]
    fn drives() {
        let d = ok(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true,
                "is_read_only": true, "cache_type": "Writeback", "io_engine": "Sync",
                "rate_limiter": {"bandwidth": {"size": 1000, "one_time_burst": 5, "refill_time": 100}}}"#,
        );
        let ApiRequest::PutDrive(d) = d else {
            panic!("{d:?}")
        };
        assert_eq!(d.drive_id, "rootfs");
        assert_eq!(d.path_on_host, Some("/img".into()));
        assert!(d.is_root_device);
        assert_eq!(d.is_read_only, Some(true));
        assert_eq!(
            d.rate_limiter.and_then(|r| r.bandwidth),
            Some(TokenBucket {
                size: 1000,
                one_time_burst: Some(5),
                refill_time: 100
            })
        );
        let m = err(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#,
        );
        assert!(
            m.contains("\"b\"") && m.contains("\"a\"") && m.contains("drive_id"),
            "{m}"
        );
        for (field, value) in [
            ("partuuid", "\"0eaa91a0-01\""),
            ("cache_type", "\"Unsafe\""),
            ("io_engine", "\"Async\""),
            ("socket", "\"/vhost.sock\""),
        ] {
            let m = err(
                "PUT",
                "/drives/a",
                &format!(
                    r#"{{"drive_id": "a", "path_on_host": "/x", "is_root_device": false, "{field}": {value}}}"#
                ),
            );
            assert!(
                m.contains(field) && m.contains("not supported by Ember"),
                "{field}: {m}"
            );
        }
        let m = err(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "a", "is_root_device": false}"#,
        );
        assert!(m.contains("path_on_host is required"), "{m}");
    }

    #[test]
    fn network_interfaces() {
        let n = ok(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01",
                "tx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#,
        );
        let ApiRequest::PutNetworkInterface(n) = n else {
            panic!("{n:?}")
        };
        assert_eq!(
            (n.iface_id.as_str(), n.host_dev_name.as_str()),
            ("eth0", "tap0")
        );
        assert_eq!(n.guest_mac.as_deref(), Some("06:00:00:00:00:01"));
        assert!(n.tx_rate_limiter.is_some() && n.rx_rate_limiter.is_none());
        let m = err(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#,
        );
        assert!(m.contains("iface_id"), "{m}");
        let m = err(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 9000}"#,
        );
        assert!(
            m.contains("mtu=9000") && m.contains("not supported by Ember"),
            "{m}"
        );
    }

    #[test]
    fn snapshots() {
        assert_eq!(
            ok(
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            ApiRequest::CreateSnapshot(SnapshotCreate {
                snapshot_type: SnapshotType::Full,
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into(),
            })
        );
        let ApiRequest::CreateSnapshot(c) = ok(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_type": "Diff", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        ) else {
            panic!()
        };
        assert_eq!(c.snapshot_type, SnapshotType::Diff);
        let m = err(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "version": "1.0.0"}"#,
        );
        assert!(m.contains("version=\"1.0.0\""), "{m}");

        let expected = SnapshotLoad {
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
            track_dirty_pages: true,
            resume_vm: true,
        };
        assert_eq!(
            ok(
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"},
                    "track_dirty_pages": true, "resume_vm": true}"#
            ),
            ApiRequest::LoadSnapshot(expected.clone())
        );
        assert_eq!(
            ok(
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true,
                    "resume_vm": true}"#
            ),
            ApiRequest::LoadSnapshot(expected)
        );
        let m = err(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
        );
        assert!(
            m.contains("Uffd") && m.contains("not supported by Ember"),
            "{m}"
        );
        let m = err("PUT", "/snapshot/load", r#"{"snapshot_path": "/s"}"#);
        assert!(m.contains("mem_backend"), "{m}");
        let m = err(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m",
                "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
        );
        assert!(m.contains("not both"), "{m}");
    }

    #[test]
    fn paths_and_methods() {
        for (method, path) in [
            ("PUT", "/logger"),
            ("PUT", "/metrics"),
            ("GET", "/balloon"),
            ("PATCH", "/balloon/statistics"),
            ("PUT", "/mmds"),
            ("PUT", "/mmds/config"),
            ("PUT", "/vsock"),
            ("PUT", "/cpu-config"),
            ("PUT", "/hotplug/memory"),
            ("PUT", "/pmem/p0"),
            ("PUT", "/serial"),
        ] {
            let m = err(method, path, "{}");
            assert_eq!(
                m,
                format!("{method} {path}: {path} is not supported by Ember")
            );
        }
        for (method, path) in [
            ("PATCH", "/drives/a"),
            ("PATCH", "/network-interfaces/a"),
            ("PATCH", "/machine-config"),
        ] {
            let m = err(method, path, "{}");
            assert!(
                m.starts_with(&format!("{method} {path} is not supported by Ember")),
                "{m}"
            );
        }
        for (method, path) in [
            ("GET", "/nothing"),
            ("DELETE", "/"),
            ("GET", "/drives/a"),
            ("PUT", "/drives/"),
            ("PUT", "/drives/a/b"),
            ("POST", "/actions"),
            ("PUT", "/machine-config/"),
            ("PUT", "/loggers"),
            ("GET", "*"),
        ] {
            let m = err(method, path, "{}");
            assert_eq!(
                m,
                format!("invalid request method and/or path: {method} {path}")
            );
        }
    }

    #[test]
    fn instance_info_shape() {
        let v = InstanceInfo::new("vm0", InstanceState::NotStarted).to_json();
        assert_eq!(v["id"], "vm0");
        assert_eq!(v["state"], "Not started");
        assert_eq!(v["app_name"], "Ember");
        assert_eq!(v["vmm_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            InstanceInfo::new("x", InstanceState::Paused).to_json()["state"],
            "Paused"
        );
    }
}
