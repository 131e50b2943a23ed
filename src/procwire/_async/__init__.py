"""asyncio implementations; ``procwire._sync`` is generated from here by scripts/unasync.py."""
