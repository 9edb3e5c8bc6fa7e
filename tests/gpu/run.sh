#!/usr/bin/env bash
# The GPU tests: ember-kernels' CubeCL kernels against f64 references and the CPU kernels, and
# SmolLM2 and Gemma 3 on a wgpu device against the CPU path (whole model, --gpu-layers split,
# device-memory refusal). On a machine with no GPU they run on Mesa's
# lavapipe (software Vulkan; Debian: `apt-get install mesa-vulkan-drivers`); with no Vulkan,
# Metal or DX12 adapter at all every test prints why it skipped and passes.
#
# Debug builds: the wgpu stack compiles about twice as fast as in release (about 18 minutes
# on 2 cores from nothing) and the kernels' speed is not what these tests measure.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo test -p ember-kernels --features wgpu --test cube
cargo test -p ember-kernels --features wgpu --lib cube::
cargo test -p ember-runtime --features wgpu --test cube -- --nocapture
# The Vulkan-only build (SPIR-V; cubecl then reads the device's memory): another build of the
# stack, so only when asked.
if [ "${EMBER_GPU_VULKAN:-0}" = 1 ]; then
    cargo test -p ember-kernels --features vulkan --lib cube::tests -- --nocapture
fi
