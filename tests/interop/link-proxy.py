#!/usr/bin/python3
"""A long link on one machine, for the tests: link-proxy.py LISTEN TARGET MS

Forwards every connection to the unix socket LISTEN to the unix socket
TARGET, each byte MS milliseconds after it arrived, in order, in both
directions: a round trip costs 2 * MS, pipelined requests stay pipelined,
and there is no rate limit.  Creates LISTEN only once it listens; runs
until killed.
"""
import asyncio
import os
import sys
import time


async def pump(reader, writer, delay):
    q = asyncio.Queue()

    async def rx():
        while True:
            b = await reader.read(1 << 18)
            await q.put((time.monotonic() + delay, b))
            if not b:
                return

    async def tx():
        while True:
            due, b = await q.get()
            if not b:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(b)
            await writer.drain()
        writer.close()

    try:
        await asyncio.gather(rx(), tx())
    except (ConnectionError, OSError):
        writer.close()


async def main(listen, target, ms):
    delay = ms / 1000

    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_unix_connection(target)
        except OSError as e:
            print(f"link-proxy: {target}: {e}", file=sys.stderr)
            cw.close()
            return
        await asyncio.gather(pump(cr, sw, delay), pump(sr, cw, delay))

    tmp = listen + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    srv = await asyncio.start_unix_server(handle, tmp)
    os.rename(tmp, listen)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.splitlines()[1])
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    except KeyboardInterrupt:
        pass
