"""Running the app under uvicorn: ``bulkhook serve`` (``serve``), the HTTP protocol with
its request deadline (``protocol``) and servers on loopback threads (``thread``)."""
