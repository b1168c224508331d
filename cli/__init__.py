"""The `keyquorum` command line: custodian, ceremony, audit, server, admin, demo."""
