"""Model-card templates per domain."""
