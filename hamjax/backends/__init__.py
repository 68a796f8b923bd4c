"""Backend-specific workarounds, one package per backend, each naming the upstream problem it
works around and when it can go."""
