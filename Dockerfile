# The app image: API (`boxoffice serve`), workers (`boxoffice worker`), migrations and Locust.
# Built by docker-compose.yml; `docker build -t boxoffice .` on its own works too.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --system --create-home --uid 10001 boxoffice

COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY loadtests ./loadtests
# The Lua scripts and SQL migrations are read from beside the packages (service/scripts.py,
# service/migrate.py), so the project is installed in place (editable), not copied into site-packages.
COPY lua ./lua
COPY migrations ./migrations
RUN pip install -e '.[load]'

USER boxoffice
EXPOSE 8000 8089
STOPSIGNAL SIGTERM
CMD ["boxoffice", "serve", "--host", "0.0.0.0", "--no-migrate"]
