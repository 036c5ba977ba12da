"""Free loopback ports for tests that bind servers."""

import socket


def free_port(consecutive: int = 1) -> int:
    """A port p below 60000 such that p .. p+consecutive-1 are free on 127.0.0.1 right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + consecutive > 60000:
            continue
        try:
            for p in range(port + 1, port + consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {consecutive} free consecutive ports")
