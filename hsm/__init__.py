"""The key store and the daemon: seal state, key handling, gRPC, storage.

Transport and storage live here, at the edge; every decision about what is
valid is delegated to `keyquorum.quorum`.
"""
