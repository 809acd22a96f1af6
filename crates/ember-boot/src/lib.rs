//! Linux boot loader for x86-64 KVM guests: ELF vmlinux, zero page, command line and e820 map
