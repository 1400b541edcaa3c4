"""The train stage's parts, one concern per module; fusion/stages/train.py is the recipe that
uses them (setup, the step loop, checkpoints, export).

    distributed.py   the process world from torchrun / a Kubeflow PyTorchJob; the launch command
    data.py          the packed set streamed from the store: order, ranks, prefetch, validation, tensors
    engine.py        model + optimizer + schedule: plain torch (one process) or DeepSpeed ZeRO
    checkpoint.py    checkpoints in the run store, resume, SIGTERM (preemption)
    metrics.py       the step log (train_log.json) and TensorBoard scalars
"""
