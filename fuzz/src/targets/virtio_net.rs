//! virtio-net frame handling: transmit chains ([`ember_virtio_devices::net::process_tx_chain`])
//! and receive ([`ember_virtio_devices::net::process_rx`]) into posted buffers, with a
//! scripted backend (frames of any length and header, `WouldBlock`, `Interrupted`,
//! errors, end of stream), structure-aware chains and any bounce buffer size.
//!
//! Checked: a sent frame is exactly the chain's readable bytes, between the header size
//! and the frame limit, without offload flags; rx never adds more used entries than it
//! reports, and every used length is a frame that fitted.

use std::collections::VecDeque;
use std::io;

use ember_virtio_devices::net::{
    process_rx, process_tx_chain, FrameBuffer, NetBackend, TxOutcome, MAX_FRAME_LEN,
    VIRTIO_NET_HDR_LEN,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::common::{
    place_chain, recording, virtio_memory, Chain, Placed, Ring, Seen, DATA_START, SECOND_QUEUE,
};
use crate::{decode, input_struct};

input_struct! {
    /// Bounce buffer sizes, queue sizes, `EVENT_IDX`, and the operations in turn.
    /// `backend % 2 == 1`: the backend refuses writes.
    pub struct NetInput {
        pub bounce: u8,
        pub backend: u8,
        pub rx_size: u8,
        pub tx_size: u8,
        pub event_idx: bool,
        pub ops: Vec<NetOp>,
    }
}

input_struct! {
    /// `kind % 3`: 0 transmit `hdr` plus `frame_len` bytes through `chain`; 1 post
    /// `chain` as an rx buffer; 2 deliver `events` from the backend with `budget`.
    pub struct NetOp {
        pub kind: u8,
        pub hdr: [u8; 12],
        pub frame_len: u16,
        pub chain: Chain,
        pub events: Vec<RxEvent>,
        pub budget: u8,
    }
}

input_struct! {
    /// What the backend's next read returns: `kind % 6`: 0-1 a frame of `len` bytes
    /// (header `flags`, `gso_type`), 2 `WouldBlock`, 3 `Interrupted`, 4 an error, 5 0.
    pub struct RxEvent {
        pub kind: u8,
        pub len: u16,
        pub flags: u8,
        pub gso: u8,
    }
}

/// A backend that plays `events` and records what is written.
struct Scripted {
    events: VecDeque<RxEvent>,
    sent: Vec<Vec<u8>>,
    refuse_writes: bool,
    last_read: Option<usize>,
}

impl NetBackend for Scripted {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.last_read = None;
        let Some(e) = self.events.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        match e.kind % 6 {
            0 | 1 => {
                let n = usize::from(e.len).min(buf.len());
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = i as u8;
                }
                if let Some(b) = buf.get_mut(0) {
                    *b = e.flags;
                }
                if let Some(b) = buf.get_mut(1) {
                    *b = e.gso;
                }
                self.last_read = Some(n);
                Ok(n)
            }
            2 => Err(io::ErrorKind::WouldBlock.into()),
            3 => Err(io::ErrorKind::Interrupted.into()),
            4 => Err(io::Error::from_raw_os_error(libc::EIO)),
            _ => Ok(0),
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        if self.refuse_writes {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        self.sent.push(frame.to_vec());
        Ok(frame.len())
    }
}

fn check_tx(
    mem: &GuestMemoryMmap,
    outcome: TxOutcome,
    seen: &Seen,
    backend: &Scripted,
    limit: usize,
) {
    let TxOutcome::Sent(len) = outcome else {
        return;
    };
    assert!(
        len >= VIRTIO_NET_HDR_LEN && len <= limit,
        "sent {len} bytes"
    );
    assert_eq!(
        len as u64,
        seen.readable_len(),
        "sent length vs readable bytes"
    );
    let frame = backend.sent.last().expect("a sent frame");
    assert_eq!(frame.len(), len);
    assert!(frame[0] & 1 == 0 && frame[1] == 0, "offload header sent");
    let mut gathered = Vec::with_capacity(len);
    for d in seen.descs.iter().filter(|d| !d.is_write_only()) {
        let mut buf = vec![0u8; d.len() as usize];
        mem.read_slice(&mut buf, d.addr()).expect("readable buffer");
        gathered.extend_from_slice(&buf);
    }
    assert!(
        gathered == *frame,
        "sent frame differs from the chain's bytes"
    );
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<NetInput>(data) else {
        return;
    };
    let bounce_len = [MAX_FRAME_LEN, 0, 11, 12, 100, 1514][usize::from(input.bounce % 6)];
    let mut rx_buffer = FrameBuffer::with_len(bounce_len);
    let mut tx_buffer =
        FrameBuffer::with_len([MAX_FRAME_LEN, 64][usize::from(input.bounce / 6 % 2)]);
    let mut backend = Scripted {
        events: VecDeque::new(),
        sent: Vec::new(),
        refuse_writes: input.backend % 2 == 1,
        last_read: None,
    };

    let mem = virtio_memory();
    let mut rx_ring = Ring::new(Ring::size_from(input.rx_size), 0);
    let mut tx_ring = Ring::new(Ring::size_from(input.tx_size), SECOND_QUEUE);
    let (Some(mut rxq), Some(mut txq)) = (
        rx_ring.queue(&mem, input.event_idx),
        tx_ring.queue(&mem, input.event_idx),
    ) else {
        return;
    };

    // Whether an rx buffer may overlap the queue structures: then the used ring holds
    // frame bytes, and only the report's own consistency is checked.
    let mut rings_clobbered = false;
    for op in input.ops.iter().take(32) {
        match op.kind % 3 {
            0 => {
                let mut content = op.hdr.to_vec();
                content.extend((0..op.frame_len).map(|i| i as u8));
                let limit = MAX_FRAME_LEN.min(tx_buffer.len());
                match place_chain(&mem, &mut tx_ring, &op.chain, &content) {
                    Placed::Direct(descs) => {
                        let mut seen = Seen::default();
                        let out = process_tx_chain(
                            &mem,
                            recording(descs, &mut seen),
                            &mut backend,
                            &mut tx_buffer,
                        );
                        check_tx(&mem, out, &seen, &backend, limit);
                    }
                    Placed::Ring => {
                        let Some(chain) = txq.pop_descriptor_chain(&mem) else {
                            continue;
                        };
                        let head = chain.head_index();
                        let mut seen = Seen::default();
                        let out = process_tx_chain(
                            &mem,
                            recording(chain, &mut seen),
                            &mut backend,
                            &mut tx_buffer,
                        );
                        check_tx(&mem, out, &seen, &backend, limit);
                        let _ = txq.add_used(&mem, head, 0);
                        let _ = txq.needs_notification(&mem);
                    }
                    Placed::Nothing => {}
                }
            }
            1 => {
                let mut chain = op.chain.clone();
                if chain.delivery % 4 == 0 {
                    chain.delivery = 1;
                }
                rings_clobbered |= chain.table.resolve() < DATA_START
                    || chain.descs.iter().any(|d| d.addr.resolve() < DATA_START);
                place_chain(&mem, &mut rx_ring, &chain, &[]);
            }
            _ => {
                backend.events = op.events.iter().take(64).cloned().collect();
                let used_before = rx_ring.used_idx(&mem);
                let budget = usize::from(op.budget % 32) + 1;
                let report = process_rx(&mem, &mut rxq, &mut backend, &mut rx_buffer, budget);
                assert_eq!(
                    report.used,
                    report.delivered + report.bad_buffers,
                    "{report:?}"
                );
                if rings_clobbered {
                    continue;
                }
                let added = rx_ring.used_idx(&mem).wrapping_sub(used_before);
                assert!(
                    usize::from(added) <= report.used,
                    "{added} used entries for {report:?}"
                );
                for i in 0..added {
                    let slot = used_before.wrapping_add(i) % rx_ring.size;
                    let at = rx_ring.used + 4 + 8 * u64::from(slot);
                    let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap_or(0);
                    assert!(
                        len as usize <= MAX_FRAME_LEN.min(rx_buffer.len()),
                        "rx used length {len}"
                    );
                }
                let _ = rxq.needs_notification(&mem);
                backend.events.clear();
            }
        }
    }
}
