"""Drain the parent before Auto Scaling terminates its instance: ``python -m parent_app.lifecycle``.

The CDK app (``infra/constructs/enclave_host.py``) puts a termination lifecycle hook named
:data:`HOOK_NAME` on the Auto Scaling group, runs this watcher as ``nitrovault-lifecycle.service`` and
gives ``nitrovault-parent.service`` ``KillSignal=SIGTERM`` with a ``TimeoutStopSec`` above the parent's
drain bound. The watcher's steps (Amazon EC2 Auto Scaling User Guide, "Retrieve the target lifecycle
state through instance metadata" and "Complete a lifecycle action"):

1. Every :data:`POLL_INTERVAL_S` seconds, read ``meta-data/autoscaling/target-lifecycle-state`` over
   IMDSv2: a session token from ``PUT api/token``, sent as ``X-aws-ec2-metadata-token`` and renewed before
   it expires or when IMDS answers 401. An IMDS error (unreachable, timeout, 5xx, no such item yet) is
   logged once per outage and retried at the next poll. Only ``Terminated`` goes on.
2. ``systemctl stop nitrovault-parent.service`` (an argv list, never a shell): systemd sends SIGTERM and
   the parent drains (public port closed, every enclave told to drain, ``drain_timeout_s`` for calls in
   flight, ``parent_app.main.AUDIT_FLUSH_S`` for the final audit checkpoints) and exits 0; systemd waits
   up to the unit's ``TimeoutStopSec``. A stop that fails or hangs is logged and the watcher goes on: the
   instance is terminated either way, and holding it only delays the group.
3. Wait :data:`LOG_SHIP_WAIT_S` seconds so the CloudWatch agent (flush interval 5 s) ships the drain's
   last log and audit lines before the instance goes away.
4. Find the group: ``describe_auto_scaling_instances`` for the instance id read from IMDS. The launch
   template cannot carry the group's name: the group depends on the template, so that would be a cycle.
5. ``complete_lifecycle_action(LifecycleActionResult="CONTINUE")``. API and IMDS errors are retried with
   capped backoff for ``complete_for_s`` seconds; after that the hook's heartbeat timeout continues the
   termination anyway (its default result is CONTINUE), so a watcher that cannot reach the API delays
   the group by the heartbeat, never forever.

The watcher exits 0 once the action is completed, 1 when it gave up completing it. The IMDS base URL,
the command runner, the Auto Scaling client, ``clock`` and ``sleep`` are parameters, so
``tests/unit/test_lifecycle.py`` drives every step through a real local HTTP server and botocore's
Stubber without waiting. Needs ``autoscaling:DescribeAutoScalingInstances`` and
``autoscaling:CompleteLifecycleAction`` on the group, nothing else.

Example (what the unit runs)::

    python -m parent_app.lifecycle --region eu-west-1 --stop-timeout 60
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger(__name__)

#: the termination lifecycle hook's name (``infra/constructs/enclave_host.py`` creates it by this name)
HOOK_NAME = "nitrovault-drain"
#: the unit whose stop drains the parent (``infra/constructs/enclave_host.py``'s ``PARENT_UNIT``)
PARENT_UNIT = "nitrovault-parent.service"
#: IMDS, as seen from the instance (hop limit 1: the instance itself only)
IMDS_BASE = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path, not a secret
TARGET_STATE_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
#: the target lifecycle state that means "this instance is being terminated"
TERMINATED = "Terminated"
#: seconds between reads of the target lifecycle state
POLL_INTERVAL_S = 5.0
#: seconds between the parent's stop and completing the action, so the log agent ships the last lines
LOG_SHIP_WAIT_S = 15.0
#: seconds the watcher keeps retrying to complete the action before it leaves it to the heartbeat timeout
COMPLETE_FOR_S = 40.0
#: IMDSv2 session tokens live this long (seconds) and are renewed a minute before
TOKEN_TTL_S = 21600

Clock = Callable[[], float]
Sleep = Callable[[float], None]
#: runs an argv (never a shell) and returns its exit code; raises ``subprocess.TimeoutExpired`` or OSError
Runner = Callable[[Sequence[str], float], int]


def run_command(argv: Sequence[str], timeout_s: float) -> int:
    """Run ``argv`` without a shell, bounded by ``timeout_s``; its exit code."""
    return subprocess.run(list(argv), check=False, timeout=timeout_s).returncode


def stop_argv(unit: str = PARENT_UNIT) -> list[str]:
    """``systemctl stop UNIT``: systemd sends the unit's ``KillSignal`` (SIGTERM: the parent drains)."""
    if not unit.endswith(".service") or unit.startswith("-") or "/" in unit:
        raise ValueError(f"not a service unit name: {unit!r}")
    return ["systemctl", "stop", unit]


class Imds:
    """A minimal IMDSv2 client: a session token (PUT), then GETs that carry it.

    :meth:`get` returns the item's text, or ``None`` when IMDS has no such item (404: for example the
    target lifecycle state before the instance is in service). Any other failure raises OSError
    (``urllib.error.URLError`` and ``HTTPError`` are OSErrors); a 401 drops the token and retries once.
    """

    def __init__(
        self, base: str = IMDS_BASE, *, timeout_s: float = 2.0, clock: Clock = time.monotonic
    ) -> None:
        self._base = base.rstrip("/")
        self._timeout = timeout_s
        self._clock = clock
        self._token: str | None = None
        self._token_until = 0.0

    def _open(self, method: str, path: str, headers: dict[str, str]) -> str:
        request = urllib.request.Request(f"{self._base}{path}", method=method, headers=headers)  # noqa: S310
        with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310 - IMDS URL
            return str(response.read().decode("utf-8", "replace")).strip()

    def _session(self) -> str:
        if self._token is None or self._clock() >= self._token_until:
            token = self._open("PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            if not token:
                raise OSError("IMDS answered an empty session token")
            self._token, self._token_until = token, self._clock() + TOKEN_TTL_S - 60
        return self._token

    def get(self, path: str) -> str | None:
        for attempt in (1, 2):
            try:
                return self._open("GET", path, {"X-aws-ec2-metadata-token": self._session()})
            except urllib.error.HTTPError as err:
                if err.code == 404:
                    return None
                if err.code == 401 and attempt == 1:  # the token expired or IMDS restarted: a new one
                    self._token = None
                    continue
                raise
        raise OSError("IMDS refused a fresh session token")  # pragma: no cover - the loop returns or raises


class AutoScaling(Protocol):
    """The two calls of boto3's ``autoscaling`` client the watcher makes."""

    def describe_auto_scaling_instances(self, **kwargs: Any) -> dict[str, Any]: ...

    def complete_lifecycle_action(self, **kwargs: Any) -> dict[str, Any]: ...


class LifecycleWatcher:
    """Steps 1-5 of the module docstring; :meth:`run` is the whole life of the watcher."""

    def __init__(
        self,
        imds: Imds,
        autoscaling: AutoScaling,
        *,
        run: Runner = run_command,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        stop_timeout_s: float = 120.0,
        poll_s: float = POLL_INTERVAL_S,
        ship_wait_s: float = LOG_SHIP_WAIT_S,
        complete_for_s: float = COMPLETE_FOR_S,
        unit: str = PARENT_UNIT,
        hook_name: str = HOOK_NAME,
    ) -> None:
        self._imds = imds
        self._autoscaling = autoscaling
        self._run = run
        self._clock = clock
        self._sleep = sleep
        self._stop_timeout = stop_timeout_s
        self._poll = poll_s
        self._ship_wait = ship_wait_s
        self._complete_for = complete_for_s
        self._stop_argv = stop_argv(unit)
        self._hook = hook_name

    # -- step 1 --------------------------------------------------------------------------------------------

    def wait_for_termination(self) -> None:
        """Return once IMDS reads ``Terminated``; every other answer or failure polls again."""
        trouble: str | None = None  # what the last poll ran into: logged once per outage, not per poll
        while True:
            try:
                state = self._imds.get(TARGET_STATE_PATH)
                now, detail = (None, "") if state is not None else ("missing", "")
            except OSError as err:
                state, now, detail = None, "unreachable", f"{type(err).__name__}: {err}"
            if now != trouble:
                if now == "missing":
                    log.warning("IMDS has no target lifecycle state yet; polling again")
                elif now == "unreachable":
                    log.warning("IMDS unreachable (%s); retrying every %.0f s", detail, self._poll)
                else:
                    log.info("IMDS answers again")
                trouble = now
            if state == TERMINATED:
                log.warning("target lifecycle state is %s: draining the parent", state)
                return
            self._sleep(self._poll)

    # -- step 2 ----------------------------------------------------------------------------------------------

    def stop_parent(self) -> bool:
        """``systemctl stop`` the parent (it drains); ``False`` if that failed or did not return in time."""
        started = self._clock()
        try:
            code = self._run(self._stop_argv, self._stop_timeout)
        except subprocess.TimeoutExpired:
            log.error("%s did not return within %.0f s; completing the lifecycle action anyway",
                      " ".join(self._stop_argv), self._stop_timeout)
            return False
        except OSError as err:
            log.error("could not run %s (%s); completing the lifecycle action anyway",
                      " ".join(self._stop_argv), type(err).__name__)
            return False
        if code != 0:
            log.error("%s exited with %d; completing the lifecycle action anyway",
                      " ".join(self._stop_argv), code)
            return False
        log.warning("the parent stopped (drained) in %.1f s", self._clock() - started)
        return True

    # -- steps 4 and 5 ---------------------------------------------------------------------------------------

    def _instance_and_group(self) -> tuple[str, str]:
        instance_id = self._imds.get(INSTANCE_ID_PATH)
        if not instance_id:
            raise OSError("IMDS has no instance id")
        answer = self._autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])
        found = [i for i in answer.get("AutoScalingInstances", []) if i.get("InstanceId") == instance_id]
        if not found or not found[0].get("AutoScalingGroupName"):
            raise LookupError(f"instance {instance_id} is in no Auto Scaling group")
        return instance_id, str(found[0]["AutoScalingGroupName"])

    def complete(self) -> bool:
        """Find the group and complete the hook's action with CONTINUE, retrying for ``complete_for_s``."""
        deadline = self._clock() + self._complete_for
        delay = 1.0
        attempt = 0
        while True:
            attempt += 1
            try:
                instance_id, group = self._instance_and_group()
                self._autoscaling.complete_lifecycle_action(
                    LifecycleHookName=self._hook,
                    AutoScalingGroupName=group,
                    InstanceId=instance_id,
                    LifecycleActionResult="CONTINUE",
                )
            except (OSError, LookupError, BotoCoreError, ClientError) as err:
                left = deadline - self._clock()
                if left <= 0:
                    log.error("could not complete lifecycle action %s after %d attempts (%s); the hook's "
                              "heartbeat timeout continues the termination", self._hook, attempt,
                              type(err).__name__)
                    return False
                log.warning("completing lifecycle action %s failed (attempt %d, %s: %s); retrying",
                            self._hook, attempt, type(err).__name__, err)
                self._sleep(min(delay, left))
                delay = min(delay * 2, 10.0)
                continue
            log.warning("completed lifecycle action %s (CONTINUE) for %s in %s",
                        self._hook, instance_id, group)
            return True

    # -- all of it -------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.wait_for_termination()
        self.stop_parent()  # a failed stop still completes: the instance goes either way
        self._sleep(self._ship_wait)
        return 0 if self.complete() else 1


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``--region REGION`` (required) and ``--stop-timeout SECONDS`` (above the unit's TimeoutStopSec)."""
    parser = argparse.ArgumentParser(
        prog="python -m parent_app.lifecycle",
        description="Drain the parent before Auto Scaling terminates its instance.",
    )
    parser.add_argument("--region", required=True, help="the Auto Scaling group's region")
    parser.add_argument("--stop-timeout", type=float, default=120.0,
                        help="seconds systemctl stop may take (above the unit's TimeoutStopSec)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Production entry: ``python -m parent_app.lifecycle --region REGION [--stop-timeout S]``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import boto3

    client = boto3.client("autoscaling", region_name=args.region)
    log.info("watching the target lifecycle state (hook %s, unit %s)", HOOK_NAME, PARENT_UNIT)
    return LifecycleWatcher(Imds(), client, stop_timeout_s=args.stop_timeout).run()


if __name__ == "__main__":
    raise SystemExit(main())
