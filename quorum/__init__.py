"""Pure logic of keyquorum: no I/O, no network, no files, no clocks.

Everything here takes its inputs (bytes, time, randomness where a test
must pin it) as arguments, so the daemon, each replica and each auditor
run byte-for-byte the same code over the same log.
"""
