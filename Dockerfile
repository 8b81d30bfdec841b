# The project image: web, worker, beat and the mock upstream all run from it
# (see docker-compose.yml). Dependencies come only from the hashed lock.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    GATEWAY_VAR_DIR=/app/var

WORKDIR /app

COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

COPY . .
# The spool and files directories exist (owned by gateway) before compose mounts
# named volumes on them, so a fresh volume is created writable by the app user.
RUN useradd --system --uid 10001 --home-dir /app gateway \
    && mkdir -p /app/var/ledger-spool /app/var/files \
    && chown -R gateway /app/var
USER gateway

EXPOSE 8000
# One worker per core by default (GATEWAY_WORKERS overrides); see config/serve.py.
CMD ["python", "-m", "config.serve", "--host", "0.0.0.0", "--port", "8000"]
