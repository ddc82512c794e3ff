"""One contract, every store kind: what each backend must do through the public API."""
