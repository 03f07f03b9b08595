"""GoL7-LB: an HTTP/1.1 load balancer on gunicorn (gunicorn's master, gol7lb's own epoll
worker, a WSGI proxy app and helper processes).

Empty on purpose: gunicorn.conf.py imports gol7lb modules in an order that matters
(gol7lb.rundir sets PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported), so
importing the package itself must import nothing.
"""
