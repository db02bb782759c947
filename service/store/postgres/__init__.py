"""The shared store for several replicas, on PostgreSQL."""
