"""The live page served at ``/`` (``server.page``): static files in ``static/``, read by
``odin_fanout.server.page``."""
