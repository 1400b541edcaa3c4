"""The stages of a fusion run, in order. Every stage module has the same plain functions:

    parts(run)                  the parts it writes (a model name, "train", ...)
    inputs(run, part)           the (stage, part) outputs it reads; it may start once they are committed
    fingerprint(run, part)      what determines its output; hashed into the config hash
    shard_count(run, part)      how many shards the part has
    run_shard(run, part, i)     compute shard i and commit it

Launchers (local, Kubernetes workers) only ever call these.
"""

from fusion.stages import align, evaluate, fuse, logits, split, train, vocab

STAGES = {
    "split": split,
    "vocab": vocab,
    "logits": logits,
    "align": align,
    "fuse": fuse,
    "train": train,
    "eval": evaluate,
}
