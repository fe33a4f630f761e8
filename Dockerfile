# The one image of every project process in docker-compose.yml: workers, relay,
# scheduler, migrations, the flower monitor, and the integration suite.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 orchestrator \
    && useradd --system --uid 10001 --gid orchestrator --create-home orchestrator

WORKDIR /app

# Dependencies (with the dev extra: the integration suite runs from this image)
# in a layer of their own, read from pyproject.toml alone, so that a change to
# the code does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['dev'], sep=chr(10))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The packages of [tool.setuptools.packages.find], installed in place (as in
# development), and the integration suite.
COPY orchestrator ./orchestrator
COPY activities ./activities
COPY events ./events
COPY outbox ./outbox
COPY examples ./examples
RUN pip install --no-deps --editable . \
    && python -m compileall -q orchestrator activities events outbox examples
COPY tests/integration ./tests/integration

# The code stays root's and read-only; the suite may write its cache.
RUN mkdir .pytest_cache && chown orchestrator:orchestrator .pytest_cache
USER orchestrator

CMD ["orchestrator", "--help"]
