"""The service layer: the command line (and, later, the HTTP API and cluster submission)."""
