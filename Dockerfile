# GoL7-LB image. Runs the load balancer by default; the same image runs a demo backend with
# `python -m backend PORT --host 0.0.0.0` (see docker-compose.yml).
# Python 3.11 on Debian 13 (trixie): the tag names both, so a rebuild picks up patch
# releases and security updates, never another Python or Debian. requirements.lock was
# frozen with Python 3.11; every pin has a wheel for it (amd64 and arm64): no compiler needed.
FROM python:3.11-slim-trixie

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# gunicorn.conf.py is read from the working directory.
WORKDIR /app

# Locked dependencies first, in a layer of their own: it is rebuilt only when the lock
# changes. --no-deps: the lock is the whole closure, nothing unpinned may come in.
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps -r requirements.lock

# Then the project itself, without dependencies (they are the locked ones above), and a
# check that the locked set satisfies every requirement.
COPY pyproject.toml README.md ./
COPY gol7lb/ ./gol7lb/
COPY backend/ ./backend/
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && rm -rf build ./*.egg-info

COPY gunicorn.conf.py ./

# Not root. Writes go only to the temp directory (the LB's private run directory, gunicorn's
# worker heartbeats), so the image runs with a read-only root filesystem when /tmp is a
# writable volume (docker run --read-only --tmpfs /tmp; Kubernetes: an emptyDir on /tmp).
RUN useradd --create-home --uid 10001 --user-group gol7lb
USER 10001:10001

# gunicorn.conf.py binds 0.0.0.0:$PORT; override PORT at run time to move it.
ENV PORT=8080
EXPOSE 8080

# TERM is the graceful stop: in-flight requests get up to gunicorn's graceful_timeout (30 s),
# so give the container more than that (docker stop -t 45; compose stop_grace_period).
STOPSIGNAL SIGTERM

# The admin listener (127.0.0.1:8404 inside the container) answers 200 while the LB serves.
# It stays on loopback unless GOL7LB_ADMIN_BIND moves it, and the LB refuses to bind it
# beyond loopback without GOL7LB_ADMIN_TOKEN (docs/deployment.md, Docker and compose).
# The slim image has no curl: the standard library does the request.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8404/healthz', timeout=2)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi"]
