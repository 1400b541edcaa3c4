"""What a failed store operation means: the store cannot be used as given (bad input, one line,
exit 3), or it is unreachable for now (wait and try again, then exit with the retryable code).

Failures come as OSError from local disks and s3fs (which keeps botocore's ClientError as the
cause), and as botocore and aiohttp errors that are not OSError (an endpoint that refuses
connections, timeouts, missing credentials). Anything else is not a storage failure and is
left alone (a bug shows its traceback).
"""

from __future__ import annotations

import asyncio
import errno
import sys
import threading
import time
from dataclasses import dataclass

from fusion.errors import StoreUnreachable

# S3 error codes that say the credentials or the policy refuse this request
ACCESS_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity", "InvalidClientTokenId",
}  # fmt: skip
# S3 error codes of a server that is there but cannot serve now (a conditional write that kept
# meeting concurrent ones, 409 ConditionalRequestConflict, included: it is waited out, not fatal)
BUSY_CODES = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "ThrottlingException",
    "ConditionalRequestConflict", "OperationAborted",
}  # fmt: skip
# local OSErrors a user causes with the store path: (errno -> what to say)
LOCAL_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder is in the way",
    errno.ENOENT: "a folder of the path cannot be created here",
    errno.ENAMETOOLONG: "the path is too long",
    errno.EIO: "input/output error",
}


@dataclass(frozen=True)
class Failure:
    transient: bool
    reason: str


def s3_error(e: BaseException | None) -> tuple[int | None, str | None]:
    """(HTTP status, S3 error code) of a failed S3 request, from the botocore ClientError that
    s3fs keeps as the cause of the OSError it raises; (None, None) for other errors."""
    for _ in range(8):
        if e is None:
            break
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return status, response["Error"].get("Code")
        e = e.__cause__ or e.__context__
    return None, None


def classify(e: BaseException) -> Failure | None:
    """What a failed store operation means; None if it is not a storage failure."""
    status, code = s3_error(e)
    if status is not None or code is not None:
        if code == "NoSuchBucket":
            return Failure(False, "the bucket does not exist")
        if code in ACCESS_CODES or status in (401, 403):
            return Failure(False, f"access refused ({code or status}): check the credentials and the bucket's policy")
        if code in BUSY_CODES or status == 409 or (status is not None and status >= 500):
            return Failure(True, f"{code or status} from the server")
        return Failure(False, f"the server refused the request ({code or status}: {_message(e)})")
    botocore_failure = _botocore(e)
    if botocore_failure is not None:
        return botocore_failure
    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)) or _is_aiohttp_client_error(e):
        return Failure(True, f"{type(e).__name__}: {_message(e)}")
    if isinstance(e, OSError) and e.errno in LOCAL_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        return Failure(False, f"{LOCAL_ERRNOS[e.errno]}{where}")
    return None


def _botocore(e: BaseException) -> Failure | None:
    try:
        from botocore import exceptions as bx
    except ImportError:
        return None
    if not isinstance(e, bx.BotoCoreError):
        return None
    if isinstance(e, bx.SSLError):
        return Failure(False, f"TLS failed ({_message(e)})")
    if isinstance(e, (bx.HTTPClientError, bx.ConnectionError)):  # refused, reset, timed out
        return Failure(True, f"{type(e).__name__}: {_message(e)}")
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return Failure(False, f"no usable credentials ({type(e).__name__}): set AWS_* or store_options")
    return Failure(False, f"{type(e).__name__}: {_message(e)}")


def _is_aiohttp_client_error(e: BaseException) -> bool:
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(e, aiohttp.ClientError)


def _message(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


class Outage:
    """Waiting out one unreachable spell of a store, in one thread: capped exponential back-off,
    one log line a minute (shared by the store's threads), StoreUnreachable past `limit`."""

    LOG_EVERY = 60.0
    MAX_PAUSE = 15.0

    def __init__(self, url: str, limit: float, log_state: "OutageLog"):
        self.url, self.limit, self.log = url, limit, log_state
        self.started = time.monotonic()
        self.pause = 0.5

    def wait(self, reason: str) -> None:
        waited = time.monotonic() - self.started
        if waited >= self.limit:
            raise StoreUnreachable(
                f"store {self.url}: unreachable for {waited:.0f} s ({reason}); gave up after "
                f"store_options.outage_seconds={self.limit:g}: run again once it answers, nothing is lost"
            )
        self.log.maybe(f"store {self.url}: unreachable ({reason}); waiting, {waited:.0f} s so far, up to {self.limit:g} s")
        time.sleep(min(self.pause, max(self.limit - waited, 0.0)))
        self.pause = min(self.pause * 2, self.MAX_PAUSE)

    def over(self) -> None:
        self.log.recovered(f"store {self.url}: reachable again after {time.monotonic() - self.started:.0f} s")


class OutageLog:
    """At most one outage line a minute per store, whichever thread waits."""

    def __init__(self):
        self.lock = threading.Lock()
        self.last: float | None = None
        self.told = False

    def maybe(self, line: str) -> None:
        with self.lock:
            now = time.monotonic()
            if self.last is None or now - self.last >= Outage.LOG_EVERY:
                self.last, self.told = now, True
                print(f"[fusion] {line}", file=sys.stderr, flush=True)

    def recovered(self, line: str) -> None:
        with self.lock:
            if self.told:
                self.told, self.last = False, None
                print(f"[fusion] {line}", file=sys.stderr, flush=True)
