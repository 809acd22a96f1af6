//! virtio-rng request handling ([`ember_virtio_devices::rng::process_request`]): chains
//! of random lengths, flags and addresses, given directly or popped from a queue
//! (indirect tables, wrap-around, loops). The used length must never exceed the
//! writable bytes of the chain nor the per-chain cap.

use ember_virtio_devices::rng::{process_request, MAX_BYTES_PER_CHAIN};
use virtio_queue::QueueOwnedT;
use virtio_queue::QueueT;

use crate::common::{place_chain, recording, virtio_memory, Chain, Placed, Ring, Seen};
use crate::{decode, input_struct};

input_struct! {
    /// Queue size selector, `EVENT_IDX`, and the chains to serve in turn.
    pub struct RngInput {
        pub size_sel: u8,
        pub event_idx: bool,
        pub chains: Vec<Chain>,
    }
}

fn check(used: u32, seen: &Seen) {
    assert!(
        used as usize <= MAX_BYTES_PER_CHAIN,
        "used {used} above the cap"
    );
    assert!(
        u64::from(used) <= seen.writable_len(),
        "used {used} > writable bytes {} of {:?}",
        seen.writable_len(),
        seen.descs
    );
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<RngInput>(data) else {
        return;
    };
    let mem = virtio_memory();
    let mut ring = Ring::new(Ring::size_from(input.size_sel), 0);
    let Some(mut queue) = ring.queue(&mem, input.event_idx) else {
        return;
    };
    for chain in input.chains.iter().take(64) {
        match place_chain(&mem, &mut ring, chain, &[]) {
            Placed::Direct(descs) => {
                let mut seen = Seen::default();
                let used = process_request(&mem, recording(descs, &mut seen));
                check(used, &seen);
            }
            Placed::Ring => {
                let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                    continue;
                };
                let head = chain.head_index();
                let mut seen = Seen::default();
                let used = process_request(&mem, recording(chain, &mut seen));
                check(used, &seen);
                let _ = queue.add_used(&mem, head, used);
                let _ = queue.needs_notification(&mem);
            }
            Placed::Nothing => {}
        }
    }
    // Whatever is left in the ring.
    for _ in 0..ring.size {
        let Some(chain) = queue.iter(&mem).ok().and_then(|mut it| it.next()) else {
            break;
        };
        let mut seen = Seen::default();
        let used = process_request(&mem, recording(chain, &mut seen));
        check(used, &seen);
    }
}
