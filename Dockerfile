# The serving image: the Gradio app and its ONNX models, no torch.
#   docker build -t resnet-trio .
#   docker run --rm -p 7860:7860 resnet-trio
#   docker run --rm -p 7860:7860 -v "$PWD/other-models:/app/models:ro" resnet-trio
#   docker build --build-arg OPENVINO=0 -t resnet-trio .   # ONNX Runtime only (180 MB smaller)
FROM python:3.11-slim

# 1: also install OpenVINO (the "openvino" extra), which --engine auto picks where it is faster.
ARG OPENVINO=1

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1

WORKDIR /app

# The base and "serve" dependencies (and with OPENVINO=1 the "openvino" extra), exactly as
# locked with hashes in requirements/ (made from pyproject.toml by scripts/lock-serve); this
# layer is rebuilt only when the locks change, not when the code or the models do.
COPY requirements/ /tmp/requirements/
RUN lock=serve.lock; if [ "$OPENVINO" = "1" ]; then lock=serve-openvino.lock; fi; \
    pip install --no-cache-dir --require-hashes --no-deps -r "/tmp/requirements/$lock" \
    && rm -r /tmp/requirements

# The app runs from source: serve/ and the torch-free packages it shares with training.
COPY common/ common/
COPY imaging/ imaging/
COPY serve/ serve/
COPY models/ models/

RUN useradd --create-home --uid 10001 app
USER app

EXPOSE 7860
# /readyz: 200 once every model is loaded and warmed and the queue runs (503 before).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/readyz', timeout=4)"
CMD ["python", "-m", "serve.app", "--host", "0.0.0.0", "--port", "7860"]
