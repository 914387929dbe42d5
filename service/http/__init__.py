"""The HTTP/JSON API (and the playground page) beside gRPC: the same servicers, engine, auth,
limits and metrics, served by aiohttp on the same event loop (DESIGN §14)."""
