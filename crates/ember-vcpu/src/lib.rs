//! x86-64 vCPU set-up (CPUID, MSRs, registers, FPU, LAPIC) and the KVM run loop with exit dispatch to Ember buses
