# Training image: the project with its pinned requirements, installed as `make venv` does.
#
#   docker build -t resnet-keras:1.0 .                               # CPU
#   docker build --build-arg DEVICE=gpu -t resnet-keras:1.0-gpu .    # NVIDIA GPUs (CUDA wheels)
#   docker run --rm -v "$PWD/runs:/app/runs" -v "$HOME/data/cifar10:/data/cifar10:ro" \
#       resnet-keras:1.0 python -m app.train --flagfile=app/configs/cifar10_cpu_quick.flags \
#       --data_dir=/data/cifar10 --model_dir=runs/cpu_quick
#
# deploy/tfjob.yaml runs the GPU image on several machines (Kubeflow TFJob).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu: requirements.txt as it is; gpu: plus tensorflow[and-cuda] at the same TF version
# (the CUDA/cuDNN pip wheels; the host needs only the NVIDIA driver).
ARG DEVICE=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /app

COPY requirements.txt ./
RUN python -m pip install --quiet -r requirements.txt \
 && if [ "$DEVICE" = gpu ]; then \
      python -m pip install --quiet "tensorflow[and-cuda]==$(sed -n 's/^tensorflow==//p' requirements.txt)"; \
    elif [ "$DEVICE" != cpu ]; then echo "DEVICE must be cpu or gpu, not $DEVICE" >&2; exit 2; fi

COPY common/ common/
COPY models/ models/
COPY export/ export/
COPY app/ app/

# Runs and data are volumes; a training run writes only under --model_dir.
CMD ["python", "-m", "app.train", "--flagfile=app/configs/cifar10_cpu_quick.flags", "--model_dir=runs/cpu_quick"]
