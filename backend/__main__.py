"""`python -m backend PORT [--host HOST] [--log]`."""

from backend.server import main

if __name__ == "__main__":
    raise SystemExit(main())
