# nadray image: the Ray base image plus nadray and its pinned dependencies.
# One image runs everywhere nadray runs on a cluster: the head and workers started
# by `ray up` (cluster/aws-cluster.yaml) and by KubeRay (cluster/kuberay/*.yaml).
# Build and use: docs/CLUSTER.md.
#
#   GPU (default):  docker build -t nadray:0.1.0-ray2.60.0-gpu .
#   CPU only:       docker build -t nadray:0.1.0-ray2.60.0-cpu \
#                     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The Ray version of the base image must equal the ray pin in pyproject.toml and
# requirements.lock (2.60.0): head, workers and the job driver must all run the
# same Ray, and KubeRay's rayVersion fields say the same. tests/test_cluster.py checks it.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# Where torch comes from. The lock pins torch==2.13.0 without saying which build;
# the wheel index decides: a CUDA 12.x build for the GPU image (it brings its own
# CUDA runtime and needs only the node's NVIDIA driver), the CPU build for the CPU
# image (about 2 GB smaller). Pass the index that matches RAY_IMAGE.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# The Ray images run as the non-root user `ray` (uid 1000, group `users`, gid 100)
# with Python in /home/ray/anaconda3, which that user owns: pip needs no root.
USER ray
WORKDIR /home/ray/nadray

# Dependencies first, so editing nadray's code does not rebuild this layer.
COPY --chown=ray:users pyproject.toml requirements.lock README.md ./
# 1. torch alone, from the chosen index (--no-deps: its dependencies come from the lock in step 2).
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" \
      "$(grep -E '^torch==' requirements.lock)"

COPY --chown=ray:users nadray/ nadray/
COPY --chown=ray:users jobs/ jobs/
# 2. nadray with every dependency constrained by the lock (the same versions CI tests);
#    the torch installed above satisfies torch==2.13.0 and is kept. Not editable: the
#    image is immutable, and `nadray` lands on PATH as a console script.
RUN pip install --no-cache-dir -c requirements.lock . \
 && python -c "import nadray, torch, ray; assert ray.__version__ == '2.60.0', ray.__version__"

# No secrets here: S3 credentials, NADRAY_API_TOKEN and the Ray auth token come from
# the environment at run time (Kubernetes Secrets, the cluster launcher, IAM roles).
# No ENTRYPOINT / CMD / HEALTHCHECK: `ray up` and KubeRay start `ray start` themselves
# and probe Ray's own health endpoints.
