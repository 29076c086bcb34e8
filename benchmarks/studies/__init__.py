"""One-off studies: each answers one question once; its conclusion is in docs/architecture.md."""
