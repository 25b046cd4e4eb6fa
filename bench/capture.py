"""Run ``tests.capture_server`` standalone with TCP_NODELAY on its connections.

The test server writes a response's headers and its body in two ``send``
calls. With Nagle's algorithm on, the body waits for the client's ACK of the
headers, and the client delays that ACK by up to 40 ms on Linux, so every
request takes about 40 ms more than the work it does. A real ingestion
endpoint does not wait like this, so the benchmarks turn Nagle's algorithm
off with ``StreamRequestHandler.disable_nagle_algorithm``, which makes
``socketserver`` set TCP_NODELAY on each accepted connection. Pass
``--nagle`` to keep the test server as it is.

Run: python -m bench.capture --port 0 --dir DIR [--nagle] (other options as tests.capture_server)
"""

import sys

from tests import capture_server


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--nagle" in argv:
        argv.remove("--nagle")
    else:
        capture_server._CaptureRequestHandler.disable_nagle_algorithm = True
    return capture_server.main(argv)


if __name__ == "__main__":
    sys.exit(main())
