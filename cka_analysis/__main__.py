"""``python -m cka_analysis`` is the ``cka-prune`` CLI (also under ``torchrun``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
