# longscribe server on an NVIDIA GPU. Build: docker build -t longscribe .
# Run:   docker run --gpus all -p 50051:50051 -v longscribe-data:/data longscribe
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LONGSCRIBE_HOST=0.0.0.0 LONGSCRIBE_PORT=50051 LONGSCRIBE_DATA_DIR=/data
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ffmpeg libjemalloc2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/longscribe
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CUDA build of torch first, so the server extra does not pull a different one.
RUN pip install --upgrade pip && pip install torch --index-url https://download.pytorch.org/whl/cu124
COPY pyproject.toml README.md ./
COPY protos protos
COPY service service
COPY client client
RUN pip install '.[server]'

RUN useradd --system --home /data longscribe && mkdir -p /data && chown longscribe /data
USER longscribe
VOLUME /data
EXPOSE 50051
ENTRYPOINT ["longscribe", "serve"]
