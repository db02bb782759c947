"""The ``bulkhook`` command line: local commands (``main``), commands that talk to a
running service (``remote``) through its HTTP API (``api_client``), and ``demo``."""
