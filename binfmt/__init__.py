"""binfmt_misc, platforms, ELF and QEMU handlers."""
