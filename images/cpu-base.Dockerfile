# A CPU stand-in for pytorch/pytorch, for `make image-smoke` only (never a base of a published image):
# Debian bookworm's Python 3.11 in a venv on PATH, torch from the wheel in the build context, g++.
# Context (images/smoke.sh makes it): torch-*.whl, certs/ (the host's extra CA certificates: HTTPS to PyPI
# may pass through an egress proxy that only the host trusts).
ARG DEBIAN_BASE=local/debian:bookworm

# hadolint ignore=DL3006
FROM ${DEBIAN_BASE} AS os
COPY certs/ /usr/local/share/ca-certificates/
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates python3 python3-venv python3-dev g++ \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/py && /opt/py/bin/pip install --no-cache-dir --upgrade pip==26.3

# The wheel is installed in a stage of its own, so that the image does not carry it too. The label lets
# images/smoke.sh remove this stage's image once the build is done.
FROM os AS wheel
LABEL t2s.smoke.stage=wheel
COPY torch-*.whl /tmp/
# hadolint ignore=DL3013
RUN /opt/py/bin/pip install --no-cache-dir /tmp/torch-*.whl

FROM os
COPY --from=wheel /opt/py /opt/py
ENV PATH=/opt/py/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -c "import sys, torch; assert sys.version_info[:2] == (3, 11); print('torch', torch.__version__, 'python', sys.version.split()[0])"
