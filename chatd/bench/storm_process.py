"""The storm's own process, apart from the bystander that measures it.

``python -m chatd.bench.storm_process URL CLIENTS SUBS TAG`` runs
:func:`chatd.bench.storm.storm_clients` and writes its result as JSON on
stdout. A module of its own: run as ``-m chatd.bench.storm``, the module
would already have been imported by its package (Python warns about that).
"""

from __future__ import annotations

import sys
from functools import partial

import orjson
import trio

from chatd.bench.storm import storm_clients

if __name__ == "__main__":
    url, clients, subs, tag = sys.argv[1:5]
    result = trio.run(partial(storm_clients, url, int(clients), int(subs), tag))
    sys.stdout.write(orjson.dumps(result).decode())
