#!/usr/bin/env python3
"""TLS termination in front of plaintext TCP servers on loopback, for the local TLS Kafka broker.

tansu 0.6.0 (the local Kafka-protocol broker) does not serve TLS: its CLI declares `--cert` and
`--key` in one clap group, so giving both is rejected ("the argument '--cert <CERT>' cannot be
used with '--key <KEY>'"), and its listener never uses the TLS acceptor it builds
(tansu-broker/src/broker.rs: `let _acceptor = ...`). scripts/services therefore runs tansu on a
plaintext loopback address and this proxy in front of it: clients speak real TLS 1.2/1.3 to the
advertised address and verify the certificate against the CA the script generated; the Kafka
protocol, including SASL, passes through unchanged. Python's standard library is used instead
of stunnel/socat so that no Debian package (nor apt lists) is needed on a fresh machine.

Usage: tls_proxy.py --cert CERT --key KEY --map LISTEN_HOST:PORT=TARGET_HOST:PORT [--map ...]
"""

import argparse
import asyncio
import ssl


def address(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, ssl.SSLError, OSError, RuntimeError):
            pass


def forward_to(target):
    async def handle(client_reader, client_writer):
        try:
            backend_reader, backend_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pump(client_reader, backend_writer), pump(backend_reader, client_writer)
        )

    return handle


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--map", action="append", required=True, metavar="LISTEN=TARGET")
    args = parser.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    servers = []
    for pair in args.map:
        listen, _, target = pair.partition("=")
        host, port = address(listen)
        servers.append(
            await asyncio.start_server(forward_to(address(target)), host, port, ssl=context)
        )
        print(f"tls_proxy: {listen} (TLS) -> {target}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
