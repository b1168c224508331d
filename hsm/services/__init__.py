"""The gRPC edge: servicers, the server, status codes, metrics and the access log."""
