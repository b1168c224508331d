"""The daemon's edge: key material in memory, transport and storage.

- `daemon/`: governance (seal state, ceremony, unseal, proposals and
  executions, tenant keys, replica follower, rollback check, log key);
- `dataplane/`: KeyService's logic (ciphertext format, counters, nonces,
  rate limit, the C wire codec);
- `services/`: the gRPC servicers, server, status codes, metrics, access log;
- `stores/`: the `Store` contract and its SQLite and PostgreSQL backends;
- `tls.py`, `pki.py`, `hardening.py`: server TLS and peer identity, the
  development PKI, process hardening.

Every decision about what is valid is delegated to `keyquorum.quorum`.
"""
