# GoL7-LB image. Runs the load balancer by default; the same image runs a demo backend with
# `python -m backend PORT --host 0.0.0.0` (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# gunicorn.conf.py is read from the working directory.
WORKDIR /app

# What the package is built from; the install is a layer of its own.
COPY pyproject.toml README.md ./
COPY gol7lb/ ./gol7lb/
COPY backend/ ./backend/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

COPY gunicorn.conf.py ./

# Not root. A home directory, because gunicorn puts its control socket in ~/.gunicorn/.
RUN useradd --create-home --uid 10001 --user-group gol7lb
USER gol7lb

# gunicorn.conf.py binds 0.0.0.0:$PORT; override PORT at run time to move it.
ENV PORT=8080
EXPOSE 8080

# The admin listener (127.0.0.1:8404 inside the container) answers 200 while the LB serves.
# The slim image has no curl: the standard library does the request.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8404/healthz', timeout=2)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "gol7lb.wsgi"]
