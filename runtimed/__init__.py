"""runtimed: an emulation-aware execution runtime for Linux build hosts."""
