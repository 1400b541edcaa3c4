"""The error types of a refused run, and the exit codes that tell a retrying launcher what to do.

Kubernetes podFailurePolicy (helm/fusion) keys on these codes:
- BAD_INPUT_EXIT_CODE (3): bad input (a spec, a model, a store that cannot be used as given);
  retrying cannot help, so the Job fails at once.
- NOT_READY_EXIT_CODE (75, EX_TEMPFAIL): a worker started before its stage's inputs were
  committed; nothing is wrong, try again later.
- STORE_UNREACHABLE_EXIT_CODE (200): the store did not answer for longer than the run waits
  for it (store_options.outage_seconds); nothing is lost, try again later.
- PEER_LOST_EXIT_CODE (201): a training process lost its peers (a node went away, the
  rendezvous or a collective failed); start the training pods again, they resume from the
  newest checkpoint.
The retryable codes are 128 or more so that the training operator's restartPolicy ExitCode
(1-127 fail the job, 128-255 restart the pod) restarts training pods on them, and above 192
so that they are never mistaken for a death by signal (128 + signal number).
Any other non-zero exit counts as a flaky failure and may be retried.
"""

BAD_INPUT_EXIT_CODE = 3
NOT_READY_EXIT_CODE = 75
STORE_UNREACHABLE_EXIT_CODE = 200
PEER_LOST_EXIT_CODE = 201


class FusionError(Exception):
    """Bad input or a refused operation. The CLI prints its message as one line and exits
    with its exit_code; the message must name the culprit (key, file, object, store)."""

    exit_code = BAD_INPUT_EXIT_CODE


class StoreUnreachable(FusionError):
    """The store stayed unreachable (connection refused, timeouts, 5xx) past the wait."""

    exit_code = STORE_UNREACHABLE_EXIT_CODE


class PeersLost(FusionError):
    """A training process lost its peers (a node or pod went away mid-training)."""

    exit_code = PEER_LOST_EXIT_CODE
