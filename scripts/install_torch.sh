#!/usr/bin/env bash
# Installs torch/torchvision into a venv before the package (called by `make install`).
#
#   install_torch.sh PYTHON BUILD "TORCH" CPU_INDEX "CPU_FALLBACK"
#
# BUILD auto: cuda when `nvidia-smi -L` lists a GPU, else cpu.
# cuda: TORCH from the configured package index (PyPI's Linux wheels: ~4 GB of CUDA libraries).
# cpu:  TORCH from PyTorch's CPU index CPU_INDEX; where that index cannot be reached (a
#       machine that reaches only a mirror), CPU_FALLBACK from the configured registries
#       (empty: no fallback). Then checks that the torch installed is a CPU build.
# Exits non-zero with a message saying what failed and what to set when torch does not install.
set -euo pipefail
python=$1 build=$2 torch=$3 cpu_index=$4 fallback=${5:-}

fail() {
    echo "make install: cannot install torch ($1)." >&2
    echo "  Pick another build or pair: make install TORCH_BUILD=cpu|cuda TORCH='torch==X torchvision==Y'" >&2
    echo "  (CPU builds: TORCH_CPU_INDEX=<index URL>, TORCH_CPU_FALLBACK='<pip requirements>')" >&2
    exit 1
}

if [ "$build" = auto ]; then
    if nvidia-smi -L >/dev/null 2>&1; then build=cuda; else build=cpu; fi
    echo "torch: TORCH_BUILD=auto -> $build"
fi

case $build in
cuda)
    echo "torch: CUDA build from the package index: $torch"
    # shellcheck disable=SC2086
    "$python" -m pip install -q $torch || fail "CUDA build $torch"
    ;;
cpu)
    if "$python" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=15)" \
            "$cpu_index" 2>/dev/null; then
        echo "torch: CPU build from $cpu_index: $torch"
        # shellcheck disable=SC2086
        "$python" -m pip install -q --index-url "$cpu_index" $torch || fail "CPU build $torch from $cpu_index"
    elif [ -n "$fallback" ]; then
        echo "torch: $cpu_index cannot be reached; CPU build from the configured registries: $fallback"
        # shellcheck disable=SC2086
        "$python" -m pip install -q $fallback || fail "$cpu_index cannot be reached and the fallback $fallback does not install"
        # A torchvision left by an earlier CUDA install cannot load beside this torch, and
        # transformers imports it when it is there.
        if "$python" -m pip show -q torchvision >/dev/null 2>&1 && ! "$python" -W ignore -c "import torchvision" 2>/dev/null; then
            echo "torch: removing torchvision, which does not load beside this torch"
            "$python" -m pip uninstall -y -q torchvision
        fi
    else
        fail "CPU build: $cpu_index cannot be reached and TORCH_CPU_FALLBACK is empty"
    fi
    "$python" -W ignore -c "import sys, torch; sys.exit(torch.version.cuda is not None)" \
        || fail "a CUDA build of torch was installed where a CPU build was asked for"
    ;;
*)
    echo "make install: TORCH_BUILD=$build: use auto, cpu or cuda" >&2
    exit 2
    ;;
esac
