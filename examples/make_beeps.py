"""Regenerate examples/beeps.wav, the bundled example clip: 8 s of low noise with four 880 Hz beeps
(at 1.0, 3.2, 3.6 and 6.0 s). Deterministic: the committed file is what this writes.

    python examples/make_beeps.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
BEEPS = [(1.0, 0.2), (3.2, 0.15), (3.6, 0.15), (6.0, 0.3)]


def main() -> None:
    t = np.arange(int(SR * 8.0)) / SR
    x = 0.01 * np.random.default_rng(0).standard_normal(len(t))
    for onset, length in BEEPS:
        m = (t >= onset) & (t < onset + length)
        x[m] += 0.5 * np.sin(2 * np.pi * 880.0 * t[m])
    out = Path(__file__).with_name("beeps.wav")
    sf.write(out, x.astype(np.float32), SR, subtype="PCM_16")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
