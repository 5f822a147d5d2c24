"""``python -m lightning_bn fit --config ...``: the LightningCLI of ``train.py``, from any directory.

Sweeps start their training processes this way, so they need no repository checkout.
"""

from lightning_bn.cli import main

if __name__ == "__main__":
    main()
