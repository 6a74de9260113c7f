"""Planning a run before it starts: memory and time estimates, recommended settings."""
