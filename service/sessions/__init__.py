"""Sessions: the per-client state handles, their store, limits and lifecycle."""
