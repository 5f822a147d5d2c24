from lightning_bn.surface.cli import main

if __name__ == "__main__":
    main()
