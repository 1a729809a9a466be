"""The API-races study rebuilt on a real multi-master cluster (see README.md here)."""
