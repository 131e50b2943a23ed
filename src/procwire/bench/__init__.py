"""Benchmarks behind ``procwire bench``.

:mod:`procwire.bench.channels` compares procwire channels with the usual ways two processes talk
(raw sockets, pipes, multiprocessing, pyzmq, Node's ``fork()`` IPC); call
:func:`procwire.bench.channels.run` for structured results.
"""
