"""Free TCP ports on loopback for processes a test starts later.

Not `bind(0)`: the kernel hands those out from its ephemeral range, where the next `bind(0)`
(or any outgoing connection, such as a node dialling its peers) may take the same port before
our process listens on it. Ports come from 20000..32768 instead, below that range, each bound
once to check it is free and never handed out twice by this process.
"""

import os
import random
import socket

LOW, HIGH = 20000, 32768
_given = set()
_rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))


def free_port():
    for _ in range(HIGH - LOW):
        port = _rng.randrange(LOW, HIGH)
        if port in _given:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _given.add(port)
        return port
    raise RuntimeError("no free port in %d..%d" % (LOW, HIGH))
