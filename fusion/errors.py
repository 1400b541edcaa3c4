"""The one error type for bad input, and the exit code that says "do not retry"."""

# Kubernetes podFailurePolicy keys on this: a shard that fails with it is bad input and is not
# retried; any other non-zero exit counts as a flaky failure and may be retried.
BAD_INPUT_EXIT_CODE = 3
# A worker started before its stage's inputs were committed exits with this (EX_TEMPFAIL):
# nothing is wrong, try again later.
NOT_READY_EXIT_CODE = 75


class FusionError(Exception):
    """Bad input or a refused operation. The CLI prints its message as one line and exits
    with BAD_INPUT_EXIT_CODE; the message must name the culprit (key, file, object)."""
