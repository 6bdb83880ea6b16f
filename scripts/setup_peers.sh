#!/usr/bin/env bash
# The peers' environment for scripts/compare_peers.py: transformers generate and optimum's ORTModelForCausalLM;
# opt-in, CTranslate2 (a wheel) and llama.cpp (llama-cpp-python, built from its sdist for this CPU).
# Separate from .venv because optimum-onnx 0.1.0 needs transformers < 4.58. torch pinned to the project's
# version and installed first, as scripts/setup.sh does. Run from anywhere:
#
#   bash scripts/setup_peers.sh [--with-ctranslate2] [--with-llama-cpp] [VENV_DIR]
#
# --with-llama-cpp builds a llama-cpp-python wheel once (CPU, -DGGML_NATIVE=ON: the build machine's AVX2 /
# AVX-512; minutes on 2 cores, niced) into $WHEELS (default ~/.cache/nanogpt-deploy/wheels), then installs that
# wheel; a second setup installs it in seconds. It also unpacks llama.cpp's GGUF converter (convert_hf_to_gguf.py,
# conversion/, gguf-py/) from the same sdist into peers/llama.cpp (git-ignored). LLAMA_CPP_VERSION pins the version.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-peers
WITH_CT2=0
WITH_LLAMA=0
for arg in "$@"; do
    case "$arg" in
        --with-ctranslate2) WITH_CT2=1 ;;
        --with-llama-cpp) WITH_LLAMA=1 ;;
        -*) echo "unknown option $arg; use --with-ctranslate2, --with-llama-cpp, [VENV_DIR]" >&2; exit 2 ;;
        *) VENV="$arg" ;;
    esac
done
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
CACHE="${NANOGPT_DEPLOY_CACHE:-$HOME/.cache/nanogpt-deploy}"
WHEELS="${WHEELS:-$CACHE/wheels}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q "torch==2.13.0"  # first and pinned, as scripts/setup.sh does
"$VENV/bin/python" -m pip install -q "transformers>=4.56,<4.58" "optimum-onnx[onnxruntime]==0.1.0" numpy
"$VENV/bin/python" -c "import torch, transformers, optimum.onnxruntime, onnxruntime as ort; \
print('peers ready: torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', ort.__version__)"

if [ "$WITH_CT2" = 1 ]; then
    "$VENV/bin/python" -m pip install -q ctranslate2
    "$VENV/bin/python" -c "import ctranslate2; print('ctranslate2', ctranslate2.__version__)"
fi

if [ "$WITH_LLAMA" = 1 ]; then
    mkdir -p "$WHEELS" "$CACHE/sdists"
    WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$WHEEL" ]; then
        echo "building llama-cpp-python $LLAMA_CPP_VERSION from source (CPU, native; a few minutes to half an hour on 2 cores) into $WHEELS"
        CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
            nice -n 10 "$VENV/bin/python" -m pip wheel -q --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS"
        WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n 1)
    fi
    "$VENV/bin/python" -m pip install -q "$WHEEL" gguf
    # the GGUF converter ships in the sdist only (vendor/llama.cpp), with the gguf-py it was written against
    SDIST="$CACHE/sdists/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
    if [ ! -f "$SDIST" ]; then
        "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" \
            -d "$CACHE/sdists"
    fi
    if [ ! -f peers/llama.cpp/convert_hf_to_gguf.py ]; then
        # extracted beside, then moved into place: an interrupted extraction leaves no half converter behind
        rm -rf peers/.llama.cpp.tmp && mkdir -p peers/.llama.cpp.tmp
        top="llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"
        tar xzf "$SDIST" -C peers/.llama.cpp.tmp --strip-components=3 \
            "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py"
        rm -rf peers/llama.cpp && mv peers/.llama.cpp.tmp peers/llama.cpp
    fi
    "$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, '|', \
llama_cpp.llama_print_system_info().decode().strip(' |'))"
fi
