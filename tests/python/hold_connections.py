"""Opens many connections to a listener and holds them, as a local process
that tries to take the broker's file descriptors would. Run by
tests/it/bounds.rs, usually as another uid:

    python hold_connections.py unix:PATH|tcp:HOST:PORT COUNT [REQUEST]

REQUEST, if given, is sent on every connection (e.g. an HTTP long-poll), with
"\\r\\n" for CRLF. Once all are open it waits a second and prints one JSON
line: how many connected, how many the server closed at once, and the HTTP
status lines it answered with. It then holds the connections until stdin
closes.
"""

import json
import resource
import select
import socket
import sys
import time


def connect(target):
    kind, address = target.split(":", 1)
    if kind == "unix":
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(address)
    else:
        host, port = address.rsplit(":", 1)
        conn = socket.create_connection((host, int(port)))
    return conn


def main():
    target, count = sys.argv[1], int(sys.argv[2])
    request = sys.argv[3].replace("\\r\\n", "\r\n").encode() if len(sys.argv) > 3 else b""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    held, failed = [], 0
    for _ in range(count):
        try:
            conn = connect(target)
            if request:
                conn.sendall(request)
            held.append(conn)
        except OSError:
            failed += 1

    # What the server did with them within a second: closed, answered, or
    # nothing (held open).
    closed, statuses = 0, {}
    pending = {conn.fileno(): conn for conn in held}
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN | select.POLLHUP)
    deadline = time.monotonic() + 1.0
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            conn = pending.pop(fd, None)
            if conn is None:
                continue
            poller.unregister(fd)
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            if not data:
                closed += 1
            else:
                status = data.split(b"\r\n", 1)[0].decode(errors="replace")
                statuses[status] = statuses.get(status, 0) + 1
    print(json.dumps({
        "connected": len(held),
        "failed": failed,
        "closed": closed,
        "statuses": statuses,
        "held_open": len(pending),
    }), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
