"""``python -m igpt`` is the ``igpt`` command (so ``torchrun -m igpt pretrain ...`` works)."""

from igpt.cli import main

if __name__ == "__main__":
    main()
