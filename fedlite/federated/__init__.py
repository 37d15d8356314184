"""Federated training across hospital sites: what sites send and how the server combines it."""
