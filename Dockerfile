# The image cluster/kuberay-rayservice.yaml runs (tests/test_dockerfile.py checks that they agree):
#   docker build -t moe-serve:0.1.0-gpu .
# rayproject/ray of the Ray this project is tested with, the project installed from this checkout
# (not editable), and the tiny checkpoint at /home/ray/models/tiny, where serve.yaml's relative
# `models/tiny` resolves (KubeRay starts Ray in /home/ray). Mount real weights and give their path.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
LABEL org.opencontainers.image.title="moe-serve" org.opencontainers.image.version="0.1.0"
COPY --chown=ray . /tmp/moe-serve
RUN pip install --no-cache-dir /tmp/moe-serve \
 && rm -rf /tmp/moe-serve \
 && moe-serve init-model /home/ray/models/tiny --preset tiny --seed 0
WORKDIR /home/ray
# Serve's HTTP proxy (OpenAI routes), the gRPC gateway, Ray's dashboard
EXPOSE 8000 9000 8265
