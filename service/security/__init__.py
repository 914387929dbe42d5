"""Who is calling: bearer tokens with roles, client certificates, and the principal of a call."""
