# Image for the Sequencer worker. docker-compose.yml builds it and runs `python worker.py`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SEQUENCER_HOME=/home/sequencer/.sequencer

# The home directory is the only place the worker can write to, so SEQUENCER_HOME points
# into it. The default, .sequencer in the working directory, would be under read-only /app.
RUN groupadd --system --gid 10001 sequencer \
    && useradd --system --uid 10001 --gid sequencer --create-home \
        --home-dir /home/sequencer --shell /usr/sbin/nologin sequencer

WORKDIR /app

# The files stay owned by root, so the worker cannot modify its own code.
COPY . /app
RUN pip install --no-cache-dir '.[postgres]'
# The workflow sandbox loads the workflow modules again for every workflow it starts; with
# their bytecode compiled here it does not compile their source each time.
RUN python -m compileall -q /app

USER sequencer

CMD ["python", "worker.py"]
