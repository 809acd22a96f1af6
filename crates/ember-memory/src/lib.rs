//! x86-64 guest memory layout, allocation on vm-memory, KVM memory slots and resource allocators
