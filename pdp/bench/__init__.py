"""``pdp bench``: what pdp costs on this machine, side by side with what the same work costs bare.

One run starts the real servers on loopback and measures, interleaved and repeated, the floors (a bare
grpcio server, a bare uvicorn + starlette app, raw ``cryptography`` verifications, the policy engine's own
evaluation) and pdp (in process, and ``pdp serve`` under ``h2load`` and ``wrk``), then prints the figures,
the ratios pdp / floor against the targets, and writes JSON and a plot.

- ``floors``: the bare servers and the raw operations pdp is measured against
- ``workload``: the development setup and the same request in each protocol's form
- ``inprocess``: CPU per operation, pdp and floors, in this process
- ``servers``: starting, checking and stopping the server processes
- ``load``: running ``h2load`` and ``wrk`` and reading what they print
- ``report``: the table, the JSON document and the plot
- ``run``: the orchestration behind ``pdp bench``
"""
