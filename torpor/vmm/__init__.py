"""QEMU microVMs: argv, accelerator, the per-VM shim, the VM manager."""
