# One image for the dispatcher and the GPU workers. PyPI's Linux torch wheel is the CUDA build and brings its
# own CUDA runtime; the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HOME=/cache/huggingface KILN_CACHE_DIR=/cache/kiln
WORKDIR /opt/kiln
RUN pip install torch
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY dispatcher dispatcher
COPY worker worker
RUN pip install .
WORKDIR /manifests
ENTRYPOINT ["kiln"]
CMD ["--help"]
