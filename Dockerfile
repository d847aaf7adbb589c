# The Ringstore image: the `storage` and `scheduler` commands on Python 3.11.
# One image for every role; compose.yaml picks the command (the entrypoint is a shell-free
# exec of whichever console script the service names first).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY scheduler ./scheduler
RUN pip install --no-cache-dir . \
 && storage --help >/dev/null \
 && scheduler --help >/dev/null
# storage nodes: 7000; scheduler masters: 5050; agents: 5051
EXPOSE 7000 5050 5051
ENTRYPOINT []
CMD ["scheduler", "--help"]
