"""Helpers of the distributed tests: a free loopback port for the spawned process groups, and a
rank's result file that appears whole."""
import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publish(path: str, write) -> None:
    """Write a rank's result (``write(binary file)``) under a temporary name, then rename it: the
    parent, which polls for the file, never reads a partial one."""
    with open(path + ".part", "wb") as f:
        write(f)
    os.replace(path + ".part", path)
