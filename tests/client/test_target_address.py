"""A gRPC target's checks (`service/client/target_address.py`): the one check of the client,
`seqserve loadtest` and `seqserve generate`, and a target's host and whether it is loopback."""

from __future__ import annotations

import pytest

from service.client import errors
from service.client.client import SeqServeClient
from service.client.target_address import check_target, is_loopback_target, target_host

# Not an address a channel can be opened to: gRPC would fail to parse it (C-core lines on
# stderr), look up a name that is no host, or wrap the port (99999 connects to 34463).
BAD_TARGETS = [
    "", "  ", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:65536",
    ":50051", "127.0.0.1:50x", "127.0.0.1:+5", "::1:50051", "[::1]", "[]:1",
    "http://127.0.0.1:50051", "two words:1", "dns:///127.0.0.1:99999", "dns:///", "unix:",
    "ipv4:127.0.0.1:1,127.0.0.2:0",
]  # fmt: skip
GOOD_TARGETS = [
    "127.0.0.1:1", "127.0.0.1:65535", "localhost:50051", "nginx:50051", "[::1]:50051",
    "dns:///localhost:50051", "dns://8.8.8.8/seqserve.example.com:443", "dns:localhost:1",
    "ipv4:127.0.0.1:1,127.0.0.2:2", "ipv6:[::1]:1", "unix:/run/seqserve.sock",
]  # fmt: skip


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_a_target_that_is_not_host_port_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match=r"^target must be host:port") as refused:
        check_target(target)
    assert repr(target) in str(refused.value)


@pytest.mark.parametrize("target", GOOD_TARGETS)
def test_host_port_and_grpc_target_uris_are_accepted(target: str) -> None:
    check_target(target)  # raises for a refused one


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "", "127.0.0.1", "http://127.0.0.1:1"])
async def test_the_client_refuses_a_target_before_opening_a_channel(target: str) -> None:
    """It took any str: 127.0.0.1:99999 reached port 34463, "" printed gRPC's C-core errors
    and every call then failed UNAVAILABLE."""
    with pytest.raises(errors.InvalidArgumentError, match="target must be host:port") as refused:
        SeqServeClient(target)
    assert refused.value.reason == "INVALID_ARGUMENT"


async def test_the_client_takes_a_grpc_target_uri() -> None:
    for target in GOOD_TARGETS:
        client = SeqServeClient(target)
        assert client.target == target
        await client.close()


@pytest.mark.parametrize(
    ("target", "host", "loopback"),
    [
        ("127.0.0.1:50051", "127.0.0.1", True), ("127.9.0.3:1", "127.9.0.3", True),
        ("localhost:50051", "localhost", True), ("[::1]:50051", "::1", True),
        ("dns:///localhost:50051", "localhost", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", "127.0.0.1", True),
        ("unix:/run/seqserve.sock", "", True), ("10.0.0.7:50051", "10.0.0.7", False),
        ("seqserve.example.com:443", "seqserve.example.com", False),
        ("dns:///seqserve.example.com:443", "seqserve.example.com", False),
        ("[2001:db8::1]:50051", "2001:db8::1", False),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", "127.0.0.1", False),
        ("localhost.example.com:1", "localhost.example.com", False),
    ],
)  # fmt: skip
def test_target_hosts(target: str, host: str, loopback: bool) -> None:
    assert target_host(target) == host
    assert is_loopback_target(target) is loopback
