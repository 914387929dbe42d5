"""Tensor-owning runtime: the state pool, the sampler and the model runner. Only this package
touches model tensors at serving time."""
