"""`python -m qcompile ...`: the CLI (torchrun starts fine-tuning ranks this way)."""

from qcompile.cli import main

main()
