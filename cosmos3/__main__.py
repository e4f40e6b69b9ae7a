"""`python -m cosmos3 ...` (e.g. `torchrun --nproc-per-node 8 -m cosmos3 train recipe.toml`)."""

from .cli import main

main()
