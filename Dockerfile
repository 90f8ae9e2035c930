# longscribe server on an NVIDIA GPU. Build: docker build -t longscribe .
# Run:   docker run --gpus all -p 50051:50051 -p 9100:9100 \
#          -v longscribe-data:/data -v longscribe-models:/models longscribe
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LONGSCRIBE_HOST=0.0.0.0 LONGSCRIBE_PORT=50051 LONGSCRIBE_DATA_DIR=/data \
    LONGSCRIBE_METRICS_PORT=9100 XDG_CACHE_HOME=/models
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ffmpeg libjemalloc2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/longscribe
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CUDA build of the torch version the tests run on, first, so the server extra does not
# pull a different one.
RUN pip install --upgrade pip \
 && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124
COPY pyproject.toml README.md ./
COPY protos protos
COPY service service
COPY client client
RUN pip install '.[server]'

RUN useradd --system --home /data longscribe && mkdir -p /data /models \
 && chown longscribe /data /models
USER longscribe
# jobs and media; downloaded Whisper weights (openai-whisper caches under $XDG_CACHE_HOME)
VOLUME ["/data", "/models"]
EXPOSE 50051 9100
# SERVING once the model is loaded (grpc.health.v1, no token needed by default)
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 CMD \
  python3 -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
sys.exit(g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), \
timeout=4).status != h.HealthCheckResponse.SERVING)"
ENTRYPOINT ["longscribe", "serve"]
