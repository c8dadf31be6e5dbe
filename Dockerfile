# The course's grading image: CPU-only PyTorch from conda-forge (the same
# environment as Binder, binder/environment.yml), tlhelpers installed, and
# Dask for grading on a cluster. Build it from the course folder:
#
#   docker build -t tlcourse-grader .
#
# Grade a cohort with no network, the submissions read-only (the container
# is the sandbox, so the grader's own bubblewrap sandbox is switched off):
#
#   docker run --rm --network none \
#       -v "$PWD/submissions:/submissions:ro" -v "$PWD/out:/out" \
#       tlcourse-grader tlcourse grade /submissions --no-sandbox \
#       --out /out/gradebook.csv
#
# Or run it as a Dask worker of a grading cluster:
#
#   docker run --rm tlcourse-grader dask worker tcp://SCHEDULER:8786
FROM mambaorg/micromamba:1.5.10-bookworm-slim

COPY --chown=$MAMBA_USER:$MAMBA_USER binder/environment.yml /tmp/env.yml
RUN micromamba install --yes --name base --file /tmp/env.yml \
        "dask-core>=2024.1" "distributed>=2024.1" \
    && micromamba clean --all --yes

ARG MAMBA_DOCKERFILE_ACTIVATE=1
COPY --chown=$MAMBA_USER:$MAMBA_USER . /home/mambauser/course
WORKDIR /home/mambauser/course
# Dependencies come from the environment above: --no-deps keeps pip from
# pulling a second (CUDA) torch.
RUN python -m pip install --no-deps --no-cache-dir . \
    && tlcourse doctor --no-online

ENV OMP_NUM_THREADS=1 \
    TLH_OFFLINE=1
WORKDIR /work
