#!/usr/bin/env bash
# The small wheels that part 1 of the GPU check needs and the lent GPU image lacks, in ONE folder that
# one `run` call can carry (see docs/testing.md; the full set with DALI is ../shared/tools/gpu-wheels.sh).
#
#   bash tests/gpu/wheels.sh            # from the project root, on the development machine (needs PyPI)
#   -> .gpu1/wheels.tar (14 wheels, 5.8 MiB) and .gpu1/install.sh; carry ".gpu1" in the run call, then on the GPU:
#      bash .gpu1/install.sh && export PYTHONPATH=/tmp/site:$PWD && bash tests/gpu/run.sh part1 "$OUT"
#
# The image has Python 3.12, torch 2.11 (cu130), triton, numpy, pillow, pyyaml, pytest, onnx(runtime)
# (../shared/GPU.md). Pinned to the versions checked on the development machine; --no-deps throughout,
# so nothing here can pull a torch. deepspeed ships only as an sdist: its pure-Python wheel is built here.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
out=.gpu1
rm -rf "$out" && mkdir -p "$out/wheels"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_5_x86_64
      --platform manylinux1_x86_64 --platform any)
want=(
  # DeepSpeed's own requirements (deepspeed 0.19.8 METADATA), less torch / numpy / packaging / tqdm
  hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0 einops==0.8.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0   # pydantic 2.14 needs >= 4.16; the image's torch brings an older one
  # the data package's reader (imported by the training step's data module)
  webdataset==1.0.2 braceexpand==0.1.7
)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$out/wheels" "${want[@]}"
python3 -m pip wheel -q --no-deps -w "$out/wheels" deepspeed==0.19.8
tar cf "$out/wheels.tar" -C "$out" wheels && rm -rf "$out/wheels"
cat > "$out/install.sh" <<'EOS'
# On the GPU machine: unpack the carried wheels and install them into /tmp/site (no index, no deps).
set -e
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p /tmp/gpu1 && tar xf "$here/wheels.tar" -C /tmp/gpu1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/gpu1/wheels/*.whl
echo "installed $(ls /tmp/gpu1/wheels | wc -l) wheels into /tmp/site: export PYTHONPATH=/tmp/site:\$PYTHONPATH"
EOS
size=$(du -sb "$out" | cut -f1)
echo "$out: $(tar tf "$out/wheels.tar" | grep -c '\.whl$') wheels, $((size / 1024 / 1024)) MiB (carry limit 64 MiB with the working tree)"
if [ "$size" -gt $((50 * 1024 * 1024)) ]; then echo "too large to carry with the tree" >&2; exit 1; fi
