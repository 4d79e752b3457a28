# syntax=docker/dockerfile:1
# The canary controller's image: `docker build -t canary:0.1.0 .` (see the README).
#
# Two stages: the build stage installs the package (and only the runtime dependencies, not the
# [dev] extras) into a virtualenv; the runtime stage copies that virtualenv onto the same base,
# without pip's caches or the sources, and runs as the non-root user manifests/ expects.
#
# The base is pinned by tag. To pin its digest as well, replace the default with
# python:3.12-slim-bookworm@sha256:<digest of the tag you reviewed>, or pass
# --build-arg PYTHON_IMAGE=... ; any Debian-like image with python3 (>= 3.11) and its venv
# module works (CI builds it on a Debian base made with debootstrap, see scripts/image).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Behind a TLS-intercepting proxy, pip needs its CA: mount it for the build and name it here,
# e.g. --build-arg PIP_CERT=/etc/ssl/build-ca.crt (scripts/image does). Not kept in the image.
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml README.md ./
COPY canary ./canary
COPY analysis ./analysis
# Not editable, not [dev]: the runtime package and its dependencies, byte-compiled.
RUN python3 -m venv /opt/canary \
    && /opt/canary/bin/pip install --no-compile . \
    && /opt/canary/bin/python -m compileall -q /opt/canary/lib \
    && /opt/canary/bin/pip uninstall -y pip \
    && /opt/canary/bin/canary --help >/dev/null

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/canary /opt/canary
# HOME: uid 65532 has no passwd entry, and kubernetes_asyncio asks for a home directory when
# imported; /tmp is the one writable place (an emptyDir in manifests/).
ENV PATH=/opt/canary/bin:/usr/local/bin:/usr/bin:/bin \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The uid/gid manifests/deployment.yaml runs as (runAsNonRoot needs a numeric user).
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["canary"]
CMD ["--help"]
