"""Transports: thin I/O only. One module per URL scheme, registered in ``procwire._url``.

Each module provides::

    LOCAL_ONLY: bool                     # True when traffic cannot leave the machine
    def connect(addr, opts, timeout) -> MessageStream           (blocking)
    def listen(addr, opts) -> ListenerBackend                   (blocking)
    async def aconnect(addr, opts, timeout) -> AsyncMessageStream
    async def alisten(addr, opts) -> AsyncListenerBackend

The interfaces are in ``procwire.transports.base``. Transports know nothing about events,
queues or clusters.
"""
