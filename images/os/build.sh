#!/bin/bash
# `make appliance-image`: the bootable appliance disk image, step by step, into $IMAGE_BUILD.
#
#   debian/          bookworm root tree (mkrootfs.sh; kept between builds)
#   llama-wheel/     llama-cpp-python built for any x86-64 with AVX2 (QEMU's TCG has no AVX-512)
#   wheels/          the wheelhouse (wheelhouse.py)
#   base/            the root tree with Palisade installed (mkbase.sh; rebuilt when its inputs change)
#   release.key, trust.json   the release signing key and the trust file that pins it (kept)
#   palisade-$IMAGE_VERSION.pimg   the signed bundle (`palisade image build`)
#   grub.lnx         GRUB core image with grub.cfg (mkgrub.sh), for QEMU's -kernel
#   disk.img         GPT disk: the bundle in slot A on trial, the data partition (mkdisk.sh)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/../.."
out=${IMAGE_BUILD:-var/image-build}
version=${IMAGE_VERSION:-1.0.0}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1767225600}  # 2026-01-01
python=.venv/bin/python
palisade=$(readlink -f .venv/bin/palisade)
mkdir -p "$out"
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

if [ ! -d "$out/debian/usr" ]; then
    step "Debian root tree"
    images/os/mkrootfs.sh "$out/debian"
fi

llama=$($python -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')
if ! ls "$out/llama-wheel"/llama_cpp_python-"$llama"-*.whl > /dev/null 2>&1; then
    step "llama-cpp-python $llama without -march=native (slow: compiles llama.cpp)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        $python -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
        -w "$out/llama-wheel" "llama-cpp-python==$llama"
fi

step "wheelhouse"
$python -m images.os.wheelhouse "$out/wheels" "$out/llama-wheel" | wc -l

stamp=$(cat "$out"/wheels/*.whl images/os/mkbase.sh $(find images/os/rootfs images/os/units -type f | sort) | sha256sum)
if [ ! -d "$out/base" ] || [ "$(cat "$out/base.stamp" 2>/dev/null)" != "$stamp" ]; then
    step "root tree with Palisade"
    rm -f "$out/base.stamp"
    images/os/mkbase.sh "$out/debian" "$out/wheels" "$out/base"
    echo "$stamp" > "$out/base.stamp"
fi

if [ ! -f "$out/release.key" ]; then
    step "release key"
    "$palisade" image keys create --out "$out/release.key" --trust "$out/trust.json"
fi

bundle=$out/palisade-$version.pimg
if [ ! -f "$bundle" ] || [ "$out/base.stamp" -nt "$bundle" ] \
    || [ images/os/appliance-image.toml -nt "$bundle" ] || [ images/os/appliance.toml.tmpl -nt "$bundle" ]; then
    step "bundle $version"
    "$palisade" image build images/os/appliance-image.toml --version "$version" \
        --out "$bundle" --key "$out/release.key"
fi

step "GRUB"
images/os/mkgrub.sh "$out/grub.lnx"

step "disk image"
PALISADE=$palisade images/os/mkdisk.sh "$bundle" "$out/trust.json" \
    "$out/disk.img" "${IMAGE_SLOT_SIZE:-1G}" "${IMAGE_DATA_SIZE:-512M}"
step "done: $out/disk.img (boot it: images/os/boot-qemu.sh $out/disk.img $out/grub.lnx)"
