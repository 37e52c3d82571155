"""The CpuConfig and how it is built: pure functions of a CPUID table, the
operator's Policy and the ToolFacts learned from this machine's tools.

- cpuconfig.py: CpuConfig, what the guest should see;
- build.py: Policy and build(): host / auto / named model, enable/disable;
- qemu_adjust.py: what QEMU actually hands over under KVM;
- max_model.py: --max-model, a cap at a named CPU model;
- host_model.py: a libvirt host-model CPU (domain capabilities) as a table.
"""
