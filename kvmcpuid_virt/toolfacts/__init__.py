"""What this machine's tools say (QEMU, libvirt's cpu_map): `facts.py` holds
the ToolFacts object (plain data, no I/O), `learn.py` asks the tools and
caches their answers. Build the facts once at the command boundary
(`learn()`) and pass them down."""
