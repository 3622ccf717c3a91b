"""``pdp serve``: the HTTP and gRPC listeners, their TLS, the reloader, metrics and the decision log."""
