"""Train a lightning-bn model from a YAML config with LightningCLI.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/quickstart.yaml --model.init_args.norm none
    python train.py test --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt

Run ``python train.py fit --help`` for every option.
"""

from lightning_bn.cli import main

if __name__ == "__main__":
    main()
