"""The API description at ``/openapi.json`` and its Swagger UI at ``/docs``."""
