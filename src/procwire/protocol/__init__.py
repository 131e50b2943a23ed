"""Sans-IO protocol code: feed bytes in, get messages out; ask for bytes to send.

Nothing in this package imports ``socket``, ``asyncio`` or ``threading``.
"""
