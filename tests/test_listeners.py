"""Every listener binds the declared address and port (GEOMX_BIND_HOST, GEOMX_*_PORT; docs/Configurations.md):
real sockets, read back from ZeroMQ and the kernel."""
from __future__ import annotations

import socket

import pytest
import zmq

from geomx import config
from geomx.launch import free_ports
from geomx.servers import GlobalServer, LocalServer
from geomx.servers.features import DGTReception
from geomx.transport import EventLoop

pytestmark = pytest.mark.unit

TIERS = {"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": "9", "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "2",
         "DMLC_PS_GLOBAL_ROOT_URI": "127.0.0.1", "DMLC_PS_GLOBAL_ROOT_PORT": "9", "DMLC_NUM_GLOBAL_SERVER": "1",
         "DMLC_NUM_GLOBAL_WORKER": "2"}


def endpoint(link) -> str:
    return link.sock.getsockopt(zmq.LAST_ENDPOINT).decode()


@pytest.fixture
def loop():
    ctx = zmq.Context()
    loop = EventLoop(ctx, 1 << 20, name="test", local_ipc=False)
    yield loop
    loop.close()
    ctx.destroy(linger=0)


def test_local_server_binds_the_declared_ports(loop):
    port, ts = free_ports(2)
    cfg = config.load(dict(TIERS, DMLC_ROLE="server", DMLC_NODE_HOST="127.0.0.1", ENABLE_INTER_TS="1",
                           GEOMX_SERVER_PORT=str(port), GEOMX_TS_PORT=str(ts)))
    server = LocalServer(cfg, loop)
    assert (server.port, server.ts_port) == (port, ts)
    assert endpoint(server.link) == f"tcp://127.0.0.1:{port}"
    assert endpoint(server.ts_link) == f"tcp://127.0.0.1:{ts}"


def test_local_server_without_fixed_ports_binds_its_advertised_address(loop):
    server = LocalServer(config.load(dict(TIERS, DMLC_ROLE="server")), loop)
    # Advertised: the address that reaches the scheduler (127.0.0.1); never every interface.
    assert endpoint(server.link) == f"tcp://127.0.0.1:{server.port}"


def test_global_server_binds_the_declared_ports_and_every_interface_when_told(loop):
    wan, lan, udp = free_ports(3)
    cfg = config.load(dict(TIERS, DMLC_ROLE_GLOBAL="global_server", DMLC_ROLE="server", DMLC_NUM_ALL_WORKER="4",
                           GEOMX_BIND_HOST="0.0.0.0", GEOMX_SERVER_PORT=str(wan), GEOMX_CENTRAL_PORT=str(lan),
                           ENABLE_DGT="1", GEOMX_DGT_UDP_PORT=str(udp)))
    server = GlobalServer(cfg, loop)
    receiver = server.features.require(DGTReception).receiver
    try:
        assert endpoint(server.wan_link) == f"tcp://0.0.0.0:{wan}"
        assert endpoint(server.lan_link) == f"tcp://0.0.0.0:{lan}"
        assert receiver.udp.getsockname() == ("0.0.0.0", udp)
        assert receiver.udp.type == socket.SOCK_DGRAM
    finally:
        receiver.close()


def test_a_taken_fixed_port_is_an_error(loop):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    with taken:
        cfg = config.load(dict(TIERS, DMLC_ROLE="server", GEOMX_SERVER_PORT=str(taken.getsockname()[1])))
        with pytest.raises(zmq.ZMQError, match="Address already in use"):
            LocalServer(cfg, loop)
