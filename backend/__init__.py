"""The demo backend: a small threaded HTTP/1.1 server to balance across and to test against.

Standard library only, so it runs anywhere the load balancer runs. See `backend.server`.
"""

from backend.server import BackendServer, main

__all__ = ["BackendServer", "main"]
