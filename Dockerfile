# syntax=docker/dockerfile:1
#
# slidescore GPU image for the Ray cluster, the RayJob and the intake CronJob (k8s/).
# The Ray image carries the pinned Ray, Python 3.11 and CUDA; the package goes on top.
#
#   docker build -t <registry>/slidescore:0.1.0-ray2.60.0 .
#
# The tag must carry the Ray version (`-ray2.60.0`): k8s/ sets rayVersion to it and the tests in
# tests/k8s check both against the installed Ray. See docs/kubernetes.md.

ARG RAY_VERSION=2.60.0
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-py311-cu121

# --- build the wheel (throwaway stage; root is fine here) ----------------------------------------
FROM ${BASE_IMAGE} AS wheel
USER root
WORKDIR /src
# README.m[d]: copied when present (pyproject names it as the long description).
COPY pyproject.toml README.m[d] ./
COPY slidescore/ slidescore/
COPY jobs/ jobs/
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG RAY_VERSION
# torch as tested (pyproject allows >=2.4). PyPI's Linux x86_64 torch wheels are CUDA builds that
# bring their own CUDA runtime (nvidia-* wheels); the node only needs a recent enough driver.
ARG TORCH_VERSION=2.13.0
# Empty: torch from PyPI. To choose the CUDA flavour, point at a PyTorch wheel index, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX_URL=""

LABEL org.opencontainers.image.title="slidescore" \
      org.opencontainers.image.description="Distributed patch scoring of gigapixel images on Ray" \
      io.ray.version="${RAY_VERSION}"

# uid 1000 / gid 100 is the base image's `ray` user, which owns the conda environment; the pods
# run as this uid too (runAsUser: 1000) and never as root.
USER 1000:100
COPY --from=wheel --chown=1000:100 /wheels /tmp/wheels
# The lock (constraints.txt: the versions CI passed with) plus the image's Ray and the chosen torch:
# pip installs exactly those versions and never replaces the image's Ray.
COPY --chown=1000:100 constraints.txt /tmp/lock.txt
RUN printf 'ray==%s\ntorch==%s\n' "${RAY_VERSION}" "${TORCH_VERSION}" > /tmp/constraints.txt \
 && pip install --no-cache-dir --constraint /tmp/lock.txt --constraint /tmp/constraints.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
        /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels /tmp/constraints.txt /tmp/lock.txt \
 && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')"

# The sources too, so `python -m jobs.score` / `python -m jobs.intake` work from WORKDIR as in a
# checkout. Root-owned and read-only for uid 1000; byte-compiled now because the pods mount the
# root filesystem read-only.
USER root
WORKDIR /app
COPY jobs/ /app/jobs/
COPY slidescore/ /app/slidescore/
RUN python -m compileall -q /app
USER 1000:100

# No credentials in the image: S3 access comes from the pod (slidescore-s3 Secret or workload
# identity), see docs/kubernetes.md.
CMD ["python", "-m", "jobs.score", "--help"]
