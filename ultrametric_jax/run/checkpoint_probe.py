"""Reading a checkpoint item's arrays synchronously before Orbax restores them.

Orbax restores an item's arrays concurrently on an asyncio loop of its own and closes that
loop as soon as one read fails; the reads still in flight then finish on the closed loop, and
each prints a "RuntimeError: Event loop is closed" traceback (10 to 80 lines for a damaged
step). Reading the item once through tensorstore's synchronous API meets the damage first, so
a damaged step is refused before Orbax starts and no read is left in flight. Run checkpoints
are small (router and optimiser state), so the second read costs little.
"""
from __future__ import annotations

import os

import tensorstore as ts

_ZARR_DRIVERS = {".zarray": "zarr", "zarr.json": "zarr3"}


def probe_ocdbt_item(item_dir: str) -> None:
    """Open and read every array of the OCDBT item at item_dir (a no-op for other layouts);
    raises tensorstore's ValueError (DATA_LOSS, NOT_FOUND, ...) on damage."""
    if not os.path.isfile(os.path.join(item_dir, "manifest.ocdbt")):
        return
    store = {"driver": "ocdbt", "base": f"file://{os.path.abspath(item_dir)}/"}
    keys = ts.KvStore.open(store).result().list().result()
    for key in sorted(k.decode() for k in keys):
        prefix, _, leaf = key.rpartition("/")
        if leaf in _ZARR_DRIVERS:
            spec = {"driver": _ZARR_DRIVERS[leaf], "kvstore": {**store, "path": prefix + "/"}}
            ts.open(spec, open=True).result().read().result()
