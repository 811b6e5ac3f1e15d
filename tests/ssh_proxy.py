"""ssh ProxyCommand relay: stdin/stdout <-> 127.0.0.1:PORT, so `ray up` reaches an sshd on a free port."""

import socket
import sys
import threading

connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])))


def upstream() -> None:
    while chunk := sys.stdin.buffer.read1(65536):
        connection.sendall(chunk)
    connection.shutdown(socket.SHUT_WR)


threading.Thread(target=upstream, daemon=True).start()
while chunk := connection.recv(65536):
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
