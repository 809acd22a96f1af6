//! The API socket: Firecracker's HTTP API shapes over a Unix stream socket.
//!
//! [`ApiServer::start`] listens on the socket and starts the `ember-api` thread; the VMM
//! thread gets each request as an [`ApiRequest`] from [`ApiRequests`] (waking on its
//! eventfd) and answers it with an [`ApiReply`] through the [`Responder`]. The
//! configuration requests can be applied with [`PreBootConfig::handle`].
//!
//! - [`http`]: HTTP/1.1 framing (limits, keep-alive, `Expect`, refusals).
//! - [`model`]: the bodies in Firecracker's shapes, the routes, what Ember refuses.
//! - [`convert`]: bodies to [`crate::config::VmConfig`] with the values checked, and
//!   `GET /vm/config`'s body.
//! - [`server`]: the socket, the thread and the channel to the VMM.
//!
//! ```text
//! curl --unix-socket /tmp/ember.sock -X PUT http://localhost/machine-config \
//!      -d '{"vcpu_count": 2, "mem_size_mib": 512}'
//! ```

pub mod convert;
pub mod http;
pub mod model;
pub mod server;

// The VMM side's vocabulary, whether or not it names each item yet.
#[allow(unused_imports)]
pub use convert::PreBootConfig;
#[allow(unused_imports)]
pub use model::{
    ApiReply, ApiRequest, InstanceInfo, InstanceState, SnapshotCreate, SnapshotLoad, SnapshotType,
};
#[allow(unused_imports)]
pub use server::{ApiError, ApiRequests, ApiServer, Responder};
