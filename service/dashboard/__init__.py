"""The operator dashboard: server-rendered pages, live updates and failed records."""
