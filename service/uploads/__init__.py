"""Receiving CSV uploads: streamed to a spool file (``spool``) while checked
(``csv_checks``), and relayed upstream while they arrive (``relay``)."""
