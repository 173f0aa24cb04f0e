"""``python -m cimlab``: the command line (also what ``torchrun ... -m cimlab train ...`` runs in every rank)."""

from cimlab.cli import main

if __name__ == "__main__":
    main()
