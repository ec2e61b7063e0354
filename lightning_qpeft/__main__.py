"""python -m lightning_qpeft {fit,validate,test,predict} ... (see cli.py)."""

from lightning_qpeft.cli import main

if __name__ == "__main__":
    main()
