"""CPU speed: fused kernels and ops, per-sample attention, fast dropout, the allocator."""
