//! Legacy devices for Ember VMMs: 16550 serial, i8042, debug-exit and boot-done ports, in-kernel irqchip and PIT
