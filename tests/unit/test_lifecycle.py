"""The termination watcher (``parent_app.lifecycle``), driven through a real IMDSv2 stand-in (an
``http.server`` on 127.0.0.1 speaking the token protocol) and botocore's Stubber for Auto Scaling.

Time is injected (a fake clock that ``sleep`` advances), so nothing here waits; every step has a test
for its failure: IMDS errors and missing items are retried, an expired session token is renewed, a
failed or hung ``systemctl stop`` still completes with CONTINUE, and API errors are retried until the
watcher leaves the action to the hook's heartbeat timeout.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from parent_app.lifecycle import (
    HOOK_NAME,
    INSTANCE_ID_PATH,
    LOG_SHIP_WAIT_S,
    POLL_INTERVAL_S,
    TARGET_STATE_PATH,
    TOKEN_PATH,
    TOKEN_TTL_S,
    Imds,
    LifecycleWatcher,
    main,
    stop_argv,
)

INSTANCE = "i-0123456789abcdef0"
GROUP = "Nitrovault-EnclaveHostAsgASG-1A2B3C"
#: an answer the fake IMDS gives instead of an item: an HTTP status, or a dropped connection
DROP = "drop"


class FakeImds:
    """IMDSv2: ``PUT /latest/api/token`` hands out tokens; GETs need a live one (else 401).

    ``states`` are the successive answers for the target lifecycle state (the last one repeats); an int
    answers that HTTP status, :data:`DROP` closes the connection without an answer. ``instance_ids``
    likewise for the instance id.
    """

    def __init__(self) -> None:
        self.states: list[str | int] = ["InService"]
        self.instance_ids: list[str | int] = [INSTANCE]
        self.issued: list[str] = []
        self.revoked: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self.ttl_headers: list[str | None] = []
        self._lock = threading.Lock()

    def next(self, queue: list[str | int]) -> str | int:
        with self._lock:
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

            def _answer(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                fake.requests.append(("PUT", self.path, None))
                if self.path != TOKEN_PATH:
                    self._answer(404)
                    return
                fake.ttl_headers.append(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"))
                token = f"token-{len(fake.issued) + 1}"
                fake.issued.append(token)
                self._answer(200, token)

            def do_GET(self) -> None:
                token = self.headers.get("X-aws-ec2-metadata-token")
                fake.requests.append(("GET", self.path, token))
                if token not in fake.issued or token in fake.revoked:
                    self._answer(401)
                    return
                queue = {TARGET_STATE_PATH: fake.states, INSTANCE_ID_PATH: fake.instance_ids}.get(self.path)
                answer = fake.next(queue) if queue is not None else 404
                if answer == DROP:
                    self.close_connection = True
                    self.connection.close()
                elif isinstance(answer, int):
                    self._answer(answer)
                else:
                    self._answer(200, answer)

        return Handler

    def gets(self, path: str) -> list[str | None]:
        return [token for method, p, token in self.requests if method == "GET" and p == path]


@pytest.fixture
def imds() -> Iterator[tuple[FakeImds, str]]:
    fake = FakeImds()
    server = HTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Systemctl:
    """Records ``systemctl`` runs; answers ``code`` or raises ``raises``; takes ``takes_s`` of fake time."""

    def __init__(self, clock: FakeTime, events: list[str], *, code: int = 0, raises: Exception | None = None,
                 takes_s: float = 42.0) -> None:
        self.clock = clock
        self.events = events
        self.code = code
        self.raises = raises
        self.takes_s = takes_s
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv: Sequence[str], timeout_s: float) -> int:
        self.calls.append((list(argv), timeout_s))
        self.events.append("stop")
        self.clock.now += self.takes_s
        if self.raises is not None:
            raise self.raises
        return self.code


class Recording:
    """The stubbed boto3 client, with each call noted in ``events`` (to check the order of the steps)."""

    def __init__(self, client: Any, events: list[str]) -> None:
        self._client = client
        self._events = events

    def describe_auto_scaling_instances(self, **kwargs: Any) -> dict[str, Any]:
        self._events.append("describe")
        return dict(self._client.describe_auto_scaling_instances(**kwargs))

    def complete_lifecycle_action(self, **kwargs: Any) -> dict[str, Any]:
        self._events.append("complete")
        return dict(self._client.complete_lifecycle_action(**kwargs))


def _client() -> Any:
    return boto3.client("autoscaling", region_name="eu-west-1", aws_access_key_id="AKIDEXAMPLE",
                        aws_secret_access_key="not-a-secret")


def _describe(stub: Stubber, instance: str = INSTANCE, group: str | None = GROUP) -> None:
    found = [] if group is None else [{
        "InstanceId": instance, "AutoScalingGroupName": group, "AvailabilityZone": "eu-west-1a",
        "LifecycleState": "Terminating:Wait", "HealthStatus": "HEALTHY", "ProtectedFromScaleIn": False,
    }]
    stub.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": found},
                      {"InstanceIds": [instance]})


def _complete(stub: Stubber) -> None:
    stub.add_response("complete_lifecycle_action", {}, {
        "LifecycleHookName": HOOK_NAME, "AutoScalingGroupName": GROUP, "InstanceId": INSTANCE,
        "LifecycleActionResult": "CONTINUE",
    })


class Rig:
    def __init__(self, base: str) -> None:
        self.time = FakeTime()
        self.events: list[str] = []
        self.client = _client()
        self.stub = Stubber(self.client)
        self.systemctl = Systemctl(self.time, self.events)
        self.base = base

    def watcher(self, **kwargs: Any) -> LifecycleWatcher:
        original = self.time.sleep

        def sleep(seconds: float) -> None:
            self.events.append(f"sleep {seconds:g}")
            original(seconds)

        return LifecycleWatcher(
            Imds(self.base, clock=self.time.clock), Recording(self.client, self.events),
            run=self.systemctl, clock=self.time.clock, sleep=sleep, stop_timeout_s=75.0, **kwargs,
        )


@pytest.fixture
def rig(imds: tuple[FakeImds, str]) -> Rig:
    return Rig(imds[1])


# -- the whole drain -----------------------------------------------------------------------------------------


def test_terminated_stops_the_parent_waits_for_the_log_agent_then_completes_with_continue(
    imds: tuple[FakeImds, str], rig: Rig, caplog: pytest.LogCaptureFixture,
) -> None:
    fake, _ = imds
    fake.states = ["InService", "InService", "Terminated"]
    _describe(rig.stub)
    _complete(rig.stub)
    with rig.stub, caplog.at_level(logging.INFO, logger="parent_app.lifecycle"):
        assert rig.watcher().run() == 0
    rig.stub.assert_no_pending_responses()
    poll, ship = f"sleep {POLL_INTERVAL_S:g}", f"sleep {LOG_SHIP_WAIT_S:g}"
    assert rig.events == [poll, poll, "stop", ship, "describe", "complete"]
    assert rig.systemctl.calls == [(["systemctl", "stop", "nitrovault-parent.service"], 75.0)]
    # IMDSv2: one session token (with its TTL header), carried by every GET
    assert fake.issued == ["token-1"] and fake.ttl_headers == [str(TOKEN_TTL_S)]
    assert fake.gets(TARGET_STATE_PATH) == ["token-1"] * 3
    assert fake.gets(INSTANCE_ID_PATH) == ["token-1"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("draining the parent" in m for m in messages)
    assert any("completed lifecycle action nitrovault-drain (CONTINUE)" in m and GROUP in m for m in messages)


def test_other_states_never_stop_the_parent(imds: tuple[FakeImds, str], rig: Rig) -> None:
    # Negative control for the trigger: a watcher that sees only InService/Standby/Detached keeps polling.
    fake, _ = imds
    fake.states = ["InService", "Standby", "Detached", "InService"]
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 6:
            raise KeyboardInterrupt  # the only way out of the loop without "Terminated"

    watcher = LifecycleWatcher(Imds(rig.base), Recording(rig.client, rig.events), run=rig.systemctl,
                               clock=rig.time.clock, sleep=sleep)
    with pytest.raises(KeyboardInterrupt):
        watcher.wait_for_termination()
    assert polls == [POLL_INTERVAL_S] * 6
    assert rig.systemctl.calls == [] and "describe" not in rig.events


# -- step 1: IMDS --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failures",
    [[500] * 3, [503] * 3, [DROP] * 3, [500, DROP, 503]],
    ids=["http-500", "http-503", "dropped-connection", "mixed"],
)
def test_imds_errors_are_logged_once_and_retried(
    imds: tuple[FakeImds, str], rig: Rig, caplog: pytest.LogCaptureFixture, failures: list[str | int],
) -> None:
    fake, _ = imds
    fake.states = [*failures, "InService", "Terminated"]
    with caplog.at_level(logging.INFO, logger="parent_app.lifecycle"):
        rig.watcher().wait_for_termination()
    assert len(fake.gets(TARGET_STATE_PATH)) == 5
    messages = [r.getMessage() for r in caplog.records]
    assert sum("IMDS unreachable" in m for m in messages) == 1  # once per outage, not once per poll
    assert sum("IMDS answers again" in m for m in messages) == 1


def test_a_second_outage_is_logged_again(imds: tuple[FakeImds, str], rig: Rig,
                                        caplog: pytest.LogCaptureFixture) -> None:
    # Negative control for "once per outage": once per outage, not once ever.
    fake, _ = imds
    fake.states = [500, "InService", DROP, DROP, "Terminated"]
    with caplog.at_level(logging.INFO, logger="parent_app.lifecycle"):
        rig.watcher().wait_for_termination()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("IMDS unreachable" in m for m in messages) == 2
    assert sum("IMDS answers again" in m for m in messages) == 2


def test_no_target_state_yet_is_polled_again(imds: tuple[FakeImds, str], rig: Rig,
                                             caplog: pytest.LogCaptureFixture) -> None:
    fake, _ = imds
    fake.states = [404, 404, "Terminated"]
    with caplog.at_level(logging.INFO, logger="parent_app.lifecycle"):
        rig.watcher().wait_for_termination()
    assert rig.time.slept == [POLL_INTERVAL_S] * 2
    assert sum("no target lifecycle state yet" in r.getMessage() for r in caplog.records) == 1


def test_imds_nobody_listening_is_an_oserror_the_watcher_retries(rig: Rig) -> None:
    # A port with no server: connection refused, the same retry path as IMDS being down.
    with socket_without_server() as base:
        watcher = LifecycleWatcher(Imds(base), Recording(rig.client, rig.events), run=rig.systemctl,
                                   clock=rig.time.clock, sleep=_stop_after(3))
        with pytest.raises(KeyboardInterrupt):
            watcher.wait_for_termination()
    assert rig.systemctl.calls == []


def test_a_revoked_token_is_replaced_and_the_read_retried(imds: tuple[FakeImds, str], rig: Rig) -> None:
    fake, _ = imds
    client = Imds(rig.base, clock=rig.time.clock)
    assert client.get(TARGET_STATE_PATH) == "InService"
    fake.revoked.add("token-1")  # IMDS restarted: the old token answers 401
    assert client.get(TARGET_STATE_PATH) == "InService"
    assert fake.gets(TARGET_STATE_PATH) == ["token-1", "token-1", "token-2"]


def test_the_token_is_renewed_before_it_expires(imds: tuple[FakeImds, str], rig: Rig) -> None:
    fake, _ = imds
    client = Imds(rig.base, clock=rig.time.clock)
    client.get(TARGET_STATE_PATH)
    rig.time.now += TOKEN_TTL_S - 61
    client.get(TARGET_STATE_PATH)
    assert fake.issued == ["token-1"]
    rig.time.now += 1
    client.get(TARGET_STATE_PATH)
    assert fake.issued == ["token-1", "token-2"]


def test_a_token_imds_keeps_refusing_is_an_error_not_a_loop(imds: tuple[FakeImds, str], rig: Rig) -> None:
    fake, _ = imds
    client = Imds(rig.base, clock=rig.time.clock)
    fake.revoked.update(f"token-{i}" for i in range(1, 5))
    with pytest.raises(OSError):
        client.get(TARGET_STATE_PATH)
    assert fake.issued == ["token-1", "token-2"]


# -- step 2: the stop ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "raises"),
    [(1, None), (0, subprocess.TimeoutExpired(["systemctl"], 75.0)), (0, FileNotFoundError("systemctl"))],
    ids=["exit-1", "timeout", "no-systemctl"],
)
def test_a_failed_stop_is_logged_and_still_completes_with_continue(
    imds: tuple[FakeImds, str], rig: Rig, caplog: pytest.LogCaptureFixture, code: int,
    raises: Exception | None,
) -> None:
    fake, _ = imds
    fake.states = ["Terminated"]
    rig.systemctl.code, rig.systemctl.raises = code, raises
    _describe(rig.stub)
    _complete(rig.stub)
    with rig.stub, caplog.at_level(logging.INFO, logger="parent_app.lifecycle"):
        assert rig.watcher().run() == 0
    rig.stub.assert_no_pending_responses()
    assert rig.events == ["stop", f"sleep {LOG_SHIP_WAIT_S:g}", "describe", "complete"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "completing the lifecycle action anyway" in errors[0]


def test_a_clean_stop_logs_no_error(imds: tuple[FakeImds, str], rig: Rig,
                                    caplog: pytest.LogCaptureFixture) -> None:
    # Negative control for the test above: exit 0 is a drained parent, not an error.
    with caplog.at_level(logging.INFO, logger="parent_app.lifecycle"):
        assert rig.watcher().stop_parent() is True
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("stopped (drained) in 42.0 s" in r.getMessage() for r in caplog.records)


def test_stop_argv_is_a_list_naming_one_service_unit() -> None:
    assert stop_argv() == ["systemctl", "stop", "nitrovault-parent.service"]
    for bad in ("nitrovault-parent", "-x.service", "../evil.service", "a/b.service"):
        with pytest.raises(ValueError, match="service unit"):
            stop_argv(bad)


# -- steps 4 and 5: the group and the action -----------------------------------------------------------------


def test_api_errors_are_retried_with_capped_backoff(imds: tuple[FakeImds, str], rig: Rig) -> None:
    rig.stub.add_client_error("describe_auto_scaling_instances", service_error_code="Throttling",
                              http_status_code=400)
    _describe(rig.stub)
    rig.stub.add_client_error("complete_lifecycle_action", service_error_code="ServiceUnavailable",
                              http_status_code=503)
    _describe(rig.stub)
    _complete(rig.stub)
    with rig.stub:
        assert rig.watcher().complete() is True
    rig.stub.assert_no_pending_responses()
    assert rig.events == ["describe", "sleep 1", "describe", "complete", "sleep 2", "describe", "complete"]


def test_an_imds_error_on_the_instance_id_is_retried(imds: tuple[FakeImds, str], rig: Rig) -> None:
    fake, _ = imds
    fake.instance_ids = [500, DROP, INSTANCE]
    _describe(rig.stub)
    _complete(rig.stub)
    with rig.stub:
        assert rig.watcher().complete() is True
    assert rig.events == ["sleep 1", "sleep 2", "describe", "complete"]


def test_the_watcher_gives_up_after_complete_for_s_and_leaves_it_to_the_heartbeat(
    imds: tuple[FakeImds, str], rig: Rig, caplog: pytest.LogCaptureFixture,
) -> None:
    for _ in range(20):
        rig.stub.add_client_error("describe_auto_scaling_instances", service_error_code="Throttling",
                                  http_status_code=400)
    started = rig.time.now
    with rig.stub, caplog.at_level(logging.INFO, logger="parent_app.lifecycle"):
        assert rig.watcher(complete_for_s=40.0).complete() is False
    assert rig.time.now - started == pytest.approx(40.0)  # never sleeps past the bound
    assert max(rig.time.slept) == 10.0  # the backoff is capped
    assert rig.time.slept[:4] == [1.0, 2.0, 4.0, 8.0]
    assert any("heartbeat timeout continues the termination" in r.getMessage() for r in caplog.records)


def test_an_instance_in_no_group_is_not_completed(imds: tuple[FakeImds, str], rig: Rig) -> None:
    for _ in range(10):
        _describe(rig.stub, group=None)
    with rig.stub:
        assert rig.watcher(complete_for_s=5.0).complete() is False
    assert "complete" not in rig.events


def test_run_exits_1_when_the_action_could_not_be_completed(imds: tuple[FakeImds, str], rig: Rig) -> None:
    fake, _ = imds
    fake.states = ["Terminated"]
    for _ in range(10):
        rig.stub.add_client_error("describe_auto_scaling_instances", service_error_code="AccessDenied",
                                  http_status_code=403)
    with rig.stub:
        assert rig.watcher(complete_for_s=3.0).run() == 1
    assert rig.systemctl.calls  # the parent was still drained first


def test_main_needs_the_region() -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


# -- helpers -------------------------------------------------------------------------------------------------


def _stop_after(polls: int) -> Any:
    seen: list[float] = []

    def sleep(seconds: float) -> None:
        seen.append(seconds)
        if len(seen) >= polls:
            raise KeyboardInterrupt

    return sleep


@contextlib.contextmanager
def socket_without_server() -> Iterator[str]:
    """A loopback URL whose port was bound and released: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"
