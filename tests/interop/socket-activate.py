#!/usr/bin/python3
"""Start a server by systemd socket activation on a free TCP port.

    socket-activate.py [--unix PATH] -- CMD [ARGS...]

Binds a TCP socket on 127.0.0.1 to a free port (or a unix socket at PATH),
listens, prints the port (or PATH) and a newline on stdout, then points
stdout at stderr and becomes CMD (exec) with the listening socket as
descriptor 3, LISTEN_FDS=1 and LISTEN_PID=its pid -- the protocol of
sd_listen_fds(3), which qcbt-server, qemu-nbd and nbdkit take in place of
their own listening options.

So the port is bound from before CMD starts until CMD exits: nobody else
can take it in between (picking a free port by binding port 0, closing it
and passing the number on is a race on a busy machine), and clients that
connect before CMD calls accept() wait in the listen backlog: once the port
is printed, the server is connectable.  Exec, not fork, so the caller's $!
is the server's pid.
"""
import os
import socket
import sys

LISTEN_FDS_START = 3


def main(argv):
    unix = None
    if argv[:1] == ["--unix"]:
        unix, argv = argv[1], argv[2:]
    if argv[:1] != ["--"] or len(argv) < 2:
        sys.exit(__doc__)
    cmd = argv[1:]
    if unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(unix):
            os.unlink(unix)
        s.bind(unix)
        where = unix
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        where = str(s.getsockname()[1])
    s.listen(socket.SOMAXCONN)
    fd = s.detach()
    if fd != LISTEN_FDS_START:
        os.dup2(fd, LISTEN_FDS_START, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    sys.stdout.write(where + "\n")
    sys.stdout.flush()
    os.dup2(2, 1)           # the reader of the port sees EOF
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    env.pop("LISTEN_FDNAMES", None)
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        sys.exit("socket-activate.py: %s: %s" % (cmd[0], e))


if __name__ == "__main__":
    main(sys.argv[1:])
