"""bulkhook: Open Connectors bulk jobs with verified callbacks and durable job state."""

__version__ = "0.1.0"
