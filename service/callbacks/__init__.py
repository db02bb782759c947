"""Job-completion callbacks: the bare ASGI endpoint ahead of the middleware
(``endpoint``), signature checks (``signatures``), what a verified body says
(``notification``, pure) and receiving one into the store (``receiving``)."""
