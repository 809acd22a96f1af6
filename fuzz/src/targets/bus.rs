//! The PIO and MMIO buses ([`ember_bus::Bus`]) with random device layouts (inserts and
//! removals, overlapping, empty, wrapping and out-of-space ranges) and random accesses
//! of any width (0 to 16 bytes) at any address.
//!
//! A model of the layout predicts every result: which inserts succeed, which device an
//! access reaches and at which offset, what reads of unclaimed addresses and bad
//! widths return, and the statistics.

use std::sync::{Arc, Mutex};

use ember_bus::{Bus, BusDevice, BusError, BusKind, BusStats};

use crate::{decode, input_struct};

input_struct! {
    /// `mmio % 2`: which bus; then the operations.
    pub struct BusInput {
        pub mmio: u8,
        pub ops: Vec<BusOp>,
    }
}

input_struct! {
    /// `kind % 6`: 0-1 insert `[addr, addr + len)`; 2 remove at `addr`; 3 read and 4
    /// write `width` bytes at `addr`; 5 look up `addr`. `addr_kind % 4` picks the
    /// address: small, near the top of the space, anything, or a model device's base
    /// plus a small offset.
    pub struct BusOp {
        pub kind: u8,
        pub addr_kind: u8,
        pub addr: u64,
        pub len_kind: u8,
        pub len: u64,
        pub width: u8,
    }
}

/// An access a probe got: device id, offset, width, whether a write.
type Access = (usize, u64, usize, bool);

/// A device that records the accesses it gets.
struct Probe {
    id: usize,
    len: u64,
    last: Arc<Mutex<Option<Access>>>,
}

impl BusDevice for Probe {
    fn read(&self, offset: u64, data: &mut [u8]) {
        assert!(
            data.iter().all(|&b| b == 0xff),
            "read buffer not pre-filled with ones"
        );
        assert!(offset < self.len && data.len() as u64 <= self.len - offset);
        *self.last.lock().unwrap() = Some((self.id, offset, data.len(), false));
        data.fill(self.id as u8);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        assert!(offset < self.len && data.len() as u64 <= self.len - offset);
        *self.last.lock().unwrap() = Some((self.id, offset, data.len(), true));
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<BusInput>(data) else {
        return;
    };
    let kind = if input.mmio % 2 == 1 {
        BusKind::Mmio
    } else {
        BusKind::Pio
    };
    let max = if kind == BusKind::Mmio {
        u64::MAX
    } else {
        0xffff
    };
    let bus = Bus::new(kind);
    let last = Arc::new(Mutex::new(None));
    // The model: (base, len, id), unordered.
    let mut model: Vec<(u64, u64, usize)> = Vec::new();
    let mut stats = BusStats::default();
    let mut next_id = 0usize;

    for op in input.ops.iter().take(256) {
        let addr = match op.addr_kind % 4 {
            0 => op.addr % 0x100,
            1 => max.wrapping_sub(op.addr % 0x100),
            2 => op.addr & max,
            _ => match model.get(op.addr as usize % model.len().max(1)) {
                Some(&(base, _, _)) => base.wrapping_add(op.addr >> 56).wrapping_sub(2),
                None => op.addr % 0x100,
            },
        };
        let len = match op.len_kind % 4 {
            0 => op.len % 16,
            1 => op.len % 0x1000,
            2 => max.wrapping_sub(op.len % 4),
            _ => op.len,
        };
        let width = match op.width % 8 {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 8,
            4 => 0,
            _ => usize::from(op.width / 8 % 17),
        };
        match op.kind % 6 {
            0 | 1 => {
                let id = next_id;
                next_id += 1;
                let dev = Arc::new(Probe {
                    id,
                    len,
                    last: Arc::clone(&last),
                });
                let result = bus.insert(addr, len, dev);
                let last_addr = (len != 0).then(|| addr.checked_add(len - 1)).flatten();
                let expected = match last_addr {
                    None => Err("invalid"),
                    Some(end) if end > max => Err("invalid"),
                    Some(end) => {
                        if model
                            .iter()
                            .any(|&(b, l, _)| b <= end && addr <= b + (l - 1))
                        {
                            Err("overlap")
                        } else {
                            Ok(())
                        }
                    }
                };
                match (&result, expected) {
                    (Ok(()), Ok(())) => model.push((addr, len, id)),
                    (Err(BusError::InvalidRange { .. }), Err("invalid")) => {}
                    (Err(BusError::Overlap { .. }), Err("overlap")) => {}
                    (got, want) => {
                        panic!("insert {addr:#x}+{len:#x}: got {got:?}, model says {want:?}")
                    }
                }
            }
            2 => {
                let result = bus.remove(addr);
                match model.iter().position(|&(b, _, _)| b == addr) {
                    Some(i) => {
                        assert!(result.is_ok(), "remove {addr:#x} failed");
                        model.swap_remove(i);
                    }
                    None => assert!(
                        matches!(result, Err(BusError::NotFound { .. })),
                        "remove {addr:#x}: {:?}",
                        result.err()
                    ),
                }
            }
            3 | 4 => {
                let write = op.kind % 6 == 4;
                *last.lock().unwrap() = None;
                let mut data = vec![0x11u8; width];
                let result = if write {
                    bus.write(addr, &data)
                } else {
                    bus.read(addr, &mut data)
                };
                let width_ok = match kind {
                    BusKind::Pio => matches!(width, 1 | 2 | 4),
                    BusKind::Mmio => matches!(width, 1 | 2 | 4 | 8),
                };
                let target = model.iter().find(|&&(b, l, _)| {
                    addr >= b && addr - b < l && width as u64 <= l - (addr - b)
                });
                let seen = *last.lock().unwrap();
                if !width_ok {
                    stats.bad_widths += 1;
                    assert!(
                        matches!(result, Err(BusError::BadWidth { .. })),
                        "{result:?}"
                    );
                    assert_eq!(seen, None);
                } else if let Some(&(b, _, id)) = target {
                    assert_eq!(result, Ok(()));
                    assert_eq!(seen, Some((id, addr - b, width, write)));
                    if !write {
                        assert!(data.iter().all(|&x| x == id as u8));
                    }
                } else {
                    if write {
                        stats.unclaimed_writes += 1;
                    } else {
                        stats.unclaimed_reads += 1;
                    }
                    assert!(
                        matches!(result, Err(BusError::Unclaimed { .. })),
                        "{result:?}"
                    );
                    assert_eq!(seen, None, "access {addr:#x}+{width} reached a device");
                }
                if !write && result.is_err() {
                    assert!(data.iter().all(|&x| x == 0xff), "failed read not all ones");
                }
            }
            _ => {
                let found = bus.device_at(addr).map(|(b, l, _)| (b, l));
                let want = model
                    .iter()
                    .find(|&&(b, l, _)| addr >= b && addr - b < l)
                    .map(|&(b, l, _)| (b, l));
                assert_eq!(found, want, "device_at {addr:#x}");
            }
        }
        assert_eq!(bus.len(), model.len());
        assert_eq!(bus.stats(), stats);
    }
}
