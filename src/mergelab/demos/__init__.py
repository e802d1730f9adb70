"""What `mergelab demo` runs: `digits` (four task models from one base, merged with every method) and
`minilm` (two fine-tunes of the real MiniLM through the whole recipe -> folder -> sentence-transformers path).

Kept out of the core library: only the `demo` command and the noise-scale experiment
(analysis/noise_sweep.py, which reuses the digits data and MLP) import them.
"""
