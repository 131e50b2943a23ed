"""Benchmarks behind ``procwire bench``.

:mod:`procwire.bench.channels` compares procwire channels with the usual ways two processes talk
(raw sockets, pipes, multiprocessing, pyzmq, Node's ``fork()`` IPC); call
:func:`procwire.bench.channels.run` for structured results. :mod:`.processes` (children and
cluster relay), :mod:`.bus` (the event bus) and :mod:`.queues` (the SQLite and Redis work queues
against persist-queue, huey and RQ) are the other suites; each module's ``main(argv, ...)``
is what ``procwire bench SUITE`` and the scripts in a checkout's ``benchmarks/`` call.
"""
