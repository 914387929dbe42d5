"""seqserve: a gRPC service for stateful LSTM and GRU sequence models."""

__version__ = "0.1.0"
