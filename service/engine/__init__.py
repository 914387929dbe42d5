"""The transport-free core: step scheduling, model versions and the session engine."""
