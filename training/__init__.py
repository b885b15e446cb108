"""Training data and stages; `synth` generates the synthetic audio-puzzle suite (design §8)."""
