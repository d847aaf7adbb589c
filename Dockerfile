# The Ringstore image: the `storage` and `scheduler` commands on Python 3.11.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY scheduler ./scheduler
RUN pip install --no-cache-dir .
EXPOSE 7000
ENTRYPOINT ["storage"]
