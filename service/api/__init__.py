"""The gRPC edge of seqserve: the seqserve.v1 protos' generated code (``gen``) and its codegen."""
