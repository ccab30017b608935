"""A trivial NDJSON echo server on uvloop: for each request line, a short reply line.

The load generator's rate against it is the ceiling of this machine's loopback plus the
generator itself; perfdb's figures are read against it.

    python benchmarks/echo_server.py --port P
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

REPLY = b'{"id":null,"ok":true,"record_id":"0000000000000000000000","duplicate":false}\n'


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        count = data.count(b"\n")
        if count:
            self.transport.write(REPLY * count)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
