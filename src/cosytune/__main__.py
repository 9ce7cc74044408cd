"""``python -m cosytune`` (also what ``torchrun -m cosytune train ...`` runs)."""

from cosytune.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
