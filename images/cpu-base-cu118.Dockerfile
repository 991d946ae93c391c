# A CPU stand-in for pytorch/pytorch:2.1.2-cuda11.8-cudnn8-runtime (the cu118 flavor's base), for
# `make image-smoke` only (never a base of a published image): Python 3.10 and torch 2.1.2 on PATH, g++.
# Debian bookworm has no Python 3.10, so the machine's own build is copied in (images/smoke.sh puts it in the
# context as python/): a pyenv-style build finds its libpython by the path it was built for, so it goes to that
# same path (PYTHON_PREFIX). torch 2.1.2 is PyPI's build (CUDA 12.1 libraries, runs on the CPU), as in .venv-cu118.
# Python 3.10's own pip (23.0) trusts only its bundled certifi: PIP_CERT points it at the system's store (with the
# host's CAs) for the upgrade; pip 26 uses the system's store itself.
# Context: python/, certs/ (the host's extra CA certificates: HTTPS to PyPI may pass through an egress proxy that
# only the host trusts).
ARG DEBIAN_BASE=local/debian:bookworm

# hadolint ignore=DL3006
FROM ${DEBIAN_BASE}
ARG PYTHON_PREFIX
COPY certs/ /usr/local/share/ca-certificates/
# The shared libraries Python's own modules link against (ssl, sqlite3, ctypes, lzma, bz2, readline, uuid, ...).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates g++ libssl3 libsqlite3-0 libffi8 libbz2-1.0 liblzma5 zlib1g libreadline8 libncursesw6 \
      libuuid1 libnsl2 libtirpc3 libexpat1 \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY python/ ${PYTHON_PREFIX}/
# hadolint ignore=DL3013
RUN "${PYTHON_PREFIX}/bin/python3.10" -c "import ssl, sqlite3, ctypes, lzma, bz2, zlib, uuid, venv" \
 && "${PYTHON_PREFIX}/bin/python3.10" -m venv /opt/py \
 && PIP_CERT=/etc/ssl/certs/ca-certificates.crt /opt/py/bin/pip install --no-cache-dir --upgrade pip==26.3 \
 && /opt/py/bin/pip install --no-cache-dir torch==2.1.2
ENV PATH=/opt/py/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The prefix may be under a home folder (pyenv's: /root/.pyenv/...): the jobs run as any uid (docker run --user),
# so every folder above it must let them through to the interpreter.
RUN d="${PYTHON_PREFIX}"; while [ "$d" != / ]; do chmod a+rx "$d"; d="$(dirname "$d")"; done
RUN python -c "import sys, torch; assert sys.version_info[:2] == (3, 10); print('torch', torch.__version__, 'python', sys.version.split()[0])"
