"""`helm test`: what a pod of the run needs works from inside the cluster.

The run spec parses, and the store is reachable and writable with the pods' credentials
(a probe object is written, read back and removed). If the run has started, its status is
printed too.
"""

from __future__ import annotations

import uuid

from fusion.config import load_spec
from fusion.errors import FusionError
from fusion.run import RUN_RECORD, Run

CHECK_WAIT_SECONDS = 20.0
from fusion.status import format_status, status


def main(spec_path: str) -> int:
    spec = load_spec(spec_path)
    store = Run(spec).store  # the spec's store and store_options, reached as every stage reaches them
    store.outage_seconds = min(store.outage_seconds, CHECK_WAIT_SECONDS)  # `helm test` answers soon
    probe = f"logs/probe-{uuid.uuid4().hex}.json"
    token = {"probe": probe}
    try:
        store.write_json(probe, token)
        if store.read_json(probe) != token:
            raise FusionError(f"{store.uri(probe)}: read back something else than was written")
        store.remove(probe)
    except FusionError as e:  # no such bucket, access refused, unreachable (the store names which)
        raise type(e)(f"store {store.url} is not usable from this pod: {e}") from None
    print(f"run spec {spec_path}: valid (run '{spec.name}', {len(spec.models.sources)} source(s))")
    print(f"store {store.url}: reachable and writable")
    if store.exists(RUN_RECORD):
        print(format_status(status(store)))
    else:
        print("the run has not been prepared yet")
    return 0
