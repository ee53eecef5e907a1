"""Every core of a host: ``odin serve --workers N`` runs a supervisor and N worker processes
that accept on one port and share one set of metrics (see docs/architecture.md)."""
