"""The Open Connectors bulk API: the client and its retry rules (``client``), outgoing
multipart bodies (``multipart``) and the upstream's job status names (``statuses``)."""
